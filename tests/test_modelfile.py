"""Ollama Modelfiles: the parser, models made from others in the models directory, and `dgemma create / cp /
show / run` on them through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dgemma.plugin.default_model import ensure_default_model
from dgemma.plugin.engine import DoneEvent, Engine
from dgemma.plugin.modelfile import (ModelfileError, ModelSettings, check_parameters, parse_modelfile,
                                     render_modelfile)
from dgemma.plugin.registry import ModelNotFound, Registry, RegistryError

MARIO = '''# a comment, then instructions in any case
FROM default
system """
You are Mario from Super Mario Bros.
Answer as Mario.
"""
PARAMETER temperature 0.7
PARAMETER stop "<end>"
parameter stop </s>
PARAMETER num_predict 6
PARAMETER top_k 40
MESSAGE user Who is Toad?
MESSAGE assistant """A friend,
always."""
LICENSE "MIT "or" not"
REQUIRES 0.5.0
'''


def test_parser_reads_every_instruction():
    made = parse_modelfile(MARIO)
    assert made.base == "default"
    s = made.settings
    assert s.system == "\nYou are Mario from Super Mario Bros.\nAnswer as Mario.\n"  # (kept as written, as Ollama)
    assert s.parameters == {"temperature": 0.7, "stop": ["<end>", "</s>"], "num_predict": 6, "top_k": 40}
    assert s.messages == [{"role": "user", "content": "Who is Toad?"}, {"role": "assistant", "content": "A friend,\nalways."}]
    assert s.license == ['MIT "or" not']


@pytest.mark.parametrize("settings", [
    parse_modelfile(MARIO).settings,
    ModelSettings(),
    ModelSettings(system='quotes " and \\ inside, """ and C:\\new\\tmp', parameters={"stop": [" a b ", '"q"', "\n", "x\ny"]}),
    ModelSettings(system="", messages=[{"role": "system", "content": "x\n\ny"}], license=["one", "two"]),
    ModelSettings(system='ends with a quote: "hi"', messages=[{"role": "user", "content": "    x = 1\n  "}]),
    ModelSettings(system="  leading and trailing  \n", license=["form\x0cfeed\u2028and\x85others\ttab"]),
    ModelSettings(parameters={"temperature": 0.1, "seed": -1, "numa": True, "num_predict": -2}),
])
def test_render_reads_back(settings):
    text = render_modelfile("some/file.gguf", settings, name="x:latest")
    assert parse_modelfile(text).settings == settings
    assert parse_modelfile(text).base == "some/file.gguf"


@pytest.mark.parametrize("text, message", [
    ("SYSTEM hi", "Modelfile: no FROM line"),
    ("FROM default\nTEMPLATE {{ .Prompt }}", "Modelfile:2: TEMPLATE is not supported"),
    ("FROM default\nADAPTER ./lora.gguf", "Modelfile:2: ADAPTER is not supported"),
    ("FROM default\nPARAMETER temperature hot", "Modelfile:2: parameter 'temperature' must be a finite number"),
    ("FROM default\nPARAMETER num_ctx 1.5", "Modelfile:2: parameter 'num_ctx' must be an integer"),
    ("FROM default\nPARAMETER use_mmap maybe", "Modelfile:2: parameter 'use_mmap' must be true or false"),
    ("FROM default\nPARAMETER warmth 3", "Modelfile:2: unknown parameter 'warmth'"),
    ("FROM default\nPARAMETER seed", "Modelfile:2: PARAMETER needs a name and a value"),
    ("FROM default\nMESSAGE robot hi", "Modelfile:2: MESSAGE needs a role"),
    ("FROM default\n\nSYSTEM \"\"\"open\nstill open", "Modelfile:3: unterminated"),
    ("FROM default\nSYSTEM \"\"\"a\"\"\" b\nPARAMETER seed 1", "Modelfile:2: unterminated"),
    ("FROM default\nPARAMETER temperature nan", "Modelfile:2: parameter 'temperature' must be a finite number"),
    ("FROM default\nPARAMETER diffusion_steps 0", "Modelfile:2: parameter 'diffusion_steps' must be at least 1"),
    ("FROM default\nPARAMETER num_ctx -5", "Modelfile:2: parameter 'num_ctx' must be at least 1"),
    ("FROM default\nDESCRIBE it", "Modelfile:2: unknown instruction 'DESCRIBE'"),
    ("FROM", "Modelfile:1: FROM needs a value"),
])
def test_parser_errors_name_the_line(text, message):
    with pytest.raises(ModelfileError) as e:
        parse_modelfile(text)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_ollama_parser_details():
    # a byte order mark, CRLF line ends, tabs between words, values as written between quotes
    made = parse_modelfile('\ufeffFROM\tdefault\r\nPARAMETER\ttemperature\t0.5\r\nMESSAGE user\thi there\r\n'
                           'SYSTEM "Save under C:\\new\\tmp"\r\nSYSTEM ""\r\n')
    assert made.base == "default" and made.settings.parameters == {"temperature": 0.5}
    assert made.settings.messages == [{"role": "user", "content": "hi there"}] and made.settings.system == ""
    assert parse_modelfile('FROM x\nSYSTEM "Save under C:\\new\\tmp"').settings.system == "Save under C:\\new\\tmp"
    assert parse_modelfile('FROM x\nSYSTEM """Say "hi""""').settings.system == 'Say "hi"'
    # an empty SYSTEM keeps the base's, as Ollama's
    assert ModelSettings("").over(ModelSettings("base")).system == "base"


