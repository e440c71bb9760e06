"""`dgemma run` and the bundled default model, through the real command line."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter

from dgemma.plugin.default_model import BUNDLED, ensure_default_model
from dgemma.plugin.engine import DoneEvent, Engine, GenerateOptions, TextEvent


def run_cli(models: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DGEMMA_MODELS": str(models)}
    return subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "run", *args], capture_output=True, text=True,
                          input=stdin, env=env, timeout=300)


def test_default_model_is_deterministic_and_loads(tmp_path, models):
    other = ensure_default_model(tmp_path)
    assert other.read_bytes() == (models / "default.gguf").read_bytes()
    engine = Engine.load(other)
    assert engine.cfg.n_layer == 4 and engine.cfg.is_swa == [True, True, True, False] and engine.cfg.n_expert == 8
    trained = json.loads((BUNDLED.parent / "default-train.json").read_text())["model"]
    assert engine.cfg.n_embd == 256 and engine.cfg.canvas_length == trained["canvas_length"]
    assert engine.tokenizer.chat_template and engine.tokenizer.vocab_size == 4096


def test_run_streams_what_the_engine_generates(models):
    engine = Engine.load(models / "default.gguf")
    events = list(engine.generate("Once upon a time", GenerateOptions(seed=7, max_tokens=40)))
    expected = "".join(e.text for e in events if isinstance(e, TextEvent))
    proc = run_cli(models, "default", "Once upon a time", "--seed", "7", "--max-tokens", "40")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n"


def test_run_json_with_prompt_ids_and_stats(models):
    proc = run_cli(models, "default", "--prompt-ids", "2,105,40,41", "--json", "--max-tokens", "10", "--seed", "1")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    engine = Engine.load(models / "default.gguf")
    done = list(engine.generate([2, 105, 40, 41], GenerateOptions(seed=1, max_tokens=10)))[-1]
    assert isinstance(done, DoneEvent)
    assert out["token_ids"] == done.token_ids and out["canvases"] == done.canvases
    assert out["prompt_eval_count"] == 4 and out["seed"] == 1 and out["steps_per_canvas"] == done.steps_per_canvas
    proc = run_cli(models, "default", "hello", "--stats", "--max-tokens", "8", "--steps", "3", "--seed", "2")
    assert proc.returncode == 0 and "tokens per forward:" in proc.stderr and "steps: 3" in proc.stderr
    if not _cuda_usable():  # --backend auto, without a GPU: the torch backend, and it says so
        assert "backend:              torch on the CPU (rng torch, KV cache f32)" in proc.stderr


def test_run_reads_the_prompt_from_stdin_and_can_visualize(models):
    a = run_cli(models, "default", "--seed", "3", "--max-tokens", "12", stdin="Hello there")
    b = run_cli(models, "default", "Hello there", "--seed", "3", "--max-tokens", "12")
    assert a.returncode == 0 and a.stdout == b.stdout
    v = run_cli(models, "default", "Hello there", "--seed", "3", "--max-tokens", "12", "--visualize")
    assert v.returncode == 0 and b.stdout.strip()[:5] in v.stdout


def test_run_errors_are_one_line(models, tmp_path):
    llama = tmp_path / "llama.gguf"
    w = GGUFWriter(llama, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a gguf")
    cases = [
        (str(tmp_path / "missing.gguf"), "no such file"),
        (str(junk), "not a GGUF file"),
        (str(llama), "architecture is 'llama'"),
        (str(tmp_path), "is a directory"),
        ("no-such-model", "not found"),
    ]
    for model, needle in cases:
        proc = run_cli(models, model, "hi")
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        assert proc.returncode == 1 and len(lines) == 1 and needle in lines[0], (model, proc.stderr)
    proc = run_cli(models, "default", "--prompt-ids", "2,x")
    assert proc.returncode == 1 and "--prompt-ids" in proc.stderr


def test_run_with_counter_draws(models):
    """--rng counter on the torch backend: what the engine generates with rng="counter" (the cuda
    backend's draws), reproducible per seed; an unknown --rng is refused by argparse."""
    engine = Engine.load(models / "default.gguf", rng="counter")
    events = list(engine.generate("Tell me a fortune.", GenerateOptions(seed=2, max_tokens=12)))
    expected = "".join(e.text for e in events if isinstance(e, TextEvent))
    proc = run_cli(models, "default", "Tell me a fortune.", "--seed", "2", "--max-tokens", "12", "--rng", "counter",
                   "--stats")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n" and expected.strip()
    # on this model and seed both kinds of draws happen to give the same text: the engine says which ran
    assert "(rng counter, KV cache f32)" in proc.stderr
    f16 = run_cli(models, "default", "Tell me a fortune.", "--seed", "2", "--max-tokens", "12", "--kv-cache", "f16",
                  "--stats")
    assert f16.returncode == 0 and f16.stdout.strip(), f16.stderr
    assert "(rng torch, KV cache f16)" in f16.stderr
    bad = run_cli(models, "default", "hi", "--rng", "philox")
    assert bad.returncode == 2 and "invalid choice: 'philox'" in bad.stderr
    with pytest.raises(ValueError, match="rng 'philox' is not available"):
        Engine.load(models / "default.gguf", rng="philox")


def _cuda_missing() -> str | None:
    """What this machine lacks for the cuda backend, in check_cuda's words (CuPy, a GPU ...), or None."""
    from dgemma.plugin.cuda import CudaUnavailable, check_cuda

    try:
        check_cuda()
    except CudaUnavailable as e:
        return str(e)
    return None


def _cuda_usable() -> bool:
    return _cuda_missing() is None


@pytest.mark.skipif(_cuda_usable(), reason="here the cuda backend can run: auto picks it")
def test_backend_auto_is_torch_without_a_gpu_and_falls_back_when_the_gpu_side_fails(models, monkeypatch, tmp_path):
    import dgemma.plugin.cuda as cuda
    from dgemma.plugin.engine import EngineError, pick_backend

    path = models / "default.gguf"
    assert pick_backend("auto") == "torch"
    with pytest.raises(EngineError, match=re.escape(_cuda_missing())):  # asked for by name: says what is missing
        pick_backend("cuda")
    with monkeypatch.context() as m:  # without CuPy (whether or not this machine has it): named
        m.setitem(sys.modules, "cupy", None)
        with pytest.raises(EngineError, match="cuda backend needs CuPy"):
            pick_backend("cuda")
    engine = Engine.load(path, "auto")
    assert engine.device.type == "cpu" and engine.rng == "torch" and engine.matmul == {}
    with pytest.raises(EngineError, match="backend 'gpu' is not available"):
        pick_backend("gpu")
    # as if CuPy and a GPU were there: the cuda backend is tried, fails on the GPU side (this torch has no
    # CUDA), and auto falls back to the torch backend on the CPU, saying why
    monkeypatch.setattr(cuda, "check_cuda", lambda: (8, 0))
    assert pick_backend("auto") == "cuda"
    with pytest.warns(RuntimeWarning, match="the cuda backend could not load .*default.gguf.*using the torch backend"):
        engine = Engine.load(path, "auto")
    assert engine.device.type == "cpu" and engine.rng == "torch"
    import dgemma.plugin.weights as pw  # too little RAM for the fallback: one error that says why cuda is not used
    from dgemma.plugin.engine import RamShortageError
    from dgemma.plugin.inspect import open_gguf

    need = pw.float32_bytes(open_gguf(path), engine.cfg)
    with monkeypatch.context() as m:
        m.setattr(pw, "available_ram", lambda: need - 1)
        with pytest.warns(RuntimeWarning, match="the cuda backend could not load"), \
                pytest.raises(RamShortageError, match=r"of memory available: the cuda backend, which keeps them "
                                                      r"quantized, could not load it \(.+\)$"):
            Engine.load(path, "auto")
    with pytest.raises(EngineError, match="missing.gguf"):  # not the GPU's fault: no fallback, the same error
        Engine.load(tmp_path / "missing.gguf", "auto")


def test_a_gpu_with_too_little_free_memory_is_one_clear_error_before_the_load(models, monkeypatch):
    """The cuda backend measures the model against the GPU's free memory before loading anything: too little
    is an EngineError naming the file, both figures and the --fit plan for the card, for "auto" too (not a
    fallback to float32 weights in RAM). Without a GPU here, CuPy and the GPU are stood in for."""
    import torch

    import dgemma.plugin.cuda as cuda
    import dgemma.plugin.cuda.weights as cw
    from dgemma.plugin.config import ModelConfig
    from dgemma.plugin.engine import EngineError, GpuMemoryError
    from dgemma.plugin.inspect import open_gguf

    assert issubclass(GpuMemoryError, EngineError)
    path = models / "default.gguf"
    loads = []
    monkeypatch.setattr(cuda, "check_cuda", lambda: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3060")
    monkeypatch.setattr(cw, "load_cuda_weights", lambda *a: loads.append(a) or pytest.fail("loaded"))
    free = {"bytes": 3 << 20}
    def mem_get_info(device: int) -> tuple[int, int]:
        assert isinstance(device, int)  # torch 2.4 takes no device without an index ("cuda")
        return free["bytes"], 12 << 30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    for name in ("current_device", "memory_reserved", "memory_allocated"):  # (on a GPU: not this process's own)
        monkeypatch.setattr(torch.cuda, name, lambda device=None: 0)
    for backend in ("cuda", "auto"):
        with pytest.raises(GpuMemoryError) as e:  # an EngineError: one line, and no fallback for auto
            Engine.load(path, backend)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"{path}: the cuda backend needs about ")
        assert "RTX 3060 has 0.00 GiB free of 12.00" in msg and "--fit 12GB" in msg
    need = cw.vram_estimate(open_gguf(path), ModelConfig.from_gguf(open_gguf(path), path)).total
    assert 3 << 20 < need < 1 << 30  # the default model: 11 MB of weights and its canvas's working memory
    free["bytes"] = need  # exactly enough: the load goes on
    with pytest.raises(pytest.fail.Exception, match="loaded"):
        Engine.load(path, "cuda")
    assert len(loads) == 1

    def short(*a):  # the estimate fell short: CUDA's own error during the load is the same one-line error
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB\n(GPU 0; ...)")

    monkeypatch.setattr(cw, "load_cuda_weights", short)
    for backend in ("cuda", "auto"):
        with pytest.raises(GpuMemoryError, match=r"^\S+default.gguf: the GPU ran out of memory while loading this "
                                                  r"model: convert it with a smaller --fit, or free GPU memory$"):
            Engine.load(path, backend)


def test_too_little_ram_for_the_torch_backends_float32_weights_is_one_line(models, monkeypatch):
    """The torch backend dequantizes every tensor to float32 (about 100 GiB for the 26B): where the machine has
    less memory available, Engine.load says so before loading, instead of the kernel ending the process."""
    import dgemma.plugin.weights as pw
    from dgemma.plugin.config import ModelConfig
    from dgemma.plugin.engine import EngineError, RamShortageError
    from dgemma.plugin.inspect import open_gguf
    from dgemma.plugin.weights import load_weights

    assert issubclass(RamShortageError, EngineError)

    path = models / "default.gguf"
    reader = open_gguf(path)
    from cuda_util import held_bytes

    weights = load_weights(reader, ModelConfig.from_gguf(reader, path), path)
    need = pw.float32_bytes(reader, ModelConfig.from_gguf(reader, path))
    assert need == held_bytes(weights)  # what the estimate counts is what load_weights holds
    monkeypatch.setattr(pw, "available_ram", lambda: need - 1)
    with pytest.raises(RamShortageError) as e:  # an EngineError: one line
        Engine.load(path, "torch")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path}: the torch backend holds the weights as float32, about ")
    assert "cuda backend" in msg
    monkeypatch.setattr(pw, "available_ram", lambda: need)
    assert Engine.load(path, "torch").cfg.n_layer > 0
    monkeypatch.setattr(pw, "available_ram", lambda: None)  # not known (not Linux): no check
    assert Engine.load(path, "torch").cfg.n_layer > 0


