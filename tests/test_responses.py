"""OpenAI's Responses API (/v1/responses) on `dgemma serve`, through the official openai client: a request is
the chat completion it stands for (same prompt, same tokens for a seed), streamed as the typed events the
client's own accumulator (`responses.stream`) rebuilds into the same response."""

from __future__ import annotations


import openai
import pytest
from server_util import running_server

from dgemma.plugin.engine import Engine
from dgemma.plugin.server import protocol as P
from dgemma.plugin.server.conversation import openai_messages
from dgemma.plugin.server.responses import input_messages

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(default_gguf) -> openai.OpenAI:
    with running_server(default_gguf.parent) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x")


@pytest.fixture(scope="module")
def engine(default_gguf) -> Engine:
    return Engine.load(default_gguf)


def test_a_response_is_the_chat_completion_it_stands_for(client, engine):
    chat = client.chat.completions.create(model="default", messages=CHAT, max_tokens=12, seed=3)
    got = client.responses.create(model="default", instructions="Be brief.", input="Name a colour.",
                                  max_output_tokens=12, extra_body={"seed": 3})
    assert got.output_text == chat.choices[0].message.content and got.object == "response"
    assert got.usage.input_tokens == len(engine.prompt_ids(CHAT)) == chat.usage.prompt_tokens
    assert got.usage.output_tokens == chat.usage.completion_tokens
    cut = chat.choices[0].finish_reason == "length"
    assert got.status == ("incomplete" if cut else "completed")
    assert (got.incomplete_details.reason if cut else got.incomplete_details) == ("max_output_tokens" if cut else None)
    # the same as a list of input items
    items = client.responses.create(model="default", input=[
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Name a colour."}]}],
        max_output_tokens=12, extra_body={"seed": 3})
    assert items.output_text == got.output_text


def test_the_stream_rebuilds_the_same_response(client):
    whole = client.responses.create(model="default", input="Tell me a story.", max_output_tokens=40,
                                    extra_body={"seed": 5})
    with client.responses.stream(model="default", input="Tell me a story.", max_output_tokens=40,
                                 extra_body={"seed": 5}) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] in ("response.completed",
                                                                                         "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == whole.output_text and len(deltas) >= 1
    assert kinds.count("response.output_item.added") == kinds.count("response.output_item.done") == 1


def test_reasoning_effort_thinks_as_chat_completions_does(client):
    chat = client.chat.completions.create(model="default", messages=CHAT, max_tokens=30, seed=7,
                                          reasoning_effort="high")
    got = client.responses.create(model="default", instructions="Be brief.", input="Name a colour.",
                                  max_output_tokens=30, reasoning={"effort": "high"}, extra_body={"seed": 7})
    thinking = getattr(chat.choices[0].message, "reasoning_content", None) or ""
    reasoning = [i for i in got.output if i.type == "reasoning"]
    assert ("".join(s.text for i in reasoning for s in i.summary)) == thinking
    assert got.output_text == (chat.choices[0].message.content or "")
    with client.responses.stream(model="default", instructions="Be brief.", input="Name a colour.",
                                 max_output_tokens=30, reasoning={"effort": "high"}, extra_body={"seed": 7}) as s:
        final = s.get_final_response()
    assert [i.type for i in final.output] == [i.type for i in got.output] and final.output_text == got.output_text


def test_function_calls_and_outputs_become_the_chat_messages():
    req = P.ResponsesRequest(model="m", instructions="Use tools.", input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {"type": "function_call", "call_id": "call_1", "name": "weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "noon"}]}])
    got = openai_messages(input_messages(req), lambda c: c or "")
    assert [m["role"] for m in got] == ["system", "user", "assistant", "tool", "tool"]
    assert [c["function"] for c in got[2]["tool_calls"]] == [{"name": "weather", "arguments": {"city": "Paris"}},
                                                             {"name": "time", "arguments": {}}]
    assert (got[3]["name"], got[3]["content"], got[4]["name"], got[4]["content"]) == ("weather", "sunny", "time", "noon")


@pytest.mark.parametrize("extra, needle", [
    ({"previous_response_id": "resp_1"}, "not stored"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"$ref": "#/$defs/y"}}}},
     "text.format.schema: at #: $ref '#/$defs/y' names nothing"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "'input_image' is not"),
    ({"tools": ["web_search"]}, "tools[0]: expected an object"),
    ({"text": {"format": "text"}}, "text.format: expected an object"),
    ({"input": [{"type": "function_call", "call_id": "c1", "arguments": "{}"}]}, "input[0].name: expected a string"),
    ({"input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "[1]"}]},
     "input[0].arguments: expected a JSON object"),
    ({"input": [{"type": "function_call_output", "call_id": "c9", "output": "x"}]}, "input[0].call_id: 'c9' answers"),
    ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "does not support tools"),
    ({"reasoning": {"effort": "maximal"}}, "reasoning.effort"),
    ({"input": [{"type": "computer_call"}]}, "'computer_call' is not supported"),
    ({"extra_body": {"seed": "x"}}, "seed"),
])
def test_what_it_cannot_do_is_a_400(client, extra, needle):
    body = {"model": "default", "input": "Hi", "max_output_tokens": 2, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.responses.create(**body)
    assert needle in e.value.message


def test_a_reply_with_thinking_text_and_calls_streams_as_the_client_rebuilds_it():
    """A random model never thinks or calls a tool here, so the stream is built from the engine's events for a
    reply with all three parts (thinking over two canvases, then text, then two calls) and read back by the
    openai client's own stream state; the result is what the route answers unstreamed for that reply."""
    import json

    from dgemma.plugin.engine import DoneEvent, TextEvent
    from dgemma.plugin.reply import ReplyDelta, ToolCall
    from dgemma.plugin.server.responses import output_items

    calls = [ToolCall("weather", {"city": "Paris"}), ToolCall("time", {})]
    canvases = [TextEvent("", [], 0, 4, thinking="Let me"), TextEvent("It is", [], 1, 4, thinking=" think."),
                TextEvent(" sunny.", [], 2, 4, tool_calls=calls)]
    raw, state = _stream_of(canvases, DoneEvent("stop", 9, 30, [], [], [], 1.0, 0, 0, 0, 0, 0))
    final = raw[-1]["response"]
    expected = output_items(ReplyDelta("It is sunny.", "Let me think.", calls))
    strip = lambda items: [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in items]  # noqa: E731
    assert raw[-1]["type"] == "response.completed" and strip(final["output"]) == strip(expected)
    snapshot = state._ResponseStreamState__current_snapshot  # (what the client's stream built from the deltas)
    assert [i.type for i in snapshot.output] == ["reasoning", "message", "function_call", "function_call"]
    assert snapshot.output[1].content[0].text == "It is sunny."
    assert [json.loads(i.arguments) for i in snapshot.output[2:]] == [{"city": "Paris"}, {}]
    completed = state._completed_response  # (get_final_response's: checked against the items the deltas made)
    assert completed.output_text == "It is sunny." and completed.output[0].summary[0].text == "Let me think."
    assert final["usage"]["input_tokens"] == 9 and final["usage"]["output_tokens"] == 30


def test_built_in_tools_are_left_out_and_every_effort_is_known(client):
    """Codex sends web_search along with its functions: left out (nothing here runs it), the request answered;
    openai's newest efforts (xhigh, max) turn thinking on."""
    got = client.responses.create(model="default", input="Hi", max_output_tokens=2, tools=[{"type": "web_search"}],
                                  reasoning={"effort": "xhigh"}, extra_body={"seed": 1})
    assert got.usage.output_tokens <= 2 and got.tools[0].type == "web_search"


def _stream_of(canvases, done):
    """The route's stream for these engine events, read back by the openai client's stream state."""
    import asyncio
    import json

    from openai._models import construct_type
    from openai.lib.streaming.responses._responses import ResponseStreamState
    from openai.types.responses import ResponseStreamEvent

    from dgemma.plugin.server.responses import _Head, _stream_events, _typed_stream

    async def events():
        for e in canvases:
            if isinstance(e, Exception):
                raise e
            yield e
        if done is not None:
            yield done

    async def sse() -> list[bytes]:
        head = _Head(P.ResponsesRequest(model="m", input="x"))
        return [chunk async for chunk in _typed_stream(_stream_events(head, events()))]

    state = ResponseStreamState(input_tools=[], text_format=openai.omit)
    raw = []
    for chunk in asyncio.run(sse()):
        kind, data = chunk.decode().strip().split("\n")
        raw.append(json.loads(data.removeprefix("data: ")))
        assert kind == f"event: {raw[-1]['type']}"
        if raw[-1]["type"] not in ("error", "response.failed"):
            state.handle_event(construct_type(type_=ResponseStreamEvent, value=raw[-1]))
    return raw, state


def test_thinking_only_and_cut_replies_stream_as_they_answer_unstreamed():
    from dgemma.plugin.engine import DoneEvent, TextEvent
    from dgemma.plugin.reply import ReplyDelta
    from dgemma.plugin.server.responses import output_items

    stop = DoneEvent("stop", 3, 8, [], [], [], 1.0, 0, 0, 0, 0, 0)
    raw, state = _stream_of([TextEvent("", [], 0, 4, thinking="Hmm.")], stop)
    items = raw[-1]["response"]["output"]
    assert [(i["type"], i.get("status")) for i in items] == [(i["type"], i.get("status"))
                                                            for i in output_items(ReplyDelta("", "Hmm.", []))]
    assert state._completed_response.output_text == "" and len(items) == 2
    cut = DoneEvent("length", 3, 8, [], [], [], 1.0, 0, 0, 0, 0, 0)
    raw, _ = _stream_of([TextEvent("Once upon", [], 0, 4)], cut)
    assert raw[-1]["type"] == "response.incomplete" and raw[-1]["response"]["output"][0]["status"] == "incomplete"
    assert raw[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert output_items(ReplyDelta("Once upon", "", []), cut=True)[0]["status"] == "incomplete"


def test_a_failure_mid_stream_ends_it_with_response_failed():
    from dgemma.plugin.engine import EngineError, TextEvent

    raw, state = _stream_of([TextEvent("Half", [], 0, 4), EngineError("the GPU fell over")], None)
    kinds = [r["type"] for r in raw]
    assert kinds[-2:] == ["error", "response.failed"] and "response.output_item.done" in kinds
    assert raw[-1]["response"]["status"] == "failed" and "fell over" in raw[-1]["response"]["error"]["message"]
    assert raw[-1]["response"]["output"][0]["content"][0]["text"] == "Half"
    assert [r["sequence_number"] for r in raw] == list(range(len(raw)))