def test_request_parameters_are_typed():
    assert check_parameters({"num_ctx": "2048", "stop": "x", "temperature": 1, "numa": "true"}) == {
        "num_ctx": 2048, "stop": ["x"], "temperature": 1.0, "numa": True}
    for bad in ({"seed": True}, {"stop": [1]}, {"stop": []}, {"what": 1}):
        with pytest.raises(ModelfileError):
            check_parameters(bad)


def test_settings_at_generation_as_ollama_applies_them():
    s = ModelSettings("S", {"seed": 1, "num_predict": 3}, [{"role": "user", "content": "u0"}])
    assert s.options({"seed": 2}) == {"seed": 2, "num_predict": 3}
    user = {"role": "user", "content": "q"}
    assert s.chat([user]) == [{"role": "system", "content": "S"}, {"role": "user", "content": "u0"}, user]
    own = {"role": "system", "content": "mine"}
    assert s.chat([own, user]) == [{"role": "user", "content": "u0"}, own, user]  # (Ollama's order)
    assert s.prompt("q", None) == [{"role": "system", "content": "S"}, {"role": "user", "content": "u0"}, user]
    assert s.prompt("q", "mine", history=False) == [own, user]


@pytest.fixture
def reg(tmp_path) -> Registry:
    return Registry(tmp_path / "models")


@pytest.fixture(scope="module")
def gguf(tmp_path_factory) -> Path:
    return ensure_default_model(tmp_path_factory.mktemp("src"))


def test_made_models_share_files_and_build_on_their_base(reg, gguf):
    base = reg.import_file(gguf, "base")
    mario = reg.create("mario", "base", parse_modelfile(MARIO).settings)
    assert mario.path == base.path and mario.base == "base:latest" and "You are Mario" in mario.settings.system
    # made again from mario: its settings over mario's
    luigi = reg.create("luigi:v2", "mario:latest", ModelSettings("Luigi", {"seed": 5}))
    assert luigi.settings.system == "Luigi" and luigi.settings.parameters["seed"] == 5
    assert luigi.settings.parameters["num_predict"] == 6 and luigi.settings.messages == mario.settings.messages
    assert reg.resolve("luigi:v2").settings == luigi.settings and reg.resolve("mario").settings == mario.settings
    assert len({base.digest, mario.digest, luigi.digest}) == 3
    copied = reg.copy("mario", "mario2")
    assert copied.digest == mario.digest and copied.path == base.path
    # a shared file stays until no name uses it
    reg.remove("base")
    assert base.path.is_file() and reg.resolve("mario").path == base.path
    for name in ("mario", "luigi:v2"):
        reg.remove(name)
    assert base.path.is_file()
    reg.remove("mario2")
    assert not base.path.exists()
    assert {e.name for e in reg.list()} == {"default"}


def test_import_over_a_shared_file_leaves_it_to_the_others(reg, gguf, tmp_path):
    first = reg.import_file(gguf, "mine")
    reg.create("mine-sys", "mine", ModelSettings("s"))
    again = reg.import_file(gguf, "mine", force=True)
    assert again.path != first.path and first.path.is_file() and reg.resolve("mine-sys").path == first.path
    index = json.loads((reg.root / "registry.json").read_text())["models"]
    assert index["mine"] == again.path.name  # (a plain import keeps the plain form)
    assert index["mine-sys"] == {"file": first.path.name, "from": "mine:latest", "system": "s"}