@pytest.mark.skipif(_cuda_usable(), reason="here the cuda backend can run")
def test_serve_with_the_cuda_backend_says_what_is_missing(models):
    env = {**os.environ, "DGEMMA_MODELS": str(models)}
    proc = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "serve", "--backend", "cuda", "--port", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert _cuda_missing() in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_stats_name_the_kernels_and_the_head():
    """--stats on the cuda backend: its matmul kernels per weight shape and the vocabulary head's form (the
    tuner's classes; plugin/cuda/tune.py), here from a stand-in engine."""
    from types import SimpleNamespace

    from dgemma.plugin.run import backend_lines

    torch_engine = SimpleNamespace(describe=lambda: "torch on the CPU (rng torch, KV cache f32)", matmul={})
    assert backend_lines(torch_engine) == ["backend:              torch on the CPU (rng torch, KV cache f32)"]
    plan = {"dense Q4_K 4096x2816": "int8", "experts Q4_K 1408x2816": "int8", "dense Q6_K 2816x4096 unbounded": "scalar"}
    for head, form in (("f16", "by vocabulary chunks on f16 tensor cores"), ("scalar", "fused float kernel")):
        gpu = SimpleNamespace(describe=lambda: "cuda on H100", matmul={**plan, "head Q6_K 262144x2816": head})
        lines = backend_lines(gpu)
        assert lines[1].endswith("weight shapes") and ("int8 for 2" in lines[1]) and lines[2].endswith(form)


