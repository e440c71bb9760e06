"""plugin/cuda/tune.py on the CPU: which matmul kernel each quantized weight gets, with the csrc kernels
replaced by their references (tests/test_cuda_kernels.py compares those with the kernels) and a
timer that reports preset times for whichever kernel the timed call ran; the model-level test also runs
with the kernels themselves in the CPU emulator (tests/cuda_emu.py). What it says about speed comes
from a GPU (bench/step_gpu.py); this checks the choosing, the cache and the dispatch."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cuda_util import cpu_cuda_weights, decode_both
from gguf import GGMLQuantizationType as Q

from dgemma.plugin.cuda import head_ops, ops, tune
from dgemma.plugin.cuda.weights import QuantExperts, QuantLinear
from dgemma.plugin.engine import Engine, EngineError
from dgemma.plugin.model import DiffusionGemma


AMPERE, TURING, VOLTA = (8, 0), (7, 5), (7, 0)  # VOLTA: below the tiles' (and the loader's) 7.5


@pytest.fixture()
def ran(kernels_as_references, monkeypatch):
    """The kernels as their references (conftest), recording which matmul kernel ran: ran[-1] after a call.
    The head's fused float kernel counts as "scalar", its chunked form as its matmul."""
    return recording(monkeypatch)


@pytest.fixture()
def ran_either(kernels, monkeypatch):
    """As `ran`, with the kernels as their references and again as themselves in the emulator (conftest)."""
    return recording(monkeypatch)


def recording(monkeypatch) -> list[str]:
    calls: list[str] = []

    def record(module, name: str, kernel) -> None:
        f = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **kw: (calls.append(kernel(*a, **kw)), f(*a, **kw))[1])

    for kernel, names in ops.MATMULS.items():
        for name in filter(None, names):
            record(ops, name, lambda *a, _k=kernel, **kw: _k)
    record(head_ops, "head_stats", lambda *a, **kw: "scalar")
    record(head_ops, "head_stats_chunked", lambda *a, **kw: a[7] if len(a) > 7 else kw.get("matmul", "f16"))
    return calls


def preset_timer(ran: list[str], times: dict[str, float]):
    """A timer that runs the call once and reports the preset time of the kernel it ran."""
    timed: list[str] = []

    def timer(fn) -> float:
        before = len(ran)
        fn()
        kernels = set(ran[before:])
        assert len(kernels) == 1, f"one timed call ran {kernels}"
        timed.append(kernels.pop())
        return times[timed[-1]]

    timer.timed = timed
    return timer


def usable(obj, capability=AMPERE) -> list[str]:
    return tune.candidates(obj, capability)


def test_auto_takes_the_fastest_usable_kernel_per_shape_and_caches_it(default_gguf, ran, tmp_path):
    w, cfg = cpu_cuda_weights(default_gguf)
    f16 = torch.from_numpy(np.random.default_rng(0).standard_normal((cfg.vocab_size, cfg.n_embd)).astype(np.float16))
    w.head = QuantLinear(f16.view(torch.uint8).view(cfg.vocab_size, -1), Q.F16, cfg.vocab_size, cfg.n_embd)
    cache = tmp_path / "matmul.json"
    timer = preset_timer(ran, {"scalar": 3.0, "f16": 0.5, "f16-wide": 0.7, "int8": 1.0, "int8-wide": 0.9,
                               "f16-cublas": 0.4})
    plan = tune.choose(w, "auto", rows=16, device="cpu", capability=AMPERE, timer=timer, cache=cache, top_k=2)
    first = {}
    for o in tune.weight_objects(w):
        first.setdefault(tune.shape_class(o, head=o is w.head), o)
    assert set(plan) == set(first) and {"dense", "experts", "head"} == {c.split()[0] for c in plan}
    unbounded = {c for c, o in first.items() if not o.bounded_input}
    assert unbounded == {c for c in plan if c.endswith(" unbounded")} and len(unbounded) >= 2  # dense and experts
    for c, o in first.items():  # f16-cublas is fastest, but has no grouped form; f16 never on gelu(gate) * up
        assert plan[c] == ("int8-wide" if c in unbounded else "f16" if c.startswith("experts") else "f16-cublas"), c
    assert plan[f"head F16 {cfg.vocab_size}x{cfg.n_embd}"] == "f16-cublas"  # timed through its statistics (chunked)
    assert not any(isinstance(o, QuantExperts) and "f16-cublas" in usable(o) for o in first.values())
    assert all(o.matmul == plan[tune.shape_class(o, head=o is w.head)] for o in tune.weight_objects(w))
    assert timer.timed == [m for o in first.values() for m in usable(o)]  # each usable kernel once per class
    stored = json.loads(cache.read_text())
    assert list(stored.values()) == [plan]
    # a second load reads the cache: nothing is timed, nothing is written
    w2, _ = cpu_cuda_weights(default_gguf)
    w2.head = w.head
    never = preset_timer(ran, {})
    mtime = cache.stat().st_mtime_ns
    assert tune.choose(w2, "auto", rows=16, device="cpu", capability=AMPERE, timer=never, cache=cache, top_k=2) == plan
    assert never.timed == [] and cache.stat().st_mtime_ns == mtime
    # another row count, or top-k, is another key: timed again, the first kept
    for n, (rows, top_k) in enumerate([(32, 2), (16, 8)]):
        faster_scalar = preset_timer(ran, {"scalar": 0.5, "f16": 2.0, "f16-wide": 2.0, "int8": 1.0, "int8-wide": 1.0,
                                           "f16-cublas": 2.0})
        other = tune.choose(w2, "auto", rows=rows, device="cpu", capability=AMPERE, timer=faster_scalar, cache=cache,
                            top_k=top_k)
        assert set(other.values()) == {"scalar"} and len(json.loads(cache.read_text())) == 2 + n


