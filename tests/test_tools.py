"""Tools and thinking through `dgemma serve` on loopback, with the official ollama and openai clients.

The tiny test model's template renders tools as Gemma 4's does. A random model never calls a tool, so the way
in is checked end to end (both APIs' conversations with calls and tool answers become the same prompt, the one
rendered here, and generate what the engine generates for it), and the way out, the reply's calls and thinking,
through the clients' own response types fed with the routes' builders (tests/test_reply.py reads the calls
from tokens)."""

from __future__ import annotations

import json

import httpx
import ollama
import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from server_util import running_server

from dgemma.convert import convert
from dgemma.plugin.default_model import ensure_default_model
from dgemma.plugin.engine import Engine, GenerateOptions, TextEvent
from dgemma.plugin.reply import ReplyDelta, ToolCall

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "the city"},
                                                    "days": {"type": "integer"}}, "required": ["city"]}}}
ARGS = {"city": "Paris", "days": 2}
# the conversation as the chat template reads it
CANONICAL = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": ARGS}}]},
    {"role": "tool", "name": "get_weather", "content": "18 C, sunny"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_checkpoint):
    d = tmp_path_factory.mktemp("tool-models")
    ensure_default_model(d)
    convert(base_checkpoint, d / "tiny.gguf", "Q8_0", quiet=True)
    return d


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    with running_server(models, log=tmp_path_factory.mktemp("log") / "serve.log") as url:
        yield url


@pytest.fixture(scope="module")
def engine(models) -> Engine:
    return Engine.load(models / "tiny.gguf")


def expected(engine: Engine, seed: int, n: int, **template) -> tuple[int, ReplyDelta]:
    """The prompt's length and the reply the engine gives for CANONICAL with no server in between."""
    ids = engine.prompt_ids(CANONICAL, tools=[WEATHER], **template)
    o = GenerateOptions(seed=seed, max_tokens=n, split_thinking=True, tool_calls=True)
    reply = ReplyDelta()
    for e in engine.generate(ids, o):
        if isinstance(e, TextEvent):
            reply.extend(ReplyDelta(e.text, e.thinking, e.tool_calls))
    return len(ids), reply


def test_capabilities(server):
    client = ollama.Client(host=server)
    assert {"completion", "tools", "thinking"} <= set(client.show("tiny").capabilities)
    default = client.show("default").capabilities
    assert "thinking" in default and "tools" not in default  # the bundled model's template renders no tools


def test_a_tool_conversation_from_ollama(server, engine):
    """ollama-python's shapes: the reply's call with its arguments as an object, the answer with tool_name."""
    n_prompt, want = expected(engine, seed=4, n=24)
    client = ollama.Client(host=server)
    messages = [{"role": "user", "content": "Weather in Paris?"},
                ollama.Message(role="assistant", content="",
                               tool_calls=[ollama.Message.ToolCall(function=ollama.Message.ToolCall.Function(
                                   name="get_weather", arguments=ARGS))]),
                {"role": "tool", "content": "18 C, sunny", "tool_name": "get_weather"}]
    r = client.chat(model="tiny", messages=messages, tools=[WEATHER], options={"seed": 4, "num_predict": 24})
    assert r.prompt_eval_count == n_prompt and r.message.content == want.content
    assert (r.message.thinking or "") == want.thinking and not r.message.tool_calls
    parts = list(client.chat(model="tiny", messages=messages, tools=[WEATHER], stream=True,
                             options={"seed": 4, "num_predict": 24}))
    assert "".join(p.message.content for p in parts) == want.content and parts[-1].prompt_eval_count == n_prompt

    def get_weather(city: str, days: int) -> str:
        """The weather in a city

        Args:
            city: the city
            days: how many days
        """
        return "18 C"

    # a Python function as the tool (the client writes its schema): accepted, and a longer prompt than no tools
    r2 = client.chat(model="tiny", messages=messages[:1], tools=[get_weather], options={"seed": 4, "num_predict": 4})
    r3 = client.chat(model="tiny", messages=messages[:1], options={"seed": 4, "num_predict": 4})
    assert r2.prompt_eval_count > r3.prompt_eval_count + 10


def test_a_tool_conversation_from_openai(server, engine):
    """openai's shapes: the call's arguments as a JSON string and an id, the answer by tool_call_id; thinking on
    through the template's enable_thinking is not part of OpenAI's API, so this turn runs with it off."""
    n_prompt, want = expected(engine, seed=6, n=24)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS)}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"}]
    r = client.chat.completions.create(model="tiny", messages=messages, tools=[WEATHER], max_tokens=24, seed=6)
    assert r.usage.prompt_tokens == n_prompt and r.choices[0].message.content == want.content
    assert r.choices[0].finish_reason in ("stop", "length") and not r.choices[0].message.tool_calls
    # tool_choice "none": no tools in the prompt
    none = client.chat.completions.create(model="tiny", messages=messages[:1], tools=[WEATHER], tool_choice="none",
                                          max_tokens=4, seed=6)
    bare = client.chat.completions.create(model="tiny", messages=messages[:1], max_tokens=4, seed=6)
    assert none.usage.prompt_tokens == bare.usage.prompt_tokens


