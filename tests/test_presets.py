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


ALL_CLASSES = {"expert_gate_up", "expert_down", "dense_ffn", "self_cond", "attention", "embedding"}


@pytest.mark.parametrize("gib,fits,lowered,streamed", [
    (24, True, set(), 0), (16, True, {"expert_gate_up"}, 0), (12, True, {"expert_gate_up", "expert_down"}, 0),
    (10, True, ALL_CLASSES, 5), (8, True, ALL_CLASSES, 11), (2, False, ALL_CLASSES, 0),
])
def test_fit_budgets(real, gib, fits, lowered, streamed):
    """Whole where the types can go low enough; else at the lowest types, with the experts of as few layers as
    needed in host RAM, streamed by the cuda backend (two VRAM slots counted), within the budget; else not."""
    conv, tensors = real
    plan = fit(tensors, conv.model_facts(), conv.model_dims(), gib * GiB, 8192)
    assert plan.fits is fits and len(plan.host_layers) == streamed
    assert {s.split(" ")[0] for s in plan.steps} == lowered
    if fits and not streamed:
        assert plan.breakdown.total <= gib * GiB and not plan.notes
        assert all(plan.types[n] == Q.Q2_K for n in plan.types if tensor_class(n) == "expert_gate_up") or gib > 12
    if streamed:
        assert plan.breakdown.total > gib * GiB >= plan.streamed_vram > gib * GiB - 0.5 * GiB
        assert plan.host_bytes > (plan.breakdown.total - plan.streamed_vram)  # (the slots stay in VRAM)
    if gib <= 10:
        text = "\n".join(plan.notes)
        assert "no llama.cpp-compatible plan fits" in text and "whole" in text and "704" in text
        assert "--pad-experts" in text and "host RAM" in text
    if gib == 10:
        assert "fits" in plan.notes[1]  # padding the 704-wide rows to 768 makes 10 GiB work whole
    if gib == 8:
        assert "still over" in plan.notes[1]
    if streamed:  # the note says the same
        note = re.search(r"fits with the experts of (\d+) of 30 layers in host RAM, .* VRAM ([\d.]+) GiB", plan.notes[2])
        assert note and int(note[1]) == streamed and float(note[2]) == round(plan.streamed_vram / GiB, 2)
    if gib == 2:
        assert "even with the experts of every layer in host RAM" in plan.notes[2]


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


def test_convert_for_a_card_the_model_fits_only_streaming_writes_the_file(base_checkpoint, tmp_path):
    """`dgemma convert --fit` for a budget the lowest types fit only with some layers' experts in host RAM
    writes the file and says how many stream; one that even streaming every layer cannot fit is the error, and
    nothing is written."""
    from gguf import GGUFReader

    from dgemma.convert.plan import make_plan
    from dgemma.quant.planner import expert_sizes, nbytes, vram_saving

    plan = make_plan(base_checkpoint, fit_size="0.001GB")  # (nothing fits: the lowest types)
    layers = sorted({int(n.split(".")[1]) for n in plan.fit.types if n.startswith("blk.")})
    every = vram_saving(expert_sizes({n: nbytes(s, t) for n, s, t in plan.tensors}, len(layers)), layers)
    floor = plan.fit.breakdown.total
    assert every > 0 and not plan.fit.fits and len(layers) == 3

    def convert(budget: int, name: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "convert", str(base_checkpoint), "-o",
                               str(tmp_path / name), "--fit", f"{budget / GiB:.15f}GiB"], capture_output=True,
                              text=True, timeout=300)

    done = convert(floor - every // 2, "streams.gguf")
    assert done.returncode == 0, done.stderr
    assert "fits with the experts of 3 layers streamed from host RAM" in done.stdout and "VRAM, streaming" in done.stdout
    assert len(GGUFReader(tmp_path / "streams.gguf").tensors) > 0
    refused = convert(floor - every - 4096, "none.gguf")
    assert refused.returncode == 1 and "DOES NOT FIT" in refused.stdout and not (tmp_path / "none.gguf").exists()
    assert refused.stderr.strip().endswith("no plan fits (see the notes above)")