def test_auto_on_a_gpu_without_tensor_cores_times_nothing(default_gguf, ran, tmp_path):
    w, _ = cpu_cuda_weights(default_gguf)
    timer = preset_timer(ran, {})
    plan = tune.choose(w, "auto", rows=16, device="cpu", capability=VOLTA, timer=timer, cache=tmp_path / "m.json")
    assert set(plan.values()) == {"scalar"} and timer.timed == []


def test_turing_has_the_tensor_core_kinds(default_gguf):
    """sm_75 runs the tiles on its own MMA instructions (csrc/mma_tile.cuh): the same candidates as sm_80."""
    w, _ = cpu_cuda_weights(default_gguf)
    for obj in tune.weight_objects(w):
        assert tune.candidates(obj, TURING) == tune.candidates(obj, AMPERE) and len(tune.candidates(obj, TURING)) > 1
    assert set(tune.choose(w, "int8", device="cpu", capability=TURING, cache=False).values()) == {"int8"}


def test_a_damaged_cache_is_tuned_again_and_rewritten(default_gguf, ran, tmp_path):
    w, _ = cpu_cuda_weights(default_gguf)
    cache = tmp_path / "matmul.json"
    for damaged in ("{not json", "[1, 2]", json.dumps({"x": 1})):
        cache.write_text(damaged)
        timer = preset_timer(ran, {"scalar": 1.0, "f16": 2.0, "f16-wide": 2.5, "int8": 3.0, "int8-wide": 3.5,
                                   "f16-cublas": 2.0})
        plan = tune.choose(w, "auto", rows=16, device="cpu", capability=AMPERE, timer=timer, cache=cache)
        timed = sum(len(usable(o)) for o in {tune.shape_class(o, o is w.head): o for o in tune.weight_objects(w)}.values())
        assert set(plan.values()) == {"scalar"} and len(timer.timed) == timed
        assert plan in json.loads(cache.read_text()).values()
    bad_entry = {k: {c: "no-such-kernel" for c in plan} for k in json.loads(cache.read_text())}
    cache.write_text(json.dumps(bad_entry))  # a kernel name not usable here is timed again
    timer = preset_timer(ran, {"scalar": 1.0, "f16": 2.0, "f16-wide": 2.5, "int8": 3.0, "int8-wide": 3.5,
                               "f16-cublas": 2.0})
    assert tune.choose(w, "auto", rows=16, device="cpu", capability=AMPERE, timer=timer, cache=cache) == plan
    assert len(timer.timed) == timed


