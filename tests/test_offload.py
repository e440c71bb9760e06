"""Experts in host RAM, streamed to the GPU (plugin/cuda/offload.py): which layers, what VRAM that saves, the
slots' bookkeeping under any order of layers, and the same logits and tokens as the model loaded whole, on the
CPU with the kernels' references or the kernels emulated (tests/conftest.py `kernels`). The streams and events
of a GPU run in tests/test_cuda_kernels.py's GPU test."""

from __future__ import annotations

import random

import pytest
import torch
from cuda_util import cpu_cuda_weights, decode_both, held_bytes
from gguf import GGMLQuantizationType as Q

from dgemma.plugin.config import ModelConfig
from dgemma.plugin.cuda import offload
from dgemma.plugin.cuda.offload import HostExperts
from dgemma.plugin.cuda.weights import KV_RESERVE_POSITIONS, QuantExperts, vram_estimate
from dgemma.plugin.inspect import open_gguf
from dgemma.plugin.model import DiffusionGemma
from dgemma.quant.planner import kv_cache_bytes


def test_spread_layers_are_evenly_spaced_and_end_with_the_last():
    for n_layer in (4, 30):
        for n in range(1, n_layer + 1):
            layers = offload.spread(n, n_layer)
            gaps = {b - a for a, b in zip(layers, layers[1:])}
            assert len(set(layers)) == n and layers == sorted(layers) and layers[-1] == n_layer - 1
            assert not gaps or max(gaps) - min(gaps) <= 1, (n, layers)
    assert offload.spread(3, 30) == [9, 19, 29] and offload.spread(0, 30) == []
    with pytest.raises(ValueError, match="experts of 31 layers in host RAM: the model has 30"):
        offload.spread(31, 30)


def test_the_fewest_streamed_layers_that_free_the_shortfall():
    sizes = [(1000, 500)] * 10  # a slot: 1024 (gate_up, aligned to 256) + 500
    assert offload.vram_saving(sizes, [9]) == 1500 - 1524 and offload.vram_saving(sizes, [4, 9]) == 3000 - 2 * 1524
    assert offload.vram_saving(sizes, offload.spread(3, 10)) == 4500 - 3048  # two slots for three layers
    assert offload.host_layers_for(sizes, 0) == [] and offload.host_layers_for(sizes, -5) == []
    for shortfall, n in ((1, 3), (1452, 3), (1453, 4), (11952, 10)):
        layers = offload.host_layers_for(sizes, shortfall)
        assert layers == offload.spread(n, 10) and offload.vram_saving(sizes, layers) >= shortfall, shortfall
    assert offload.host_layers_for(sizes, 11953) is None
    # a larger last layer (always among them) makes both slots larger: 6000 + 1500 (n - 1) - 2 * 6096 >= 1 at n = 6
    assert offload.host_layers_for([(1000, 500)] * 9 + [(4000, 2000)], 1) == offload.spread(6, 10)


def _experts(rng: random.Random, e: int, n: int, k: int, qtype: Q) -> QuantExperts:
    row = k // 32 * (34 if qtype == Q.Q8_0 else 18)
    data = torch.tensor([rng.randrange(256) for _ in range(e * n * row)], dtype=torch.uint8).view(e, n, row)
    return QuantExperts(data, qtype, n, k)


def test_the_stage_hands_out_each_layers_own_bytes_in_any_order():
    """Layers acquired in the model's order (each pass's copies start one layer ahead), and then in any order
    (a pass that ended early, an encode after a decode): the slots always hold the layer asked for, with the
    kernel choices of its weights, and the layer just used is never overwritten by the prefetch."""
    rng = random.Random(0)
    host = {i: (_experts(rng, 3, 8 + i, 64, Q.Q8_0 if i % 2 else Q.Q4_0), _experts(rng, 3, 16, 32, Q.Q8_0))
            for i in (2, 5, 7)}
    for i, (g, d) in host.items():
        g.matmul, d.matmul = f"kind{i}", "int8"
    stage = offload.ExpertStage(host, "cpu")
    assert len(stage.buffers) == 2 and stage.buffers[0].nbytes == max(
        offload.slot_bytes(g.data.nbytes, d.data.nbytes) for g, d in host.values())
    order = [2, 5, 7] * 4 + [rng.choice([2, 5, 7]) for _ in range(40)]
    for n, layer in enumerate(order):
        gate_up, down = stage.acquire(layer, *host[layer])
        assert torch.equal(gate_up.data, host[layer][0].data) and torch.equal(down.data, host[layer][1].data)
        assert (gate_up.qtype, gate_up.matmul, down.matmul) == (host[layer][0].qtype, f"kind{layer}", "int8")
        base = stage.buffers[stage.last].data_ptr()  # (CUDA allocations start at multiples of 256)
        assert gate_up.data.data_ptr() == base and (down.data.data_ptr() - base) % 256 == 0
        stage.release(layer)
        if n == 11:  # four passes in order: the first copies one layer more than the others
            assert stage.copies == 3 * 4 + 1


