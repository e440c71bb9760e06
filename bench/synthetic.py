"""Synthetic quantized weights at a model's real shapes, for the GPU benchmarks: random GGML block bytes with
sane fp16 scales, made on the device in seconds (timing does not depend on the values).

- `synthetic_blocks`: one tensor's bytes; `SyntheticTensors`: a plan's tensors as the cuda loader's
  TensorSource (plugin/cuda/weights.py), vectors as ones and the router as small random floats;
- `model_config` / `plan_rows`: the ModelConfig and the per-tensor (name, shape, type) of a conversion
  plan (`dgemma convert --dry-run` / `--fit`) from a config.json alone; bench/configs/ holds the 26B-A4B's;
- `timed`: mean milliseconds of a call, synchronised with the device.
"""

from __future__ import annotations

from pathlib import Path

import time

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from dgemma.plugin.config import ModelConfig

Q = GGMLQuantizationType
CONFIG_26B = Path(__file__).resolve().parent / "configs" / "diffusiongemma-26b-a4b"
SCALE_FIELDS = {  # byte ranges of the fp16 scales inside a block (ggml-common.h layouts)
    Q.Q8_0: [(0, 2)], Q.Q4_0: [(0, 2)], Q.Q5_0: [(0, 2)], Q.Q5_1: [(0, 2), (2, 4)], Q.Q2_K: [(80, 82), (82, 84)],
    Q.Q3_K: [(108, 110)], Q.Q4_K: [(0, 2), (2, 4)], Q.Q5_K: [(0, 2), (2, 4)], Q.Q6_K: [(208, 210)],
}
FLOAT_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}


def synthetic_blocks(rows: int, k: int, qtype: Q, device: str = "cuda", scale: float = 0.01) -> torch.Tensor:
    """[rows, row_bytes] uint8: random blocks whose fp16 scales are all `scale`; float types: N(0, scale)."""
    if qtype in FLOAT_TYPES:
        return (torch.randn(rows, k, device=device) * scale).to(FLOAT_TYPES[qtype]).view(torch.uint8).view(rows, -1)
    bs, ts = GGML_QUANT_SIZES[qtype]
    w = torch.randint(0, 256, (rows, k // bs, ts), dtype=torch.uint8, device=device)
    half = torch.tensor([scale], dtype=torch.float16).view(torch.uint8).to(device)  # [2] bytes
    for a, b in SCALE_FIELDS[qtype]:
        w[:, :, a:b] = half
    return w.view(rows, -1)


class SyntheticTensors:
    """A conversion plan's tensors, made up on demand (plugin/cuda/weights.TensorSource)."""

    def __init__(self, rows: list[tuple[str, tuple[int, ...], Q]]) -> None:
        self.rows = {name: (tuple(shape), qtype) for name, shape, qtype in rows}

    def shape(self, name: str) -> list[int] | None:
        row = self.rows.get(name)
        return None if row is None else list(row[0])

    def qtype(self, name: str) -> Q:
        return self.rows[name][1]

    def raw(self, name: str, device: str) -> torch.Tensor:
        shape, qtype = self.rows[name]
        lead = 1
        for d in shape[:-1]:
            lead *= d
        return synthetic_blocks(lead, shape[-1], qtype, device).view(*shape[:-1], -1)

    def floats(self, name: str, device: str) -> torch.Tensor:
        shape, _ = self.rows[name]
        if len(shape) == 2:  # the router [E, D]: small random logits, so that tokens spread over the experts
            return torch.randn(*shape, device=device) * shape[1] ** -0.5
        return torch.ones(*shape, device=device)  # norms, scales, rope divisors


def model_config(config_dir: str | Path) -> ModelConfig:
    """The ModelConfig a converted file of this checkpoint (or config.json alone) would have."""
    from dgemma.convert.arch import KV, converter_for
    from dgemma.convert.source import Checkpoint

    conv = converter_for(Checkpoint.open(config_dir, weights=False))
    kv = KV()
    conv.set_gguf_parameters(kv)
    return ModelConfig.from_fields(lambda key, default=None: kv.items[key][0] if key in kv.items else default,
                                   conv.n_vocab, config_dir)


def plan_rows(config_dir: str | Path, plan: str, ctx: int = 8192) -> list[tuple[str, tuple[int, ...], Q]]:
    """(name, PyTorch shape, type) per tensor: a preset name ("Q4_K_M") or a VRAM budget ("12GB", the
    --fit plan from Q4_K_M at `ctx`)."""
    from dgemma.convert.plan import make_plan

    fit = plan if plan[:1].isdigit() else None
    p = make_plan(config_dir, "Q4_K_M" if fit else plan, fit, ctx)
    if p.fit is not None and not p.fit.fits:
        raise SystemExit(f"--fit {plan}: no plan fits")
    return p.tensors


def gpu_capability(tool: str) -> tuple[int, int]:
    """The GPU's compute capability, or exit with one line naming the tool and what is missing (CuPy, a GPU ...)."""
    from dgemma.plugin.cuda import CudaUnavailable, check_cuda

    try:
        return check_cuda()
    except CudaUnavailable as e:
        raise SystemExit(f"{tool}: {e}") from None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int = 1, warmup: bool = True) -> float:
    """Mean ms of `repeat` calls (after one warm-up call unless warmup=False), the device synchronised."""
    if warmup:
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat * 1e3
