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


# a chat template with neither tools nor a thinking mode
PLAIN_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
                  "{{ m['content'] }}<turn|>\n{% endfor %}{% if add_generation_prompt %}<|turn>model\n{% endif %}")


@pytest.fixture(scope="module")
def models(tmp_path_factory, base_checkpoint):
    import shutil

    d = tmp_path_factory.mktemp("tool-models")
    ensure_default_model(d)
    convert(base_checkpoint, d / "tiny.gguf", "Q8_0", quiet=True)
    for name, template in (("plain", PLAIN_TEMPLATE), ("broken", "{% if %}")):
        ckpt = tmp_path_factory.mktemp(f"{name}-checkpoint") / "ckpt"
        shutil.copytree(base_checkpoint, ckpt)
        config = json.loads((ckpt / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (ckpt / "tokenizer_config.json").write_text(json.dumps(config))
        (ckpt / "chat_template.jinja").unlink(missing_ok=True)
        convert(ckpt, d / f"{name}.gguf", "Q8_0", quiet=True)
    return d


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
            reply.extend(e.reply)
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

    # the call's id and the answer's tool_call_id instead of tool_name (as the calls this server returns carry ids)
    by_id = [messages[0], {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call_3", "function": {"name": "get_weather", "arguments": ARGS}}]},
             {"role": "tool", "content": "18 C, sunny", "tool_call_id": "call_3"}]
    r = httpx.post(f"{server}/api/chat", json={"model": "tiny", "messages": by_id, "tools": [WEATHER], "stream": False,
                                               "options": {"seed": 4, "num_predict": 24}}, timeout=60).json()
    assert r["prompt_eval_count"] == n_prompt and r["message"]["content"] == want.content

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


def test_thinking_asked_of_a_model_without_it(server):
    """think on the tiny model: the template's thinking mode (its prompt differs); a model whose template has
    none (nor tools) answers 400 to think and tools on both APIs, as Ollama does, and serves without them."""
    client = ollama.Client(host=server)
    ask = [{"role": "user", "content": "hi"}]
    on = client.chat(model="tiny", messages=ask, think=True, options={"num_predict": 2})
    off = client.chat(model="tiny", messages=ask, think=False, options={"num_predict": 2})
    assert on.prompt_eval_count != off.prompt_eval_count
    assert client.show("plain").capabilities == ["completion"]
    assert client.chat(model="plain", messages=ask, think=False, options={"num_predict": 2}).done
    for kw, needle in [({"think": True}, "model 'plain' does not support thinking"),
                       ({"tools": [WEATHER]}, "model 'plain' does not support tools")]:
        with pytest.raises(ollama.ResponseError) as e:
            client.chat(model="plain", messages=ask, **kw)
        assert e.value.status_code == 400 and needle in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client.generate(model="plain", prompt="hi", think=True)
    assert e.value.status_code == 400 and "does not support thinking" in e.value.error
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="plain", messages=ask, reasoning_effort="high")
    assert "model 'plain' does not support thinking" in e.value.body["message"]


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
// reported and the chat request bodies it sent. With a 5th argument, the chat request is answered with that
// SSE text instead (the server's own deltas, built by the test).
const { Chat } = require("@lmstudio/sdk");
const { generate } = require("./out/index.js");
const [base, model, tools, history, canned] = process.argv.slice(2).map((a, i) => (i === 2 || i === 3 ? JSON.parse(a) : a));
const realFetch = globalThis.fetch, sent = [], got = [];
globalThis.fetch = (url, init) => {
  if (!String(url).endsWith("/chat/completions")) return realFetch(url, init);
  sent.push(JSON.parse(init.body));
  return canned ? Promise.resolve(new Response(canned, { status: 200 })) : realFetch(url, init);
};
const config = { baseUrl: base, model };
const ctl = {
  abortSignal: new AbortController().signal,
  getGlobalPluginConfig: () => ({ get: (k) => config[k] }),
  getToolDefinitions: () => tools,
  fragmentGenerated: (text, opts) => got.push(["text", text, (opts && opts.reasoningType) || "none"]),
  toolCallGenerationStarted: (o) => got.push(["call start", o.toolCallId]),
  toolCallGenerationNameReceived: (name) => got.push(["call name", name]),
  toolCallGenerationArgumentFragmentGenerated: (text) => got.push(["call arguments", text]),
  toolCallGenerationEnded: (request) => got.push(["call", request]),
  toolCallGenerationFailed: (error) => got.push(["call failed", String(error)]),
};
generate(ctl, Chat.from(history)).then(() => console.log(JSON.stringify({ sent, got })));
"""
LM_HISTORY = {"messages": [
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {"role": "assistant", "content": [{"type": "toolCallRequest", "toolCallRequest": {
        "type": "function", "id": "call_7", "name": "get_weather", "arguments": ARGS}}]},
    {"role": "tool", "content": [{"type": "toolCallResult", "toolCallId": "call_7", "content": "18 C, sunny"}]},
]}


@pytest.fixture(scope="module")
def lmstudio_plugin(tmp_path_factory):
    """manifests/lmstudio-plugin compiled against the real @lmstudio/sdk, with the harness beside it."""
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("npm") is None or shutil.which("node") is None:
        pytest.skip("node and npm are not installed")
    plugin = tmp_path_factory.mktemp("lmstudio") / "plugin"
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

    def run(base: str, model: str, tools: list, history: dict, canned: str | None = None) -> dict:
        args = ["node", "harness.cjs", base, model, json.dumps(tools), json.dumps(history)] + ([canned] if canned else [])
        done = subprocess.run(args, cwd=plugin, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    return run


def test_the_lm_studio_plugin_sends_the_conversation_and_tools(server, engine, lmstudio_plugin):
    """The generator plugin run by node against the live server with an LM Studio history that holds a tool
    call and its result: it sends the conversation and tools as the openai client does (the same prompt), and
    reports the streamed answer; to a model whose template renders no tools it sends none."""
    out = lmstudio_plugin(f"{server}/v1", "tiny", [WEATHER], LM_HISTORY)
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

    plain = lmstudio_plugin(f"{server}/v1", "default:latest", [WEATHER], {"messages": LM_HISTORY["messages"][:1]})
    assert "tools" not in plain["sent"][0] and plain["got"]


def test_the_lm_studio_plugin_reports_thinking_and_calls(server, lmstudio_plugin):
    """The plugin fed the deltas this server streams for a reply that thinks and calls two tools (openai.py's
    own builder): the thinking as reasoning fragments, the answer, each call started, named, given its
    arguments and ended with them as an object."""
    from dgemma.plugin.server.openai import _delta

    events = [TextEvent("", [], 0, 1, "They want", []), TextEvent("Sure.", [], 1, 1, " the weather.", CALLS[:1]),
              TextEvent("", [], 2, 1, "", CALLS[1:])]
    chunks, calls = [], 0
    for e in events:
        chunks.append({"choices": [{"index": 0, "delta": _delta(e, calls), "finish_reason": None}]})
        calls += len(e.tool_calls)
    sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
    got = lmstudio_plugin(f"{server}/v1", "tiny", [WEATHER], {"messages": LM_HISTORY["messages"][:1]}, sse)["got"]
    ids = [c["choices"][0]["delta"]["tool_calls"][0]["id"] for c in chunks[1:]]
    assert got == [
        ["text", "They want", "reasoning"], ["text", " the weather.", "reasoning"], ["text", "Sure.", "none"],
        ["call start", ids[0]], ["call name", "get_weather"], ["call arguments", json.dumps(ARGS)],
        ["call", {"type": "function", "id": ids[0], "name": "get_weather", "arguments": ARGS}],
        ["call start", ids[1]], ["call name", "get_time"], ["call arguments", json.dumps(CALLS[1].arguments)],
        ["call", {"type": "function", "id": ids[1], "name": "get_time", "arguments": CALLS[1].arguments}],
    ]


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


def test_odd_values_get_a_400_or_go_to_the_template(server):
    """Values the template cannot take are a 400 naming the template, never a 500: a tool message's name that is
    not a string (left out), a text part whose text is not one, template variables named as the server's own
    parameters (they are the template's), a model whose template does not compile."""
    client = ollama.Client(host=server)
    odd = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "r", "name": 5}]
    r = httpx.post(f"{server}/api/chat", json={"model": "tiny", "messages": odd, "stream": False,
                                               "options": {"num_predict": 1}}, timeout=60)
    assert r.status_code == 200, r.text
    oai = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}])
    assert "'text' must be a string" in e.value.body["message"]
    for variables in ({"prompt": 1, "raw": True, "engine": 2, "self": 3, "tok": 4, "variables": 5}, {"bos_token": "x"}):
        r = oai.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1,
                                        extra_body={"chat_template_kwargs": variables})
        assert r.usage.prompt_tokens > 0
    assert client.show("broken").capabilities == ["completion"]
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="broken", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 400 and "chat template failed" in e.value.error
