"""bench/model_gpu.py's machinery on the CPU at tiny shapes, with the csrc kernels replaced by their references
(as tests/test_cuda_glue.py does): synthetic weights from a conversion plan, the ModelConfig from config.json
alone, the fused and the logits step. A GPU session's 15 minutes should not be spent on a typo."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SPECS

import model_gpu  # bench/ (pyproject's pythonpath)
import synthetic

from dgemma.quant.planner import PLAN_CTX


def test_config_from_config_json_equals_the_converted_files(checkpoint_factory, tmp_path):
    from dgemma.convert import convert
    from dgemma.plugin.engine import Engine

    ckpt = checkpoint_factory(SPECS["odd"])
    convert(ckpt, tmp_path / "odd.gguf", "F32", quiet=True)
    assert synthetic.model_config(ckpt) == Engine.load(tmp_path / "odd.gguf").cfg


def test_26b_shapes_and_plans():
    cfg = synthetic.model_config(synthetic.CONFIG_26B)
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size, cfg.n_expert, cfg.canvas_length) == (30, 2816, 262144, 128, 256)
    assert cfg.is_swa.count(False) == 5 and cfg.head_dim_full == 512
    for plan, lo, hi in (("Q4_K_M", 15.0, 16.5), ("12GB", 9.5, 11.0)):
        rows = synthetic.plan_rows(synthetic.CONFIG_26B, plan)
        gib = sum(math.prod(s) * synthetic.GGML_QUANT_SIZES[t][1] // synthetic.GGML_QUANT_SIZES[t][0] for _, s, t in rows)
        assert lo < gib / 2**30 < hi, (plan, gib / 2**30)


def test_runtime_and_converter_model_dims_agree(checkpoint_factory):
    """ModelConfig.model_dims (from a file's metadata: the cuda backend's load check, model_gpu's estimate) is the
    converter's ModelDims (from config.json: --fit's plan), at the 26B's shapes and a tiny model's."""
    from dgemma.convert.arch import converter_for
    from dgemma.convert.source import Checkpoint

    for d in (synthetic.CONFIG_26B, checkpoint_factory(SPECS["odd"])):
        dims = synthetic.model_config(d).model_dims()
        assert dims == converter_for(Checkpoint.open(d, weights=False)).model_dims()
        assert len(dims.layers) == dims.n_layer and any(s for s, _, _ in dims.layers)


def test_model_gpu_estimate_is_the_fit_plans_without_the_cuda_context():
    from dgemma.convert.plan import make_plan
    from dgemma.quant.planner import CUDA_CONTEXT

    p = make_plan(synthetic.CONFIG_26B, "Q4_K_M", "12GB", PLAN_CTX)
    cfg = synthetic.model_config(synthetic.CONFIG_26B)
    assert p.fit.fits and model_gpu.estimate_8k(cfg, p.tensors) * 2**30 == p.fit.breakdown.total - CUDA_CONTEXT
    assert model_gpu.estimate_8k(cfg, p.tensors) < 11.5


def test_bench_steps_run_on_synthetic_weights(checkpoint_factory, kernels_as_references, monkeypatch):
    from dgemma.plugin.cuda import head_ops, ops
    from dgemma.plugin.cuda.weights import QuantExperts, cuda_weights

    ckpt = checkpoint_factory(SPECS["base"])
    cfg = synthetic.model_config(ckpt)
    rows = synthetic.plan_rows(ckpt, "Q8_0")
    w = cuda_weights(synthetic.SyntheticTensors(rows), cfg, device="cpu")
    assert isinstance(w.layers[0].gate_up_exps, QuantExperts) and w.embed.data is w.head.data
    # every matrix of the plan once (the tied embedding too), as GGML bytes: what the GB/s figures divide
    matrices = sum(math.prod(s) * synthetic.GGML_QUANT_SIZES[t][1] // synthetic.GGML_QUANT_SIZES[t][0]
                   for _, s, t in rows if len(s) >= 2)
    assert model_gpu.weight_bytes(w) == matrices
    calls = {"head_stats": 0, "accept_renoise": 0}
    for module, name in ((head_ops, "head_stats"), (ops, "accept_renoise")):  # run in every pass the figures time
        ref = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _n=name, _r=ref, **k: (calls.__setitem__(_n, calls[_n] + 1), _r(*a, **k))[1])
    dev = torch.device("cpu")
    fused = model_gpu.measure("cuda Q8_0", cfg, w, dev, steps=2, fused=True, prompts=(5, 9))
    assert calls == {"head_stats": 6, "accept_renoise": 6}  # warm-up + 2 timed, at the short and the long context
    assert fused["weights_GB"] == matrices / 1e9
    torch_way = model_gpu.measure("torch", cfg, model_gpu.float_weights(w, "cpu"), dev, steps=1, fused=False,
                                  prompts=(5, 9))
    for r in (fused, torch_way):
        assert r["step_ms"] > 0 and r["step_8k_ms"] > 0 and r["prefill_9_ms"] > 0 and math.isfinite(r["TFLOP/s"])
        assert r["tokens/s"] > 0
    assert fused["weights_GB"] < torch_way["weights_GB"]  # blocks against float32
    line = model_gpu.report(fused, [torch_way])
    assert "prefill 5: " in line and line.count("x faster than torch") == 4  # both steps and both prefills
    assert fused["logprobs_ms"] > 0 and "logprobs_ms" not in torch_way and "a canvas's logprobs" in line
    assert "faster than torch" not in model_gpu.report(torch_way, [torch_way])  # the baseline's own line has none
    both = model_gpu.report(fused, [torch_way, {**torch_way, "label": "scalar"}])  # each base named in every ratio
    assert both.count("x faster than torch") == 4 and both.count("x faster than scalar") == 4


def test_model_gpu_streams_the_experts_a_smaller_gpu_needs(checkpoint_factory, kernels_as_references, tmp_path,
                                                          capsys, monkeypatch):
    """model_gpu's last line: the plan with the experts of the fewest layers in host RAM that fit a budget, timed
    like the others (tiny shapes on the CPU), with the layers, the pinned bytes and the PCIe rate named."""
    import argparse

    from dgemma.plugin.cuda import offload
    from dgemma.quant.planner import nbytes, runtime_breakdown

    ckpt = checkpoint_factory(SPECS["base"])
    cfg = synthetic.model_config(ckpt)
    rows = synthetic.plan_rows(ckpt, "Q8_0")
    need = runtime_breakdown(sum(nbytes(s, t) for _, s, t in rows), cfg.model_dims(), PLAN_CTX).total
    args = argparse.Namespace(matmuls="scalar", steps=1)
    dev = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # what the tuner asks
    bases = [{"label": "torch", "step_ms": 1e9, "prefill_5_ms": 1e9, "prefill_9_ms": 1e9},
             {"label": "cuda Q8_0 scalar", "step_ms": 1e-3, "prefill_5_ms": 1e-3, "prefill_9_ms": 1e-3}]
    r = model_gpu.streamed(f"{need - 1}", args, cfg, rows, "Q8_0", dev, tmp_path / "m.json", bases, prompts=(5, 9))
    out = capsys.readouterr().out
    fewest = offload.SLOTS + 1  # one byte short: the fewest layers that free anything (three, with two slots)
    assert r is not None and r["step_ms"] > 0 and f"experts of {fewest} of {cfg.n_layer} layers in host RAM" in out
    assert f"cuda Q8_0 scalar streaming {fewest}" in out and "GB/s of experts per step" in out
    assert "x faster than torch" in out and "x faster than cuda Q8_0 scalar" in out  # (a fraction: slower)
    assert model_gpu.streamed(f"{need}", args, cfg, rows, "Q8_0", dev, tmp_path / "m.json", bases) is None
    assert "is not needed for" in capsys.readouterr().out


def test_kernel_benches_name_nothing_undefined():
    """bench/step_gpu.py and bench/model_gpu.py need a GPU to run. Every global name their functions load
    (nested functions too) must exist, so a misspelled or shadowed name fails here and not in a GPU session."""
    import builtins
    import dis
    import types

    import step_gpu

    def code_objects(code):
        yield code
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                yield from code_objects(c)

    for module in (step_gpu, model_gpu):
        for fn in [v for v in vars(module).values() if isinstance(v, types.FunctionType) and v.__module__ == module.__name__]:
            for code in code_objects(fn.__code__):
                for ins in dis.get_instructions(code):
                    if ins.opname == "LOAD_GLOBAL":
                        name = ins.argval
                        assert name in vars(module) or hasattr(builtins, name), f"{module.__name__}.{fn.__name__}: {name}"
    assert [row[0] for row in step_gpu.SHAPES][-1] == "vocabulary head (Q6_K)"


def _step_gpu_on_the_cpu(monkeypatch, capsys, *args: str) -> str:
    """bench/step_gpu.py's main at tiny shapes on the CPU (with the kernels' references: the caller's fixture;
    no time is measured: each call runs once and counts 1 ms); what it printed."""
    import functools
    import sys

    import step_gpu
    from gguf import GGMLQuantizationType as Q

    monkeypatch.setattr(step_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(step_gpu, "SHAPES", [("dense", 40, 256, Q.Q4_K, 5, 2), ("down", 33, 64, Q.Q5_0, 3, 1),
                                             ("a float matrix", 9, 32, Q.F16, 2, 1)])
    monkeypatch.setattr(step_gpu, "timed", lambda fn, repeat: (fn(), 1.0)[1])
    monkeypatch.setattr(step_gpu, "gpu_capability", lambda tool: (9, 0))
    for name, value in (("get_device_capability", lambda device=None: (9, 0)), ("get_device_name", lambda device=None: "cpu"),
                        ("reset_peak_memory_stats", lambda device=None: None), ("memory_allocated", lambda device=None: 0),
                        ("max_memory_allocated", lambda device=None: 0), ("empty_cache", lambda: None)):
        monkeypatch.setattr(torch.cuda, name, value)
    for name, small in (("moe_layer", dict(experts=4, top_k=2, tokens=6, d=256, fe=64)),
                        ("head_pass", dict(vocab=300, d=256, rows=4)), ("attention", dict(canvas=4, context=40))):
        monkeypatch.setattr(step_gpu, name, functools.partial(getattr(step_gpu, name), **small))
    monkeypatch.setattr(sys, "argv", ["step_gpu.py", "--repeat", "1", *args])
    step_gpu.main()
    return capsys.readouterr().out


def test_step_gpu_runs_on_the_cpu_at_tiny_shapes(kernels_as_references, monkeypatch, capsys):
    """bench/step_gpu.py's main end to end, every table and line. Every matmul kernel has a column and a step
    total, the experts and the head a line per tensor-core kernel."""
    from dgemma.plugin.cuda import ops

    out = _step_gpu_on_the_cpu(monkeypatch, capsys)
    header = next(line for line in out.splitlines() if line.startswith("weights"))
    assert [f"{kind} ms" in header for kind in ops.MATMULS] == [True] * len(ops.MATMULS)
    f16_row = next(line for line in out.splitlines() if line.startswith("a float matrix"))
    assert f16_row.count("nan") == 4  # no integer form: the int8 tiles' columns (ms and TFLOP/s)
    down_row = next(line for line in out.splitlines() if line.startswith("down"))
    f16_kinds = sum(ops.matmul_family(m) == "f16" for m in ops.MATMULS)
    assert down_row.count("nan") == 2 * f16_kinds  # unbounded input: no f16 kind, as in the engine
    total = next(line for line in out.splitlines() if line.startswith("matmuls of one denoising step"))
    assert all(f"{kind} 4.0 ms" in total for kind in ops.MATMULS) and "the best per shape 4.0 ms" in total
    grouped = [m for m, (_, g) in ops.MATMULS.items() if g and m != "scalar"]  # f16-cublas has no grouped form
    assert sum(line.startswith("  grouped on ") for line in out.splitlines()) == len(grouped)
    assert "chunked int8-wide" in out and "decoder attention per step" in out and "accept/re-noise" in out


def test_step_gpu_times_only_the_kinds_asked_for(kernels_as_references, monkeypatch, capsys):
    """--kinds (a rerun past a kernel that failed on the GPU) leaves the other kinds out of the table, the step
    totals, the experts' and the head's lines; scalar and the kinds' families stay (f16-cublas's experts count
    f16's time, as the engine runs); an unknown kind is a one-line error."""
    import step_gpu

    out = _step_gpu_on_the_cpu(monkeypatch, capsys, "--kinds", "int8,f16-cublas")
    header = next(line for line in out.splitlines() if line.startswith("weights"))
    assert [k for k in ("scalar", "f16", "f16-wide", "int8", "int8-wide", "f16-cublas") if f" {k} ms" in header] == [
        "scalar", "f16", "int8", "f16-cublas"]
    total = next(line for line in out.splitlines() if line.startswith("matmuls of one denoising step"))
    assert "scalar 4.0 ms, f16 4.0 ms, int8 4.0 ms, f16-cublas 4.0 ms, the best" in total
    assert [line.split()[2] for line in out.splitlines() if line.startswith("  grouped on ")] == ["f16", "int8"]
    assert "chunked int8 " in out and "chunked f16 " in out and "chunked int8-wide" not in out
    with pytest.raises(SystemExit):
        _step_gpu_on_the_cpu(monkeypatch, capsys, "--kinds", "int8,int4")
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("--kinds: no matmul kind int4; expected some of " + ", ".join(step_gpu.ops.MATMULS))


@pytest.mark.parametrize("bench", ["step_gpu.py", "model_gpu.py"])
def test_gpu_benches_without_a_gpu_say_so_in_one_line(bench):
    import subprocess
    import sys
    from pathlib import Path

    from dgemma.plugin.cuda import CudaUnavailable, check_cuda

    try:
        check_cuda()
        pytest.skip("a GPU is here: the bench would run")
    except CudaUnavailable as e:
        reason = str(e)
    script = Path(__file__).resolve().parent.parent / "bench" / bench
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and proc.stderr.strip() == f"bench/{bench}: {reason}"
