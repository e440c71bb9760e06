"""Forced tool calls (plugin/call_format.py): OpenAI's tool_choice "required" or a named function.

The automaton over Gemma 4's call syntax against the chat template (which writes the calls of earlier turns: each
such call is taken, and every prefix of it closes into a call that plugin/reply.py reads) and `jsonschema` (on the
arguments read); calls changed at random are taken only where they read as valid ones; the canvas read-out on
made-up logits (the model's own call where it writes one, valid calls within the budget on random logits); the
engine; and `dgemma serve` with the official openai client (chat completions, `parse` with a pydantic tool, the
Responses API). A random model never calls a tool by itself: here it always does, with valid arguments."""

from __future__ import annotations

import json
import random
import shutil

import jsonschema
import openai
import pydantic
import pytest

from dgemma.convert import constants as C
from dgemma.plugin.call_format import CallFormat, call_format
from dgemma.plugin.chat import render_chat
from dgemma.plugin.engine import Engine, EngineError, GenerateOptions, TextEvent
from dgemma.plugin.json_format import read_canvas
from dgemma.plugin.json_schema import SchemaError
from dgemma.plugin.reply import ReplyParser, ToolCallError, parse_call
from test_json_format import mutated
from test_json_schema import ORACLE, SCHEMAS, _logits

OBJECTS = ["person", "scalars", "arrays", "any object", "alternatives", "cycle"]  # SCHEMAS with an object at the root
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "days": {"type": "integer"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}
# documents besides SCHEMAS' (whose "any object" has an empty key, which the template writes as nothing)
# and a string with what JSON escapes (written as it is in a call)
MORE = {"any object": [{"a": [1, {"b": None}], "k y": "x y", "n": -2.5}],
        "arrays": [{"few": [1], "pair": ['q"\\ \n\t{x:1}', True], "words": ["\\\"", "a\n"]}]}
NOTE = {"type": "function", "function": {"name": "get"}}  # no parameters: any arguments


@pytest.fixture(scope="module")
def engine(canvas16_gguf) -> Engine:
    return Engine.load(canvas16_gguf)


@pytest.fixture(scope="module")
def tok(engine):
    return engine.tokenizer


def _tools(name: str) -> list[dict]:
    """The schema as the parameters of two functions, one named as the other's start (names are told apart at
    their "{")."""
    schema = SCHEMAS[name][0]
    return [{"type": "function", "function": {"name": n, "parameters": schema}} for n in ("f", "f_2")]