def test_a_named_kernel_goes_where_it_can(default_gguf, ran):
    w, _ = cpu_cuda_weights(default_gguf)
    assert set(tune.choose(w, "int8", device="cpu", capability=AMPERE, cache=False).values()) == {"int8"}
    plan = tune.choose(w, "f16", device="cpu", capability=AMPERE, cache=False)
    assert {c: k for c, k in plan.items() if k != "f16"} == {c: "scalar" for c in plan if c.endswith("unbounded")}
    assert set(tune.choose(w, "int8", device="cpu", capability=VOLTA, cache=False).values()) == {"scalar"}
    plan = tune.choose(w, "f16-cublas", device="cpu", capability=AMPERE, cache=False)  # experts: the f16 tile
    assert plan == {c: "scalar" if c.endswith("unbounded") else "f16" if c.startswith("experts") else "f16-cublas"
                    for c in plan} and set(plan.values()) == {"scalar", "f16", "f16-cublas"}
    with pytest.raises(ValueError, match="matmul 'fp8' is not available"):
        tune.choose(w, "fp8", device="cpu", capability=AMPERE)


@pytest.mark.parametrize("kernel,low,high,stats", [("scalar", 0.0, 1e-4, (1e-5, 1e-5)), ("f16", 1e-4, 0.05, (0.01, 1e-3)),
                                                ("int8", 1e-2, 0.5, (0.05, 5e-3)), ("f16-wide", 1e-4, 0.05, (0.01, 1e-3)),
                                                ("int8-wide", 1e-2, 0.5, (0.05, 5e-3)),
                                                ("f16-cublas", 1e-4, 0.05, (0.01, 1e-3))])
def test_each_kernel_runs_the_model_within_its_rounding(default_gguf, ran_either, kernel, low, high, stats):
    """The dispatch: every weight runs the chosen kernel (its reference, or emulated), and the logits move by what its
    rounding allows. Measured on the default model (max |logit| 12): scalar 6e-6, f16 (X and W rounded to f16;
    the down projections stay scalar) 0.005, int8 (X quantized per 32 values) 0.15, KL(T=1) 5e-4, the same
    argmax. The head's statistics (entropy, softmax @ E of max 0.11), measured: scalar 8e-7 and 8e-7, f16 3.8e-3
    and 2.2e-4, int8 1.3e-2 and 1.1e-3; `stats` allows about 3x that. The wide tiles round as the narrow ones."""
    ref = Engine.load(default_gguf)
    w, cfg = cpu_cuda_weights(default_gguf)
    plan = tune.choose(w, kernel, device="cpu", capability=AMPERE, cache=False)
    model = DiffusionGemma(cfg, w)
    a, b, canvas, c1, c2 = decode_both(ref.model, model, 30, before=lambda: ran_either.clear())
    f16 = ops.matmul_family(kernel) == "f16"
    grouped = ops.MATMULS[kernel][1] is not None  # f16-cublas: the experts take the f16 tile
    assert set(ran_either) == ({kernel, "scalar"} if f16 else {kernel}) | (set() if grouped else {"f16"})
    diff = float((a - b).abs().max())
    assert low <= diff < high
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    # the sampler's statistics through the head the choice gives (scalar: the fused kernel; f16 and int8: the
    # chunked head on tensor cores), against the torch backend's from the float logits
    ran_either.clear()
    want = ref.model.decode_stats(canvas, c1, None, 0.7, 9, 3)
    got = model.decode_stats(canvas, c2, None, 0.7, 9, 3)
    assert plan[next(c for c in plan if c.startswith("head"))] == kernel
    assert ran_either and ran_either[-1] == kernel  # the head (run last): the fused kernel for scalar, the chunked one else
    assert torch.equal(got.argmax, want.argmax)
    assert float((got.entropy - want.entropy).abs().max()) < stats[0]
    assert float((got.sc - want.sc).abs().max()) < stats[1]


def test_matmul_and_graphs_are_cuda_backend_choices(default_gguf):
    with pytest.raises(EngineError, match="applies to the cuda backend only"):
        Engine.load(default_gguf, matmul="int8")
    with pytest.raises(EngineError, match="graphs=True applies to the cuda backend only"):
        Engine.load(default_gguf, graphs=True)
    assert not Engine.load(default_gguf, graphs=False).graphs
    assert Engine.load(default_gguf).matmul == {}
