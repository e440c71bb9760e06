"""What a conversion will write, before writing it: `dgemma convert --dry-run` and `--fit SIZE`.

Works from a full checkpoint or from its config alone (no weights needed), so a 26B plan can be made
anywhere. With `--fit`, the per-tensor types come from dgemma.quant.planner and the VRAM estimate is
printed with its breakdown.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from gguf import GGMLQuantizationType

from dgemma.quant.planner import PLAN_CTX, GiB, Plan, fit, nbytes, parse_size
from dgemma.quant.presets import PRESETS, Preset

from .arch import ModelConverter, converter_for
from .source import Checkpoint, ConvertError
from .writer import parse_type, plan_tensors

DEFAULT_CTX = PLAN_CTX
METADATA_ALLOWANCE = 8 << 20  # tokenizer and keys of a 262k-vocabulary model: ~6 MiB


@dataclass
class ConversionPlan:
    tensors: list[tuple[str, tuple[int, ...], GGMLQuantizationType]]
    preset: Preset
    fit: Plan | None
    from_weights: bool

    @property
    def tensor_bytes(self) -> int:
        return sum(nbytes(s, t) for _, s, t in self.tensors)

    def overrides(self) -> dict[str, GGMLQuantizationType]:
        return {n: t for n, _, t in self.tensors}


def _shapes(ckpt: Checkpoint, conv: ModelConverter) -> list[tuple[str, tuple[int, ...]]]:
    if ckpt.tensors:
        return [(t.name, t.shape) for t in plan_tensors(ckpt, conv, PRESETS["F32"])]
    return conv.gguf_shapes()


def make_plan(src, out_type: str = "Q4_K_M", fit_size: str | None = None, ctx: int = DEFAULT_CTX,
              pad_experts: bool = False) -> ConversionPlan:
    preset = parse_type(out_type)
    try:
        ckpt = Checkpoint.open(src)
    except ConvertError as e:
        if "no safetensors weights" not in str(e):
            raise
        ckpt = Checkpoint.open(src, weights=False)  # plan from the config alone
    conv = converter_for(ckpt, pad_experts=pad_experts)
    shapes = _shapes(ckpt, conv)
    fitted = None
    if fit_size is not None:
        try:
            budget = parse_size(fit_size)
        except ValueError as e:
            raise ConvertError(f"--fit: {e}") from None
        fitted = fit(shapes, conv.model_facts(), conv.model_dims(), budget, ctx, start=preset if preset.quantized else None)
        types = fitted.types
    else:
        from dgemma.quant.presets import preset_types

        types = preset_types(shapes, preset, conv.model_facts())
    rows = [(n, s, conv.tensor_force_quant(n, s) or types[n]) for n, s in shapes]
    return ConversionPlan(rows, preset, fitted, bool(ckpt.tensors))


def format_plan(p: ConversionPlan, per_tensor: bool = True) -> str:
    lines = []
    if per_tensor:
        lines.append(f"{'tensor':<40} {'shape (ggml)':<22} {'type':<6} {'MiB':>10}")
        for name, shape, t in p.tensors:
            dims = "x".join(str(d) for d in reversed(shape))
            lines.append(f"{name:<40} {dims:<22} {t.name:<6} {nbytes(shape, t) / (1 << 20):>10.2f}")
    counts = Counter(t.name for _, _, t in p.tensors)
    sizes = Counter()
    for _, s, t in p.tensors:
        sizes[t.name] += nbytes(s, t)
    lines.append("by type: " + ", ".join(f"{k} {counts[k]} ({sizes[k] / GiB:.2f} GiB)" for k in sorted(counts)))
    n_params = sum(_prod(s) for _, s, _ in p.tensors)
    size = p.tensor_bytes + METADATA_ALLOWANCE
    lines.append(f"file: ~{size / GiB:.2f} GiB ({size / 1e9:.2f} GB), {len(p.tensors)} tensors, "
                 f"{n_params / 1e9:.2f} B parameters, {p.tensor_bytes * 8 / n_params:.2f} bits/weight"
                 + ("" if p.from_weights else " (planned from config.json alone)"))
    if p.fit is not None:
        f = p.fit
        streamed = f" with the experts of {len(f.host_layers)} layers streamed from host RAM" if f.host_layers else ""
        lines.append(f"--fit {f.budget / GiB:.1f} GiB: {'fits' + streamed if f.fits else 'DOES NOT FIT'}")
        lines += f.breakdown.lines()
        if f.host_layers:
            lines.append(f"  {'streamed experts':<20} {(f.streamed_vram - f.breakdown.total) / GiB:7.2f} GiB  "
                         f"({f.host_bytes / GiB:.2f} GiB in host RAM, two VRAM slots counted)")
            lines.append(f"  {'VRAM, streaming':<20} {f.streamed_vram / GiB:7.2f} GiB")
        if f.steps:
            lines.append("lowered: " + "; ".join(f.steps))
        lines += [f"note: {n}" for n in f.notes]
    return "\n".join(lines)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n
