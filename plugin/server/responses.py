"""OpenAI's Responses API, `POST /v1/responses`, stateless as Ollama's and LM Studio's: the whole conversation
comes in `input` (`previous_response_id` and `conversation` are refused), nothing is stored.

The request becomes the chat completion it stands for: `instructions` a system message first, `input` a user
message (a string) or a list of items: messages (`input_text` / `output_text` parts), a reply's
`function_call`s (an assistant message's tool calls) and their `function_call_output`s (tool messages);
`reasoning` items are skipped, as a chat's earlier thinking is. `seed` (not the API's) may come in the body, as
vLLM takes it. Function tools come flattened
(`{"type": "function", "name", "parameters"}`); `reasoning.effort` turns thinking on as `reasoning_effort` does.
The reply goes back as output items: a `reasoning` item (its summary text), a `message` with one `output_text`,
and a `function_call` per call; streamed as the typed events the openai client reads (`response.created`,
`response.output_item.added`, `response.output_text.delta`, ..., `response.completed`), a canvas at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import DoneEvent, EngineError, TextEvent
from ..json_schema import Node
from ..reply import ReplyDelta, ToolCall
from . import protocol as P
from .conversation import openai_messages, tool_list
from .openai import REASONING_EFFORTS, _state, chat_prompt
from .serving import ApiError, check_json_thinking, collect, forced_call, generate_stream, json_format

router = APIRouter(prefix="/v1")

TEXT_PARTS = ("input_text", "output_text", "text")


def _part_text(content: Any, where: str) -> str:
    """An item's content: a string, or text parts (input_text / output_text); images and files are refused."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: expected a string or a list of parts", code="invalid_request")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}[{j}]: content of type {kind!r} is not supported (text only)",
                           code="unsupported_parameter")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(req: P.ResponsesRequest) -> list[P.OpenAIMessage]:
    """instructions and input as chat completion messages (a 400 naming the item for what cannot be one)."""
    out = [P.OpenAIMessage(role="system", content=req.instructions)] if req.instructions else []
    if isinstance(req.input, str):
        return [*out, P.OpenAIMessage(role="user", content=req.input)]
    calls: set[str] = set()  # the call ids of the function_calls so far
    for i, item in enumerate(req.input):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"{where}: expected an object", code="invalid_request")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(400, f"{where}.role: expected user, assistant, system or developer, got {role!r}",
                               code="invalid_request")
            out.append(P.OpenAIMessage(role=role, content=_part_text(item.get("content"), f"{where}.content")))
        elif kind == "function_call":
            for key in ("call_id", "name", "arguments"):
                if not isinstance(item.get(key), str) or (key != "arguments" and not item[key]):
                    raise ApiError(400, f"{where}.{key}: expected a string", code="invalid_request")
            try:
                arguments = json.loads(item["arguments"]) if item["arguments"].strip() else {}
            except json.JSONDecodeError:
                arguments = None
            if not isinstance(arguments, dict):
                raise ApiError(400, f"{where}.arguments: expected a JSON object, got {item['arguments'][:60]!r}",
                               code="invalid_request")
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": arguments}}
            calls.add(item["call_id"])
            if out and out[-1].role == "assistant":  # (a reply's calls after its text, or parallel calls)
                out[-1].tool_calls = [*(out[-1].tool_calls or []), call]
            else:
                out.append(P.OpenAIMessage(role="assistant", content=None, tool_calls=[call]))
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str) or not item["call_id"]:
                raise ApiError(400, f"{where}.call_id: expected a string", code="invalid_request")
            if item["call_id"] not in calls:
                raise ApiError(400, f"{where}.call_id: {item['call_id']!r} answers no function_call before it",
                               code="invalid_request")
            output = item.get("output")
            text = output if isinstance(output, str) else _part_text(output, f"{where}.output")
            out.append(P.OpenAIMessage(role="tool", content=text, tool_call_id=item.get("call_id")))
        elif kind != "reasoning":
            raise ApiError(400, f"{where}.type: {kind!r} is not supported (message, function_call, "
                                "function_call_output, reasoning)", code="unsupported_parameter")
    return out


