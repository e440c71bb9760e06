"""Ollama's /api/create, /api/copy and /api/blobs on a real `dgemma serve`, through the official clients: the
models made are listed and shown, and generate what the engine generates for their settings."""

from __future__ import annotations

import hashlib

import httpx
import ollama
import openai
import pytest

from dgemma.plugin.engine import DoneEvent, Engine
from dgemma.plugin.modelfile import ModelSettings
from dgemma.plugin.server.serving import generate_options

SYSTEM = "You are Mario from Super Mario Bros."
MESSAGES = [{"role": "user", "content": "Who is Toad?"}, {"role": "assistant", "content": "A friend."}]
PARAMETERS = {"num_predict": 7, "seed": 11, "stop": ["<never>"], "top_k": 40}


def alone(engine: Engine, messages: list, options: dict) -> tuple[list[int], DoneEvent]:
    """The prompt's ids and the engine's generation for it, with no server in between."""
    opts = generate_options(engine, options)
    ids = engine.prompt_ids(messages)
    return ids, [e for e in engine.generate(ids, opts) if isinstance(e, DoneEvent)][0]


def test_create_from_a_model_and_generate_with_its_settings(server, engine):
    client = ollama.Client(host=server)
    progress = list(client.create(model="mario", from_="default", system=SYSTEM, parameters=PARAMETERS,
                                  messages=MESSAGES, license="MIT", stream=True))
    assert progress[-1].status == "success" and len(progress) > 1
    listed = {m.model: m for m in client.list().models}
    assert listed["mario:latest"].details.parent_model == "default:latest"
    assert listed["mario:latest"].digest != listed["default:latest"].digest
    shown = client.show("mario")
    assert shown.license == "MIT" and f'SYSTEM """{SYSTEM}"""' in shown.modelfile and "top_k" in shown.parameters
    assert "FROM " in shown.modelfile and 'MESSAGE user """Who is Toad?"""' in shown.modelfile
    settings = ModelSettings(SYSTEM, PARAMETERS, MESSAGES)

    # /api/generate: the SYSTEM, the MESSAGEs, the prompt; the PARAMETERs as options (the context returned is the
    # prompt's ids and the reply's)
    ids, done = alone(engine, settings.prompt("Hi", None), PARAMETERS)
    assert len(done.token_ids) == 7  # (num_predict cut it: the parameter counts)
    out = client.generate(model="mario", prompt="Hi")
    assert out.context == ids + done.token_ids and out.prompt_eval_count == len(ids)
    # a request's options and system win
    ids, done = alone(engine, settings.prompt("Hi", "Be Luigi."), {**PARAMETERS, "num_predict": 3})
    out = client.generate(model="mario", prompt="Hi", system="Be Luigi.", options={"num_predict": 3})
    assert out.context == ids + done.token_ids and len(done.token_ids) <= 3

    # /api/chat and /v1/chat/completions: SYSTEM where the chat has none, the MESSAGEs first
    chat = [{"role": "user", "content": "Hi"}]
    ids, done = alone(engine, settings.chat(chat), PARAMETERS)
    got = client.chat(model="mario", messages=chat)
    assert got.prompt_eval_count == len(ids) and got.eval_count == len(done.token_ids)
    assert got.message.content == engine.tokenizer.decode(done.token_ids, skip_special=True)
    oa = openai.OpenAI(base_url=f"{server}/v1", api_key="x").chat.completions.create(model="mario", messages=chat)
    assert oa.usage.prompt_tokens == len(ids) and oa.choices[0].message.content == got.message.content
    # a chat's own system message: after the MESSAGEs, as Ollama orders them (the reply tells the orders apart)
    own = [{"role": "system", "content": "Be brief."}, *chat]
    ids, done = alone(engine, settings.chat(own), PARAMETERS)
    _, other = alone(engine, [own[0], *MESSAGES, *chat], PARAMETERS)
    assert other.token_ids != done.token_ids
    got = client.chat(model="mario", messages=own)
    assert got.prompt_eval_count == len(ids)
    assert got.message.content == engine.tokenizer.decode(done.token_ids, skip_special=True)

    # default and mario share one engine: /api/ps lists both, the memory under one of them
    client.generate(model="default", prompt="Hi", options={"num_predict": 1}, keep_alive="1h")
    loaded = {m.model: m for m in client.ps().models}
    assert set(loaded) == {"default:latest", "mario:latest"}
    assert loaded["default:latest"].size > 0 and loaded["mario:latest"].size == loaded["mario:latest"].size_vram == 0

    # made again: the new settings at the next request, without unloading
    client.create(model="mario", from_="default", parameters={"num_predict": 2, "seed": 11})
    assert client.show("mario").license in ("", None) and client.generate(model="mario", prompt="Hi").eval_count <= 2
    assert client.delete("mario").status == "success" and client.show("default").modelfile