def written(tok, name: str, args: dict) -> str:
    """A call as the chat template writes it in an earlier turn: `call:NAME{...}`."""
    text = render_chat(tok, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": name, "arguments": args}}]}], add_generation_prompt=False)
    return text[text.index(C.TOOL_CALL_START) + len(C.TOOL_CALL_START): text.index(C.TOOL_CALL_END)]


def _readable(tok, name: str) -> list:
    """The documents whose calls, as the template writes them, read back as themselves (not an empty key: the
    template writes it bare, as nothing)."""
    out = []
    for doc in SCHEMAS[name][1] + MORE.get(name, []):
        try:
            if parse_call(written(tok, "f", doc)).arguments == json.loads(json.dumps(doc)):
                out.append(doc)
        except ToolCallError:
            pass
    assert out
    return out


def _after_prefill(fmt: CallFormat, call: str) -> str:
    """What the reply writes of a call, the prefill (its opening) already in the prompt."""
    opened = fmt.prefill[len(C.TOOL_CALL_START):]
    assert call.startswith(opened)
    return call[len(opened):]


def _valid(fmt: CallFormat, call: str, oracle: dict | None = None) -> bool:
    """The call reads (plugin/reply.py), names a function of fmt's and has arguments its schema takes."""
    try:
        read = parse_call(call)
    except ToolCallError:
        return False
    schemas = {n: oracle for n, _ in fmt.tools} if oracle else {n: None for n, _ in fmt.tools}
    if read.name not in schemas:
        return False
    try:
        jsonschema.validate(read.arguments, schemas[read.name] or {})
        return True
    except jsonschema.ValidationError:
        return False


@pytest.mark.parametrize("name", OBJECTS)
@pytest.mark.parametrize("one", [True, False], ids=["named", "required"])
def test_calls_the_template_writes_are_taken_and_every_prefix_closes(tok, name, one):
    schema, docs = SCHEMAS[name]
    oracle = ORACLE.get(name, schema)
    tools = _tools(name)
    fmt = call_format(tools, {"type": "function", "function": {"name": "f_2"}} if one else "required")
    for doc in _readable(tok, name):
        call = written(tok, "f_2", doc)
        ids = tok.encode(_after_prefill(fmt, call) + C.TOOL_CALL_END)
        state = fmt.start(tok)
        opened = fmt.prefill[len(C.TOOL_CALL_START):]
        for k, t in enumerate(ids):
            closed = state.copy()
            rest = tok.decode(closed.close_ids(tok))
            assert closed.complete and rest.endswith(C.TOOL_CALL_END)
            text = opened + tok.decode(ids[:k]) + rest[:-len(C.TOOL_CALL_END)]
            assert _valid(fmt, text, oracle), text
            assert state.take(t, tok), (call, tok.decode(ids[:k + 1]))
        assert state.closing() == b"" and not state.complete  # (another call may come, or the reply ends)


@pytest.mark.parametrize("name", OBJECTS)
def test_what_the_automaton_takes_whole_is_valid(tok, name):
    """Each call changed at random 300 times (a character changed, dropped or added): where the automaton takes
    the change up to the call's end, it reads as a valid call."""
    schema, docs = SCHEMAS[name]
    oracle, rng = ORACLE.get(name, schema), random.Random(2)
    fmt = call_format(_tools(name), "required")
    alphabet = list('{}[],:" \n01-.etrufalsn') + [C.TOOL_QUOTE, "f_2", "x"]
    taken = 0
    for doc in _readable(tok, name):
        call = written(tok, "f", doc)
        for _ in range(300):
            text = mutated(_after_prefill(fmt, call), rng, alphabet)
            state = fmt.start(tok)
            if all(state.take(t, tok) for t in tok.encode(text + C.TOOL_CALL_END)):
                taken += 1
                assert _valid(fmt, "call:" + text, oracle), text
    assert taken > 10  # (some changes keep the call valid: spaces, other values)


@pytest.mark.parametrize("name", OBJECTS)
def test_the_read_out_follows_the_call(tok, name):
    """The model's own call where it writes one (canvases of 5 positions); random logits read out into calls that
    read as valid ones (one, or several where parallel calls may come) within the budget."""
    schema, docs = SCHEMAS[name]
    oracle = ORACLE.get(name, schema)
    eos = tok.ids["<turn|>"]
    for parallel in (True, False):
        fmt = call_format(_tools(name), "required", parallel)
        wanted = tok.encode(_after_prefill(fmt, written(tok, "f_2", _readable(tok, name)[0])) + C.TOOL_CALL_END)
        state, out = fmt.start(tok), []
        while eos not in out and len(out) < 400:
            out += read_canvas(_logits(tok, (wanted + [eos])[len(out):], 5, len(out)), 5, state, tok, {eos},
                               budget=400 - len(out))
        assert out[: out.index(eos)] == wanted
        least = fmt.least(tok)[0]
        for seed in range(4):
            budget = least + 5 * seed
            state, out = fmt.start(tok), []
            while eos not in out and len(out) < budget:
                out += read_canvas(_logits(tok, [], 4, 50 + seed * 10 + len(out)), 4, state, tok, {eos},
                                   budget - len(out))
            kept = out[:budget]
            kept = kept[: kept.index(eos)] if eos in kept else kept
            parser = ReplyParser(tok, tools=True)
            parser.prime(tok.encode("<|turn>model\n" + fmt.prefill))
            reply = parser.feed(kept, final=True)
            assert reply.tool_calls and not reply.content.strip() and (parallel or len(reply.tool_calls) == 1)
            for call in reply.tool_calls:
                assert call.name in ("f", "f_2")
                jsonschema.validate(call.arguments, oracle)


def _takes(tok, fmt: CallFormat, text: str) -> bool:
    state = fmt.start(tok)
    return all(state.take(t, tok) for t in tok.encode(text))


def test_the_call_syntax(tok):
    """What the parser reads a certain way is taken only where that reading is one the schema takes."""
    free = call_format([NOTE], "required")  # any arguments
    weather = call_format([WEATHER, TIME], "required", parallel=False)
    q, end = C.TOOL_QUOTE, C.TOOL_CALL_END
    for text in ("{ k y: 1 ,\n z:[]}", f"{{{q}k:{q}:{q}{q}}}", "{é:true}"):
        state = free.start(tok)
        assert all(state.take(t, tok) for t in tok.encode(text[1:] + end)), text  # (the prefill has its "{")
        assert parse_call("call:get" + text).arguments
    # the parser strips a bare key's ends: a space before its ':' is refused (the key would be another); no '"' in
    # a bare key, nor a bare word as a value
    assert parse_call("call:get{ k y :1}").arguments == {"k y": 1}
    for text in (" k y :1}", 'a"b:1}', '"k":1}', "k:Paris}", "k:1,}", "k{:1}", "k\x01:1}", f"k:{q}a", "k:1}}"):
        assert not _takes(tok, free, text + end), text
    # a string's text never spells <|"|> (which the parser would read as its end), in one token or across several
    opened = tok.encode(f"k:{q}")
    for pieces, taken in ((['a<|"|>b'], False), (["<|", '"|>'], False), (["<|"], True), (['"|>'], True)):
        state = free.start(tok)
        assert all(state.take(t, tok) for t in opened)
        ids = [t for p in pieces for t in tok.encode(p, parse_special=False)]
        assert all([state.take(t, tok) for t in ids]) == taken, pieces
    assert _takes(tok, weather, f"get_weather{{city:{q}Paris{q},unit:{q}celsius{q}}}{end}")
    for text in (f"get_weather{{city:{q}Paris{q}}}{end}",  # (unit is required)
                 f"get_weather{{city:{q}Paris{q},unit:{q}kelvin{q}}}{end}",
                 f"get_weather{{city:{q}{'x' * 13}{q},unit:{q}celsius{q}}}{end}",  # (maxLength 12)
                 f"get_weather{{city :{q}P{q},unit:{q}celsius{q}}}{end}",
                 f"get_time{{zone:{q}Z{q},days:1}}{end}", "get_weather {", "get_tim{"):
        assert not _takes(tok, weather, text), text
    # after a call: another where parallel calls may come, else the end
    second = f"get_time{{zone:{q}Z{q}}}{end}{C.TOOL_CALL_START}call:get_time{{zone:{q}Y{q}}}{end}"
    assert _takes(tok, call_format([WEATHER, TIME], "required"), second) and not _takes(tok, weather, second)
    assert _takes(tok, weather, f"get_time{{zone:{q}Z{q}}}{end}")


def test_tool_choice_errors_name_the_field():
    for tools, choice, needle in (
            ([WEATHER], {"type": "function", "function": {"name": "nope"}}, 'no function "nope" among the '
                                                                              "request's tools \\(get_weather\\)"),
            ([], "required", "needs tools to call"),
            ([WEATHER], "always", "expected 'none', 'auto', 'required' or a function"),
            ([WEATHER], {"type": "allowed_tools", "mode": "required", "tools": "x"}, "allowed_tools expects"),
            ([{"type": "function", "function": {"name": "s", "parameters": {"type": "string"}}}], "required",
             "tools\\[0\\].function.parameters: expected the schema of an object"),
            ([{"type": "function", "function": {"name": "s", "parameters": {"type": "objekt"}}}], "required",
             "tools\\[0\\].function.parameters: at #: type")):
        with pytest.raises(SchemaError, match=needle):
            call_format(tools, choice)
    for choice in (None, "auto", "none", {"type": "allowed_tools", "mode": "auto", "tools": []}):
        assert call_format([WEATHER], choice) is None
    # the Responses API's shapes: a flat function, allowed_tools
    assert [n for n, _ in call_format([WEATHER, TIME], {"type": "function", "name": "get_time"}).tools] == ["get_time"]
    allowed = {"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "get_weather"}]}
    assert [n for n, _ in call_format([WEATHER, TIME], allowed).tools] == ["get_weather"]
    assert call_format([NOTE], "required").prefill == "<|tool_call>call:get{"


def _engine_calls(engine, fmt, seed, max_tokens):
    events = list(engine.generate([{"role": "user", "content": "Weather in Paris?"}],
                                  GenerateOptions(seed=seed, max_tokens=max_tokens, format=fmt, tool_calls=True,
                                                  split_thinking=True), tools=[WEATHER, TIME, NOTE]))
    calls = [c for e in events if isinstance(e, TextEvent) for c in e.tool_calls]
    return calls, "".join(e.text for e in events if isinstance(e, TextEvent)), events[-1]


def test_the_engine_calls_the_function(engine):
    schemas = {t["function"]["name"]: t["function"].get("parameters", {}) for t in (WEATHER, TIME, NOTE)}
    for seed, choice, parallel in ((1, "required", False), (2, "required", None),
                                   (3, {"type": "function", "function": {"name": "get_weather"}}, None)):
        fmt = call_format([WEATHER, TIME, NOTE], choice, parallel)
        calls, text, done = _engine_calls(engine, fmt, seed, 64)
        assert calls and not text.strip() and done.eval_count <= 64 and (parallel is None or len(calls) == 1)
        for call in calls:
            jsonschema.validate(call.arguments, schemas[call.name])
        if isinstance(choice, dict):
            assert {c.name for c in calls} == {"get_weather"}
    least, shortest = call_format([WEATHER], "required").least(engine.tokenizer)
    assert shortest.startswith("city:") and shortest.endswith(C.TOOL_CALL_END)
    with pytest.raises(EngineError, match=f"a forced tool call needs room for {least} tokens"):
        _engine_calls(engine, call_format([WEATHER], "required"), 1, least - 1)


# ---- through `dgemma serve`, with the openai client -------------------------------------------------
@pytest.fixture(scope="module")
def models(models, canvas16_gguf):
    shutil.copy(canvas16_gguf, models / "tiny.gguf")  # (the default model's chat template renders no tools)
    return models


class Weather(pydantic.BaseModel):
    city: str
    days: int


def test_the_server_forces_calls(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model="tiny", messages=ask, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=64, seed=1, parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0].function
    jsonschema.validate(json.loads(call.arguments), {t["function"]["name"]: t["function"]["parameters"]
                                                     for t in (WEATHER, TIME)}[call.name])
    # a named function, streamed: the call in a delta, as the client assembles it
    named = {"type": "function", "function": {"name": "get_weather"}}
    with client.chat.completions.stream(model="tiny", messages=ask, tools=[WEATHER, TIME], tool_choice=named,
                                        max_tokens=64, seed=2) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and {c.function.name for c in calls} == {"get_weather"}
    for c in calls:
        jsonschema.validate(json.loads(c.function.arguments), WEATHER["function"]["parameters"])
    # parse(): a pydantic model as a strict function tool, its arguments read back into the model
    parsed = client.chat.completions.parse(model="tiny", messages=ask, tools=[openai.pydantic_function_tool(Weather)],
                                           tool_choice={"type": "function", "function": {"name": "Weather"}},
                                           max_tokens=64, seed=3)
    assert isinstance(parsed.choices[0].message.tool_calls[0].function.parsed_arguments, Weather)
    # the Responses API
    flat = [{"type": "function", **WEATHER["function"]}]
    resp = client.responses.create(model="tiny", input="Weather in Paris?", tools=flat, tool_choice="required",
                                   max_output_tokens=64, parallel_tool_calls=False)
    items = [o for o in resp.output if o.type == "function_call"]
    assert len(items) == 1 and items[0].name == "get_weather" and resp.parallel_tool_calls is False
    jsonschema.validate(json.loads(items[0].arguments), WEATHER["function"]["parameters"])


def test_bad_tool_choices_get_a_400(server):
    client = openai.OpenAI(base_url=f"{server}/v1", api_key="unused")
    ask = [{"role": "user", "content": "x"}]
    for kwargs, needle in (
            (dict(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
             'tool_choice: no function "nope"'),
            (dict(tool_choice="required"), "tool_choice: \"required\" needs tools to call"),
            (dict(tools=[WEATHER], tool_choice="required", reasoning_effort="high"),
             "a forced tool call \\(tool_choice\\) leaves out the thought channel")):
        with pytest.raises(openai.BadRequestError, match=needle):
            client.chat.completions.create(model="tiny", messages=ask, max_tokens=8, **kwargs)
    with pytest.raises(openai.BadRequestError, match="tool_choice: expected"):
        client.responses.create(model="tiny", input="x", tools=[{"type": "function", **WEATHER["function"]}],
                                tool_choice={"type": "web_search_preview"})
