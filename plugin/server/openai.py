"""OpenAI's API (/v1/*) as Ollama and LM Studio serve it: thin routes over serving.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..call_format import CallFormat
from ..engine import DoneEvent, EngineError, TextEvent
from ..json_schema import Node
from ..logprobs import MAX_COMPLETION_LOGPROBS, TextOffsets, completion_wire, wire
from ..registry import ModelNotFound
from ..reply import ReplyDelta
from . import protocol as P
from .conversation import check_thinking, check_tools, openai_messages, openai_tool_calls, tool_list
from .serving import (
    ApiError,
    check_json_thinking,
    check_request,
    collect,
    generate_options,
    generate_stream,
    fitted_ids,
    forced_call,
    json_format,
    logprobs_option,
)

router = APIRouter(prefix="/v1")


def _state(request: Request):
    return request.app.state.dgemma


def _model_object(name: str, created: int, owner: str = "dgemma") -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


@router.get("/models")
async def models(request: Request) -> dict[str, Any]:
    state = _state(request)
    data = [_model_object(P.display_name(e.name), int(e.modified_at.timestamp()))
            for e in await asyncio.to_thread(state.registry.list)]
    data += await state.upstream_openai_models()
    return {"object": "list", "data": data}


@router.get("/models/{model:path}")
async def model(request: Request, model: str) -> dict[str, Any]:
    state = _state(request)
    try:
        entry = await asyncio.to_thread(state.registry.resolve, model)
    except ModelNotFound:
        for m in await state.upstream_openai_models():
            if m["id"] == model:
                return m
        raise ApiError(404, f"model '{model}' not found", code="model_not_found") from None
    return _model_object(P.display_name(entry.name), int(entry.modified_at.timestamp()))


@router.post("/embeddings")
async def embeddings(request: Request) -> Response:
    """An upstream's embedding model (`--upstream`, `--upstream-openai`), proxied; DiffusionGemma has none."""
    state = _state(request)
    try:
        body = await request.json()
    except ValueError:
        body = None
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or not model:
        raise ApiError(400, "model is required")
    try:
        await asyncio.to_thread(state.registry.resolve, model)
    except ModelNotFound:
        if await state.upstream_owns(model, openai=True):
            return await state.upstream_openai_proxy(request, "/embeddings", model)
        raise ApiError(404, f"model '{model}' not found", code="model_not_found") from None
    raise ApiError(400, "DiffusionGemma is a generative model: embeddings are not supported",
                   code="unsupported_parameter")