def test_an_upload_that_is_not_a_gguf_is_refused(server, models, tmp_path):
    client = ollama.Client(host=server)
    (tmp_path / "junk.gguf").write_bytes(b"not a model at all")
    digest = client.create_blob(tmp_path / "junk.gguf")
    before = sorted(p.name for p in models.iterdir())
    with pytest.raises(ollama.ResponseError) as e:
        client.create(model="junk", files={"junk.gguf": digest})
    assert e.value.status_code == 400 and "not a GGUF" in str(e.value)
    assert sorted(p.name for p in models.iterdir()) == before and "junk" not in [m.model for m in client.list().models]


def test_create_from_an_uploaded_gguf_and_copy(server, models, tmp_path):
    client = ollama.Client(host=server)
    digest = client.create_blob(models / "default.gguf")
    assert httpx.head(f"{server}/api/blobs/{digest}", timeout=60).status_code == 200
    client.create(model="uploaded:q8", files={"model.gguf": digest}, system="From a file.")
    shown = client.show("uploaded:q8")
    assert shown.details.parent_model in ("", None) and shown.modelinfo["general.architecture"] == "diffusion-gemma"
    # the upload became the model's file: the blob is gone, the file is new
    assert httpx.head(f"{server}/api/blobs/{digest}", timeout=60).status_code == 404
    assert client.copy("uploaded:q8", "copied").status == "success"
    assert client.show("copied").modelfile.count("From a file.") == 1
    assert client.generate(model="copied", prompt="Hi", options={"num_predict": 2}).eval_count <= 2
    for name in ("uploaded:q8", "copied"):
        client.delete(name)
    assert sorted(p.name for p in models.glob("*.gguf")) == ["default.gguf"]


def test_create_quantizes(server, models, checkpoint_factory, tmp_path):
    """`quantize`: the model gets its own file, an uploaded F32 GGUF (or a model's) as dgemma quantize writes it."""
    from conftest import SPECS

    from dgemma.convert import convert
    from dgemma.convert.requant import requantize

    f32 = convert(checkpoint_factory(SPECS["base"]), tmp_path / "f32.gguf", "F32", quiet=True).path
    expected = requantize(f32, tmp_path / "q8.gguf", "Q8_0", quiet=True).path.read_bytes()
    client = ollama.Client(host=server)
    digest = client.create_blob(f32)
    statuses = [p.status for p in client.create(model="tiny-q8", files={"f32.gguf": digest}, quantize="q8_0",
                                               system="Small.", stream=True)]
    assert "quantized to Q8_0" in statuses and statuses[-1] == "success"
    assert client.show("tiny-q8").details.quantization_level == "Q8_0"
    made = next(models.glob("tiny-q8*.gguf"))
    assert made.read_bytes() == expected
    assert httpx.head(f"{server}/api/blobs/{digest}", timeout=60).status_code == 404  # (the upload went)
    # from a model: its settings kept, its file left as it is
    client.create(model="tiny-f32", files={"f32.gguf": client.create_blob(f32)}, system="Kept.")
    client.create(model="tiny-q8b", from_="tiny-f32", quantize="Q8_0")
    assert 'SYSTEM """Kept."""' in client.show("tiny-q8b").modelfile
    assert client.show("tiny-f32").details.quantization_level == "F32"
    for name in ("tiny-q8", "tiny-f32", "tiny-q8b"):
        client.delete(name)
    assert sorted(p.name for p in models.glob("*.gguf")) == ["default.gguf"] and not list(models.glob(".*.partial"))


