"""Bad input to `dgemma convert`: one clear line naming the file/field, exit code != 0, nothing left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from dgemma.convert.tiny import TinySpec


def run_cli(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", *args], capture_output=True, text=True,
                          timeout=300, **kwargs)


def assert_clean_failure(proc: subprocess.CompletedProcess, out: Path, *needles: str, code: int | None = None) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and (code is None or proc.returncode == code), proc
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dgemma: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists()
    assert not list(out.parent.glob("*.partial")), list(out.parent.iterdir())


@pytest.fixture
def ckpt(tmp_path, base_checkpoint) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(base_checkpoint, dst)
    return dst


@pytest.fixture
def out(tmp_path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d / "model.gguf"


def shard_of(ckpt: Path, tensor: str) -> Path:
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    return ckpt / index["weight_map"][tensor]


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


EMBED = "model.decoder.embed_tokens.weight"


def test_source_is_not_a_directory(tmp_path, out):
    f = tmp_path / "file.txt"
    f.write_text("x")
    assert_clean_failure(run_cli("convert", str(f), "-o", str(out), "--quiet"), out, str(f), "not a directory")
    assert_clean_failure(run_cli("convert", str(tmp_path / "nope"), "-o", str(out)), out, "no such directory")


def test_missing_config(ckpt, out):
    (ckpt / "config.json").unlink()
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "config.json", "missing")


def test_config_not_json(ckpt, out):
    (ckpt / "config.json").write_text("{ not json")
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "config.json", "not valid JSON")


def test_missing_tokenizer(ckpt, out):
    (ckpt / "tokenizer.json").unlink()
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "tokenizer.json", "missing")


def test_index_names_a_missing_shard(ckpt, out):
    shard = shard_of(ckpt, EMBED)
    shard.unlink()
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "model.safetensors.index.json",
                         shard.name, "does not exist")


def test_no_shards_at_all(ckpt, out):
    for p in ckpt.glob("*.safetensors*"):
        p.unlink()
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "no safetensors weights")


def test_truncated_shard(ckpt, out):
    shard = shard_of(ckpt, EMBED)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, shard.name, "truncated", "ends at byte")


def test_shape_disagrees_with_config(ckpt, out):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["text_config"]["intermediate_size"] = 100
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "mlp", "has shape", "config.json implies")


def test_unsupported_dtype(ckpt, out):
    shard = shard_of(ckpt, EMBED)
    tensors = load_file(shard)
    tensors[EMBED] = tensors[EMBED].to(torch.float64)
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, shard.name, EMBED, "dtype F64",
                         "F32, F16, BF16")


def test_missing_tensor(ckpt, out):
    name = "model.decoder.layers.1.self_attn.q_proj.weight"
    shard = shard_of(ckpt, name)
    tensors = load_file(shard)
    del tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "blk.1.attn_q.weight")


def test_unknown_architecture(ckpt, out):
    edit_json(ckpt / "config.json", architectures=["LlamaForCausalLM"])
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out)), out, "config.json", "LlamaForCausalLM",
                         "DiffusionGemmaForBlockDiffusion")


def test_unknown_type(ckpt, out):
    assert_clean_failure(run_cli("convert", str(ckpt), "-o", str(out), "--type", "Q7_X"), out, "--type",
                         "Q7_X", "F32, F16, BF16, Q8_0, Q6_K, Q5_K_M")


def test_existing_output_is_kept(ckpt, out):
    out.write_bytes(b"precious")
    proc = run_cli("convert", str(ckpt), "-o", str(out))
    assert proc.returncode != 0 and "already exists" in proc.stderr and "--force" in proc.stderr
    assert out.read_bytes() == b"precious"


def _small_filesystem(path: Path, size: str) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full(ckpt, tmp_path):
    mnt = tmp_path / "small"
    if _small_filesystem(mnt, "200k"):  # a real full disk: ENOSPC
        try:
            out = mnt / "model.gguf"
            proc = run_cli("convert", str(ckpt), "-o", str(out), "--type", "F32", "--quiet")
            assert_clean_failure(proc, out, str(out), "write failed", "No space left on device")
            assert os.listdir(mnt) == []
        finally:
            subprocess.run(["umount", str(mnt)], check=False)
    else:  # no mount rights here: the kernel's file-size limit fails the write the same way (EFBIG)
        import resource

        out = tmp_path / "out.gguf"

        def limit():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

        proc = run_cli("convert", str(ckpt), "-o", str(out), "--type", "F32", "--quiet", preexec_fn=limit)
        assert_clean_failure(proc, out, str(out), "write failed", "File too large")


BIG = TinySpec(vocab_size=65536, hidden_size=512, intermediate_size=64, num_hidden_layers=1,
               layer_types=("full_attention",), num_experts=2, top_k_experts=1, moe_intermediate_size=32,
               max_shard_size="64MB", with_vision=False)


def test_ctrl_c_mid_write(tmp_path, checkpoint_factory):
    ckpt = checkpoint_factory(BIG)  # a 128 MB embedding: converting takes long enough to interrupt
    out = tmp_path / "model.gguf"
    # a shell running the tests in the background passes SIGINT on as ignored, and Python then installs no
    # KeyboardInterrupt handler: give the child the default disposition, as a terminal's Ctrl-C finds it
    proc = subprocess.Popen([sys.executable, "-m", "dgemma.plugin.cli", "convert", str(ckpt), "-o", str(out),
                             "--type", "Q8_0", "--quiet"], stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*.partial")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "conversion finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert_clean_failure(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr), out, "interrupted",
                         code=130)