def test_a_name_made_again_gets_a_new_file(reg, gguf, tmp_path):
    # (a model loaded from the old file reloads: the server compares paths)
    first = reg.create("m", str(gguf), ModelSettings())
    other = tmp_path / "other.gguf"
    other.write_bytes(gguf.read_bytes()[:-1] + b"\1")
    again = reg.create("m", str(other), ModelSettings())
    assert again.path != first.path and not first.path.exists() and again.path.read_bytes() == other.read_bytes()
    # a name removed does not come back through a file another model shares
    reg.create("m2", "m", ModelSettings("s"))
    reg.remove("m")
    with pytest.raises(ModelNotFound):
        reg.resolve("m")
    assert reg.resolve("m2").path == again.path
    # a GGUF dropped in by hand is never overwritten by an import whose slug it has
    (reg.root / "my-model.gguf").write_bytes(other.read_bytes())
    imported = reg.import_file(gguf, "my:model")
    assert imported.path.name != "my-model.gguf" and (reg.root / "my-model.gguf").read_bytes() == other.read_bytes()
    with pytest.raises(RegistryError, match="too long"):
        reg.create("y" * 260, str(gguf), ModelSettings())


def test_concurrent_changes_keep_every_name_on_a_file(reg, gguf):
    import threading

    reg.import_file(gguf, "m")
    errors: list[Exception] = []

    def copy(i: int) -> None:
        try:
            reg.copy("m", f"c{i}")
        except ModelNotFound:
            pass  # (m removed first)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=copy, args=(i,)) for i in range(8)]
    threads.append(threading.Thread(target=lambda: reg.remove("m")))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    index = json.loads((reg.root / "registry.json").read_text())["models"]
    assert "m" not in index and all((reg.root / (v if isinstance(v, str) else v["file"])).is_file() for v in index.values())


def test_made_from_the_bundled_and_loose_models(reg, gguf):
    reg.create("d2", "default", ModelSettings("x"))
    reg.remove("d2")
    assert (reg.root / "default.gguf").is_file()
    (reg.root / "handmade.gguf").write_bytes(gguf.read_bytes())
    reg.create("hm2", "handmade", ModelSettings("y"))
    assert {"handmade", "hm2"} <= {e.name for e in reg.list()}  # the loose model stays listed (adopted)
    reg.remove("hm2")
    assert reg.resolve("handmade").path.is_file()


def test_made_from_a_file_copies_it(reg, gguf, tmp_path):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "weights.gguf").write_bytes(gguf.read_bytes())
    entry = reg.create("fromfile", "weights.gguf", ModelSettings(parameters={"seed": 3}), folder=folder)
    assert entry.path.parent == reg.root and entry.path.read_bytes() == gguf.read_bytes() and entry.base is None
    with pytest.raises(RegistryError, match="FROM missing.gguf: no such file"):
        reg.create("x", "missing.gguf", ModelSettings(), folder=folder)
    with pytest.raises(RegistryError, match="FROM nothing: model 'nothing' not found"):
        reg.create("x", "nothing", ModelSettings())
    for bad in ("default", "a/b", "x y", ":tag"):
        with pytest.raises(RegistryError, match="reserved|invalid model name"):
            reg.create(bad, "default", ModelSettings())
    with pytest.raises(ModelNotFound):
        reg.copy("nothing", "y")
    assert not list(reg.root.glob("*.partial"))


def test_blob_uploads_are_checked(reg):
    import hashlib

    data = b"not really a model"
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    w = reg.blob_writer(good)
    w.write(data[:5])
    w.write(data[5:])
    w.finish()
    assert reg.blob_path(good).read_bytes() == data
    bad = reg.blob_writer("sha256:" + "0" * 64)
    bad.write(data)
    with pytest.raises(RegistryError, match="digest mismatch"):
        bad.finish()
    assert sorted(p.name for p in reg.blob_path(good).parent.iterdir()) == [reg.blob_path(good).name]
    with pytest.raises(RegistryError, match="invalid digest"):
        reg.blob_path("md5:abc")


# ---- the command line ---------------------------------------------------------------------------------------
def cli(models: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "DGEMMA_MODELS": str(models)}
    return subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


