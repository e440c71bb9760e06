"""`dgemma serve` on loopback, driven by the official ollama and openai clients."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import ollama
import openai
import pytest
from conftest import THOUGHT_CHANNEL_TOKENS
from server_util import running_server

from dgemma.plugin.engine import Engine, TextEvent


def alone(engine: Engine, messages, seed: int, n: int) -> str:
    """What the engine generates for a chat with no server in between."""
    from dgemma.plugin.server.serving import generate_options

    opts = generate_options(engine, {"seed": seed, "num_predict": n})
    return "".join(e.text for e in engine.generate(messages, opts) if isinstance(e, TextEvent))


def test_root_version_tags_show_ps(server, models):
    assert httpx.get(server, timeout=60).text == "Ollama is running" and httpx.head(server, timeout=60).status_code == 200
    client = ollama.Client(host=server)
    listed = client.list()
    names = [m.model for m in listed.models]
    assert "default:latest" in names
    default = next(m for m in listed.models if m.model == "default:latest")
    assert default.size == (models / "default.gguf").stat().st_size and len(default.digest) == 64
    assert default.details.format == "gguf" and default.details.family == "diffusiongemma"
    assert default.details.quantization_level == "Q8_0" and default.details.parameter_size.endswith("M")
    shown = client.show("default")
    assert shown.modelinfo["general.architecture"] == "diffusion-gemma"
    assert shown.modelinfo["general.parameter_count"] > 0 and "completion" in shown.capabilities
    assert "num_ctx" in shown.parameters and "<|turn>" in shown.template
    # Continue asks with the legacy field
    legacy = httpx.post(f"{server}/api/show", json={"name": "default"}, timeout=60).json()
    assert legacy["model_info"] == json.loads(shown.model_dump_json(by_alias=True))["model_info"]
    client.generate(model="default", prompt="")  # load
    assert [m.model for m in client.ps().models] == ["default:latest"]
    assert client.generate(model="default", prompt="", keep_alive=0).done_reason == "unload"
    assert client.ps().models == []


def test_generate_and_chat_streaming_and_not(server, engine):
    client = ollama.Client(host=server)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    expected = alone(engine, messages, seed=11, n=40)
    full = client.chat(model="default", messages=messages, options={"seed": 11, "num_predict": 40})
    assert full.message.role == "assistant" and full.message.content == expected
    assert full.done and full.eval_count <= 40 and (full.done_reason == "length") == (full.eval_count == 40)
    assert full.prompt_eval_count > 0 and full.total_duration >= full.eval_duration > 0
    parts = list(client.chat(model="default", messages=messages, stream=True, options={"seed": 11, "num_predict": 40}))
    assert "".join(p.message.content for p in parts) == expected
    assert parts[-1].done and not any(p.done for p in parts[:-1]) and parts[-1].eval_count == full.eval_count

    gen_expected = alone(engine, [{"role": "user", "content": "Once upon a time"}], seed=5, n=24)
    r = client.generate(model="default", prompt="Once upon a time", options={"seed": 5, "num_predict": 24})
    assert r.response == gen_expected and r.context and r.done_reason in ("stop", "length")
    chunks = list(client.generate(model="default:latest", prompt="Once upon a time", stream=True,
                                  options={"seed": 5, "num_predict": 24}))
    assert "".join(c.response for c in chunks) == gen_expected


def test_errors(server):
    client = ollama.Client(host=server)
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="no-such-model", prompt="hi", stream=False)
    assert e.value.status_code == 404
    for path, body, needle in [
        ("/api/generate", {"model": "default", "prompt": "hi", "images": ["aGk="]}, "images"),
        ("/api/generate", {"model": "default", "prompt": "hi", "format": {"type": "objekt"}}, "format: at #: type"),
        ("/api/chat", {"model": "default", "messages": [{"role": "user", "content": "hi"}], "format": "xml"}, "format"),
        ("/api/generate", {"model": "default", "prompt": "hi", "keep_alive": "soon"}, "keep_alive"),
        ("/api/chat", {"model": "default", "messages": [{"role": "user", "content": "hi"}], "tools": [{}]}, "tools"),
        ("/api/chat", {"model": "default", "messages": "nope"}, "invalid request"),
        ("/api/pull", {"model": "x"}, "dgemma import"),
        ("/api/embed", {"model": "default", "input": "x"}, "embeddings"),
        ("/api/generate", {"model": "default", "prompt": "hi", "options": {"num_predict": "ten"}}, "num_predict"),
    ]:
        r = httpx.post(f"{server}{path}", json=body, timeout=60)
        assert 400 <= r.status_code < 600 and needle in r.json()["error"], (path, r.text)
    r = httpx.post(f"{server}/api/chat", content=b"{broken", timeout=60)
    assert r.status_code == 400 and "error" in r.json()
    # options: a 400 naming the option, never a 500 (JSON's NaN and Infinity included, sent as raw text)
    for options, needle in [('{"num_batch": 0}', "'num_batch' must be at least 1"), ('{"num_batch": 1.5}', "integer"),
                            ('{"num_predict": Infinity}', "finite"), ('{"seed": NaN}', "finite")]:
        body = '{"model": "default", "prompt": "hi", "stream": false, "options": %s}' % options
        r = httpx.post(f"{server}/api/generate", content=body.encode(), headers={"content-type": "application/json"},
                       timeout=60)
        assert r.status_code == 400 and needle in r.json()["error"], (options, r.text)


def test_ollama_options_reach_the_engine(engine):
    """Ollama's options map onto GenerateOptions (num_batch: prompt tokens per encoder pass; absent: the
    engine's default), the integer ones given as JSON floats with integral values too."""
    from dgemma.plugin.server.serving import generate_options

    opts = generate_options(engine, {"num_batch": 2, "num_ctx": 2048.0, "seed": 7})
    assert (opts.num_batch, opts.num_ctx, opts.seed) == (2, 2048, 7) and isinstance(opts.num_ctx, int)
    assert generate_options(engine, {}).num_batch is None