def function_tools(req: P.ResponsesRequest) -> list[dict[str, Any]] | None:
    """The Responses API's flat function tools as chat completion tools. Built-in tools (web_search, file_search,
    ...; a client such as Codex sends them along) are left out: nothing here runs them, and the model is not told
    of them."""
    if req.tool_choice == "none" or not req.tools:
        return None
    out = []
    for i, tool in enumerate(req.tools):
        if not isinstance(tool, dict):
            raise ApiError(400, f"tools[{i}]: expected an object", code="invalid_request")
        if tool.get("type") == "function":
            fn = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
            out.append({"type": "function", "function": fn})
    return tool_list(out)


def _checked(req: P.ResponsesRequest) -> dict[str, Any]:
    """Refusals and the template's variables, before any model loads."""
    if req.previous_response_id or req.conversation:
        raise ApiError(400, "previous_response_id and conversation are not supported: responses are not stored, "
                            "send the whole conversation in 'input'", code="unsupported_parameter")
    fmt = (req.text or {}).get("format") or {}
    if not isinstance(fmt, dict):
        raise ApiError(400, f"text.format: expected an object, got {fmt!r}", code="invalid_request")
    if not req.input:
        raise ApiError(400, "input is required", code="invalid_request")
    if req.truncation not in (None, "auto", "disabled"):
        raise ApiError(400, f"truncation: expected 'auto' or 'disabled', got {req.truncation!r}", code="invalid_request")
    effort = (req.reasoning or {}).get("effort")
    if effort is None:
        return {}
    if effort not in REASONING_EFFORTS:
        raise ApiError(400, f"reasoning.effort: expected one of {', '.join(REASONING_EFFORTS)}, got {effort!r}",
                       code="invalid_request")
    return {"enable_thinking": effort != "none"}


def _json(req: P.ResponsesRequest) -> Node | None:
    """text.format as GenerateOptions.format (serving.json_format)."""
    return json_format((req.text or {}).get("format"), openai="text.format")