def test_the_legacy_modelfile_form(server, models):
    digest = "sha256:" + hashlib.sha256((models / "default.gguf").read_bytes()).hexdigest()
    with (models / "default.gguf").open("rb") as f:
        assert httpx.post(f"{server}/api/blobs/{digest}", content=f, timeout=120).status_code == 201
    r = httpx.post(f"{server}/api/create", json={"name": "legacy", "modelfile": f"FROM @{digest}\nSYSTEM Old.\n",
                                                   "stream": False}, timeout=120)
    assert r.status_code == 200 and r.json() == {"status": "success"}
    assert 'SYSTEM """Old."""' in ollama.Client(host=server).show("legacy").modelfile
    ollama.Client(host=server).delete("legacy")


@pytest.mark.parametrize("body, status, message", [
    ({"from": "default", "template": "{{ .Prompt }}"}, 400, "TEMPLATE is not supported"),
    ({"from": "default", "adapters": {"a.gguf": "sha256:" + "1" * 64}}, 400, "ADAPTER is not supported"),
    ({"from": "default", "quantize": "q4_K_M"}, 400, "quantize q4_K_M: "),
    ({"from": "default", "quantize": "q9_z"}, 400, "--type 'q9_z' is not supported"),
    ({"from": "/etc/passwd.gguf"}, 400, "is a path"),
    ({"from": "nothing"}, 400, "FROM nothing: model 'nothing' not found"),
    ({}, 400, "'from' (the model to build on) or 'files'"),
    ({"files": {"model.gguf": "sha256:" + "2" * 64}}, 400, "its blob was not uploaded"),
    ({"files": {"model.safetensors": "sha256:" + "2" * 64}}, 400, "convert them with 'dgemma convert'"),
    ({"from": "default", "parameters": {"warmth": 2}}, 400, "unknown parameter 'warmth'"),
    ({"from": "default", "parameters": {"seed": "x"}}, 400, "parameter 'seed' must be an integer"),
    ({"from": "default", "messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0] must have a role"),
    ({"from": "default", "modelfile": "SYSTEM x"}, 400, "modelfile: no FROM line"),
])
def test_create_refusals(server, body, status, message):
    r = httpx.post(f"{server}/api/create", json={"model": "bad", **body}, timeout=60)
    assert r.status_code == status and message in r.json()["error"], r.text
    with pytest.raises(ollama.ResponseError):
        ollama.Client(host=server).show("bad")


def test_copy_blob_and_name_refusals(server):
    with pytest.raises(ollama.ResponseError) as e:
        ollama.Client(host=server).copy("nothing", "x")
    assert e.value.status_code == 404
    r = httpx.post(f"{server}/api/copy", json={"source": "default", "destination": "a b"}, timeout=60)
    assert r.status_code == 400 and "invalid model name" in r.json()["error"]
    r = httpx.post(f"{server}/api/create", json={"model": "default", "from": "default"}, timeout=60)
    assert r.status_code == 400 and "reserved" in r.json()["error"]
    r = httpx.post(f"{server}/api/blobs/sha256:{'3' * 64}", content=b"other bytes", timeout=60)
    assert r.status_code == 400 and "digest mismatch" in r.json()["error"]
    assert httpx.head(f"{server}/api/blobs/sha256:{'3' * 64}", timeout=60).status_code == 404
    assert httpx.head(f"{server}/api/blobs/md5:{'3' * 32}", timeout=60).status_code == 400


def test_show_reads_a_tokenizer_once_per_file(monkeypatch, tmp_path):
    import os

    from dgemma.plugin.registry import Registry
    from dgemma.plugin.server import app as server_app
    from dgemma.plugin.server.serving import ModelManager

    registry = Registry(tmp_path / "m")
    state = server_app.AppState(server_app.ServerConfig(), registry, ModelManager(registry))
    built = []
    real = server_app.Tokenizer.from_gguf
    monkeypatch.setattr(server_app.Tokenizer, "from_gguf", lambda *a: built.append(1) or real(*a))
    first = state.template_info(registry.resolve("default"))
    assert state.template_info(registry.resolve("default")) is first and len(built) == 1
    assert first.stops and "<|turn>" in first.template and first.features.thinking
    path = registry.resolve("default").path
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # (another file there now)
    assert state.template_info(registry.resolve("default")) == first and len(built) == 2
