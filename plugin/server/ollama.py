"""Ollama's API (/api/*): thin routes over serving.py, shapes from protocol.py."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timedelta, timezone
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..engine import DoneEvent, EngineError, TextEvent
from ..logprobs import wire
from ..modelfile import parameter_lines, render_modelfile
from ..registry import ModelNotFound, RegistryError, normalize_name
from ..reply import ReplyDelta
from . import protocol as P
from .conversation import check_thinking, check_tools, ollama_messages, ollama_tool_calls, tool_list
from .serving import (
    ApiError,
    LoadedModel,
    check_json_thinking,
    check_request,
    collect,
    generate_options,
    generate_stream,
    json_format,
    logprobs_option,
    parse_keep_alive,
    fitted_ids,
    prompt_ids,
)

router = APIRouter()
NDJSON = "application/x-ndjson"
FOREVER_AFTER = 100 * 365 * 86400.0  # seconds of keep-alive left that /api/ps reports as forever


def _state(request: Request):
    return request.app.state.dgemma


def _keep_alive(request: Request, value: Any) -> float:
    try:
        return parse_keep_alive(value, _state(request).manager.default_keep_alive)
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _model_name(name: str | None) -> str:
    if not name:
        raise ApiError(400, "model is required")
    return name


async def _load(request: Request, name: str) -> tuple[LoadedModel, int]:
    t0 = time.perf_counter_ns()
    try:
        model = await _state(request).manager.get(name)
    except ModelNotFound:
        raise ApiError(404, f"model '{name}' not found") from None
    except (EngineError, RegistryError) as e:
        raise ApiError(500, f"model '{name}' failed to load: {e}") from None
    return model, time.perf_counter_ns() - t0


async def _load_or_unload(request: Request, name: str, asked_keep_alive: Any, keep: float,
                          options: dict[str, Any] | None) -> str:
    """A request with nothing to generate: load the model ("load"; with the server's default keep_alive 0, for
    nothing; its options' num_ctx is what /api/ps then shows, as Ollama loads a runner for it), or, with
    keep_alive 0 asked for, unload it without loading it first ("unload", `ollama stop`)."""
    if asked_keep_alive is None or keep != 0:
        model = (await _load(request, name))[0]
        model.asked_for(generate_options(model.engine, model.entry.settings.options(options)).num_ctx)
        _state(request).manager.touch(model, keep)
        return "load"
    try:
        await _state(request).manager.stop(name)
    except ModelNotFound:
        raise ApiError(404, f"model '{name}' not found") from None
    return "unload"


def _unsupported(**fields: Any) -> None:
    reasons = {
        "images": "images are not supported: dgemma serves DiffusionGemma as a text-only model",
        "suffix": "fill-in-the-middle ('suffix') is not supported",
    }
    for key, value in fields.items():
        if value:
            raise ApiError(400, reasons[key])


async def _ndjson(lines: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """NDJSON with Ollama's error convention: a failure after the first line becomes a final {"error"} line."""
    try:
        async for line in lines:
            yield (json.dumps(line, ensure_ascii=False) + "\n").encode()
    except (ApiError, EngineError) as e:
        yield (json.dumps({"error": getattr(e, "message", str(e))}) + "\n").encode()
    except Exception as e:  # noqa: BLE001 - the server must not crash on a request
        yield (json.dumps({"error": f"an error was encountered while running the model: {e}"}) + "\n").encode()


def _think(engine, model: str, value: Any) -> dict[str, Any]:
    """`think` (true, false or a level) as the chat template's enable_thinking."""
    if value is None or isinstance(value, bool):
        return check_thinking(engine, model, value)
    if value in ("low", "medium", "high", "max"):
        return check_thinking(engine, model, True)
    raise ApiError(400, f'invalid think value: {json.dumps(value)} (must be "high", "medium", "low", "max", true, or false)')


async def _respond(request: Request, model: LoadedModel, ids: list[int], opts, keep: float, stream: bool,
                   t_start: int, load_ns: int, chunk, final) -> Response:
    """Stream NDJSON chunks (chunk(part) per canvas with any answer, thinking or tool call: a ReplyDelta, then
    final(done, empty part)) or answer one object (final(done, the whole reply)); with logprobs asked for, each chunk
    has its tokens' `logprobs` (a canvas's tokens that made no text yet too), the one object all of them."""
    check_request(model.engine, ids, opts)
    state = _state(request)
    events = generate_stream(state.manager, model, ids, opts, keep)
    tok, top = model.engine.tokenizer, bool(opts.logprobs)
    if stream:
        async def lines() -> AsyncIterator[dict[str, Any]]:
            async for event in events:
                if isinstance(event, TextEvent):
                    if event.reply or event.logprobs:
                        line = chunk(event.reply)
                        yield {**line, "logprobs": wire(tok, event.logprobs, top)} if event.logprobs else line
                elif isinstance(event, DoneEvent):
                    yield final(event, ReplyDelta(), time.perf_counter_ns() - t_start)

        return StreamingResponse(_ndjson(lines()), media_type=NDJSON)
    reply, done = await state.until_disconnected(request, collect(events))
    out = final(done, reply, time.perf_counter_ns() - t_start)
    return JSONResponse(out if done.logprobs is None else {**out, "logprobs": wire(tok, done.logprobs, top)})


def _chat_message(part: ReplyDelta, calls_before: int = 0) -> dict[str, Any]:
    """An /api/chat message: the answer, and the thinking and tool calls where there are any (indexed after
    the calls_before of earlier chunks)."""
    out: dict[str, Any] = {"role": "assistant", "content": part.content}
    if part.thinking:
        out["thinking"] = part.thinking
    if part.tool_calls:
        out["tool_calls"] = ollama_tool_calls(part.tool_calls, calls_before)
    return out


@router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> Response:
    return PlainTextResponse("Ollama is running")


@router.api_route("/api/version", methods=["GET", "HEAD"])
async def version() -> dict[str, str]:
    return {"version": P.OLLAMA_VERSION}


@router.api_route("/api/tags", methods=["GET", "HEAD"])
async def tags(request: Request) -> dict[str, Any]:
    state = _state(request)
    models = []
    for entry in await asyncio.to_thread(state.registry.list):
        info = await asyncio.to_thread(state.info, entry)
        models.append(P.tag_entry(entry, info))
    models += await state.upstream_ollama_models()
    return {"models": models}


@router.get("/api/ps")
async def ps(request: Request) -> dict[str, Any]:
    state = _state(request)
    out, seen = [], set()  # (engines listed: names sharing one, `dgemma create`, count its memory once)
    for name, m in sorted(state.manager.loaded.items(), key=lambda kv: -kv[1].expires_at):
        left = m.expires_at - time.monotonic()
        forever = left > FOREVER_AFTER  # (keep_alive -1, or so long that its date would pass the year 9999)
        expires = P.FOREVER if forever else P.rfc3339(datetime.now(timezone.utc) + timedelta(seconds=max(0.0, left)))
        entry = P.tag_entry(m.entry, m.info)
        # the file, the slots streamed experts are copied into and the KV cache kept from the last generation (as
        # Ollama's size counts its KV cache); all of it on the GPU but the streamed experts (kept in host RAM), or
        # none: `ollama ps` shows the share in host RAM as CPU
        engine = m.engine
        size = entry.get("size", 0) + engine.slot_bytes + engine.prompt_cache.nbytes
        vram = size - engine.host_bytes if engine.device.type == "cuda" else 0
        if id(engine) in seen:  # (listed under the name kept longest: the others take no memory of their own)
            size = vram = 0
        seen.add(id(engine))
        out.append({**entry, "size": size, "expires_at": expires, "size_vram": vram,
                    "context_length": m.num_ctx})
    return {"models": out}


@router.post("/api/show")
async def show(request: Request, req: P.ShowRequest) -> dict[str, Any]:
    name = _model_name(req.model or req.name)
    state = _state(request)
    if await state.upstream_owns(name):
        return await state.upstream_ollama_json("/api/show", req.model_dump(exclude_none=True))
    try:
        entry = await asyncio.to_thread(state.registry.resolve, name)
    except ModelNotFound:
        raise ApiError(404, f"model '{P.display_name(normalize_name(name))}' not found") from None
    info = await asyncio.to_thread(state.info, entry)
    made = await asyncio.to_thread(state.template_info, entry)
    features = made.features
    params = P.show_parameters(entry, made.stops, info)
    model_info = {k: v for k, v in info.metadata.items() if k not in ("general.name",)}
    if not req.verbose:
        model_info = {k: (v if not isinstance(v, list) or len(v) <= 5 else []) for k, v in model_info.items()}
    settings = entry.settings
    return {
        "license": "\n".join(settings.license),
        "modelfile": render_modelfile(str(entry.path), settings, params, P.display_name(entry.name)),
        "parameters": "\n".join(f"{k:<30} {json.dumps(v)}" for k, v in parameter_lines(params)),
        "template": made.template,
        **({"system": settings.system} if settings.system else {}),
        **({"messages": settings.messages} if settings.messages else {}),
        "details": P.details(info),
        "model_info": model_info,
        "capabilities": ["completion"] + [k for k, on in (("tools", features.tools), ("thinking", features.thinking)) if on],
        "modified_at": P.rfc3339(entry.modified_at),
    }


@router.post("/api/generate")
async def generate(request: Request, req: P.GenerateRequest) -> Response:
    t_start = time.perf_counter_ns()
    name = _model_name(req.model)
    state = _state(request)
    if await state.upstream_owns(name):
        return await state.upstream_ollama_proxy(request, "/api/generate")
    keep = _keep_alive(request, req.keep_alive)
    _unsupported(images=req.images, suffix=req.suffix)
    fmt = json_format(req.format)
    check_json_thinking(fmt, req.think)
    logprobs = logprobs_option(req.logprobs, req.top_logprobs)
    if req.raw and (req.system or req.template or req.context):
        raise ApiError(400, "raw mode does not support template, system, or context")
    if req.template:
        raise ApiError(400, "template overrides are not supported: dgemma renders the model's own chat template")
    if not req.prompt:
        reason = await _load_or_unload(request, name, req.keep_alive, keep, req.options)
        return JSONResponse({"model": req.model, "created_at": P.now_rfc3339(), "response": "", "done": True,
                             "done_reason": reason})
    model, load_ns = await _load(request, name)
    settings = model.entry.settings  # (a Modelfile's: SYSTEM, MESSAGEs, PARAMETERs)
    opts = generate_options(model.engine, settings.options(req.options))
    opts.logprobs, opts.truncate, opts.format = logprobs, req.truncate is not False, fmt
    if req.raw:
        ids = fitted_ids(model.engine, req.prompt, opts, raw=True)
    else:
        messages = settings.prompt(req.prompt, req.system, history=not req.context)
        context = list(req.context or [])
        vocab = model.engine.cfg.vocab_size
        bad = [i for i in context if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise ApiError(400, f"context: token id {str(bad[0])[:30]} is outside the vocabulary of {vocab}")
        think = _think(model.engine, name, req.think)
        # (without a context, the system message, the Modelfile's MESSAGEs and the prompt are fitted as a chat is)
        ids = fitted_ids(model.engine, context + prompt_ids(model.engine, messages, **think) if context else messages,
                         opts, variables=think)
        opts.split_thinking = True

    def response(part: ReplyDelta) -> dict[str, Any]:
        out = {"model": req.model, "created_at": P.now_rfc3339(), "response": part.content}
        return {**out, "thinking": part.thinking} if part.thinking else out

    def chunk(part: ReplyDelta) -> dict[str, Any]:
        return {**response(part), "done": False}

    def final(done: DoneEvent, part: ReplyDelta, total_ns: int) -> dict[str, Any]:
        out = {**response(part), "done": True,
               "done_reason": "stop" if done.done_reason == "cancelled" else done.done_reason}
        if not req.raw:
            out["context"] = ids + done.token_ids
        return {**out, **P.metrics(done, total_ns, load_ns)}

    return await _respond(request, model, ids, opts, keep, req.stream is not False, t_start, load_ns, chunk, final)


@router.post("/api/chat")
async def chat(request: Request, req: P.ChatRequest) -> Response:
    t_start = time.perf_counter_ns()
    name = _model_name(req.model)
    state = _state(request)
    if await state.upstream_owns(name):
        return await state.upstream_ollama_proxy(request, "/api/chat")
    keep = _keep_alive(request, req.keep_alive)
    messages = req.messages or []
    _unsupported(images=any(m.images for m in messages))
    fmt = json_format(req.format)
    check_json_thinking(fmt, req.think)
    logprobs = logprobs_option(req.logprobs, req.top_logprobs)
    if not messages:
        reason = await _load_or_unload(request, name, req.keep_alive, keep, req.options)
        return JSONResponse({"model": req.model, "created_at": P.now_rfc3339(),
                             "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": reason})
    conv, tools = ollama_messages(messages), tool_list(req.tools)
    model, load_ns = await _load(request, name)
    opts = generate_options(model.engine, model.entry.settings.options(req.options))
    opts.logprobs = logprobs
    conv = model.entry.settings.chat(conv)
    opts.truncate, opts.format = req.truncate is not False, fmt
    ids = fitted_ids(model.engine, conv, opts, variables={**_think(model.engine, name, req.think),
                                                          **check_tools(model.engine, name, tools)})
    opts.split_thinking, opts.tool_calls = True, bool(tools)
    made = 0  # tool calls streamed so far (their index goes on across chunks)

    def chunk(part: ReplyDelta) -> dict[str, Any]:
        nonlocal made
        message = _chat_message(part, made)
        made += len(part.tool_calls)
        return {"model": req.model, "created_at": P.now_rfc3339(), "message": message, "done": False}

    def final(done: DoneEvent, part: ReplyDelta, total_ns: int) -> dict[str, Any]:
        return {"model": req.model, "created_at": P.now_rfc3339(), "message": _chat_message(part),
                "done": True, "done_reason": "stop" if done.done_reason == "cancelled" else done.done_reason,
                **P.metrics(done, total_ns, load_ns)}

    return await _respond(request, model, ids, opts, keep, req.stream is not False, t_start, load_ns, chunk, final)


@router.api_route("/api/delete", methods=["DELETE", "POST"])
async def delete(request: Request, req: P.DeleteRequest) -> Response:
    name = _model_name(req.model or req.name)
    state = _state(request)
    try:
        await asyncio.to_thread(state.registry.remove, name)
    except ModelNotFound:
        if await state.upstream_owns(name):  # (`ollama rm` of an upstream's model through dgemma)
            return await state.upstream_ollama_proxy(request, "/api/delete", method="DELETE")
        raise ApiError(404, f"model '{name}' not found") from None
    except RegistryError as e:
        raise ApiError(400, str(e)) from None
    state.manager.unload(normalize_name(name))
    return Response(status_code=200)


_NOT_HERE = {
    "/api/pull": "dgemma does not download models: convert a checkpoint with 'dgemma convert' and add it with 'dgemma import'",
    "/api/push": "dgemma does not push models",
    "/api/embed": "DiffusionGemma is a generative model: embeddings are not supported",
    "/api/embeddings": "DiffusionGemma is a generative model: embeddings are not supported",
}


def _elsewhere(path: str, message: str):
    """What dgemma itself does not do, for an upstream Ollama's models (`--upstream`): embeddings of its
    embedding models (Open WebUI's RAG pointed at dgemma), pulling a model into it (a name not ours), pushing;
    for ours, or without an upstream, the error says why not."""

    async def handler(request: Request) -> Response:
        state = _state(request)
        try:
            body = await request.json()
        except ValueError:
            body = None
        name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(400, "model is required")
        try:
            await asyncio.to_thread(state.registry.resolve, name)
        except ModelNotFound:
            if state.config.upstream and (path == "/api/pull" or await state.upstream_owns(name)):
                return await state.upstream_ollama_proxy(request, path)
            if path != "/api/pull":
                raise ApiError(404, f"model '{name}' not found") from None
        raise ApiError(400 if "not supported" in message else 501, message)

    return handler


for _path, _message in _NOT_HERE.items():
    router.add_api_route(_path, _elsewhere(_path, _message), methods=["POST"], include_in_schema=False)
