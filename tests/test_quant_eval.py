"""dgemma quant-eval: KL divergence and top-1 agreement against a reference file."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dgemma.convert import convert
from dgemma.plugin.engine import Engine
from dgemma.plugin.quant_eval import evaluate


@pytest.fixture(scope="module")
def files(tmp_path_factory, base_checkpoint, checkpoint_factory):
    from conftest import SPECS

    d = tmp_path_factory.mktemp("qe")
    for t in ("F32", "F16", "Q8_0"):
        convert(base_checkpoint, d / f"{t}.gguf", t, quiet=True)
    other = checkpoint_factory(SPECS["base"].__class__(seed=42))  # same shape, other weights
    convert(other, d / "other.gguf", "F32", quiet=True)
    return d


def test_kld_orders_files_by_how_far_they_are(files):
    ref = Engine.load(files / "F32.gguf")
    same, f16, q8, other = evaluate(ref, [Engine.load(files / f) for f in
                                          ("F32.gguf", "F16.gguf", "Q8_0.gguf", "other.gguf")], n_cases=3)
    assert same.mean_kld == 0 and same.max_kld == 0 and same.top1 == 1.0
    assert 0 < f16.mean_kld < q8.mean_kld < other.mean_kld
    assert f16.top1 > 0.95 and other.top1 < 0.5
    assert f16.p99_kld >= f16.median_kld and same.positions == 3 * 2 * ref.cfg.canvas_length


def test_cli_prints_and_plots(files, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "kld.png"
    proc = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "quant-eval", str(files / "F32.gguf"),
                           str(files / "F16.gguf"), str(files / "Q8_0.gguf"), "--cases", "2", "--plot", str(png)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Q8_0.gguf" in proc.stdout and "mean KLD" in proc.stdout and "same top-1" in proc.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_different_models_are_refused(files, tmp_path, checkpoint_factory):
    from conftest import SPECS

    wide = tmp_path / "wide.gguf"
    convert(checkpoint_factory(SPECS["bf16_wide"]), wide, "F16", quiet=True)
    proc = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "quant-eval", str(files / "F32.gguf"), str(wide)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "not the same model" in proc.stderr


def test_text_prompts_are_windows_of_the_text(files):
    from dgemma.plugin.quant_eval import cases

    ref = Engine.load(files / "F32.gguf")
    text = "The quick brown fox jumps over the lazy dog. " * 40
    ids = ref.tokenizer.encode(text, add_bos=True)
    got = list(cases(ref.cfg.vocab_size, ref.cfg.canvas_length, 3, prompt_len=16, text_ids=ids))
    assert len(got) == 3
    for i, (prompt, canvas) in enumerate(got):
        p = prompt[0].tolist()
        assert len(p) == 16 and p[0] == ref.tokenizer.bos_id
        start = (len(ids) - 16) * i // 3
        assert p[1:] == ids[1:][start : start + 15]
        assert canvas.shape == (1, ref.cfg.canvas_length)
    with pytest.raises(ValueError, match="--text: .* tokens, need at least 15"):
        list(cases(ref.cfg.vocab_size, ref.cfg.canvas_length, 1, prompt_len=16, text_ids=ids[:5]))


def test_cli_text_option(files, tmp_path):
    txt = tmp_path / "t.txt"
    txt.write_text("Fools rush in where angels fear to tread, and get the best seats in the house. " * 20)
    run = [sys.executable, "-m", "dgemma.plugin.cli", "quant-eval", str(files / "F32.gguf"), str(files / "Q8_0.gguf"),
           "--cases", "2"]
    proc = subprocess.run(run + ["--text", str(txt)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"windows of {txt}" in proc.stdout and "Q8_0.gguf" in proc.stdout
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00bad")
    proc = subprocess.run(run + ["--text", str(bad)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "--text" in proc.stderr and "UTF-8" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