def test_bad_tool_requests_get_a_400_naming_the_field(server):
    client = ollama.Client(host=server)
    ask = [{"role": "user", "content": "hi"}]
    for model, kw, needle in [
        ("default", {"tools": [WEATHER]}, "model 'default' does not support tools"),
        ("tiny", {"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ("tiny", {"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0].type"),
    ]:
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model=model, messages=ask, **kw)
        assert e.value.status_code == 400 and needle in e.value.error
    bad_call = [*ask, {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}]
    r = httpx.post(f"{server}/api/chat", json={"model": "tiny", "messages": bad_call}, timeout=60)  # (the client checks it)
    assert r.status_code == 400 and "messages[1].tool_calls[0].function.arguments: expected an object" in r.json()["error"]

    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    for messages, needle in [
        ([*ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}],
         "messages[1].tool_calls[0].function.arguments: expected a JSON object"),
        ([*ask, {"role": "tool", "tool_call_id": "nowhere", "content": "x"}], "messages[1].tool_call_id: 'nowhere'"),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model="tiny", messages=messages)
        assert needle in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="default", messages=ask, tools=[WEATHER])
    assert "does not support tools" in e.value.body["message"]


def test_thinking_asked_of_a_model_without_it(server, models, tmp_path):
    """think on the tiny model: the template's thinking mode (its prompt differs); a model whose template has
    none answers 400, as Ollama does."""
    client = ollama.Client(host=server)
    on = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], think=True, options={"num_predict": 2})
    off = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], think=False, options={"num_predict": 2})
    assert on.prompt_eval_count != off.prompt_eval_count


CALLS = [ToolCall("get_weather", ARGS), ToolCall("get_time", {"zone": "CET", "detail": {"utc": True}})]


def test_ollama_reply_shapes_read_by_the_client():
    from dgemma.plugin.server.ollama import _chat_message

    part = ReplyDelta("Looking it up.", "They want the weather.", CALLS)
    r = ollama.ChatResponse.model_validate({"model": "tiny", "done": False, "message": _chat_message(part)})
    assert r.message.content == "Looking it up." and r.message.thinking == "They want the weather."
    assert [(c.function.name, dict(c.function.arguments)) for c in r.message.tool_calls] == [(c.name, c.arguments) for c in CALLS]
    later = _chat_message(ReplyDelta("", "", CALLS[1:]), 1)  # a later chunk's calls go on counting
    assert later["tool_calls"][0]["function"]["index"] == 1
    plain = _chat_message(ReplyDelta("hi"))
    assert plain == {"role": "assistant", "content": "hi"}  # no empty thinking or tool_calls fields


def test_openai_reply_shapes_read_by_the_client():
    """The stream's deltas accumulated by openai's own stream state give the calls whole, in order, with their
    arguments as JSON; the whole reply parses as a ChatCompletion with finish_reason tool_calls."""
    from dgemma.plugin.server.openai import _delta, _message

    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 0, "model": "tiny"}
    events = [TextEvent("", [], 0, 1, "They want", []), TextEvent("Sure.", [], 1, 1, " the weather.", CALLS[:1]),
              TextEvent("", [], 2, 1, "", CALLS[1:])]
    state, calls = ChatCompletionStreamState(), 0
    state.handle_chunk(ChatCompletionChunk.model_validate(
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}))
    for e in events:
        state.handle_chunk(ChatCompletionChunk.model_validate(
            {**head, "choices": [{"index": 0, "delta": _delta(e, calls), "finish_reason": None}]}))
        calls += len(e.tool_calls)
    state.handle_chunk(ChatCompletionChunk.model_validate(
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}))
    final = state.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls" and final.message.content == "Sure."
    got = [(c.function.name, json.loads(c.function.arguments)) for c in final.message.tool_calls]
    assert got == [(c.name, c.arguments) for c in CALLS] and len({c.id for c in final.message.tool_calls}) == 2

    whole = ChatCompletion.model_validate({
        "id": "chatcmpl-2", "object": "chat.completion", "created": 0, "model": "tiny",
        "choices": [{"index": 0, "message": _message(ReplyDelta("", "thought", CALLS)), "finish_reason": "tool_calls"}]})
    message = whole.choices[0].message
    assert message.content is None and message.model_extra["reasoning_content"] == "thought"
    assert json.loads(message.tool_calls[1].function.arguments) == CALLS[1].arguments
    from dgemma.plugin.engine import DoneEvent
    from dgemma.plugin.server import protocol as P

    done = DoneEvent("stop", 5, 3, [], [], [], 1.0, 0, 0, 0, 0, 0)
    assert (P.finish_reason(done), P.finish_reason(done, True)) == ("stop", "tool_calls")
    done.done_reason = "length"
    assert P.finish_reason(done, True) == "length"  # cut by max_tokens: a call may be half-written


