"""The server's model manager on a GPU that is too full (plugin/server/serving.py ModelManager): as Ollama does,
idle models are unloaded, soonest to expire first, until the new one fits; a model a request holds never is.

There is no GPU here: the cuda backend's Engine.load runs for real up to its weights, which are the cuda weight
objects on the CPU (tests/cuda_util.py), and the GPU's free memory is what a fixed capacity leaves after the
weight sets still alive. So a manager that kept a reference to an unloaded engine would free nothing, and the
next load would fail."""

from __future__ import annotations

import asyncio
import shutil
import weakref

import pytest
import torch
from cuda_util import cpu_cuda_weights

from dgemma.plugin.config import ModelConfig
from dgemma.plugin.engine import GpuMemoryError
from dgemma.plugin.inspect import open_gguf
from dgemma.plugin.registry import Registry
from dgemma.plugin.server.serving import ModelManager


@pytest.fixture
def gpu(default_gguf, tmp_path, monkeypatch):
    """A registry of three names for the default model, and a stand-in GPU: returns (manager, state), where
    state["capacity"] is the GPU's memory in bytes and state["need"] what one model takes of it."""
    import dgemma.plugin.cuda as cuda
    import dgemma.plugin.cuda.tune as tune
    import dgemma.plugin.cuda.weights as cw

    registry = Registry(tmp_path / "models")
    for name in ("a", "b", "c"):
        registry.import_file(shutil.copy(default_gguf, tmp_path / f"{name}.gguf"), name=name)
    reader = open_gguf(default_gguf)
    state = {"need": cw.vram_estimate(reader, ModelConfig.from_gguf(reader, default_gguf)).total, "used": 0,
             "loads": []}

    def load(reader, cfg, path, device):
        weights, _ = cpu_cuda_weights(path)
        state["used"] += state["need"]
        state["loads"].append(path.stem)
        weakref.finalize(weights, lambda: state.__setitem__("used", state["used"] - state["need"]))
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
        assert list(manager.loaded) == ["a"] and state["used"] == state["need"]
        b = await manager.get("b")  # does not fit beside a: a goes
        assert list(manager.loaded) == ["b"] and state["used"] == state["need"]
        assert state["loads"] == ["a", "b"]
        b.busy = 1  # a request holds b: it stays, and a cannot load
        with pytest.raises(GpuMemoryError, match=r"Test GPU has 0\.\d\d GiB free of 0\.\d\d: .* --fit 1GB"):
            await manager.get("a")
        assert list(manager.loaded) == ["b"] and state["loads"] == ["a", "b"]

    asyncio.run(run())


def test_the_soonest_to_expire_goes_first_and_only_as_many_as_needed(gpu):
    manager, state = gpu
    state["capacity"] = state["need"] * 5 // 2  # room for two models

    async def run() -> None:
        manager.touch(await manager.get("a"), 600)
        manager.touch(await manager.get("b"), 60)  # b expires first (and nothing here holds either)
        await manager.get("c")
        assert sorted(manager.loaded) == ["a", "c"]
        assert state["used"] == 2 * state["need"]

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
        assert list(manager.loaded) == ["a"] and state["loads"] == ["a"] and state["used"] == state["need"]
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
