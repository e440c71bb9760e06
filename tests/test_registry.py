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


def test_paths_never_reach_outside_the_models_directory(reg, gguf, tmp_path):
    """rm takes names only (`../x`, an absolute path: not found, nothing deleted); the server's registry
    (paths=False) does not open a client's path, the CLI's does."""
    victim = tmp_path / "victim.gguf"
    shutil.copy(gguf, victim)
    reg.root.mkdir(parents=True)
    for name in ("../victim", str(tmp_path / "victim"), str(victim)):
        with pytest.raises(ModelNotFound, match="not a path"):
            reg.remove(name)
    assert victim.is_file()
    assert reg.resolve(str(victim)).path == victim
    server = Registry(reg.root, paths=False)
    for name in (str(victim), "../victim.gguf", "sub/model"):
        with pytest.raises(ModelNotFound, match="not a path"):
            server.resolve(name)
    assert server.resolve("default").path == reg.root / "default.gguf"
    # a hand-dropped file with any name is listed, resolves and is removed (only paths are refused)
    shutil.copy(gguf, reg.root / "my model (1).gguf")
    assert "my model (1)" in {e.name for e in reg.list()} and reg.resolve("my model (1)").path.is_file()
    reg.remove("my model (1)")
    assert not (reg.root / "my model (1).gguf").exists()
    # on Windows a name with a drive, `C:x`, would name a file outside the directory: not a loose file
    from pathlib import PureWindowsPath

    win = Registry(reg.root)
    win.root = PureWindowsPath("D:/models")
    assert win._loose("C:x") is None and win._loose("x") == PureWindowsPath("D:/models/x.gguf")


def test_files_are_copied_in_outside_the_lock(reg, gguf, tmp_path, monkeypatch):
    """A large GGUF takes minutes to copy: meanwhile other changes (an upload's create, rm, cp) go on."""
    import dgemma.plugin.registry as registry
    from dgemma.plugin.modelfile import ModelSettings

    free, copy = [], shutil.copyfile

    def copying(src, dst):
        free.append(registry._CHANGING.acquire(blocking=False))
        if free[-1]:
            registry._CHANGING.release()
        return copy(src, dst)

    monkeypatch.setattr(registry.shutil, "copyfile", copying)
    reg.import_file(gguf, "imported")
    (tmp_path / "Modelfile").write_text("FROM x")
    entry = reg.create("made", str(gguf), ModelSettings(system="S."), folder=tmp_path)
    assert free == [True, True] and entry.path.read_bytes() == gguf.read_bytes()
    assert sorted(e.name for e in reg.list()) == ["default", "imported", "made"]
    assert not list(reg.root.glob(".copy.*"))
    with pytest.raises(RegistryError, match="already exists"):
        reg.import_file(gguf, "imported")
    assert len(free) == 2  # (refused before any copy)


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


def test_the_windows_lock_is_on_the_lock_files_first_byte(reg, gguf, monkeypatch):
    """Without fcntl (Windows) changes lock the first byte of .registry.lock with msvcrt.locking, trying again
    while another process holds it (LK_LOCK gives up after 10 s), and unlock it after."""
    import dgemma.plugin.registry as registry

    calls = []

    class Msvcrt:  # (msvcrt.locking's contract: locks n bytes from the file's position)
        LK_UNLCK, LK_LOCK = 0, 1
        held_elsewhere = 2  # tries that find it held

        @classmethod
        def locking(cls, fd: int, mode: int, n: int) -> None:
            calls.append((mode, os.lseek(fd, 0, os.SEEK_CUR), n))
            if mode == cls.LK_LOCK and cls.held_elsewhere:
                cls.held_elsewhere -= 1
                raise OSError(36, "Resource deadlock avoided")

    monkeypatch.setattr(registry, "fcntl", None)
    monkeypatch.setattr(registry, "msvcrt", Msvcrt)
    reg.import_file(gguf, "mine")
    assert calls == [(1, 0, 1)] * 3 + [(0, 0, 1)] and reg.resolve("mine").path.is_file()


def test_serve_prunes_leftovers_not_written_for_an_hour(reg, gguf, monkeypatch):
    """Uploads no create took and temporary files of killed writes go at `dgemma serve`'s start, unless recent
    (another process may be writing) or DGEMMA_NOPRUNE is set; models, the index and the lock stay."""
    from fastapi.testclient import TestClient

    from dgemma.plugin.server.app import ServerConfig, create_app

    reg.import_file(gguf, "kept")
    (reg.root / "blobs").mkdir()
    old = [reg.root / "blobs" / ("sha256-" + "0" * 64), reg.root / ".quantize.abc.partial",
           reg.root / "blobs" / ".sha256-x.partial", reg.root / ".copy.def.partial"]
    new = [reg.root / "blobs" / ("sha256-" + "1" * 64), reg.root / ".copy.new.partial"]
    for path in old + new:
        path.write_bytes(b"x" * 10)
    for path in old:
        os.utime(path, (0, 1_000_000))
    keep = sorted(p for p in reg.root.rglob("*") if p not in old)
    monkeypatch.setenv("DGEMMA_NOPRUNE", "1")
    with TestClient(create_app(ServerConfig(models=reg.root))):
        assert all(p.exists() for p in old)
    monkeypatch.delenv("DGEMMA_NOPRUNE")
    with TestClient(create_app(ServerConfig(models=reg.root))) as client:
        assert client.get("/api/tags").status_code == 200
    assert not any(p.exists() for p in old) and all(p.exists() for p in keep)  # (/api/tags adds default's file)
