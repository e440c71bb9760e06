"""Fit a model into a VRAM budget: choose GGML types per tensor class, estimate what the GPU will hold.

Estimate = weights + KV cache at the requested context + canvas activations + workspace + CUDA context.
Starting from the Q4_K_M preset (llama.cpp's rules), the planner lowers whole tensor classes one type
step at a time, cheapest quality first: expert gate_up, expert down, dense FFN, self-conditioning,
attention, embeddings. Rows that are not multiples of 256 (expert down rows of 704, dense down rows of
2112) can only take 32-block types in a llama.cpp-compatible file, so their floor is Q4_0. When even
the floors do not fit, the plan says so and prices two ways out: zero-padding the expert down rows to a
multiple of 256 (a dgemma-only layout) and keeping some layers' experts in host RAM.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .presets import PRESETS, ModelFacts, Preset, block_size, preset_types

Q = GGMLQuantizationType
GiB = 1 << 30
MiB = 1 << 20

CUDA_CONTEXT = 450 * MiB  # driver context + cuBLAS handles, measured typically 300-500 MiB
WORKSPACE = 256 * MiB  # dequant scratch, MoE grouping buffers, attention temporaries
# the context whose KV cache the --fit plans hold (--ctx) and the cuda backend's load check leaves room for
PLAN_CTX = 8192
# positions a sliding layer keeps from before its window, so that a chat's next prompt, which may differ from
# the last in its final few tokens, goes back to their common prefix (plugin/kv_cache.py: KVCache.spare)
KV_SPARE = 16

# type ladders, best first; a step down moves one rung
LADDER_K = [Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q4_K, Q.Q3_K, Q.Q2_K]  # rows that are multiples of 256
LADDER_32 = [Q.Q8_0, Q.Q5_0, Q.Q4_0]  # rows that are multiples of 32 only
CLASS_ORDER = ["expert_gate_up", "expert_down", "dense_ffn", "self_cond", "attention", "embedding"]


def tensor_class(name: str) -> str:
    if name.endswith("ffn_gate_up_exps.weight"):
        return "expert_gate_up"
    if name.endswith("ffn_down_exps.weight"):
        return "expert_down"
    if re.search(r"\.ffn_(gate|up|down)\.weight$", name):
        return "dense_ffn"
    if re.fullmatch(r"self_cond_(gate|up|down)\.weight", name):
        return "self_cond"
    if re.search(r"\.attn_(q|k|v|output)\.weight$", name):
        return "attention"
    if name == "token_embd.weight":
        return "embedding"
    return "other"  # F32 vectors, norms, router


def nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    n = 1
    for d in shape:
        n *= d
    bs, ts = GGML_QUANT_SIZES[qtype]
    return n // bs * ts


def parse_size(text: str) -> int:
    """'12GB' / '12GiB' / '12288MiB' / '11.5G' -> bytes. GB means GiB: a '12 GB' card has 12 GiB."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B?)\s*", text, re.I)
    if not m:
        raise ValueError(f"size '{text}' is not understood (examples: 12GB, 10GiB, 8192MiB)")
    scale = {"": 1, "K": 1 << 10, "M": MiB, "G": GiB, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


@dataclass
class ModelDims:
    """The shapes the runtime estimate needs (KV cache and activations)."""

    n_layer: int
    n_embd: int
    canvas: int
    sliding_window: int
    layers: list[tuple[bool, int, int]]  # per layer: (sliding, kv heads, head dim)
    n_expert_used: int
    n_ff_exp: int
    n_ff: int


@dataclass
class Breakdown:
    weights: int
    kv_cache: int
    activations: int
    workspace: int = WORKSPACE
    cuda_context: int = CUDA_CONTEXT

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.workspace + self.cuda_context

    def lines(self) -> list[str]:
        rows = [("weights", self.weights), ("KV cache", self.kv_cache), ("canvas activations", self.activations),
                ("workspace", self.workspace), ("CUDA context", self.cuda_context), ("total VRAM", self.total)]
        return [f"  {k:<20} {v / GiB:7.2f} GiB" for k, v in rows]


def kv_cache_bytes(d: ModelDims, ctx: int, bytes_per_value: int = 2) -> int:
    """K and V (f16) for every layer: all positions on global layers, the window and KV_SPARE on sliding
    ones, plus one canvas of positions being denoised."""
    total = 0
    for sliding, kv, hd in d.layers:
        positions = (min(ctx, d.sliding_window + KV_SPARE) if sliding else ctx) + d.canvas
        total += 2 * positions * kv * hd * bytes_per_value
    return total


def activation_bytes(d: ModelDims) -> int:
    """The canvas step's live tensors (f16): hidden states, attention scores over the window, the routed
    expert intermediates, the fused head's per-position statistics. The [canvas, vocab] logits are never
    materialized (fused head)."""
    c = d.canvas
    hidden = 6 * c * d.n_embd
    moe = c * d.n_expert_used * 2 * d.n_ff_exp * 2
    dense = c * 3 * d.n_ff
    return 2 * (hidden + moe + dense)


def runtime_breakdown(weights: int, dims: ModelDims, ctx: int | None,
                      cuda_context: int = CUDA_CONTEXT) -> Breakdown:
    """`weights` bytes and what the runtime adds: the KV cache at context ctx (None: none yet), one canvas step's
    activations, the workspace and the CUDA context (0: already counted, as in a GPU's free memory)."""
    kv = 0 if ctx is None else kv_cache_bytes(dims, ctx)
    return Breakdown(weights, kv, activation_bytes(dims), cuda_context=cuda_context)


@dataclass
class Plan:
    types: dict[str, GGMLQuantizationType]
    breakdown: Breakdown
    budget: int
    fits: bool  # whole, or with host_layers' experts streamed
    steps: list[str] = field(default_factory=list)  # what was lowered, in order
    notes: list[str] = field(default_factory=list)
    # where even the lowest types do not fit whole: the layers whose experts the cuda backend keeps in host RAM
    # on a card of this budget (plugin/cuda/offload.py), their bytes there, and the VRAM then
    host_layers: list[int] = field(default_factory=list)
    host_bytes: int = 0
    streamed_vram: int = 0

    def class_types(self, shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name, t in self.types.items():
            cls = tensor_class(name)
            out.setdefault(cls, {}).setdefault(t.name, 0)
            out[cls][t.name] += 1
        return out


def _lower(qtype: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType | None:
    ladder = LADDER_K if ncols % 256 == 0 else LADDER_32
    if qtype not in ladder:
        ladder = LADDER_32 if qtype in LADDER_32 else LADDER_K
    i = ladder.index(qtype) if qtype in ladder else -1
    if i < 0 or i + 1 >= len(ladder):
        return None
    nxt = ladder[i + 1]
    return nxt if ncols % block_size(nxt) == 0 else None


def weights_bytes(types: dict[str, GGMLQuantizationType], shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(nbytes(shapes[n], t) for n, t in types.items())


def fit(tensors: list[tuple[str, tuple[int, ...]]], facts: ModelFacts, dims: ModelDims, budget: int, ctx: int,
        start: Preset | None = None) -> Plan:
    start = start or PRESETS["Q4_K_M"]
    shapes = dict(tensors)
    types = preset_types(tensors, start, facts)

    def breakdown() -> Breakdown:
        return runtime_breakdown(weights_bytes(types, shapes), dims, ctx)

    steps: list[str] = []
    b = breakdown()
    for cls in CLASS_ORDER:
        while b.total > budget:
            members = [n for n in types if tensor_class(n) == cls]
            lowered = {n: _lower(types[n], shapes[n][-1]) for n in members}
            if not members or all(v is None for v in lowered.values()):
                break
            for n, t in lowered.items():
                if t is not None:
                    types[n] = t
            kinds = sorted({types[n].name for n in members})
            steps.append(f"{cls} -> {'/'.join(kinds)}")
            b = breakdown()
        if b.total <= budget:
            break
    plan = Plan(dict(types), b, budget, b.total <= budget, steps)
    if not plan.fits:  # what still does not fit at the lowest types streams, where that is enough
        sizes = expert_sizes({n: nbytes(shapes[n], t) for n, t in types.items()}, facts.n_layer)
        layers, host, vram = stream_for(sizes, b.total, budget)
        if layers:
            plan.fits, plan.host_layers, plan.host_bytes, plan.streamed_vram = True, layers, host, vram
        plan.notes += _ways_out(plan, shapes, sizes)
    return plan


# ---- experts kept in host RAM and streamed through VRAM slots (the cuda backend, plugin/cuda/offload.py) ----
SLOTS = 2  # VRAM slots: one layer's experts being read while the next streamed layer's are copied in
SLOT_ALIGN = 256  # where a slot's down experts start: past every type's block alignment (plugin/cuda/ops.py block_align)


def _aligned(n: int) -> int:
    return -(-n // SLOT_ALIGN) * SLOT_ALIGN


def expert_sizes(nbytes_by_name: Mapping[str, int], n_layer: int) -> list[tuple[int, int]]:
    """Each layer's routed experts in bytes, (gate_up, down), from the bytes of every tensor by name (a file's, or
    a plan's at its types)."""
    sizes = [(0, 0)] * n_layer
    for name, b in nbytes_by_name.items():
        cls = tensor_class(name)
        if cls in ("expert_gate_up", "expert_down"):
            layer = int(name.split(".")[1])
            gate_up, down = sizes[layer]
            sizes[layer] = (gate_up + b, down) if cls == "expert_gate_up" else (gate_up, down + b)
    return sizes


def slot_bytes(gate_up: int, down: int) -> int:
    """What a slot needs for a layer's experts: gate_up, then down from the next SLOT_ALIGN bytes."""
    return _aligned(gate_up) + down


def spread(n: int, n_layer: int) -> list[int]:
    """n of the model's n_layer layers, as evenly spaced as they go (the last one last): the layers between two
    streamed ones are the time their copies have."""
    if not 0 <= n <= n_layer:
        raise ValueError(f"experts of {n} layers in host RAM: the model has {n_layer}")
    return [n_layer - 1 - (j * n_layer) // n for j in range(n)][::-1]


def vram_saving(sizes: Sequence[tuple[int, int]], layers: Sequence[int]) -> int:
    """VRAM freed by keeping these layers' experts in host RAM: their bytes less the slots they are copied into
    (negative for one or two layers: the slots cost as much as they hold)."""
    if not layers:
        return 0
    held = sum(sum(sizes[i]) for i in layers)
    return held - min(SLOTS, len(layers)) * max(slot_bytes(*sizes[i]) for i in layers)


def host_layers_for(sizes: Sequence[tuple[int, int]], shortfall: int) -> list[int] | None:
    """The fewest layers (spread) whose streamed experts free `shortfall` bytes of VRAM (none for a shortfall
    <= 0), or None where even every layer's would not."""
    if shortfall <= 0:
        return []
    for n in range(SLOTS + 1, len(sizes) + 1):
        layers = spread(n, len(sizes))
        if vram_saving(sizes, layers) >= shortfall:
            return layers
    return None


def stream_for(sizes: Sequence[tuple[int, int]], need: int, budget: int) -> tuple[list[int] | None, int, int]:
    """For an estimate of `need` bytes against `budget`: the layers whose experts stream (host_layers_for: none
    where it fits, None where even every layer's would not do), their bytes in host RAM, and the VRAM then."""
    layers = host_layers_for(sizes, need - budget)
    if not layers:
        return layers, 0, need
    return layers, sum(sum(sizes[i]) for i in layers), need - vram_saving(sizes, layers)


def _ways_out(plan: Plan, shapes: dict[str, tuple[int, ...]], sizes: list[tuple[int, int]]) -> list[str]:
    """Notes for a plan that does not fit whole at the lowest types: --pad-experts, and the layers streamed."""
    types, budget, floor = plan.types, plan.budget, plan.breakdown.total
    fixed = floor - plan.breakdown.weights
    down_cols = next((s[-1] for n, s in shapes.items() if tensor_class(n) == "expert_down"), 0)
    notes = []
    if down_cols % 256:
        notes.append(f"no llama.cpp-compatible plan fits {budget / GiB:.1f} GiB whole: at the lowest types the estimate is "
                     f"{floor / GiB:.2f} GiB (expert down rows of {down_cols} cannot go below Q4_0)")
        padded, pad_shapes = dict(types), dict(shapes)
        for n, s in shapes.items():
            if tensor_class(n) == "expert_down":
                pad_shapes[n] = (*s[:-1], -(-s[-1] // 256) * 256)
                padded[n] = Q.Q2_K
        pad_total = weights_bytes(padded, pad_shapes) + fixed
        notes.append(f"--pad-experts (zero-pad expert down rows to a multiple of 256, Q2_K; a dgemma-only layout): "
                     f"{pad_total / GiB:.2f} GiB" + (" - fits" if pad_total <= budget else " - still over"))
    else:
        notes.append(f"no plan fits {budget / GiB:.1f} GiB whole: at the lowest types the estimate is {floor / GiB:.2f} GiB")
    n_layer = len(sizes)
    if plan.host_layers:
        notes.append(f"fits with the experts of {len(plan.host_layers)} of {n_layer} layers in host RAM, which the cuda "
                     f"backend streams to the GPU as each pass reaches them (by itself where the GPU is short; slower, by "
                     f"the PCIe copies; dgemma run --host-experts): VRAM {plan.streamed_vram / GiB:.2f} GiB, host RAM "
                     f"{plan.host_bytes / GiB:.2f} GiB (page-locked)")
    else:  # (host_layers_for found none enough)
        notes.append(f"even with the experts of every layer in host RAM, streamed to the GPU, VRAM "
                     f"{(floor - vram_saving(sizes, spread(n_layer, n_layer))) / GiB:.2f} GiB")
    return notes
