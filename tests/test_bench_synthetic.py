"""bench/model_gpu.py's machinery on the CPU at tiny shapes, with the csrc kernels replaced by their references
(as tests/test_cuda_glue.py does): synthetic weights from a conversion plan, the ModelConfig from config.json
alone, the fused and the logits step. A GPU session's 15 minutes should not be spent on a typo."""

from __future__ import annotations

import math

import torch
from conftest import SPECS

import model_gpu  # bench/ (pyproject's pythonpath)
import synthetic


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
    assert "faster than torch" not in model_gpu.report(torch_way, [torch_way])  # the baseline's own line has none
    both = model_gpu.report(fused, [torch_way, {**torch_way, "label": "scalar"}])  # each base named in every ratio
    assert both.count("x faster than torch") == 4 and both.count("x faster than scalar") == 4


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
