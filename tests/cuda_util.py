"""What the cuda backend's CPU tests share: the kernels replaced by their torch references (ops.*_reference,
which tests/test_cuda_kernels.py compares with the kernels on a GPU), the cuda weight objects loaded on the
CPU, and one prompt and canvas decoded by two models."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dgemma.plugin.config import ModelConfig
from dgemma.plugin.cuda import head_ops, ops
from dgemma.plugin.cuda.weights import load_cuda_weights
from dgemma.plugin.inspect import open_gguf
from dgemma.plugin.kv_cache import KVCache
from dgemma.plugin.model import DiffusionGemma, Weights

# a kernel's definition in csrc: (name, parameter list); tests/test_cuda_launch.py checks launches against the
# parameters, tests/cuda_emu.py names extern "C" kernels by their type
KERNEL_SIGNATURE = re.compile(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)\s*\{")

# every op the backend launches, each with a `<name>_reference` beside it in its module
KERNEL_OPS = {ops: ("get_rows", "get_rows_f16", "quantize_q8", "accept_renoise",
                    *(name for pair in ops.MATMULS.values() for name in pair if name)),
              head_ops: ("head_stats", "head_merge", "head_chunk_stats", "head_merge_into")}


@contextlib.contextmanager
def kernel_device(where: str, arch: int = 90) -> Iterator[str]:
    """Where the kernel tests run the csrc kernels: "gpu" gives "cuda" (skipped without a usable GPU), "emu"
    gives "cpu" with the kernels emulated as on a GPU of compute capability arch / 10 (skipped without the
    emulator's compiler)."""
    if where == "gpu":
        from dgemma.plugin.cuda import CudaUnavailable, check_cuda

        try:
            check_cuda()
        except CudaUnavailable as e:
            pytest.skip(str(e))
        yield "cuda"
        return
    import cuda_emu

    reason = cuda_emu.unavailable()
    if reason:
        pytest.skip(reason)
    with cuda_emu.emulated(arch=arch):
        yield "cpu"


def use_references(monkeypatch) -> None:
    for module, names in KERNEL_OPS.items():
        for name in names:
            monkeypatch.setattr(module, name, getattr(module, f"{name}_reference"))


def cpu_cuda_weights(path: Path, host_layers: tuple[int, ...] | list[int] = ()) -> tuple[Weights, ModelConfig]:
    """The cuda backend's weight objects for the GGUF at `path`, on the CPU (the experts of host_layers streamed
    through slots, plugin/cuda/offload.py), and its config."""
    reader = open_gguf(path)
    cfg = ModelConfig.from_gguf(reader, path)
    return load_cuda_weights(reader, cfg, path, device="cpu", host_layers=host_layers), cfg


def held_bytes(tree: object) -> int:
    """Bytes of the tensors a weight tree holds (Weights, LayerWeights, the cuda weight objects; lists), each
    tensor once by (address, bytes): one shared by two fields (the embedding and the tied head) counts once."""
    seen: dict[tuple[int, int], int] = {}

    def walk(obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            seen[(obj.data_ptr(), obj.nbytes)] = obj.nbytes
        elif isinstance(obj, (list, tuple)):
            for x in obj:
                walk(x)
        elif type(obj).__module__.startswith("dgemma."):
            for x in vars(obj).values():
                walk(x)

    walk(tree)
    return sum(seen.values())


def decode_both(ref: DiffusionGemma, model: DiffusionGemma, prompt_len: int, before=lambda: None):
    """The same random prompt encoded and canvas decoded by two models (`before()` runs just before the
    second model's encode): (logits of ref, logits of model, canvas, ref's cache, model's cache)."""
    cfg = ref.cfg
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, prompt_len), generator=g)
    canvas = torch.randint(3, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    c1, c2 = KVCache(), KVCache()
    ref.encode(prompt, c1)
    before()
    model.encode(prompt, c2)
    return ref.decode(canvas, c1), model.decode(canvas, c2), canvas, c1, c2