def _text(content: Any) -> str:
    """OpenAI message content: a string or a list of parts; only text parts are supported."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise ApiError(400, f"content part of type '{part.get('type')}' is not supported (text only)")
        if not isinstance(part.get("text", ""), str):
            raise ApiError(400, f"content part of type 'text': 'text' must be a string, got {type(part['text']).__name__}")
        texts.append(part.get("text", ""))
    return "".join(texts)


async def _load(request: Request, name: str):
    try:
        return await _state(request).manager.get(name)
    except ModelNotFound:
        raise ApiError(404, f"model '{name}' not found", code="model_not_found") from None
    except EngineError as e:
        raise ApiError(500, f"model '{name}' failed to load: {e}") from None


def _sse(obj: Any) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def _sse_stream(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    try:
        async for c in chunks:
            yield _sse(c)
    except (ApiError, EngineError) as e:
        yield _sse(P.openai_error(getattr(e, "message", str(e)), 500))
    except Exception as e:  # noqa: BLE001 - the server must not crash on a request
        yield _sse(P.openai_error(f"an error was encountered while running the model: {e}", 500))
    yield _sse("[DONE]")


def _common(req, max_tokens: int | None):
    if req.n not in (None, 1):
        raise ApiError(400, "n > 1 is not supported", code="unsupported_parameter")
    return dict(max_tokens=max_tokens, temperature=req.temperature, seed=req.seed, stop=req.stop)


@router.post("/chat/completions")
async def chat_completions(request: Request, req: P.ChatCompletionRequest) -> Response:
    state = _state(request)
    if await state.upstream_owns(req.model, openai=True):
        return await state.upstream_openai_proxy(request, "/chat/completions", req.model)
    if not req.messages:
        raise ApiError(400, "[] is too short - 'messages'", code="invalid_request")
    # tool_choice "none": no tools; "required" or a function: the reply is a call (forced_call), whatever the
    # response_format
    conv, tools = openai_messages(req.messages, _text), tool_list(req.tools) if req.tool_choice != "none" else None
    fmt = forced_call(tools, req.tool_choice, req.parallel_tool_calls) or \
        json_format(req.response_format, openai="response_format")
    variables = _template_variables(req)
    check_json_thinking(fmt, variables.get("enable_thinking"))
    logprobs = logprobs_option(req.logprobs, req.top_logprobs, strict=True)
    model, ids, opts = await chat_prompt(request, req.model, conv, tools, variables, format=fmt,
                                         **_common(req, req.max_completion_tokens or req.max_tokens))
    opts.logprobs = logprobs
    tok = model.engine.tokenizer

    def content_logprobs(items) -> dict[str, Any]:
        return {"content": wire(tok, items, top=True), "refusal": None}
    keep = state.manager.default_keep_alive
    cid, created = P.completion_id("chatcmpl"), int(time.time())
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": req.model,
            "system_fingerprint": "dgemma"}
    events = generate_stream(state.manager, model, ids, opts, keep)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}
            calls = 0
            async for event in events:
                if isinstance(event, TextEvent):
                    delta = _delta(event, calls)
                    calls += len(event.tool_calls)
                    if delta or event.logprobs:
                        choice = {"index": 0, "delta": delta, "finish_reason": None}
                        if logprobs is not None:
                            choice["logprobs"] = content_logprobs(event.logprobs)
                        yield {**head, "choices": [choice]}
                elif isinstance(event, DoneEvent):
                    yield {**head, "choices": [{"index": 0, "delta": {},
                                                "finish_reason": P.finish_reason(event, calls > 0)}]}
                    if include_usage:
                        yield {**head, "choices": [], "usage": P.usage(event)}

        return StreamingResponse(_sse_stream(chunks()), media_type="text/event-stream")
    reply, done = await state.until_disconnected(request, collect(events))
    choice = {"index": 0, "message": _message(reply), "finish_reason": P.finish_reason(done, bool(reply.tool_calls))}
    if done.logprobs is not None:
        choice["logprobs"] = content_logprobs(done.logprobs)
    return JSONResponse({"id": cid, "object": "chat.completion", "created": created, "model": req.model,
                         "system_fingerprint": "dgemma", "choices": [choice], "usage": P.usage(done)})


async def chat_prompt(request: Request, name: str, conv: list[dict[str, Any]], tools: list[dict[str, Any]] | None,
                      variables: dict[str, Any], truncate: bool = True, format: Node | CallFormat | None = None,
                      **limits: Any) -> tuple[Any, list[int], Any]:
    """A chat's model (loaded), prompt ids and GenerateOptions, for /v1/chat/completions and /v1/responses: the
    Modelfile's SYSTEM and MESSAGEs around the conversation and its PARAMETERs under the request's `limits`
    (generate_options' keywords), thinking and tools checked against the chat template, the whole checked
    against the model; the reply split into thinking, answer and tool calls. truncate and format: GenerateOptions'
    (a prompt fitted into num_ctx; JSON mode, a schema or a forced call)."""
    model = await _load(request, name)
    opts = generate_options(model.engine, model.entry.settings.parameters, **limits)
    conv = model.entry.settings.chat(conv)
    if "enable_thinking" in variables:
        variables = {**variables, **check_thinking(model.engine, name, variables["enable_thinking"])}
    opts.truncate, opts.format = truncate, format
    ids = fitted_ids(model.engine, conv, opts, variables={**variables, **check_tools(model.engine, name, tools)})
    opts.split_thinking, opts.tool_calls = True, bool(tools)
    check_request(model.engine, ids, opts)
    return model, ids, opts


REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")  # (openai's ReasoningEffort)
RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "add_generation_prompt")


def _template_variables(req: P.ChatCompletionRequest) -> dict[str, Any]:
    """The chat template's variables, checked before any model loads: chat_template_kwargs (as vLLM and
    llama.cpp's server take them), and reasoning_effort as enable_thinking (the template has one thinking mode:
    any effort but "none" turns it on)."""
    out = dict(req.chat_template_kwargs or {})
    bad = [k for k in out if k in RESERVED_TEMPLATE_KWARGS or not k.isidentifier()]
    if bad:
        raise ApiError(400, f"chat_template_kwargs: '{bad[0]}' cannot be set", code="invalid_request")
    if req.reasoning_effort is not None:
        if req.reasoning_effort not in REASONING_EFFORTS:
            raise ApiError(400, f"reasoning_effort: expected one of {', '.join(REASONING_EFFORTS)}, got "
                                f"{req.reasoning_effort!r}", code="invalid_request")
        out["enable_thinking"] = req.reasoning_effort != "none"
    return out


def _message(reply: ReplyDelta) -> dict[str, Any]:
    """The whole reply: content null where it is only tool calls, as OpenAI answers."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.content or (None if reply.tool_calls else "")}
    if reply.thinking:
        message["reasoning_content"] = reply.thinking
    if reply.tool_calls:
        message["tool_calls"] = openai_tool_calls(reply.tool_calls)
    return message


