"""The models directory: names from metadata, import/list/rm, resolution, and the CLI around it."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys

import pytest

from dgemma.plugin.default_model import ensure_default_model
from dgemma.plugin.registry import ModelNotFound, Registry, RegistryError, read_model_info


@pytest.fixture
def reg(tmp_path):
    return Registry(tmp_path / "models")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("src"))


def test_default_is_always_listed_and_reserved(reg, gguf):
    assert [e.name for e in reg.list()] == ["default"]
    assert reg.resolve("default:latest").path == reg.root / "default.gguf"
    with pytest.raises(RegistryError, match="reserved"):
        reg.import_file(gguf, "default")
    with pytest.raises(RegistryError, match="cannot be removed"):
        reg.remove("default")


def test_import_names_from_metadata_and_resolves_with_tags(reg, gguf):
    info = read_model_info(gguf)
    assert info.quantization == "Q8_0" and info.n_active < info.n_params  # MoE: fewer active parameters
    entry = reg.import_file(gguf)
    assert entry.name == info.default_name() and entry.name.startswith("diffusiongemma:") and entry.name.endswith("-q8_0")
    assert entry.path.read_bytes() == gguf.read_bytes()
    assert reg.resolve(entry.name).path == entry.path
    with pytest.raises(RegistryError, match="already exists"):
        reg.import_file(gguf)
    reg.import_file(gguf, force=True)
    named = reg.import_file(gguf, "mine")
    assert reg.resolve("mine:latest").path == named.path
    assert {e.name for e in reg.list()} == {"default", entry.name, "mine"}
    index = json.loads((reg.root / "registry.json").read_text())["models"]
    assert index["mine"] == "mine.gguf"
    reg.remove("mine")
    assert not named.path.exists() and "mine" not in {e.name for e in reg.list()}
    with pytest.raises(ModelNotFound):
        reg.resolve("mine")


def test_loose_files_are_served_under_their_stem(reg, gguf):
    reg.root.mkdir(parents=True)
    shutil.copy(gguf, reg.root / "handmade.gguf")
    assert "handmade" in {e.name for e in reg.list()}
    assert reg.resolve("handmade:latest").path.name == "handmade.gguf"
    with pytest.raises(ModelNotFound, match="have: default, handmade"):
        reg.resolve("other")


def test_bad_files_are_refused(reg, tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_text("nope")
    with pytest.raises(RegistryError, match="not a GGUF"):
        reg.import_file(junk)
    assert not reg.root.exists() or not list(reg.root.glob("*.partial"))


def test_cli_import_list_rm(tmp_path, gguf):
    env = {**os.environ, "DGEMMA_MODELS": str(tmp_path / "m")}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", *args], capture_output=True, text=True,
                              env=env, timeout=120)

    assert cli("import", str(gguf), "--name", "tiny:v1").returncode == 0
    out = cli("list").stdout
    assert "default" in out and "tiny:v1" in out and "Q8_0" in out
    again = cli("import", str(gguf), "--name", "tiny:v1")
    assert again.returncode == 1 and "already exists" in again.stderr
    assert cli("rm", "tiny:v1").returncode == 0 and "tiny:v1" not in cli("list").stdout
    missing = cli("rm", "tiny:v1")
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_stream_failure_becomes_a_final_error_line():
    from dgemma.plugin.server.ollama import _ndjson

    async def lines():
        yield {"response": "a", "done": False}
        raise RuntimeError("disk vanished")

    async def run():
        return [json.loads(x) async for x in _ndjson(lines())]

    out = asyncio.run(run())
    assert out[0] == {"response": "a", "done": False} and "disk vanished" in out[-1]["error"] and len(out) == 2