HARNESS = r"""
// Runs the LM Studio plugin's generate() as LM Studio would, against a live dgemma serve; prints what it
// reported and the request body it sent.
const { Chat } = require("@lmstudio/sdk");
const { generate } = require("./out/index.js");
const [base, model, tools, history] = process.argv.slice(2).map((a, i) => (i < 2 ? a : JSON.parse(a)));
const realFetch = globalThis.fetch, sent = [], got = [];
globalThis.fetch = (url, init) => { sent.push(JSON.parse(init.body)); return realFetch(url, init); };
const config = { baseUrl: base, model };
const ctl = {
  abortSignal: new AbortController().signal,
  getGlobalPluginConfig: () => ({ get: (k) => config[k] }),
  getToolDefinitions: () => tools,
  fragmentGenerated: (text, opts) => got.push(["text", text, (opts && opts.reasoningType) || "none"]),
  toolCallGenerationStarted: () => got.push(["call start"]),
  toolCallGenerationNameReceived: (name) => got.push(["call name", name]),
  toolCallGenerationArgumentFragmentGenerated: (text) => got.push(["call arguments", text]),
  toolCallGenerationEnded: (request) => got.push(["call", request]),
  toolCallGenerationFailed: (error) => got.push(["call failed", String(error)]),
};
generate(ctl, Chat.from(history)).then(() => console.log(JSON.stringify({ sent, got })));
"""


def test_the_lm_studio_plugin_sends_the_conversation_and_tools(server, engine, tmp_path):
    """The generator plugin (manifests/lmstudio-plugin, compiled against the real @lmstudio/sdk) run by node
    against the live server with an LM Studio history that holds a tool call and its result: it sends the
    conversation and tools as the openai client does (the same prompt), and reports the streamed answer."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are not installed")
    plugin = tmp_path / "plugin"
    shutil.copytree(Path(__file__).resolve().parents[1] / "manifests" / "lmstudio-plugin", plugin)
    install = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "typescript@5", "@types/node"],
                             cwd=plugin, capture_output=True, text=True, timeout=300)
    if install.returncode != 0:
        pytest.skip(f"npm install failed (registry unreachable?): {install.stderr.strip()[-200:]}")
    tsc = subprocess.run(["npx", "tsc", "--strict", "--target", "es2022", "--module", "commonjs", "--skipLibCheck",
                          "--types", "node", "--outDir", "out", "src/index.ts"], cwd=plugin, capture_output=True,
                         text=True, timeout=300)
    assert tsc.returncode == 0, tsc.stdout + tsc.stderr
    (plugin / "harness.cjs").write_text(HARNESS)
    history = {"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [{"type": "toolCallRequest", "toolCallRequest": {
            "type": "function", "id": "call_7", "name": "get_weather", "arguments": ARGS}}]},
        {"role": "tool", "content": [{"type": "toolCallResult", "toolCallId": "call_7", "content": "18 C, sunny"}]},
    ]}
    run = subprocess.run(["node", "harness.cjs", f"{server}/v1", "tiny", json.dumps([WEATHER]), json.dumps(history)],
                         cwd=plugin, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    (body,) = out["sent"]
    assert body["tools"] == [WEATHER] and body["stream"] is True
    assert body["messages"][1]["tool_calls"] == [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": json.dumps(ARGS, separators=(",", ":"))}}]
    assert body["messages"][2] == {"role": "tool", "tool_call_id": "call_7", "content": "18 C, sunny"}
    assert out["got"] and all(kind == "text" for kind, *_ in out["got"])  # a random model calls no tool
    # the body, sent again with a seed by the openai client, is the prompt rendered here
    n_prompt, want = expected(engine, seed=8, n=16)
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    r = client.chat.completions.create(model="tiny", messages=body["messages"], tools=body["tools"], max_tokens=16, seed=8)
    assert r.usage.prompt_tokens == n_prompt and r.choices[0].message.content == want.content


def test_thinking_through_the_openai_api(server, engine):
    """reasoning_effort (any but "none" turns the template's thinking mode on) and chat_template_kwargs (as vLLM
    and llama.cpp's server take them) reach the chat template."""
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    ask = [{"role": "user", "content": "hi"}]
    on, off = len(engine.prompt_ids(ask, enable_thinking=True)), len(engine.prompt_ids(ask))
    assert on != off

    def prompt_tokens(**kw) -> int:
        return client.chat.completions.create(model="tiny", messages=ask, max_tokens=1, **kw).usage.prompt_tokens

    assert prompt_tokens(reasoning_effort="high") == prompt_tokens(reasoning_effort="minimal") == on
    assert prompt_tokens(reasoning_effort="none") == prompt_tokens() == off
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}}) == on
    for kw, needle in [({"reasoning_effort": "extreme"}, "reasoning_effort: expected one of"),
                       ({"extra_body": {"chat_template_kwargs": {"messages": []}}}, "'messages' cannot be set")]:
        with pytest.raises(openai.BadRequestError) as e:
            prompt_tokens(**kw)
        assert needle in e.value.body["message"]