def test_run_think(models):
    """--think: the template's thinking mode (a different prompt, so other tokens); with --raw it is refused."""
    engine = Engine.load(models / "default.gguf")
    opts = GenerateOptions(seed=7, max_tokens=12, split_thinking=True)
    events = list(engine.generate("Once upon a time", opts, enable_thinking=True))
    assert events[-1].prompt_eval_count == len(engine.prompt_ids("Once upon a time", enable_thinking=True))
    answer = "".join(e.text for e in events if isinstance(e, TextEvent))
    plain = "".join(e.text for e in engine.generate("Once upon a time", GenerateOptions(seed=7, max_tokens=12))
                    if isinstance(e, TextEvent))
    assert answer != plain  # (so that a --think left out shows)
    proc = run_cli(models, "default", "Once upon a time", "--seed", "7", "--max-tokens", "12", "--think", "--hidethinking")
    assert proc.returncode == 0 and proc.stdout == answer + "\n", proc.stderr
    proc = run_cli(models, "default", "x", "--think", "--raw")
    assert proc.returncode != 0 and "--think needs the chat template" in proc.stderr


def test_run_format_json(models):
    """`dgemma run --format json` (as `ollama run --format json`): the reply the engine gives in JSON mode, which
    parses as an object; not with --think."""
    engine = Engine.load(models / "default.gguf")
    events = engine.generate("Reply in JSON", GenerateOptions(seed=4, max_tokens=30, format="json"))
    expected = "".join(e.text for e in events if isinstance(e, TextEvent))
    proc = run_cli(models, "default", "Reply in JSON", "--seed", "4", "--max-tokens", "30", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected + "\n" and isinstance(json.loads(proc.stdout), dict)
    refused = run_cli(models, "default", "x", "--format", "json", "--think")
    assert refused.returncode != 0 and "--format leaves out the thinking" in refused.stderr