def test_the_tuner_times_streamed_experts_in_a_slot_which_is_then_filled_again():
    rng = random.Random(2)
    host = {i: (_experts(rng, 2, 8, 64, Q.Q8_0), _experts(rng, 2, 16, 32, Q.Q4_0)) for i in (0, 1, 2)}
    stage = offload.ExpertStage(host, "cpu")
    stage.acquire(0, *host[0])
    stage.release(0)
    twin = stage.scratch(host[2][1])
    assert torch.equal(twin.data, host[2][1].data) and twin.data.data_ptr() == stage.buffers[0].data_ptr()
    assert (twin.qtype, twin.n, twin.k, twin.stage) == (Q.Q4_0, 16, 32, None) and stage.held[0] is None
    for layer in (0, 1, 2, 0):
        gate_up, down = stage.acquire(layer, *host[layer])
        assert torch.equal(gate_up.data, host[layer][0].data) and torch.equal(down.data, host[layer][1].data)
        stage.release(layer)


def test_page_locked_copies_register_whole_pages_of_their_own(monkeypatch):
    """offload.page_locked with the CUDA runtime's register and unregister stood in for (no GPU here): the
    registered range starts on a page, covers the tensor in whole pages, and lies inside the copy's own
    allocation; the bytes are the tensor's; _release unregisters each address, then lets the memory go."""
    calls = []
    monkeypatch.setattr(offload, "_host_register", lambda address, size: calls.append(("register", address, size)))
    monkeypatch.setattr(offload, "_host_unregister", lambda address: calls.append(("unregister", address)))
    for nbytes in (1, offload.PAGE - 1, offload.PAGE, 100_000):
        t = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
        out, address = offload.page_locked(t.view(1, -1))
        base, (_, registered, size) = out.untyped_storage().data_ptr(), calls[-1]
        assert torch.equal(out.reshape(-1), t) and out.shape == (1, nbytes) and registered == address
        assert address % offload.PAGE == 0 and size % offload.PAGE == 0 and nbytes <= size < nbytes + offload.PAGE
        assert base <= address and address + size <= base + out.untyped_storage().nbytes()
    keep = [out]
    offload._release(None, [address], keep)
    assert calls[-1] == ("unregister", address) and keep == []

    def refuse(address: int, size: int) -> None:
        raise offload.PageLockError(f"cudaHostRegister of {size} bytes failed (712)")

    monkeypatch.setattr(offload, "_host_register", refuse)
    with pytest.raises(offload.PageLockError, match=f"cudaHostRegister of {offload.PAGE} bytes failed"):
        offload.page_locked(torch.zeros(10, dtype=torch.uint8))


def test_the_stage_holds_no_weight_object():
    """The weight objects hold the stage (HostExperts.stage, the down experts' stage), not the other way round:
    dropping a model's weights frees its host and slot memory at once, without waiting for the cycle collector
    (which is when the page-locked memory is unregistered)."""
    import gc
    import weakref

    rng = random.Random(3)
    layers = [type("L", (), {})() for _ in range(4)]
    for lw in layers:
        lw.gate_up_exps, lw.down_exps = _experts(rng, 2, 8, 64, Q.Q8_0), _experts(rng, 2, 16, 32, Q.Q8_0)
    stage = offload.stream_experts(layers, [1, 2, 3], "cpu")
    assert isinstance(layers[1].gate_up_exps, HostExperts) and layers[3].down_exps.stage is stage
    alive = weakref.ref(stage)
    gc.disable()
    try:
        del stage, layers, lw
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("model", ["default", "canvas16"])
def test_the_estimate_counts_the_slots_not_the_host_experts(request, model):
    path = request.getfixturevalue(f"{model}_gguf")
    reader = open_gguf(path)
    cfg = ModelConfig.from_gguf(reader, path)
    layers = offload.spread(3, cfg.n_layer)
    weights, _ = cpu_cuda_weights(path, layers)
    hosted = [weights.layers[i] for i in layers]
    assert all(isinstance(lw.gate_up_exps, HostExperts) for lw in hosted)
    host = sum(lw.gate_up_exps.data.nbytes + lw.down_exps.data.nbytes for lw in hosted)
    stage = hosted[0].gate_up_exps.stage
    assert stage is hosted[-1].gate_up_exps.stage and len(stage.buffers) == 2
    assert vram_estimate(reader, cfg, layers).weights == held_bytes(weights) - host  # the slots counted, once
    assert vram_estimate(reader, cfg).weights - vram_estimate(reader, cfg, layers).weights == \
        offload.vram_saving(offload.expert_bytes(reader, cfg.n_layer), layers)