def _delta(event: TextEvent, calls_before: int) -> dict[str, Any]:
    """A stream's delta for one canvas: its thinking (reasoning_content, as llama.cpp's server sends it), its
    answer and the tool calls it finished (each whole, indexed after those of earlier canvases)."""
    delta: dict[str, Any] = {}
    if event.thinking:
        delta["reasoning_content"] = event.thinking
    if event.text:
        delta["content"] = event.text
    if event.tool_calls:
        delta["tool_calls"] = openai_tool_calls(event.tool_calls, calls_before, delta=True)
    return delta


@router.post("/completions")
async def completions(request: Request, req: P.CompletionRequest) -> Response:
    state = _state(request)
    if await state.upstream_owns(req.model, openai=True):
        return await state.upstream_openai_proxy(request, "/completions", req.model)
    if req.suffix:
        raise ApiError(400, "suffix (fill-in-the-middle) is not supported", code="unsupported_parameter")
    if req.logprobs is not None and not 0 <= req.logprobs <= MAX_COMPLETION_LOGPROBS:
        raise ApiError(400, f"logprobs must be between 0 and {MAX_COMPLETION_LOGPROBS} (got {req.logprobs})",
                       code="invalid_request")
    if req.logprobs is not None and req.echo:
        raise ApiError(400, "echo with logprobs (the prompt's logprobs) is not supported", code="unsupported_parameter")
    prompt = req.prompt if isinstance(req.prompt, str) else None
    if prompt is None:
        if len(req.prompt) != 1:
            raise ApiError(400, "exactly one prompt is supported", code="unsupported_parameter")
        prompt = req.prompt[0]
    model = await _load(request, req.model)
    opts = generate_options(model.engine, model.entry.settings.parameters, **_common(req, req.max_tokens))
    opts.logprobs = req.logprobs
    tok = model.engine.tokenizer
    ids = fitted_ids(model.engine, prompt, opts, raw=True)
    check_request(model.engine, ids, opts)
    cid, created = P.completion_id("cmpl"), int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": req.model, "system_fingerprint": "dgemma"}
    events = generate_stream(state.manager, model, ids, opts, state.manager.default_keep_alive)
    echo = prompt if req.echo else ""
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def chunks() -> AsyncIterator[dict[str, Any]]:
            if echo:
                yield {**head, "choices": [{"index": 0, "text": echo, "finish_reason": None}]}
            offsets = TextOffsets(tok)  # (logprobs' text_offset, going on across the chunks)
            async for event in events:
                if isinstance(event, TextEvent) and (event.text or event.logprobs):
                    choice = {"index": 0, "text": event.text, "finish_reason": None}
                    if req.logprobs is not None:
                        choice["logprobs"] = completion_wire(tok, event.logprobs, offsets)
                    yield {**head, "choices": [choice]}
                elif isinstance(event, DoneEvent):
                    yield {**head, "choices": [{"index": 0, "text": "", "finish_reason": P.finish_reason(event)}]}
                    if include_usage:
                        yield {**head, "choices": [], "usage": P.usage(event)}

        return StreamingResponse(_sse_stream(chunks()), media_type="text/event-stream")
    reply, done = await state.until_disconnected(request, collect(events))
    choice = {"index": 0, "text": echo + reply.content, "finish_reason": P.finish_reason(done)}
    if done.logprobs is not None:
        choice["logprobs"] = completion_wire(tok, done.logprobs)
    return JSONResponse({**head, "choices": [choice], "usage": P.usage(done)})

