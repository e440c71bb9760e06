"""`dgemma inspect`: the summary agrees with what gguf-py reads; other files are refused clearly."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

from dgemma.convert import constants as C
from dgemma.convert import convert
from dgemma.plugin.inspect import summarize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def q8_file(tmp_path_factory, base_checkpoint) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "tiny-q8_0.gguf"
    convert(base_checkpoint, path, "Q8_0", quiet=True)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", *args], capture_output=True, text=True, timeout=120)


def test_summary_counts_match_the_reader(q8_file):
    reader = GGUFReader(q8_file)
    s = summarize(q8_file)
    assert s.n_params == sum(int(t.n_elements) for t in reader.tensors)
    assert s.n_tensors == len(reader.tensors)
    assert sum(n for n, _ in s.by_type.values()) == len(reader.tensors)
    assert s.by_type["Q8_0"][1] == sum(int(t.n_bytes) for t in reader.tensors if t.tensor_type.name == "Q8_0")
    assert s.hparams["layer_pattern"] == "ssG"
    assert s.sampler["canvas_length"] == 16 and s.sampler["max_denoising_steps"] == 48
    assert s.tokenizer["tokens"] == 512 and s.tokenizer["types"]["byte"] == 256


def test_cli_prints_architecture_types_sampler_and_tokenizer(q8_file):
    proc = run_cli("inspect", str(q8_file))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    s = summarize(q8_file)
    assert "architecture  diffusion-gemma" in out
    assert f"({s.n_params:,})" in out
    assert re.search(r"Q8_0\s+30 tensors", out) and re.search(r"F32\s+45 tensors", out)
    assert re.search(r"entropy_bound\s+0\.1\b", out) and re.search(r"canvas_length\s+16\b", out)
    assert re.search(r"model\s+gemma4", out) and "chat_template  yes (tools, thinking)" in out


def test_missing_sampler_keys_show_reader_defaults(tmp_path, base_checkpoint):
    import json
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(base_checkpoint, ckpt)
    (ckpt / "generation_config.json").unlink()
    convert(ckpt, tmp_path / "m.gguf", "F16", quiet=True)
    assert not any(k.startswith("diffusion.eb_") for k in GGUFReader(tmp_path / "m.gguf").fields)
    s = summarize(tmp_path / "m.gguf")
    assert s.sampler["max_denoising_steps"] == "48 (default)" and s.sampler["entropy_bound"] == "0.1 (default)"
    json.dumps(s.sampler)  # plain values only


def test_other_architecture_is_refused(tmp_path):
    path = tmp_path / "llama.gguf"
    w = GGUFWriter(path, "llama")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    proc = run_cli("inspect", str(path))
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        f"dgemma: error: {path}: architecture is 'llama', not 'diffusion-gemma' (not a DiffusionGemma model)"
    ]


def test_not_a_gguf_and_missing_file(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf")
    proc = run_cli("inspect", str(junk))
    assert proc.returncode != 0 and proc.stderr.strip() == f"dgemma: error: {junk}: not a GGUF file (bad magic)"
    proc = run_cli("inspect", str(tmp_path / "missing.gguf"))
    assert proc.returncode != 0 and "no such file" in proc.stderr


def test_a_model_by_name(tmp_path):
    """As dgemma run takes it (and ollama show): 'default', or a name in the models directory."""
    import os

    env = {**os.environ, "DGEMMA_MODELS": str(tmp_path)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", *a], capture_output=True,  # noqa: E731
                                    text=True, timeout=120, env=env)
    shown = run("inspect", "default")
    assert shown.returncode == 0 and "diffusion-gemma" in shown.stdout
    assert shown.stdout == run("inspect", str(tmp_path / "default.gguf")).stdout  # (the name's file, written then)
    missing = run("inspect", "nosuch")
    assert missing.returncode == 1 and missing.stderr.startswith("dgemma: error: model 'nosuch' not found in ")


def test_format_doc_lists_every_key_and_tensor_we_write(q8_file):
    """docs/FORMAT.md is the table of what we write: every key and tensor name must be in it."""
    doc = (ROOT / "docs" / "FORMAT.md").read_text()
    reader = GGUFReader(q8_file)
    keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    missing_keys = [k for k in keys if f"`{k}`" not in doc]
    assert not missing_keys
    names = {re.sub(r"^blk\.\d+\.", "blk.N.", t.name) for t in reader.tensors}
    missing_names = [n for n in sorted(names) if f"`{n}`" not in doc]
    assert not missing_names
    for key in C.SAMPLER_KEYS:
        assert f"`{key}`" in doc