def test_streamed_experts_give_the_whole_models_logits(default_gguf, kernels):
    """The same kernels on the same bytes, read from a slot: equal logits, with and without self-conditioning;
    every pass copies each streamed layer once (the first one more: the layer it starts with)."""
    whole = DiffusionGemma(*reversed(cpu_cuda_weights(default_gguf)))
    weights, cfg = cpu_cuda_weights(default_gguf, [1, 2, 3])
    streamed = DiffusionGemma(cfg, weights)
    a, b, canvas, c1, c2 = decode_both(whole, streamed, 9)
    assert torch.equal(a, b)
    sc = torch.softmax(a / 0.8, dim=-1)
    assert torch.equal(whole.decode(canvas, c1, sc), streamed.decode(canvas, c2, sc))
    assert weights.layers[1].gate_up_exps.stage.copies == 3 * 3 + 1  # the encode and two decoder passes


@pytest.fixture
def standin_gpu(monkeypatch) -> dict[str, int]:
    """No GPU here: CuPy's check and torch's GPU queries stood in for; returns {"bytes": the GPU's free memory}."""
    import dgemma.plugin.cuda as cuda

    free = {"bytes": 0}
    monkeypatch.setattr(cuda, "check_cuda", lambda: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (free["bytes"], 8 << 30))
    for name in ("current_device", "memory_reserved", "memory_allocated"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: 0)
    return free


def test_auto_streams_as_few_layers_as_the_gpu_needs_and_generates_the_same_tokens(default_gguf, standin_gpu,
                                                                                  kernels_as_references):
    """Engine.load on a stand-in GPU (no GPU here: the cuda weights load on the CPU): with enough free memory
    nothing streams; a little short, auto streams the experts of the fewest layers that make up for it, and
    the engine generates the whole model's tokens without CUDA graphs; host_experts=0 is the error instead,
    and so is a GPU that even all layers' streaming would not fit; a count is taken as it is."""
    from dgemma.plugin.engine import DoneEvent, Engine, EngineError, GenerateOptions, GpuMemoryError

    reader = open_gguf(default_gguf)
    cfg = ModelConfig.from_gguf(reader, default_gguf)
    whole = vram_estimate(reader, cfg).total
    free = standin_gpu
    free["bytes"] = whole

    def load(**kw) -> Engine:
        return Engine.load(default_gguf, "cuda", device="cpu", matmul="scalar", **kw)

    def tokens(engine: Engine) -> list[list[int]]:
        done = list(engine.generate("Once upon a time", GenerateOptions(seed=2, max_tokens=6)))[-1]
        assert isinstance(done, DoneEvent)
        return done.canvases

    engine = load()
    assert engine.host_layers == [] and engine.graphs and "host RAM" not in engine.describe() and engine.notice is None
    want = tokens(load(graphs=False))  # (CUDA graphs need a GPU)
    sizes = offload.expert_bytes(reader, cfg.n_layer)
    reserve = kv_cache_bytes(cfg.model_dims(), min(cfg.context_length, KV_RESERVE_POSITIONS))
    assert vram_estimate(reader, cfg).kv_cache == reserve > 0  # the estimate leaves room for the KV cache
    free["bytes"] = whole - 1  # one byte short: the fewest layers, three
    assert load().host_layers == [1, 2, 3]
    free["bytes"] = whole - reserve  # the weights fit, the KV cache of 8K positions does not: all four layers
    assert offload.vram_saving(sizes, [1, 2, 3]) < reserve <= offload.vram_saving(sizes, [0, 1, 2, 3])
    engine = load()
    assert engine.host_layers == [0, 1, 2, 3] and not engine.graphs
    assert engine.host_bytes == sum(map(sum, sizes)) > 0  # /api/ps: size_vram leaves them out
    assert engine.slot_bytes == 2 * offload.slot_bytes(*sizes[0])
    assert "experts of 4 of 4 layers streamed from host RAM" in engine.describe()
    assert engine.notice.startswith("default.gguf: the experts of 4 of 4 layers (0.01 GiB) stay in host RAM and are "
                                    "copied to the GPU on every pass: slower")
    assert tokens(engine) == want
    with pytest.raises(GpuMemoryError, match=r"needs about .* GiB of GPU memory for this model with a KV "
                                             r"cache of 4096 positions \(weights"):
        load(host_experts=0)
    with pytest.raises(GpuMemoryError, match="with the experts of 2 of 4 layers in host RAM"):
        load(host_experts=2)  # as asked: two slots for two layers save nothing
    free["bytes"] = whole
    assert load(host_experts=2).host_layers == [1, 3]
    with pytest.warns(RuntimeWarning, match="CUDA graphs are off while experts stream"):
        assert not load(host_experts=3, graphs=True).graphs
    free["bytes"] = vram_estimate(reader, cfg, [0, 1, 2, 3]).total - 1
    with pytest.raises(GpuMemoryError, match="with the experts of 4 of 4 layers in host RAM"):
        load()
    with pytest.raises(EngineError, match=r"device='cuda:1': the cuda backend runs on the current GPU \(cuda:0\); "
                                          "for another, set CUDA_VISIBLE_DEVICES"):
        Engine.load(default_gguf, "cuda", device="cuda:1")
    for bad in (5, -1, "some", 1.5):
        with pytest.raises(EngineError, match="host_experts"):
            load(host_experts=bad)
    with pytest.raises(EngineError, match="host_experts='auto' applies to the cuda backend only"):
        Engine.load(default_gguf, "torch", host_experts="auto")
    assert Engine.load(default_gguf, "torch", host_experts=0).backend == "torch"  # what the torch backend does


