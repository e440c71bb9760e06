"""bench/model_gpu.py's machinery on the CPU at tiny shapes, with the csrc kernels replaced by their references
(as tests/test_cuda_glue.py does): synthetic weights from a conversion plan, the ModelConfig from config.json
alone, the fused and the logits step. A GPU session's 15 minutes should not be spent on a typo."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import SPECS

from dgemma.plugin.cuda import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import model_gpu  # noqa: E402
import synthetic  # noqa: E402


@pytest.fixture()
def kernels_as_references(monkeypatch):
    for name in ("qmatmul", "moe_qmatmul", "get_rows", "head_stats", "accept_renoise"):
        monkeypatch.setattr(ops, name, getattr(ops, f"{name}_reference"))


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


def test_bench_steps_run_on_synthetic_weights(checkpoint_factory, kernels_as_references):
    from dgemma.plugin.cuda.weights import QuantExperts, cuda_weights

    ckpt = checkpoint_factory(SPECS["base"])
    cfg = synthetic.model_config(ckpt)
    w = cuda_weights(synthetic.SyntheticTensors(synthetic.plan_rows(ckpt, "Q8_0")), cfg, device="cpu")
    assert isinstance(w.layers[0].gate_up_exps, QuantExperts) and w.embed.data is w.head.data
    dev = torch.device("cpu")
    fused = model_gpu.measure("cuda Q8_0", cfg, w, dev, steps=2, fused=True, prompts=(5, 9))
    torch_way = model_gpu.measure("torch", cfg, model_gpu.float_weights(w, "cpu"), dev, steps=1, fused=False,
                                  prompts=(5, 9))
    for r in (fused, torch_way):
        assert r["step_ms"] > 0 and r["prefill_9_ms"] > 0 and math.isfinite(r["TFLOP/s"]) and r["tokens/s"] > 0
    assert fused["weights_GB"] < torch_way["weights_GB"]  # blocks against float32
    line = model_gpu.report(fused, torch_way)
    assert "prefill 5: " in line and "x the torch backend" in line


def test_kernel_bench_imports_its_helpers():
    """bench/step_gpu.py needs a GPU to run; this catches import-time and name errors before a GPU session."""
    import step_gpu

    assert step_gpu.timed.__module__ == "step_gpu" and step_gpu.synthetic_blocks is synthetic.synthetic_blocks
    assert [row[0] for row in step_gpu.SHAPES][-1] == "vocabulary head (Q6_K)"