def test_openai_client(server, engine):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    assert "default:latest" in [m.id for m in client.models.list()]
    assert client.models.retrieve("default:latest").id == "default:latest"
    messages = [{"role": "user", "content": "Hello there"}]
    expected = alone(engine, messages, seed=9, n=30)
    r = client.chat.completions.create(model="default", messages=messages, max_tokens=30, seed=9)
    n = r.usage.completion_tokens
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == ("length" if n == 30 else "stop")
    assert n <= 30 and r.usage.total_tokens == r.usage.prompt_tokens + n
    stream = client.chat.completions.create(model="default", messages=messages, max_tokens=30, seed=9, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == r.choices[0].finish_reason
    done = client.completions.create(model="default", prompt="Once upon", max_tokens=12, seed=2)
    assert done.object == "text_completion" and done.usage.completion_tokens <= 12
    assert (done.choices[0].finish_reason == "length") == (done.usage.completion_tokens == 12)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=messages)
    assert e.value.body["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[])


def test_a_conversation_reuses_its_kv_cache(server, engine):
    """A chat's next turn (the messages so far, the reply, a new message) takes the last turn's prompt but for its
    final few tokens (the template renders the reply without the generation prompt's empty thought channel)
    from the KV cache the last turn left: Ollama's prompt_eval_cached_count and OpenAI's cached_tokens say
    how many, prompt_eval_count and prompt_tokens count the whole prompt, and the reply is what the engine
    gives from scratch. The same conversation again takes all of it."""
    from dgemma.plugin.server.serving import generate_options

    client = ollama.Client(host=server)
    chat = [{"role": "user", "content": "Tell me a fortune."}]
    first = client.chat(model="default", messages=chat, options={"seed": 3, "num_predict": 16})
    chat += [{"role": "assistant", "content": first.message.content}, {"role": "user", "content": "Another one."}]
    r = httpx.post(f"{server}/api/chat", timeout=120, json={"model": "default", "messages": chat, "stream": False,
                                                            "options": {"seed": 4, "num_predict": 16}}).json()
    ids1, ids2 = engine.prompt_ids(chat[:1]), engine.prompt_ids(chat)
    common = next(n for n, (a, b) in enumerate(zip(ids1, ids2)) if a != b)
    assert len(ids1) - THOUGHT_CHANNEL_TOKENS < common < len(ids1)
    assert r["prompt_eval_cached_count"] == common and r["prompt_eval_count"] == len(ids2)
    scratch = generate_options(engine, {"seed": 4, "num_predict": 16})
    scratch.cache_prompt = False
    assert r["message"]["content"] == "".join(e.text for e in engine.generate(chat, scratch) if isinstance(e, TextEvent))

    openai_client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    again = openai_client.chat.completions.create(model="default", messages=chat, max_tokens=16, seed=4)
    assert again.usage.prompt_tokens == len(ids2) and again.usage.prompt_tokens_details.cached_tokens == len(ids2)
    assert again.choices[0].message.content == r["message"]["content"]


TITLE_PROMPT = "### Task: Generate a concise, 3-5 word title for the chat history below.\n### Chat History:\n"


def test_a_conversation_comes_back_after_a_frontend_task(server, models, tmp_path, engine):
    """Open WebUI's way: after a chat's first reply it sends its own task prompt (a title for the chat) to the same
    model, then the chat's next turn. The conversation's KV cache was put aside (host memory, --cache-ram), so
    the next turn still takes all but the last turn's final few tokens from it; with --cache-ram 0 the task's
    cache took its place and the turn is encoded (nearly) whole. The reply is the same either way."""
    chat = [{"role": "user", "content": "Tell me a fortune, and then another fortune, and a third one."}]
    options = {"seed": 5, "num_predict": 16}

    def turns(url: str) -> dict:
        client = ollama.Client(host=url)
        first = client.chat(model="default", messages=chat, options=options)
        task = [{"role": "user", "content": TITLE_PROMPT + f"USER: {chat[0]['content']}\nASSISTANT: {first.message.content}"}]
        client.chat(model="default", messages=task, options={"num_predict": 8})
        turn = chat + [{"role": "assistant", "content": first.message.content}, {"role": "user", "content": "One more."}]
        # (the client's ChatResponse has no prompt_eval_cached_count)
        return httpx.post(f"{url}/api/chat", timeout=120, json={"model": "default", "messages": turn, "stream": False,
                                                                "options": options}).json()

    kept = turns(server)
    with running_server(models, "--cache-ram", "0", log=tmp_path / "serve.log") as url:
        none = turns(url)
    assert kept["message"] == none["message"] and kept["prompt_eval_count"] == none["prompt_eval_count"]
    ids1 = engine.prompt_ids(chat)
    assert len(ids1) - THOUGHT_CHANNEL_TOKENS < kept["prompt_eval_cached_count"] < len(ids1)
    assert none["prompt_eval_cached_count"] < 8  # the task's first tokens (the turn's opening) are all it shares


def test_concurrent_streams_equal_running_alone(server, engine):
    """16 clients at once, distinct seeds: each gets exactly what the engine gives it alone."""
    messages = [{"role": "user", "content": "Tell me a story"}]
    expected = {seed: alone(engine, messages, seed, 20) for seed in range(16)}
    got: dict[int, str] = {}
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            client = ollama.Client(host=server)
            parts = client.chat(model="default", messages=messages, stream=True,
                                options={"seed": seed, "num_predict": 20})
            got[seed] = "".join(p.message.content for p in parts)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == expected


def test_disconnect_frees_the_slot(server):
    """A long stream abandoned after its first chunk stops at the next step: the next request is not stuck
    behind the 4,000 tokens it asked for."""
    one = {"model": "default", "messages": [{"role": "user", "content": "go on"}], "stream": False,
           "options": {"seed": 2, "num_predict": 32}}
    t = time.monotonic()
    assert httpx.post(f"{server}/api/chat", json=one, timeout=120).status_code == 200
    per_request = time.monotonic() - t
    body = {**one, "stream": True, "options": {"seed": 1, "num_predict": 4000}}
    with httpx.Client(timeout=120) as c:
        with c.stream("POST", f"{server}/api/chat", json=body) as r:
            first = next(r.iter_lines())
            assert json.loads(first)["done"] is False
        # the connection is closed here, mid-generation
    t = time.monotonic()
    r = httpx.post(f"{server}/api/chat", json=one, timeout=120)
    waited = time.monotonic() - t
    assert r.status_code == 200 and r.json()["eval_count"] <= 32
    assert waited < 10 * per_request + 1.0  # not the 4,000 tokens the abandoned request would still make


def test_upstream_servers_are_merged(models, tmp_path, engine):
    """A second server (an Ollama stand-in that really speaks the protocol) is merged in: its models are
    listed on /api/tags and /v1/models and requests for them are proxied, streaming included."""
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    shutil.copy(models / "default.gguf", other_dir / "upstream-model.gguf")
    with running_server(other_dir) as upstream, \
            running_server(models, "--upstream", upstream, "--upstream-openai", f"{upstream}/v1") as front:
        client = ollama.Client(host=front)
        names = [m.model for m in client.list().models]
        assert "default:latest" in names and "upstream-model:latest" in names
        messages = [{"role": "user", "content": "hi"}]
        direct = ollama.Client(host=upstream).chat(model="upstream-model", messages=messages,
                                                   options={"seed": 4, "num_predict": 10})
        via = client.chat(model="upstream-model", messages=messages, options={"seed": 4, "num_predict": 10})
        assert via.message.content == direct.message.content
        streamed = list(client.chat(model="upstream-model", messages=messages, stream=True,
                                    options={"seed": 4, "num_predict": 10}))
        assert "".join(p.message.content for p in streamed) == direct.message.content
        oa = openai.OpenAI(base_url=f"{front}/v1", api_key="x")
        ids = [m.id for m in oa.models.list()]
        assert "default:latest" in ids and "upstream-model:latest" in ids
        r = oa.chat.completions.create(model="upstream-model:latest", messages=messages, max_tokens=10, seed=4)
        assert r.choices[0].message.content == direct.message.content


def test_keep_alive_unloads_after_expiry(server):
    client = ollama.Client(host=server)
    client.generate(model="default", prompt="", keep_alive="1s")
    assert [m.model for m in client.ps().models] == ["default:latest"]
    deadline = time.monotonic() + 10
    while client.ps().models and time.monotonic() < deadline:
        time.sleep(0.2)
    assert client.ps().models == []
    client.generate(model="default", prompt="", keep_alive=-1)
    assert client.ps().models[0].expires_at.year > 2200
    for stream in (False, True):  # keep_alive 0 on a generation: unloaded as it ends (the request's own claim
        out = client.generate(model="default", prompt="hi", keep_alive=0, stream=stream,  # on the model is no hold)
                              options={"num_predict": 2, "seed": 1})
        if stream:
            out = list(out)[-1]
        assert out.done and client.ps().models == []


def test_api_key_and_non_loopback_refusal(models):
    import subprocess
    import sys

    with running_server(models, "--api-key", "s3cret") as url:
        assert httpx.get(f"{url}/api/version").status_code == 200  # health checks stay open
        r = httpx.get(f"{url}/api/tags")
        assert r.status_code == 401 and "API key" in r.json()["error"]
        assert httpx.get(f"{url}/v1/models").json()["error"]["type"] == "authentication_error"
        ok = httpx.get(f"{url}/api/tags", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["models"]
        oa = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret")
        assert oa.models.list().data
    proc = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "serve", "--host", "0.0.0.0", "--models",
                           str(models)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "--api-key" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_final_assistant_message_is_continued(server, engine):
    """As Ollama's /api/chat (and llama.cpp's server): a conversation ending with the model's message goes on
    from it (a prefill): its prompt ends with that text, and the reply is what comes after."""
    messages = [{"role": "user", "content": "Tell me a fortune."}, {"role": "assistant", "content": "The only way"}]
    ids = engine.prompt_ids(messages)
    assert engine.tokenizer.decode(ids).endswith("<|turn>model\nThe only way")
    expected = alone(engine, messages, seed=3, n=20)
    r = ollama.Client(host=server).chat(model="default", messages=messages, options={"seed": 3, "num_predict": 20})
    assert r.prompt_eval_count == len(ids) and r.message.content == expected
    o = openai.OpenAI(base_url=f"{server}/v1", api_key="unused").chat.completions.create(
        model="default", messages=messages, max_tokens=20, seed=3)
    assert o.usage.prompt_tokens == len(ids) and o.choices[0].message.content == expected


ODD = [  # (method, path, raw body, status, words in the error): found by fuzzing every route for 500s
    ("POST", "/api/generate", '{"model": "default", "prompt": "\\ud800", "stream": false}', 400, "surrogate"),
    ("POST", "/api/show", '{"model": "a\\udfff"}', 400, "surrogate"),
    ("POST", "/api/create", '{"model": "m", "from": "default", "system": "\\ud800"}', 400, "surrogate"),
    ("POST", "/api/embed", "[" * 100_000 + "]" * 100_000, 400, "nested too deeply"),
    ("POST", "/v1/embeddings", '{"model": ' * 50_000 + "1" + "}" * 50_000, 400, "nested too deeply"),
    ("POST", "/api/generate", '{"model": "default", "prompt": "hi", "options": {"seed": 1e999}}', 400, "finite"),
    ("POST", "/api/generate", '{"model": "default", "prompt": "hi", "options": {"seed": 100000000000000000000000}}',
     400, "too large"),
    ("POST", "/api/generate", '{"model": "default", "prompt": "hi", "options": {"seed": 9223372036854775808}}',
     400, "'seed' must be at most"),
    ("POST", "/v1/chat/completions", '{"model": "default", "messages": [{"role": "user", "content": "hi"}], '
     '"seed": 9223372036854775808}', 400, "'seed' must be at most"),
    ("POST", "/api/generate", '{"model": "default", "prompt": "hi", "options": {"diffusion_steps": 1000000}}', 400,
     "'diffusion_steps' must be at most 1024"),
    ("POST", "/api/generate", '{"model": "default", "options": {"num_ctx": -5}}', 400, "'num_ctx' must be at least 1"),
    ("POST", "/api/generate", '{"model": "default", "prompt": "hi", "keep_alive": NaN}', 400, "NaN"),
    ("POST", "/api/generate", '{"model": "default", "prompt": "hi", "keep_alive": "nan"}', 400, "keep_alive"),
    ("POST", "/api/generate", '{"model": "default", "prompt": "hi", "stream": false, "context": [-1]}', 400,
     "outside the vocabulary"),
    ("POST", "/api/chat", '{"model": "~zz", "messages": []}', 404, "not found"),
    ("POST", "/v1/responses", '{"model": "default", "input": "hi", "temperature": NaN}', 400, "NaN"),
    ("POST", "/api/create", '{"model": "x.gguf", "from": "default"}', 400, "ending in .gguf"),
    ("POST", "/api/create", '{"model": "m", "from": "default", "parameters": {"seed": 9223372036854775808}}', 400,
     "'seed' must be at most"),
    ("POST", "/api/create", '{"model": "m", "from": "default", "parameters": {"diffusion_steps": 5000}}', 400,
     "at most 1024"),
]


@pytest.mark.parametrize("method, path, body, status, needle", ODD, ids=[f"{o[1]}-{i}" for i, o in enumerate(ODD)])
def test_odd_requests_are_one_line_errors_never_500s(server, method, path, body, status, needle):
    r = httpx.request(method, f"{server}{path}", content=body.encode(), timeout=60,
                      headers={"content-type": "application/json"})
    error = r.json()["error"]
    message = error["message"] if isinstance(error, dict) else error
    assert r.status_code == status and needle in message and "\n" not in message, (r.status_code, message)