def test_cli_create_show_run_cp_rm(tmp_path):
    models = tmp_path / "models"
    ensure_default_model(models)
    (tmp_path / "Modelfile").write_text(MARIO)
    made = cli(models, "create", "mario", cwd=tmp_path)  # ./Modelfile, as ollama create
    assert made.returncode == 0, made.stderr
    shown, mine = parse_modelfile(cli(models, "show", "mario", "--modelfile").stdout).settings, parse_modelfile(MARIO).settings
    # the Modelfile shown makes the model again: its settings, and the defaults (as Ollama shows the stops)
    assert shown.parameters.items() >= mine.parameters.items() and shown.parameters["num_ctx"] == 4096
    shown.parameters = mine.parameters
    assert shown == mine
    assert cli(models, "show", "mario", "--system").stdout == "\nYou are Mario from Super Mario Bros.\nAnswer as Mario.\n\n"
    params = cli(models, "show", "mario", "--parameters").stdout
    assert '"</s>"' in params and "num_predict" in params and "diffusion_steps" in params
    assert "<|turn>" in cli(models, "show", "mario", "--template").stdout
    summary = cli(models, "show", "mario").stdout
    assert "diffusion-gemma" in summary and "Who is Toad?" in summary and "temperature" in summary

    # dgemma run: SYSTEM, MESSAGEs and PARAMETERs as the same conversation and options given by hand
    engine = Engine.load(models / "default.gguf")
    settings = parse_modelfile(MARIO).settings
    from dgemma.plugin.server.serving import generate_options

    conv = settings.prompt("Hello", None)
    assert conv == settings.chat([{"role": "user", "content": "Hello"}])
    opts = generate_options(engine, {**settings.parameters, "seed": 4})
    opts.num_ctx = None
    done = [e for e in engine.generate(conv, opts) if isinstance(e, DoneEvent)][0]
    assert len(done.token_ids) == 6  # (cut by num_predict, not an end of generation: the PARAMETER counts)
    run = cli(models, "run", "mario", "Hello", "--seed", "4", "--json")
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["token_ids"] == done.token_ids and out["prompt_eval_count"] == len(engine.prompt_ids(conv))
    # a flag wins over the PARAMETER, and --system over SYSTEM
    longer = json.loads(cli(models, "run", "mario", "Hello", "--seed", "4", "--json", "--max-tokens", "9",
                            "--system", "Plain.").stdout)
    mine = settings.prompt("Hello", "Plain.")  # (/api/generate's order: the system first, then the MESSAGEs)
    opts = generate_options(engine, {**settings.parameters, "seed": 4, "num_predict": 9})
    opts.num_ctx = None
    done = [e for e in engine.generate(mine, opts) if isinstance(e, DoneEvent)][0]
    assert longer["token_ids"] == done.token_ids and longer["prompt_eval_count"] == len(engine.prompt_ids(mine))

    assert cli(models, "cp", "mario", "mario:copy").returncode == 0
    assert cli(models, "show", "mario:copy", "--system").stdout.startswith("\nYou are Mario")
    assert cli(models, "rm", "mario").returncode == 0 and cli(models, "rm", "mario:copy").returncode == 0
    assert sorted(p.name for p in models.glob("*.gguf")) == ["default.gguf"]


def test_cli_errors_are_one_line(tmp_path):
    models = tmp_path / "models"
    (tmp_path / "Modelfile").write_text("FROM default\nTEMPLATE x\n")
    for args, message in ((("create", "x", "-f", str(tmp_path / "none")), "cannot read"),
                          (("create", "x", "-f", str(tmp_path / "Modelfile")), "Modelfile:2: TEMPLATE is not supported"),
                          (("cp", "nothing", "y"), "not found"), (("show", "nothing"), "not found")):
        proc = cli(models, *args)
        assert proc.returncode == 1 and message in proc.stderr and proc.stderr.count("\n") == 1, (args, proc.stderr)


def test_file_digests_are_hashed_once(tmp_path, gguf):
    import hashlib

    from dgemma.plugin import registry

    path = tmp_path / "m.gguf"
    path.write_bytes(gguf.read_bytes())
    assert registry.file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
    side = json.loads((tmp_path / registry.DIGESTS_FILE).read_text())
    st = path.stat()
    assert side == {"m.gguf": [st.st_size, st.st_mtime_ns, registry.file_digest(path)]}
    # a new process reads it from the folder (a planted value proves the file is not read again) ...
    side["m.gguf"][2] = "f" * 64
    (tmp_path / registry.DIGESTS_FILE).write_text(json.dumps(side))
    registry._DIGESTS.clear()
    assert registry.file_digest(path) == "f" * 64
    # ... while the file is the same: written again, it is hashed again
    path.write_bytes(gguf.read_bytes()[:-1] + b"\0")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert registry.file_digest(path) == hashlib.sha256(path.read_bytes()).hexdigest()