def _usage(done: DoneEvent) -> dict[str, Any]:
    return {"input_tokens": done.prompt_eval_count, "input_tokens_details": {"cached_tokens": done.prompt_cached_count},
            "output_tokens": done.eval_count, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": done.prompt_eval_count + done.eval_count}


def _reasoning_item(text: str) -> dict[str, Any]:
    return {"type": "reasoning", "id": P.completion_id("rs"), "summary": [{"type": "summary_text", "text": text}]}


def _message_item(text: str, status: str = "completed") -> dict[str, Any]:
    """The reply's message: completed, or incomplete where max_output_tokens cut it (in_progress: opened in a
    stream, its text to come)."""
    content = [{"type": "output_text", "text": text, "annotations": []}] if status != "in_progress" else []
    return {"type": "message", "id": P.completion_id("msg"), "status": status, "role": "assistant", "content": content}


def _call_item(call: ToolCall) -> dict[str, Any]:
    return {"type": "function_call", "id": P.completion_id("fc"), "call_id": P.completion_id("call"),
            "name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False), "status": "completed"}


def output_items(reply: ReplyDelta, cut: bool = False) -> list[dict[str, Any]]:
    """The reply as output items; a message (empty if need be) unless it is only calls."""
    items = [_reasoning_item(reply.thinking)] if reply.thinking else []
    if reply.content or not reply.tool_calls:
        items.append(_message_item(reply.content, "incomplete" if cut else "completed"))
    return items + [_call_item(c) for c in reply.tool_calls]


class _Head:
    """The response object's fields that do not change as it is made."""

    def __init__(self, req: P.ResponsesRequest, fmt: Node | None = None) -> None:
        self.id, self.created = P.completion_id("resp"), int(time.time())
        self.fields = {"object": "response", "model": req.model, "instructions": req.instructions,
                       "max_output_tokens": req.max_output_tokens, "temperature": req.temperature,
                       "top_p": req.top_p if req.top_p is not None else 1.0, "tools": req.tools or [],
                       "tool_choice": req.tool_choice or "auto", "parallel_tool_calls": req.parallel_tool_calls is not False, "store": False,
                       "text": {"format": (req.text or {}).get("format") if fmt else {"type": "text"}},
                       "reasoning": req.reasoning, "truncation": req.truncation or "auto",
                       "previous_response_id": None, "metadata": req.metadata or {}, "error": None}

    def response(self, status: str, output: list[dict[str, Any]], done: DoneEvent | None = None) -> dict[str, Any]:
        incomplete = done is not None and done.done_reason == "length"
        return {"id": self.id, "created_at": self.created, **self.fields,
                "status": "incomplete" if incomplete else status, "output": output,
                "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
                "usage": _usage(done) if done is not None else None}


@router.post("/responses")
async def responses(request: Request, req: P.ResponsesRequest) -> Response:
    state = _state(request)
    if await state.upstream_owns(req.model, openai=True):
        return await state.upstream_openai_proxy(request, "/responses", req.model)
    variables = _checked(req)
    tools = function_tools(req)
    json_fmt = _json(req)
    fmt = forced_call(tools, req.tool_choice, req.parallel_tool_calls) or json_fmt
    check_json_thinking(fmt, variables.get("enable_thinking"))
    conv = openai_messages(input_messages(req), lambda content: content or "")
    seed = (req.model_extra or {}).get("seed")  # (not the Responses API's: as vLLM takes it, in extra_body)
    model, ids, opts = await chat_prompt(request, req.model, conv, tools, variables, req.truncation != "disabled",
                                         fmt, max_tokens=req.max_output_tokens, temperature=req.temperature,
                                         seed=seed)
    head = _Head(req, json_fmt)
    events = generate_stream(state.manager, model, ids, opts, state.manager.default_keep_alive)
    if req.stream:
        return StreamingResponse(_typed_stream(_stream_events(head, events)), media_type="text/event-stream")
    reply, done = await state.until_disconnected(request, collect(events))
    return JSONResponse(head.response("completed", output_items(reply, done.done_reason == "length"), done))


async def _typed_stream(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI sends them (`event:` the type, `data:` the event, numbered); an error on the
    way is an `error` event (the server never breaks the stream without one)."""
    n = 0

    def sse(event: dict[str, Any]) -> bytes:
        nonlocal n
        event = {**event, "sequence_number": n}
        n += 1
        return f"event: {event['type']}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n".encode()

    try:
        async for event in events:
            yield sse(event)
    except (ApiError, EngineError) as e:
        yield sse({"type": "error", "code": "server_error", "message": getattr(e, "message", str(e)), "param": None})
    except Exception as e:  # noqa: BLE001 - the server must not crash on a request
        yield sse({"type": "error", "code": "server_error", "param": None,
                   "message": f"an error was encountered while running the model: {e}"})


async def _stream_events(head: _Head, events: AsyncIterator[Any]) -> AsyncIterator[dict[str, Any]]:
    """The Responses API's stream: an item opened where the reply's next part begins (reasoning, then the
    message's text; each tool call whole), its deltas a canvas at a time, closed when the next part or the end
    comes."""
    output: list[dict[str, Any]] = []
    open_item: dict[str, Any] | None = None
    text = ""
    yield {"type": "response.created", "response": head.response("in_progress", [])}
    yield {"type": "response.in_progress", "response": head.response("in_progress", [])}

    def close(cut: bool = False) -> list[dict[str, Any]]:
        nonlocal open_item
        if open_item is None:
            return []
        item, at, open_item = open_item, len(output), None
        if item["type"] == "reasoning":
            part = {"type": "summary_text", "text": text}
            item = {**item, "summary": [part]}
            out = [{"type": "response.reasoning_summary_text.done", "item_id": item["id"], "output_index": at,
                    "summary_index": 0, "text": text},
                   {"type": "response.reasoning_summary_part.done", "item_id": item["id"], "output_index": at,
                    "summary_index": 0, "part": part}]
        else:
            part = {"type": "output_text", "text": text, "annotations": []}
            item = {**item, "status": "incomplete" if cut else "completed", "content": [part]}
            out = [{"type": "response.output_text.done", "item_id": item["id"], "output_index": at,
                    "content_index": 0, "text": text},
                   {"type": "response.content_part.done", "item_id": item["id"], "output_index": at,
                    "content_index": 0, "part": part}]
        output.append(item)
        return [*out, {"type": "response.output_item.done", "output_index": at, "item": item}]

    def opening(kind: str) -> list[dict[str, Any]]:
        nonlocal open_item, text
        if open_item is not None and open_item["type"] == kind:
            return []
        out = close()
        at, text = len(output), ""
        if kind == "reasoning":
            open_item = {**_reasoning_item(""), "summary": []}
            part = {"type": "summary_text", "text": ""}
            return [*out, {"type": "response.output_item.added", "output_index": at, "item": open_item},
                    {"type": "response.reasoning_summary_part.added", "item_id": open_item["id"],
                     "output_index": at, "summary_index": 0, "part": part}]
        open_item = _message_item("", status="in_progress")
        part = {"type": "output_text", "text": "", "annotations": []}
        return [*out, {"type": "response.output_item.added", "output_index": at, "item": open_item},
                {"type": "response.content_part.added", "item_id": open_item["id"], "output_index": at,
                 "content_index": 0, "part": part}]

    async def parts() -> AsyncIterator[dict[str, Any]]:
        async for event in events:
            if isinstance(event, TextEvent):
                for x in on_text(event):
                    yield x
            elif isinstance(event, DoneEvent):
                for x in on_done(event):
                    yield x

    def on_text(event: TextEvent) -> list[dict[str, Any]]:
        nonlocal text
        out: list[dict[str, Any]] = []
        for kind, delta in (("reasoning", event.thinking), ("message", event.text)):
            if not delta:
                continue
            out += opening(kind)
            text += delta
            at = len(output)
            if kind == "reasoning":
                out.append({"type": "response.reasoning_summary_text.delta", "item_id": open_item["id"],
                            "output_index": at, "summary_index": 0, "delta": delta})
            else:
                out.append({"type": "response.output_text.delta", "item_id": open_item["id"], "output_index": at,
                            "content_index": 0, "delta": delta, "logprobs": []})
        for call in event.tool_calls:
            out += close()
            item, at = _call_item(call), len(output)
            out += [{"type": "response.output_item.added", "output_index": at,
                     "item": {**item, "arguments": "", "status": "in_progress"}},
                    {"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": at,
                     "delta": item["arguments"]},
                    {"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": at,
                     "arguments": item["arguments"]}]
            output.append(item)
            out.append({"type": "response.output_item.done", "output_index": at, "item": item})
        return out

    def on_done(event: DoneEvent) -> list[dict[str, Any]]:
        cut = event.done_reason == "length"
        out: list[dict[str, Any]] = []
        answered = any(i["type"] != "reasoning" for i in output) or (open_item or {}).get("type") == "message"
        if not answered:  # (thinking only, or nothing: an empty message, as when not streamed)
            out += opening("message")
        out += close(cut)
        final = head.response("completed", output, event)
        out.append({"type": "response.incomplete" if cut else "response.completed", "response": final})
        return out

    try:
        async for x in parts():
            yield x
    except Exception as e:  # noqa: BLE001 - the stream ends as OpenAI's does on a failure, never without an end
        message = getattr(e, "message", None) or f"an error was encountered while running the model: {e}"
        for x in close():
            yield x
        yield {"type": "error", "code": "server_error", "message": message, "param": None}
        failed = head.response("failed", output)
        yield {"type": "response.failed", "response": {**failed, "error": {"code": "server_error", "message": message}}}
