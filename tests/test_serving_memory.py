"""The server's model manager on a GPU that is too full (plugin/server/serving.py ModelManager): as Ollama does,
idle models are unloaded, soonest to expire first, until the new one fits; a model a request holds never is.

There is no GPU here: the cuda backend's Engine.load runs for real up to its weights, which are the cuda weight
objects on the CPU (tests/cuda_util.py), and the GPU's free memory is what a fixed capacity leaves after the
weight sets still alive. So a manager that kept a reference to an unloaded engine would free nothing, and the
next load would fail."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import weakref

import pytest
import torch
from cuda_util import cpu_cuda_weights
from server_util import serving

from dgemma.plugin.config import ModelConfig
from dgemma.plugin.cuda import offload
from dgemma.plugin.cuda.weights import vram_estimate
from dgemma.plugin.engine import GpuMemoryError, RamShortageError
from dgemma.plugin.inspect import open_gguf
from dgemma.plugin.registry import Registry
from dgemma.plugin.server.serving import ModelManager


@pytest.fixture
def gpu(default_gguf, tmp_path, monkeypatch):
    """A registry of three names for the default model, and a stand-in GPU: returns (manager, state), where
    state["capacity"] is the GPU's memory in bytes, state["need"] what the load check asks for one model
    (with room for its KV cache) and state["held"] what a loaded one takes."""
    import dgemma.plugin.cuda as cuda
    import dgemma.plugin.cuda.tune as tune
    import dgemma.plugin.cuda.weights as cw

    registry = Registry(tmp_path / "models")
    for name in ("a", "b", "c"):
        registry.import_file(shutil.copy(default_gguf, tmp_path / f"{name}.gguf"), name=name)
    reader = open_gguf(default_gguf)
    whole = cw.vram_estimate(reader, ModelConfig.from_gguf(reader, default_gguf))
    state = {"need": whole.total, "held": whole.total - whole.kv_cache, "used": 0, "loads": []}

    def load(reader, cfg, path, device, host_layers):
        weights, _ = cpu_cuda_weights(path, host_layers)
        est = cw.vram_estimate(reader, cfg, host_layers)  # less with streamed experts (plugin/cuda/offload.py)
        need = est.total - est.kv_cache  # what loading takes: the KV cache comes with a generation
        state["used"] += need
        state["loads"].append(path.stem + (f" streaming {len(host_layers)}" if host_layers else ""))
        weakref.finalize(weights, lambda: state.__setitem__("used", state["used"] - need))
        return weights

    monkeypatch.setattr(cuda, "check_cuda", lambda: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Test GPU")
    def mem_get_info(device: int) -> tuple[int, int]:
        assert isinstance(device, int)  # torch 2.4 takes no device without an index ("cuda")
        return state["capacity"] - state["used"], state["capacity"]

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    for name in ("current_device", "memory_reserved", "memory_allocated"):  # (on a GPU: not this process's own)
        monkeypatch.setattr(torch.cuda, name, lambda device=None: 0)
    monkeypatch.setattr(cw, "load_cuda_weights", load)
    monkeypatch.setattr(tune, "choose", lambda *a, **k: {})
    return ModelManager(registry, backend="cuda"), state


def test_a_full_gpu_unloads_an_idle_model_for_the_new_one(gpu):
    manager, state = gpu
    state["capacity"] = state["need"] * 3 // 2  # room for one model

    async def run() -> None:
        await manager.get("a")
        assert list(manager.loaded) == ["a"] and state["used"] == state["held"]
        b = await manager.get("b")  # does not fit beside a: a goes
        assert list(manager.loaded) == ["b"] and state["used"] == state["held"]
        assert state["loads"] == ["a", "b"]
        b.busy = 1  # a request holds b: it stays, and a cannot load
        with pytest.raises(GpuMemoryError, match=r"Test GPU has 0\.\d\d GiB free of 0\.\d\d: .* --fit 1GB"):
            await manager.get("a")
        assert list(manager.loaded) == ["b"] and state["loads"] == ["a", "b"]

    asyncio.run(run())


def test_an_idle_model_is_unloaded_to_leave_the_new_one_room_for_its_kv_cache(gpu):
    """The weights of b fit beside a, but not the KV cache of 8K positions (the model's 4096 here) the load
    check leaves room for: a, idle, goes, rather than b's first long prompt running out of memory."""
    manager, state = gpu
    kv = state["need"] - state["held"]
    state["capacity"] = state["held"] + state["need"] - kv // 2  # a as loaded, then b with half its KV cache

    async def run() -> None:
        await manager.get("a")
        assert state["used"] == state["held"] and kv > 0
        b = await manager.get("b")
        assert list(manager.loaded) == ["b"] and b.engine.host_layers == [] and state["loads"] == ["a", "b"]

    asyncio.run(run())


def test_idle_models_kept_kv_caches_go_before_the_models(gpu):
    """A model keeps its last generation's KV cache in VRAM (plugin/kv_cache.py PromptCache). Where b does not fit
    beside a and a's kept cache, but does beside a alone, the cache goes and a stays loaded; where b does not fit
    beside a either, a goes next."""
    from dgemma.plugin.kv_cache import KVCache

    manager, state = gpu
    kv = state["need"] - state["held"]

    def keep_a_cache() -> None:  # a stand-in cache of kv bytes in the stand-in GPU, freed with the KVCache
        cache = KVCache()
        manager.loaded["a"].engine.prompt_cache.put(cache, [])
        state["used"] += kv
        weakref.finalize(cache, lambda: state.__setitem__("used", state["used"] - kv))

    async def run(capacity: int, loaded: list[str]) -> None:
        state["capacity"] = capacity
        await manager.get("a")
        keep_a_cache()
        await manager.get("b")
        assert list(manager.loaded) == loaded and state["loads"][-2:] == ["a", "b"]
        assert "a" not in loaded or manager.loaded["a"].engine.prompt_cache.cache is None
        assert state["used"] == state["held"] * len(loaded)

    asyncio.run(run(state["held"] + state["need"] + kv // 2, ["a", "b"]))
    manager.unload("a"), manager.unload("b")
    asyncio.run(run(state["held"] + state["need"] - kv // 2, ["b"]))


def gated_loads(monkeypatch) -> tuple[threading.Event, list[str]]:
    """The stand-in GPU's loads wait for `go`; `calls` names each load as its worker thread begins it."""
    import dgemma.plugin.cuda.weights as cw

    go, calls = threading.Event(), []
    load = cw.load_cuda_weights

    def slow(*a):
        calls.append(a[2].stem)
        assert go.wait(30)
        return load(*a)

    monkeypatch.setattr(cw, "load_cuda_weights", slow)
    return go, calls


async def loading(manager: ModelManager, name: str, calls: list[str]) -> asyncio.Task:
    """manager.get(name) in a task, once its load's worker thread has begun (calls: gated_loads', or a stand-in's)."""
    task = asyncio.create_task(manager.get(name))
    while name not in calls:
        await asyncio.sleep(0.01)
    return task


def test_a_load_outlives_the_request_that_gave_up_on_it(gpu, monkeypatch):
    """A client that goes away while its model loads (the worker thread cannot be stopped): the load goes on,
    keeps the model's lock and registers the model; the next request for it waits for that load instead of
    starting a second one beside it (twice the memory), and a load of another model waits its turn."""
    manager, state = gpu
    state["capacity"] = state["need"] * 3
    go, calls = gated_loads(monkeypatch)

    async def run() -> None:
        first = await loading(manager, "a", calls)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second, other = asyncio.create_task(manager.get("a")), asyncio.create_task(manager.get("b"))
        await asyncio.sleep(0.3)
        assert calls == ["a"] and not second.done() and not other.done()
        go.set()
        a, b = await second, await other
        assert calls == ["a", "b"] and state["loads"] == ["a", "b"] and state["used"] == 2 * state["held"]
        assert manager.loaded == {"a": a, "b": b} and second in a.claims and other in b.claims

    asyncio.run(run())


def test_a_failed_load_whose_request_gave_up_leaves_the_model_free_to_load(gpu, monkeypatch):
    import dgemma.plugin.cuda.weights as cw

    manager, state = gpu
    state["capacity"] = state["need"] * 3
    go, raised, calls = threading.Event(), threading.Event(), []
    load = cw.load_cuda_weights

    def flaky(*a):
        calls.append(a[2].stem)
        assert go.wait(30)
        if len(calls) == 1:
            raised.set()
            raise RuntimeError("a kernel that does not compile")
        return load(*a)

    monkeypatch.setattr(cw, "load_cuda_weights", flaky)

    async def run() -> None:
        first = await loading(manager, "a", calls)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        go.set()
        while not raised.is_set():
            await asyncio.sleep(0.01)
        a = await asyncio.wait_for(manager.get("a"), 30)  # the failed load's task released the model's lock
        assert calls == ["a", "a"] and manager.loaded == {"a": a} and state["loads"] == ["a"]

    asyncio.run(run())


def test_a_queued_load_that_no_request_wants_any_more_is_dropped(gpu, monkeypatch):
    """b's request goes away while b's load waits behind a's: b is not loaded (nor anything unloaded for it)."""
    manager, state = gpu
    state["capacity"] = state["need"] * 3
    go, calls = gated_loads(monkeypatch)

    async def run() -> None:
        a = await loading(manager, "a", calls)
        b = asyncio.create_task(manager.get("b"))
        key = str(manager.registry.resolve("b").path)  # (loads are one at a time per file)
        while not manager._wanted["b"] or not manager._loading.get(key) or not manager._loading[key].locked():
            await asyncio.sleep(0.01)  # b's request holds b's lock, its load waits for a's
        b.cancel()
        with pytest.raises(asyncio.CancelledError):
            await b
        go.set()
        await a
        for _ in range(20):  # b's load task, let go by a's: it ends without loading
            await asyncio.sleep(0.01)
        assert calls == ["a"] and list(manager.loaded) == ["a"] and not manager._loading[key].locked()
        assert (await manager.get("b")).entry.name == "b" and calls == ["a", "b"]  # asked again: it loads

    asyncio.run(run())


def test_a_stop_unloads_once_the_requests_holding_the_model_are_done(gpu):
    """As Ollama's `ollama stop` on a model that is generating: it goes when the generation ends, whatever that
    request's own keep_alive; a model loaded again later is not marked. An ordinary request's keep_alive 0 is
    not a stop: a later request's keep_alive still counts."""
    manager, state = gpu
    state["capacity"] = state["need"] * 3

    async def run() -> None:
        a = await manager.get("a")
        a.busy = 1  # generating
        await manager.stop("a")
        assert "a" in manager.loaded and a.stopping
        a.busy = 0
        manager.touch(a, 300)  # the generation ends with its keep_alive
        assert "a" not in manager.loaded
        again = await manager.get("a")
        again.busy = 2  # two requests: the first asks keep_alive 0, the second 5 minutes
        again.busy -= 1
        manager.touch(again, 0)
        again.busy -= 1
        manager.touch(again, 300)
        assert manager.loaded == {"a": again} and not again.stopping

    asyncio.run(run())


def test_an_idle_model_streaming_experts_is_unloaded_for_the_host_ram_they_hold(gpu, monkeypatch):
    """--host-experts N: each model keeps N layers' experts in page-locked host RAM. Where the machine has too
    little left for the next one's, an idle model that streams is unloaded for it (its RAM, not its VRAM), without
    first dropping the KV cache it keeps (in VRAM: no help for the RAM)."""
    from dgemma.plugin.kv_cache import KVCache

    manager, state = gpu
    state["capacity"] = state["need"] * 3  # VRAM enough for all
    manager.host_experts = 3
    a = asyncio.run(manager.get("a"))
    per_model = a.engine.host_bytes
    assert a.engine.host_layers == [1, 2, 3] and per_model > 0
    monkeypatch.setattr(offload, "available_ram",
                        lambda swap=True: per_model * 3 // 2 - sum(m.engine.host_bytes for m in manager.loaded.values()))

    async def run() -> None:
        a.engine.prompt_cache.put(KVCache(), [])
        b = await manager.get("b")
        assert list(manager.loaded) == ["b"] and b.engine.host_layers == [1, 2, 3]
        assert a.engine.prompt_cache.cache is not None  # unloaded with it, not dropped first
        b.busy = 1  # held: nothing to unload, the error
        with pytest.raises(RamShortageError, match="kept in host RAM need"):
            await manager.get("c")

    asyncio.run(run())


def test_an_idle_models_kv_cache_copies_go_for_host_ram_before_it(gpu, monkeypatch):
    """The copies of other conversations' KV caches a model keeps in host RAM (--cache-ram, PromptCache.saved) go
    before the model itself where the next model's streamed experts need the RAM: here that makes room, and a
    stays loaded, its live cache (VRAM) kept."""
    from dgemma.plugin.kv_cache import KeptPrompt, KVCache

    manager, state = gpu
    state["capacity"] = state["need"] * 3
    manager.host_experts = 3
    a = asyncio.run(manager.get("a"))
    per_model = a.engine.host_bytes
    kept = a.engine.prompt_cache
    monkeypatch.setattr(offload, "available_ram", lambda swap=True: per_model * 5 // 2 - per_model * len(kept.saved)
                        - sum(m.engine.host_bytes for m in manager.loaded.values()))
    kept.put(KVCache(), [])
    kept.saved.append(KeptPrompt(KVCache(), [2, 3], 2, None))  # counted as per_model bytes of RAM above
    assert kept.holds("cpu", "cuda") and kept.holds("cuda", "cuda")
    b = asyncio.run(manager.get("b"))
    assert list(manager.loaded) == ["a", "b"] and b.engine.host_layers == [1, 2, 3]
    assert kept.saved == [] and not kept.holds("cpu", "cuda") and kept.cache is not None
    # a model that streams nothing, whose copies are all it holds of host RAM: they go, and it stays
    monkeypatch.setattr(offload, "available_ram", lambda swap=True: per_model * 2 - 1 - per_model * len(kept.saved)
                        - sum(m.engine.host_bytes for m in manager.loaded.values()))
    manager.unload("a"), manager.unload("b")
    manager.host_experts = 0
    a = asyncio.run(manager.get("a"))
    kept = a.engine.prompt_cache
    kept.saved.append(KeptPrompt(KVCache(), [2, 3], 2, None))
    manager.host_experts = 3
    b = asyncio.run(manager.get("b"))
    assert list(manager.loaded) == ["a", "b"] and a.engine.host_bytes == 0 and kept.saved == []


def test_idle_models_are_unloaded_before_experts_stream_and_held_ones_are_not(gpu, default_gguf):
    """As Ollama unloads idle models before it splits one between the GPU and the CPU: the new model loads whole
    once an idle one is gone; beside a model a request holds, it streams the experts of as few layers as the
    room left needs (host_experts "auto", the default), or the request gets the error (host_experts 0)."""
    manager, state = gpu
    reader = open_gguf(default_gguf)  # (a, b and c are copies of it)
    cfg = ModelConfig.from_gguf(reader, default_gguf)
    streamed = offload.spread(cfg.n_layer, cfg.n_layer)  # all four: the room left beside a is what they need
    state["capacity"] = state["held"] + vram_estimate(reader, cfg, streamed).total  # one whole, one streamed

    async def run() -> None:
        await manager.get("a")
        b = await manager.get("b")  # would fit streamed beside a, but a is idle: a goes, b loads whole
        assert list(manager.loaded) == ["b"] and b.engine.host_layers == [] and state["loads"] == ["a", "b"]
        b.busy = 1  # a request holds b
        a = await manager.get("a")
        assert sorted(manager.loaded) == ["a", "b"] and a.engine.host_layers == streamed
        assert state["loads"] == ["a", "b", f"a streaming {len(streamed)}"] and "host RAM" in a.engine.describe()
        a.busy, manager.host_experts = 1, 0
        with pytest.raises(GpuMemoryError, match="needs about"):
            await manager.get("c")

    asyncio.run(run())


def test_a_model_larger_than_the_gpu_unloads_idle_ones_then_streams(gpu, default_gguf, monkeypatch):
    """A model the whole GPU cannot hold, but can with streamed experts: the idle models go first (the
    loads in between still ask for the GPU alone), then it streams; one that even streaming cannot fit unloads
    nothing."""
    import dgemma.plugin.cuda.weights as cw

    manager, state = gpu
    reader = open_gguf(default_gguf)
    cfg = ModelConfig.from_gguf(reader, default_gguf)
    state["capacity"] = state["need"] - 1  # the default model streams three layers' experts to fit
    asked = []
    plan = cw.vram_plan
    monkeypatch.setattr(cw, "vram_plan", lambda *a: asked.append(a[3]) or plan(*a))

    async def run() -> None:
        await manager.get("a")
        assert state["loads"] == ["a streaming 3"] and asked == [0, "auto"]
        asked.clear()
        await manager.get("b")  # a is idle: unloaded before b streams (a streams too: it could stay beside)
        assert list(manager.loaded) == ["b"] and asked == [0, 0, "auto"]
        state["capacity"], state["used"] = vram_estimate(reader, cfg, [0, 1, 2, 3]).total - 1, 0  # (b's, forgotten)
        asked.clear()
        with pytest.raises(GpuMemoryError, match="needs about") as e:
            await manager.get("c")
        assert e.value.streaming_hopeless and list(manager.loaded) == ["b"] and asked == [0]

    asyncio.run(run())


def test_the_soonest_to_expire_goes_first_and_only_as_many_as_needed(gpu):
    manager, state = gpu
    state["capacity"] = state["need"] * 5 // 2  # room for two models

    async def run() -> None:
        manager.touch(await manager.get("a"), 600)
        manager.touch(await manager.get("b"), 60)  # b expires first (and nothing here holds either)
        await manager.get("c")
        assert sorted(manager.loaded) == ["a", "c"]
        assert state["used"] == 2 * state["held"]

    asyncio.run(run())


def test_a_model_another_request_got_is_not_unloaded_before_it_generates(gpu):
    """Between ModelManager.get and its generation counting as busy, a request still holds the model (its task
    claimed it): another request's load does not unload it, until that request has answered."""
    manager, state = gpu
    state["capacity"] = state["need"] * 3 // 2

    async def run() -> None:
        got, answer = asyncio.Event(), asyncio.Event()

        async def first_request() -> None:
            await manager.get("a")
            got.set()
            await answer.wait()  # about to generate: not busy yet

        first = asyncio.create_task(first_request())
        await got.wait()
        with pytest.raises(GpuMemoryError):
            await manager.get("b")
        assert list(manager.loaded) == ["a"] and state["loads"] == ["a"] and state["used"] == state["held"]
        answer.set()
        await first
        await manager.get("b")  # a has answered: it goes
        assert list(manager.loaded) == ["b"]

    asyncio.run(run())


def test_nothing_is_unloaded_for_a_model_larger_than_the_gpu(gpu):
    manager, state = gpu
    state["capacity"] = state["need"] * 3 // 2

    async def run() -> None:
        await manager.get("a")
        state["capacity"], state["used"] = state["need"] // 2, 0  # a GPU smaller than one model
        with pytest.raises(GpuMemoryError) as e:
            await manager.get("b")
        assert e.value.need > e.value.total and list(manager.loaded) == ["a"]

    asyncio.run(run())


def test_a_cancelled_stream_holds_its_model_until_its_worker_stops(default_gguf, tmp_path):
    """A stream cancelled as Starlette cancels one whose client went away (anyio, which cancels again and again):
    the model is still busy, and its queue held, until the worker thread has stopped at its next denoising step.
    Also, a model loaded and never generated with expires after the default keep-alive, not never."""
    import threading
    import time

    import anyio

    from dgemma.plugin.engine import GenerateOptions
    from dgemma.plugin.server.serving import generate_stream

    registry = Registry(tmp_path / "models")
    registry.import_file(shutil.copy(default_gguf, tmp_path / "a.gguf"), name="a")
    manager = ModelManager(registry, default_keep_alive=60, backend="torch")

    def generating() -> bool:
        return any(t.name == "dgemma-generate" and t.is_alive() for t in threading.enumerate())

    async def run() -> None:
        model = await manager.get("a")
        assert model.expires_at < time.monotonic() + 61
        opts = GenerateOptions(seed=1, max_tokens=400, eos_ids=set(), on_step=lambda info: time.sleep(0.1))
        first = anyio.Event()

        async def consume() -> None:
            async for _ in generate_stream(manager, model, "hi", opts, 60):
                first.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await first.wait()
            assert model.busy == 1 and generating()
            tg.cancel_scope.cancel()
        assert model.busy == 0 and not model.queue.locked() and not generating()

    anyio.run(run)


def test_the_torch_backend_unloads_an_idle_model_for_want_of_ram(default_gguf, tmp_path, monkeypatch):
    """The same on the machine's memory for the torch backend's float32 weights (RamShortageError): the available
    memory is a capacity less the weight sets still alive."""
    import dgemma.plugin.engine as engine_module
    import dgemma.plugin.weights as pw

    registry = Registry(tmp_path / "models")
    for name in ("a", "b"):
        registry.import_file(shutil.copy(default_gguf, tmp_path / f"{name}.gguf"), name=name)
    reader = open_gguf(default_gguf)
    need = pw.float32_bytes(reader, ModelConfig.from_gguf(reader, default_gguf))
    state = {"used": 0}

    def load_weights(*a, **k):
        w = pw.load_weights(*a, **k)
        state["used"] += need
        weakref.finalize(w, lambda: state.__setitem__("used", state["used"] - need))
        return w

    monkeypatch.setattr(engine_module, "load_weights", load_weights)
    monkeypatch.setattr(pw, "available_ram", lambda: need * 3 // 2 - state["used"])
    manager = ModelManager(registry, backend="torch")

    async def run() -> None:
        await manager.get("a")
        await manager.get("b")
        assert list(manager.loaded) == ["b"] and state["used"] == need

    asyncio.run(run())


def test_ps_reports_streamed_experts_outside_size_vram(gpu, default_gguf, capsys):
    """Through the real server on loopback and the official ollama client: a model that streams its experts
    reports in /api/ps as its size the file's plus the slots the experts are copied into, and as size_vram that
    less the streamed bytes; `dgemma ps` shows the share in host RAM as CPU; the server's log says it streams."""
    import ollama

    from dgemma.plugin.remote import processor, ps_table, running
    from dgemma.plugin.server.app import ServerConfig, create_app

    manager, state = gpu
    reader = open_gguf(default_gguf)
    cfg = ModelConfig.from_gguf(reader, default_gguf)
    state["capacity"] = vram_estimate(reader, cfg, [0, 1, 2, 3]).total  # the whole GPU: all four layers stream
    app = create_app(ServerConfig(models=manager.registry.root, backend="cuda"))
    with serving(app) as url:
        client = ollama.Client(host=url)
        assert client.generate(model="a", prompt="").done_reason == "load"
        (loaded,) = client.ps().models
        engine = app.state.dgemma.manager.loaded["a"].engine
        sizes = offload.expert_bytes(reader, cfg.n_layer)
        host, slots = sum(map(sum, sizes)), 2 * offload.slot_bytes(*sizes[0])
        assert engine.host_layers == [0, 1, 2, 3] and (engine.host_bytes, engine.slot_bytes) == (host, slots)
        assert loaded.size == default_gguf.stat().st_size + slots and loaded.size_vram == loaded.size - host
        split = processor(loaded.size, loaded.size_vram)  # what `dgemma ps` (and `ollama ps`) show
        assert split.endswith("% CPU/GPU") and split != "0%/100% CPU/GPU" and split in ps_table(running(url))
        assert "dgemma serve: a.gguf: the experts of 4 of 4 layers (0.01 GiB) stay in host RAM" in capsys.readouterr().out


def test_ps_counts_the_kept_kv_cache(tmp_path, default_gguf):
    """/api/ps's size: the file, then also the KV cache the last generation left (torch backend: size_vram 0);
    its context_length: Ollama's default num_ctx until a request sets one, then the last request's (within the
    model's own), a load-only request's too."""
    import ollama

    from dgemma.plugin.server.app import ServerConfig, create_app

    Registry(tmp_path / "models").import_file(shutil.copy(default_gguf, tmp_path / "a.gguf"), name="a")
    app = create_app(ServerConfig(models=tmp_path / "models", backend="torch"))
    with serving(app) as url:
        client = ollama.Client(host=url)
        assert client.generate(model="a", prompt="").done_reason == "load"
        assert client.ps().models[0].size == default_gguf.stat().st_size
        engine = app.state.dgemma.manager.loaded["a"].engine
        engine.cfg.context_length = 8192  # (the default model's is Ollama's default, 4096)
        assert client.ps().models[0].context_length == 4096
        client.generate(model="a", prompt="Once upon a time", options={"seed": 1, "num_predict": 4, "num_ctx": 300})
        kept = engine.prompt_cache.nbytes
        (loaded,) = client.ps().models
        assert kept > 0 and loaded.size == default_gguf.stat().st_size + kept and loaded.size_vram == 0
        assert loaded.context_length == 300
        client.generate(model="a", prompt="Once", options={"num_predict": 1, "num_ctx": 100_000})
        assert client.ps().models[0].context_length == 8192
        assert client.generate(model="a", prompt="", options={"num_ctx": 6000}).done_reason == "load"
        assert client.ps().models[0].context_length == 6000
        client.chat(model="a", messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 1})
        assert client.ps().models[0].context_length == 4096


def test_a_stop_request_unloads_without_loading_first(gpu):
    """keep_alive 0 with nothing to generate (`ollama stop`, `dgemma stop`): the model goes if it is loaded, and
    is not loaded first to be unloaded (which could unload idle models for it); an unknown name is a 404."""
    import ollama

    from dgemma.plugin.remote import stop
    from dgemma.plugin.server.app import ServerConfig, create_app

    manager, state = gpu
    state["capacity"] = state["need"] * 3
    with serving(create_app(ServerConfig(models=manager.registry.root, backend="cuda"))) as url:
        client = ollama.Client(host=url)
        assert client.generate(model="a", prompt="", keep_alive=0).done_reason == "unload"
        assert client.chat(model="a", messages=[], keep_alive=0).done_reason == "unload"
        assert state["loads"] == [] and client.ps().models == []
        with pytest.raises(ollama.ResponseError) as e:
            client.generate(model="nope", prompt="", keep_alive=0)
        assert e.value.status_code == 404
        assert client.chat(model="a", messages=[]).done_reason == "load" and state["loads"] == ["a"]
        client.generate(model="a", prompt="", keep_alive=10**12)  # (its date would pass the year 9999)
        assert client.ps().models[0].expires_at.year == 2262  # Ollama's "forever"
        assert stop(url, "a") == "a:latest" and client.ps().models == [] and state["loads"] == ["a"]
    # the server's own keep_alive 0 (--keep-alive 0) with a request that asks none: a load, as it says
    with serving(create_app(ServerConfig(models=manager.registry.root, backend="cuda", keep_alive=0))) as url:
        client = ollama.Client(host=url)
        assert client.generate(model="a", prompt="").done_reason == "load" and state["loads"] == ["a", "a"]
        assert client.chat(model="a", messages=[]).done_reason == "load" and state["loads"] == ["a", "a", "a"]
        assert client.ps().models == []  # (kept alive for 0 s)


def test_a_model_made_from_another_shares_its_loaded_weights(gpu, monkeypatch):
    """`dgemma create made` FROM a: both names use a's file, so the second loads nothing (as Ollama keeps one
    runner per model file): the same engine and queue (one generation at a time on it), its own settings. A load
    for room takes both names, since one alone frees nothing; while one of them is held neither goes."""
    from dgemma.plugin.modelfile import ModelSettings

    manager, state = gpu
    manager.registry.create("made", "a", ModelSettings(system="Be brief."))
    state["capacity"] = state["need"] * 3 // 2  # room for one model
    go, calls = gated_loads(monkeypatch)

    async def run() -> None:
        first = await loading(manager, "a", calls)
        second = asyncio.create_task(manager.get("made"))  # waits for a's load, then shares it
        await asyncio.sleep(0.2)
        assert not second.done()
        go.set()
        a, made = await first, await second
        assert state["loads"] == ["a"] and state["used"] == state["held"]
        assert made.engine is a.engine and made.queue is a.queue and made.info is a.info
        assert made.entry.settings.system == "Be brief." and a.entry.settings.system is None
        manager.touch(a, 0)  # a goes, its weights stay for made
        assert list(manager.loaded) == ["made"] and state["used"] == state["held"]
        a = await manager.get("a")
        assert a.engine is made.engine and state["loads"] == ["a"]
        made.busy = 1  # a request holds made: a, idle, is not unloaded for b (that would free nothing)
        with pytest.raises(GpuMemoryError):
            await manager.get("b")
        assert sorted(manager.loaded) == ["a", "made"]
        made.busy = 0
        del a, made, first, second  # (the tasks hold their results)
        await manager.get("b")  # both names go
        assert list(manager.loaded) == ["b"] and state["used"] == state["held"] and state["loads"] == ["a", "b"]

    asyncio.run(run())


def test_a_file_replaced_at_the_same_path_is_another_model(gpu, tmp_path):
    """A path whose file was replaced (its name removed and the file name given again) is loaded anew, under its
    own name or a twin's, never served with the old file's weights."""
    from dgemma.plugin.modelfile import ModelSettings

    manager, state = gpu
    state["capacity"] = state["need"] * 4
    manager.registry.create("made", "a", ModelSettings(system="S."))

    async def run() -> None:
        a = await manager.get("a")
        path = a.entry.path
        shutil.copy(manager.registry.resolve("b").path, tmp_path / "other.gguf")
        os.replace(tmp_path / "other.gguf", path)  # (another file where a's was)
        made = await manager.get("made")
        assert made.engine is not a.engine and state["loads"] == ["a", "a"]
        again = await manager.get("a")
        assert again.engine is made.engine and again is not a and state["loads"] == ["a", "a"]

    asyncio.run(run())


def test_shared_weights_go_by_their_last_keep_alive_and_not_while_one_generates(gpu):
    """a kept forever and its twin made for 5 minutes outlast c kept for 10: a load for room takes c. A generation
    on the shared engine holds it (a stays) even once its own name is unloaded (deleted meanwhile)."""
    from dgemma.plugin.modelfile import ModelSettings

    manager, state = gpu
    manager.registry.create("made", "a", ModelSettings(system="S."))
    state["capacity"] = state["held"] + state["need"] * 3 // 2  # room for two models

    async def run() -> None:
        a, made = await manager.get("a"), await manager.get("made")
        manager.touch(manager.loaded["c"] if "c" in manager.loaded else await manager.get("c"), 600)
        manager.touch(a, float("inf")), manager.touch(made, 300)
        await manager.get("b")
        assert sorted(manager.loaded) == ["a", "b", "made"] and state["loads"] == ["a", "c", "b"]
        await made.queue.acquire()  # made generates...
        manager.unload("made")  # ...and its name goes meanwhile
        manager.touch(a, 1)  # a, soonest to expire, would go first were its weights not in use
        await manager.get("c")  # b goes instead
        assert sorted(manager.loaded) == ["a", "c"] and manager.loaded["a"] is a and state["loads"][-1] == "c"
        made.queue.release()

    asyncio.run(run())
