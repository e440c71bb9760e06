"""Which matmul kernel each quantized weight uses, chosen per GPU by timing the candidates on the model's
own shapes (issue 5: "measure int8 MMA with q8 activations against f16 after dequant, keep the faster").

The candidates (ops.MATMULS): "scalar" (float FMAs, any GPU, the kernels' reference numbers), "f16"
(tensor cores on f16-rounded X and W) and "int8" (tensor cores on X quantized to int8 per 32 values, as
llama.cpp's MMQ; integer GGML types), the tensor-core ones also as "-wide" (32 x 128 tiles instead of
32 x 32: a quarter of the reads of X, a quarter of the blocks; which wins depends on the shape and the
GPU, so both are timed), and "f16-cublas" (dense weights: W decoded to f16 once per call, then cuBLAS; the
tiles decode it once per 32 rows). Weights of one shape class, (dense or experts, type, N, K), share a
choice. `choose` times each usable candidate at the canvas's row count on the GPU at hand, once: the
result is kept in a JSON cache keyed by the GPU, its compute capability, the kernels' sources and the
row count, so later loads only read it.

    plan = choose(weights, "auto", rows=256, device="cuda")   # {"experts Q4_K 1408x2816": "int8", ...}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import fields
from pathlib import Path

import torch

from ..model import Weights
from . import ops
from .loader import csrc_digest
from .weights import QuantExperts, QuantLinear

CHOICES = ("auto", *ops.MATMULS)  # what Engine.load(matmul=) and `dgemma run --matmul` take
CACHE_ENV = "DGEMMA_CACHE"  # where the tuning cache lives (default ~/.cache/dgemma)

Timer = Callable[[Callable[[], object]], float]  # seconds one call of fn takes


def weight_objects(w: Weights) -> Iterator[QuantLinear | QuantExperts]:
    """Every quantized matrix the model multiplies: the layers' and the self-conditioning MLP's, and the head."""
    for lw in w.layers:
        for f in fields(lw):
            v = getattr(lw, f.name)
            if isinstance(v, QuantLinear | QuantExperts):
                yield v
    for v in (w.sc_gate, w.sc_up, w.sc_down, w.head):
        if isinstance(v, QuantLinear | QuantExperts):
            yield v


def shape_class(obj: QuantLinear | QuantExperts, head: bool = False) -> str:
    """'dense Q4_K 4096x2816', 'experts Q5_0 2816x704 unbounded' or 'head Q6_K 262144x2816': the weights that
    share a kernel choice (unbounded: the input is gelu(gate) * up, which f16 must not round; head: the
    vocabulary head, which the sampler runs through its statistics, QuantLinear.stats)."""
    kind = "head" if head else "experts" if isinstance(obj, QuantExperts) else "dense"
    return f"{kind} {obj.qtype.name} {obj.n}x{obj.k}" + ("" if obj.bounded_input else " unbounded")


def cuda_timer(fn: Callable[[], object], repeats: int = 3) -> float:
    """Median seconds of `repeats` calls of fn on the current stream, after one warm-up call (which also
    compiles the kernel)."""
    fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def _call(obj: QuantLinear | QuantExperts, matmul: str, rows: int, top_k: int,
          device: torch.device | str, head: bool = False) -> Callable[[], object]:
    """One product of obj with kernel `matmul` on random activations: [rows, K] for a dense weight (the
    head: its sampler statistics, the fused float kernel or the chunked tensor-core one); for
    experts, rows tokens x top_k pairs spread evenly over the experts, already grouped (the gathered rows
    of gate_up differ only in where X is read from), gate_up with its GELU gate and the down projection
    with its scatter to the tokens, as the engine runs them."""
    g = torch.Generator(device=device).manual_seed(0)
    if isinstance(obj, QuantExperts) and obj.stage is not None:  # streamed experts (offload.py): timed in a slot
        obj = obj.stage.scratch(obj)
    obj.matmul = matmul  # choose() sets every weight's final choice afterwards
    if isinstance(obj, QuantLinear):
        x = torch.randn(rows, obj.k_in, generator=g, device=device)
        return (lambda: obj.stats(x, 30.0, 1.0, 0, 0)) if head else (lambda: obj(x))
    E, pairs = obj.data.shape[0], rows * top_k
    counts = torch.full((E,), pairs // E, dtype=torch.int64)
    counts[: pairs % E] += 1
    groups = ops.ExpertGroups(counts.to(device), device, pairs=pairs)
    x = torch.randn(pairs, obj.k_in, generator=g, device=device)
    if not obj.bounded_input:  # the down projection: its epilogue adds each pair into its token, as the engine's
        tokens = (torch.arange(pairs, device=device) // top_k).to(torch.int32)
        scatter = (tokens, torch.ones(pairs, device=device), rows)
        return lambda: obj(x, None, groups, scatter)
    return lambda: obj(x, None, groups, gated=obj.n % 2 == 0)  # gate_up: the GELU gate in its epilogue


def _cache_path() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dgemma") / "matmul.json"


def _cache_key(device: torch.device | str, capability: tuple[int, int], rows: int, top_k: int) -> str:
    """The GPU, its compute capability, torch's version and CUDA, the kernels' sources, the kinds there are and
    the row count: what a choice depends on (and top-k: the experts are timed at rows x top_k pairs)."""
    name = torch.cuda.get_device_name(device) if torch.cuda.is_available() else str(device)
    return (f"{name} sm_{capability[0]}{capability[1]} torch:{torch.__version__} cuda:{torch.version.cuda} "
            f"csrc:{csrc_digest()} kinds:{','.join(ops.MATMULS)} rows:{rows} top_k:{top_k}")


def candidates(obj: QuantLinear | QuantExperts, capability: tuple[int, int]) -> list[str]:
    """The kinds (ops.MATMULS) that can multiply obj on a GPU of this compute capability."""
    experts = isinstance(obj, QuantExperts)
    return [m for m in ops.MATMULS if ops.usable(m, obj.qtype, obj.k, capability, obj.bounded_input, experts)]


def fallback(choice: str, usable: list[str]) -> str:
    """What a forced choice gives a weight: itself where usable, else its family's own kind (f16-cublas on
    experts: f16; int8-wide on a float type: int8, not usable either), else scalar."""
    return next(m for m in (choice, ops.matmul_family(choice), "scalar") if m in usable)


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):  # missing or damaged: tune again and rewrite it
        return {}


def _write_cache(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only home: the choice is made again next time
        pass


def choose(weights: Weights, choice: str = "auto", rows: int = 256, device: torch.device | str = "cuda",
           capability: tuple[int, int] | None = None, timer: Timer | None = None,
           cache: Path | None | bool = True, top_k: int = 8) -> dict[str, str]:
    """Set every quantized weight's `matmul` and return {shape class: kernel}.

    choice: a kernel name (ops.MATMULS) for every weight that can use it (the others take its family's kind,
    "f16" or "int8", where they can, else "scalar"), or
    "auto": per shape class, the fastest usable kernel at `rows` rows (experts: rows x top_k pairs) by
    `timer` (cuda_timer). cache: True for the default file (DGEMMA_CACHE or ~/.cache/dgemma/matmul.json),
    a path, or False."""
    if choice not in CHOICES:
        raise ValueError(f"matmul '{choice}' is not available (have: {', '.join(CHOICES)})")
    capability = capability or torch.cuda.get_device_capability(device)
    classes: dict[str, list[QuantLinear | QuantExperts]] = {}
    for obj in weight_objects(weights):
        classes.setdefault(shape_class(obj, head=obj is weights.head), []).append(obj)

    if choice != "auto":
        plan = {c: fallback(choice, candidates(objs[0], capability)) for c, objs in classes.items()}
    else:
        path = None if cache is False else (_cache_path() if cache is True else Path(cache))
        key = _cache_key(device, capability, rows, top_k) if path else ""  # (only for a cache)
        stored = _read_cache(path) if path else {}
        known = stored.get(key, {}) if isinstance(stored.get(key), dict) else {}
        plan = {}
        for c, objs in classes.items():
            usable = candidates(objs[0], capability)
            if known.get(c) in usable or len(usable) == 1:
                plan[c] = known[c] if known.get(c) in usable else usable[0]
                continue
            timer = timer or cuda_timer
            times = {m: timer(_call(objs[0], m, rows, top_k, device, objs[0] is weights.head)) for m in usable}
            plan[c] = min(usable, key=lambda m: (times[m], usable.index(m)))  # ties: the simpler kernel
        if path and any(known.get(c) != k for c, k in plan.items()):  # only what this model added
            stored[key] = {**known, **plan}
            _write_cache(path, stored)
    for c, objs in classes.items():
        for obj in objs:
            obj.matmul = plan[c]
    return plan
