"""--pad-experts: a dgemma-only layout whose expert down rows are zero-padded to a multiple of 256."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from gguf import GGUFReader

from dgemma.convert import constants as C
from dgemma.convert import convert
from dgemma.plugin.engine import Engine
from dgemma.plugin.inspect import format_summary, summarize
from dgemma.plugin.kv_cache import KVCache
from test_presets import REAL


def test_padded_file_gives_the_same_logits_at_equal_types(tmp_path, base_checkpoint):
    plain, padded = tmp_path / "plain.gguf", tmp_path / "padded.gguf"
    convert(base_checkpoint, plain, "Q8_0", quiet=True)
    convert(base_checkpoint, padded, "Q8_0", quiet=True, pad_experts=True)
    reader = GGUFReader(padded)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert [int(x) for x in t.shape] == [256, 64, 4]  # ggml order: rows of 64 padded to 256
    assert reader.fields[C.DGEMMA_EXPERT_DOWN_PADDED].contents() == 256
    assert reader.fields[C.EXPERT_FEED_FORWARD_LENGTH].contents() == 64  # the model's real width is kept
    assert "dgemma-only" in format_summary(summarize(padded))
    a, b = Engine.load(plain), Engine.load(padded)
    # the torch backend's RAM check counts the padded rows at the model's width, as load_weights holds them
    from dgemma.plugin.weights import float32_bytes

    assert float32_bytes(reader, b.cfg) == float32_bytes(GGUFReader(plain), a.cfg)  # (test_run_cli: = what it holds)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, a.cfg.vocab_size, (1, 11), generator=g)
    canvas = torch.randint(0, a.cfg.vocab_size, (1, a.cfg.canvas_length), generator=g)
    ca, cb = KVCache(), KVCache()
    a.model.encode(prompt, ca)
    b.model.encode(prompt, cb)
    assert torch.equal(a.model.decode(canvas, ca), b.model.decode(canvas, cb))


@pytest.mark.skipif(not (REAL / "config.json").exists(), reason="../shared/configs not present")
def test_padding_lets_k_quants_reach_the_expert_down_rows():
    def plan(*extra):
        proc = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "convert", str(REAL), "--type", "Q4_K_M",
                               "--dry-run", *extra], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return {line.split()[0]: line.split()[2] for line in proc.stdout.splitlines() if line.startswith("blk.")}

    plain, padded = plan(), plan("--pad-experts")
    assert plain["blk.3.ffn_down_exps.weight"] == "Q5_0" and padded["blk.3.ffn_down_exps.weight"] == "Q4_K"
    assert plain["blk.0.ffn_down_exps.weight"] == "Q8_0" and padded["blk.0.ffn_down_exps.weight"] == "Q6_K"
    assert all(plain[n] == padded[n] for n in plain if "down_exps" not in n)
