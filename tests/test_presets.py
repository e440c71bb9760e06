"""Presets (llama.cpp's per-tensor rules) and the VRAM planner, on the real 26B-A4B shapes from config alone."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from dgemma.convert.arch import DiffusionGemma
from dgemma.convert.source import Checkpoint
from dgemma.quant.planner import GiB, fit, parse_size, tensor_class, weights_bytes
from dgemma.quant.presets import PRESETS, preset_types, use_more_bits

REAL = Path(__file__).resolve().parents[2] / "shared" / "configs" / "diffusiongemma-26b-a4b"  # ../shared beside the repo
pytestmark = pytest.mark.skipif(not (REAL / "config.json").exists(), reason="shared/configs not present")


@pytest.fixture(scope="module")
def real():
    cfg = json.loads((REAL / "config.json").read_text())
    gen = json.loads((REAL / "generation_config.json").read_text())
    conv = DiffusionGemma(Checkpoint(REAL, cfg, gen, {}))
    return conv, conv.gguf_shapes()


def typed(conv, tensors, preset):
    types = preset_types(tensors, PRESETS[preset], conv.model_facts())
    return {n: conv.tensor_force_quant(n, s) or types[n] for n, s in tensors}


def test_q4_k_m_matches_unsloths_published_file(real):
    """Unsloth's DiffusionGemma Q4_K_M (llama-quantize): 692 tensors, f32 423, q4_K 194, q5_0 33, q8_0 28, q6_K 14."""
    conv, tensors = real
    assert len(tensors) == 692
    counts = Counter(t.name for t in typed(conv, tensors, "Q4_K_M").values())
    assert counts == {"F32": 423, "Q4_K": 194, "Q5_0": 33, "Q8_0": 28, "Q6_K": 14}


def test_rows_not_multiple_of_256_never_get_k_quants(real):
    conv, tensors = real
    shapes = dict(tensors)
    for preset in PRESETS:
        for name, t in typed(conv, tensors, preset).items():
            ncols = shapes[name][-1]
            if ncols % 256:
                assert t in (Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0), (preset, name, t)


def test_presets_order_by_size_and_rules(real):
    conv, tensors = real
    shapes = dict(tensors)
    order = ["BF16", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K"]
    sizes = [weights_bytes(typed(conv, tensors, p), shapes) for p in order]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    q4 = typed(conv, tensors, "Q4_K_M")
    assert q4["token_embd.weight"] == Q.Q6_K  # tied embedding = output: Q6_K
    attn_v = [n for n, _ in tensors if n.endswith("attn_v.weight")]
    assert [q4[n] == Q.Q6_K for n in attn_v] == [use_more_bits(i, len(attn_v)) for i in range(len(attn_v))]
    assert q4["blk.0.ffn_down_exps.weight"] == Q.Q8_0 and q4["blk.3.ffn_down_exps.weight"] == Q.Q5_0  # Q6_K/Q4_K fell back
    q2 = typed(conv, tensors, "Q2_K")
    assert q2["blk.4.attn_v.weight"] == Q.Q3_K and q2["blk.4.attn_output.weight"] == Q.Q3_K  # n_gqa = 2 < 4


@pytest.mark.parametrize("gib,fits,lowered", [
    (24, True, set()), (16, True, {"expert_gate_up"}), (12, True, {"expert_gate_up", "expert_down"}),
    (10, False, None), (8, False, None),
])
def test_fit_budgets(real, gib, fits, lowered):
    conv, tensors = real
    plan = fit(tensors, conv.model_facts(), conv.model_dims(), gib * GiB, 8192)
    assert plan.fits is fits
    if fits:
        assert plan.breakdown.total <= gib * GiB
        assert {s.split(" ")[0] for s in plan.steps} == lowered
        assert all(plan.types[n] == Q.Q2_K for n in plan.types if tensor_class(n) == "expert_gate_up") or gib > 12
    else:
        text = "\n".join(plan.notes)
        assert "no llama.cpp-compatible plan fits" in text and "704" in text
        assert "--pad-experts" in text and "host RAM" in text
    if gib == 10:
        assert "fits" in plan.notes[1]  # padding the 704-wide rows to 768 makes 10 GiB work
    if gib == 8:
        assert "still over" in plan.notes[1]
    if not fits:  # the cuda backend's streamed experts (two VRAM slots counted): within the budget
        streamed = re.search(r"experts of (\d+) of 30 layers in host RAM, .* VRAM ([\d.]+) GiB", plan.notes[2])
        assert streamed and float(streamed[2]) <= gib and int(streamed[1]) == {10: 4, 8: 11}[gib]


def test_breakdown_parts_are_plausible(real):
    conv, tensors = real
    plan = fit(tensors, conv.model_facts(), conv.model_dims(), 24 * GiB, 8192)
    b = plan.breakdown
    assert 15.0 * GiB < b.weights < 16.5 * GiB  # Q4_K_M
    assert 0.3 * GiB < b.kv_cache < 0.6 * GiB  # 25 sliding layers x 1024 + 5 global x 8192 positions, f16
    longer = fit(tensors, conv.model_facts(), conv.model_dims(), 24 * GiB, 32768).breakdown.kv_cache
    assert longer > b.kv_cache


def test_parse_size():
    assert parse_size("12GB") == 12 * GiB == parse_size("12 GiB") == parse_size("12288MiB")
    with pytest.raises(ValueError):
        parse_size("twelve")


def test_dry_run_cli_from_config_alone(real):
    proc = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "convert", str(REAL), "--type", "Q4_K_M",
                           "--fit", "12GB", "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "blk.29.ffn_down_exps.weight" in proc.stdout and "fits" in proc.stdout and "total VRAM" in proc.stdout
    assert "planned from config.json alone" in proc.stdout