def test_host_ram_for_the_streamed_experts_is_checked_before_loading(default_gguf, monkeypatch, standin_gpu):
    """Page-locked memory cannot be swapped out: the streamed experts must fit the machine's available memory
    without swap, or the load stops with one line before anything is loaded."""
    from dgemma.plugin.engine import RamShortageError

    reader = open_gguf(default_gguf)
    cfg = ModelConfig.from_gguf(reader, default_gguf)
    need = sum(sum(s) for s in offload.expert_bytes(reader, cfg.n_layer)[1:])  # layers 1-3
    asked = []
    monkeypatch.setattr(offload, "available_ram", lambda swap=True: asked.append(swap) or need - 1)
    msg = offload.host_ram_shortage(reader, cfg, default_gguf, [1, 2, 3])
    assert asked == [False] and msg.startswith(f"{default_gguf}: the experts of 3 layers kept in host RAM need ")
    assert "\n" not in msg and "free memory, or convert the model for this GPU" in msg
    assert offload.host_ram_shortage(reader, cfg, default_gguf, []) is None
    monkeypatch.setattr(offload, "available_ram", lambda swap=True: need)
    assert offload.host_ram_shortage(reader, cfg, default_gguf, [1, 2, 3]) is None
    monkeypatch.setattr(offload, "available_ram", lambda swap=True: None)  # not known (not Linux): not checked
    assert offload.host_ram_shortage(reader, cfg, default_gguf, [1, 2, 3]) is None
    import dgemma.plugin.cuda.weights as cw
    from dgemma.plugin.engine import Engine

    monkeypatch.setattr(cw, "load_cuda_weights", lambda *a: pytest.fail("loaded"))
    monkeypatch.setattr(offload, "available_ram", lambda swap=True: need - 1)
    standin_gpu["bytes"] = vram_estimate(reader, cfg).total - 1  # auto streams layers 1-3
    with pytest.raises(RamShortageError, match="the experts of 3 layers kept in host RAM need"):
        Engine.load(default_gguf, "cuda", device="cpu", matmul="scalar")


def test_dgemma_run_says_when_experts_stream(default_gguf, standin_gpu, kernels_as_references, capsys):
    from dgemma.plugin.cli import build_parser
    from dgemma.plugin.run import cmd_run

    reader = open_gguf(default_gguf)
    args = ["run", str(default_gguf), "hi", "--backend", "cuda", "--device", "cpu", "--matmul", "scalar",
            "--max-tokens", "2", "--seed", "1", "--no-graphs"]
    standin_gpu["bytes"] = vram_estimate(reader, ModelConfig.from_gguf(reader, default_gguf)).total
    assert cmd_run(build_parser().parse_args(args)) == 0
    assert "host RAM" not in capsys.readouterr().err
    standin_gpu["bytes"] -= 1
    assert cmd_run(build_parser().parse_args(args)) == 0
    err = capsys.readouterr().err
    assert "dgemma: default.gguf: the experts of 3 of 4 layers (0.00 GiB) stay in host RAM" in err
    assert cmd_run(build_parser().parse_args([*args, "--host-experts", "0"])) == 1
    assert "needs about" in capsys.readouterr().err


def test_host_experts_on_the_command_line(capsys):
    from dgemma.plugin.cli import build_parser
    from dgemma.plugin.server.app import ServerConfig, serve
    from dgemma.plugin.server.serving import ApiError

    parser = build_parser()
    assert parser.parse_args(["run", "default", "--host-experts", "7"]).host_experts == 7
    assert parser.parse_args(["run", "default"]).host_experts is None  # the engine's default: auto on cuda
    assert parser.parse_args(["serve", "--host-experts", "auto"]).host_experts == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "default", "--host-experts", "some"])
    assert "host_experts 'some' is not understood (have: auto, or a number of layers)" in capsys.readouterr().err
    with pytest.raises(ApiError, match="--host-experts 3 applies to the cuda backend only"):
        serve(ServerConfig(backend="torch", host_experts=3))
