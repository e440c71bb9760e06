"""The FastAPI app: state, error handlers, API-key check, upstream merging, and `serve()`."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import ipaddress
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..chat import TemplateFeatures, template_features
from ..inspect import open_gguf
from ..kv_cache import DEFAULT_CACHE_RAM
from ..registry import NOPRUNE_ENV, ModelEntry, ModelInfo, ModelNotFound, Registry, read_model_info
from ..tokenizer import Tokenizer
from . import DEFAULT_HOST, DEFAULT_PORT, create, ollama, openai, responses
from . import protocol as P
from .serving import DEFAULT_KEEP_ALIVE, ApiError, ModelManager

T = TypeVar("T")
UPSTREAM_LIST_TTL = 5.0  # seconds a fetched upstream model list is reused
# sent with every request to an upstream: a request that comes back with it (an upstream that is this server, or
# leads back to it) finds no upstream models, instead of going round without end
HOP_HEADER = "X-Dgemma-Upstream"
_from_upstream: contextvars.ContextVar[bool] = contextvars.ContextVar("dgemma_from_upstream", default=False)


@dataclass
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    models: Path | None = None
    api_key: str | None = None
    insecure: bool = False
    upstream: str | None = None  # an Ollama server whose models are merged in
    upstream_openai: str | None = None  # an OpenAI-compatible server whose models are merged in
    upstream_openai_key: str | None = None
    keep_alive: float = DEFAULT_KEEP_ALIVE
    backend: str = "auto"  # engine.BACKEND_CHOICES: auto is the cuda backend where it can run, else torch (CPU)
    host_experts: int | str = "auto"  # cuda backend: Engine.load's, for a model the GPU cannot hold (ModelManager)
    cache_ram: int = DEFAULT_CACHE_RAM  # host bytes per model for the KV caches of conversations put aside


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class TemplateInfo:
    stops: list[str]  # the end-of-generation tokens, /api/show's stop parameters
    template: str  # the Jinja chat template
    features: TemplateFeatures  # tools, thinking


@dataclass
class AppState:
    config: ServerConfig
    registry: Registry
    manager: ModelManager
    http: httpx.AsyncClient | None = None
    _info: dict[tuple[Path, int, float], ModelInfo] = field(default_factory=dict)
    _templates: dict[tuple[Path, int, float], TemplateInfo] = field(default_factory=dict)
    _upstream_lists: dict[str, tuple[float, list[dict[str, Any]]]] = field(default_factory=dict)

    def info(self, entry: ModelEntry) -> ModelInfo:
        key = (entry.path, entry.size, entry.modified_at.timestamp())
        if key not in self._info:
            self._info[key] = read_model_info(entry.path)
        return self._info[key]

    def template_info(self, entry: ModelEntry) -> TemplateInfo:
        """What /api/show gives of a model's tokenizer, read once per file (a 262k vocabulary takes a second or
        two to build, and frontends ask for /api/show often: the LM Studio plugin before every generation)."""
        key = (entry.path, entry.size, entry.modified_at.timestamp())
        if key not in self._templates:
            tok = Tokenizer.from_gguf(open_gguf(entry.path), entry.path)
            self._templates[key] = TemplateInfo([tok.tokens[i] for i in sorted(tok.eog_ids)], tok.chat_template or "",
                                                template_features(tok))
        return self._templates[key]

    async def until_disconnected(self, request: Request, work: Awaitable[T]) -> T:
        """Await `work`, cancelling it (and so the generation) if the client goes away first."""
        task = asyncio.ensure_future(work)
        while not task.done():
            done, _ = await asyncio.wait({task}, timeout=0.1)
            if not done and await request.is_disconnected():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                raise ApiError(499, "request canceled")
        return task.result()

    # ---- upstreams ------------------------------------------------------------------------------
    async def _cached_list(self, key: str, fetch) -> list[dict[str, Any]]:
        if _from_upstream.get():  # (asked by ourselves through an upstream: none, or the lists never end)
            return []
        now = time.monotonic()
        hit = self._upstream_lists.get(key)
        if hit and now - hit[0] < UPSTREAM_LIST_TTL:
            return hit[1]
        try:
            items = await fetch()
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            items = []  # an unreachable upstream hides its models; it never breaks ours
        self._upstream_lists[key] = (now, items)
        return items

    def _local_names(self) -> set[str]:
        entries = self.registry.list()
        return {P.display_name(e.name) for e in entries} | {e.name for e in entries}

    async def upstream_ollama_models(self) -> list[dict[str, Any]]:
        if not self.config.upstream or self.http is None:
            return []

        async def fetch():
            r = await self.http.get(f"{self.config.upstream.rstrip('/')}/api/tags", headers={HOP_HEADER: "1"})
            r.raise_for_status()
            return list(r.json().get("models") or [])

        local = await asyncio.to_thread(self._local_names)
        return [m for m in await self._cached_list("ollama", fetch) if m.get("name") not in local]

    async def upstream_openai_models(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        local = await asyncio.to_thread(self._local_names)
        if self.config.upstream_openai and self.http is not None:
            async def fetch():
                r = await self.http.get(f"{self.config.upstream_openai.rstrip('/')}/models",
                                        headers={**self._openai_auth(), HOP_HEADER: "1"})
                r.raise_for_status()
                return list(r.json().get("data") or [])

            items += await self._cached_list("openai", fetch)
        # an Ollama upstream serves /v1 too: its models appear here as well
        items += [{"id": m["name"], "object": "model", "created": 0, "owned_by": "ollama"}
                  for m in await self.upstream_ollama_models()]
        seen: set[str] = set()
        return [m for m in items if m.get("id") not in local and not (m.get("id") in seen or seen.add(m.get("id")))]

    def _openai_auth(self) -> dict[str, str]:
        key = self.config.upstream_openai_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def upstream_owns(self, name: str, openai: bool = False) -> bool:
        """True when `name` is not ours and an upstream lists it."""
        if not (self.config.upstream or self.config.upstream_openai):
            return False
        try:
            await asyncio.to_thread(self.registry.resolve, name)
            return False
        except ModelNotFound:
            pass
        names = {m.get("name") for m in await self.upstream_ollama_models()}
        if openai:
            names |= {m.get("id") for m in await self.upstream_openai_models()}
        return name in names or P.display_name(name) in names

    async def upstream_ollama_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = await self.http.post(f"{self.config.upstream.rstrip('/')}{path}", json=body)
        if r.status_code >= 400:
            raise ApiError(r.status_code, _error_text(r))
        return r.json()

    async def _proxy(self, request: Request, url: str, headers: dict[str, str], method: str = "POST") -> Response:
        if _from_upstream.get():  # (this server again, through its upstream)
            raise ApiError(508, "the upstream leads back to this server (--upstream names dgemma itself)")
        body = await request.body()
        req = self.http.build_request(method, url, content=body, timeout=None,
                                      headers={"Content-Type": "application/json", **headers, HOP_HEADER: "1"})
        try:
            upstream = await self.http.send(req, stream=True)
        except httpx.HTTPError as e:
            origin = httpx.URL(url).copy_with(path="/", query=None)
            raise ApiError(502, f"upstream {str(origin).rstrip('/')} did not answer ({type(e).__name__}: {e})") from None

        async def relay() -> AsyncIterator[bytes]:
            try:  # (decoded: a gzip-ing upstream's bytes go out as the plain JSON their media type says)
                async for piece in upstream.aiter_bytes():
                    yield piece
            except httpx.HTTPError:
                pass  # (the upstream went away mid-stream: the client sees the stream end)
            finally:
                await upstream.aclose()

        media = upstream.headers.get("content-type", "application/json")
        return StreamingResponse(relay(), status_code=upstream.status_code, media_type=media)

    async def upstream_ollama_proxy(self, request: Request, path: str, method: str = "POST") -> Response:
        return await self._proxy(request, f"{self.config.upstream.rstrip('/')}{path}", {}, method)

    async def upstream_openai_proxy(self, request: Request, path: str, model: str) -> Response:
        """To the upstream that lists the model (upstream_owns said one does): the OpenAI one where it lists it
        (its id with or without `:latest`), else the Ollama one's /v1."""
        if self.config.upstream_openai:
            _, listed = self._upstream_lists.get("openai", (0.0, []))  # refreshed by upstream_owns just before
            ids = {m.get("id") for m in listed}
            if model in ids or P.display_name(model) in ids or not self.config.upstream:
                return await self._proxy(request, f"{self.config.upstream_openai.rstrip('/')}{path}", self._openai_auth())
        return await self._proxy(request, f"{self.config.upstream.rstrip('/')}/v1{path}", {})


MAX_JSON_INT = 2**64  # (no field takes more; Ollama's Go decoder refuses more than its int64/uint64 hold)


class _JsonGuard:
    """Request bodies that are JSON no JSON parser but Python's would take, answered with one 400 before any
    route reads them: NaN / Infinity (and numbers that overflow to it), integers past 2**64, lone UTF-16
    surrogates ("\\ud800": no UTF-8 text holds one, so they could not be tokenized, stored or sent back) and
    nesting too deep to read. Uploads (/api/blobs) pass untouched."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "DELETE") or \
                scope["path"].startswith("/api/blobs"):
            await self.app(scope, receive, send)
            return
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        problem = _json_problem(body)
        if problem is not None:
            openai = scope["path"].startswith("/v1")
            content = P.openai_error(problem, 400) if openai else {"error": problem}
            await JSONResponse(content, status_code=400)(scope, receive, send)
            return
        sent = False

        async def replay() -> dict[str, Any]:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # (the disconnect, when it comes)

        await self.app(scope, replay, send)


def _json_problem(body: bytes) -> str | None:
    """What makes a body unfit (None: fine, or not JSON at all, which the routes answer themselves)."""
    def constant(name: str) -> None:
        raise _Unfit(f"invalid JSON: {name} is not a finite number (JSON has no NaN or Infinity)")

    def number(text: str) -> float:
        value = float(text)
        if not math.isfinite(value):
            raise _Unfit(f"invalid JSON: {text} is not a finite number")
        return value

    def integer(text: str) -> int:
        if len(text.lstrip("-")) > 20 or abs(int(text)) >= MAX_JSON_INT:
            raise _Unfit(f"invalid JSON: {text[:30]} is too large a number")
        return int(text)

    try:
        value = json.loads(body, parse_constant=constant, parse_float=number, parse_int=integer)
    except _Unfit as e:
        return str(e)
    except RecursionError:
        return "invalid JSON: nested too deeply"
    except ValueError:
        return None
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return "invalid JSON: a string holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is no text"
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


class _Unfit(ValueError):
    pass


class _HopMark:
    """Marks a request that came through an upstream from a dgemma server (HOP_HEADER) for its handlers."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        hop = scope["type"] == "http" and any(k == HOP_HEADER.lower().encode() for k, _ in scope.get("headers", ()))
        token = _from_upstream.set(hop)
        try:
            await self.app(scope, receive, send)
        finally:
            _from_upstream.reset(token)


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
        err = body.get("error")
        return err.get("message", str(err)) if isinstance(err, dict) else str(err or r.text)
    except ValueError:
        return r.text


def create_app(config: ServerConfig | None = None) -> FastAPI:
    config = config or ServerConfig()
    registry = Registry(config.models, paths=False)
    state = AppState(config, registry, ModelManager(registry, config.keep_alive, config.backend, config.host_experts,
                                                      config.cache_ram))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        gone = await asyncio.to_thread(registry.prune)
        if gone:
            print(f"dgemma serve: removed {len(gone)} leftover upload(s) and temporary file(s) from {registry.root} "
                  f"(set {NOPRUNE_ENV}=1 to keep them)", flush=True)
        state.http = httpx.AsyncClient(timeout=httpx.Timeout(30.0, read=None))
        reaper = asyncio.create_task(state.manager.reaper())
        try:
            yield
        finally:
            reaper.cancel()
            await state.http.aclose()

    app = FastAPI(title="dgemma", description="DiffusionGemma behind the Ollama and OpenAI APIs", lifespan=lifespan)
    app.state.dgemma = state

    def is_openai(request: Request) -> bool:
        return request.url.path.startswith("/v1")

    def error(request: Request, status: int, message: str, code: str | None = None) -> JSONResponse:
        body = P.openai_error(message, status, code) if is_openai(request) else {"error": message}
        return JSONResponse(body, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(request, exc.status, exc.message, exc.code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        if first.get("type") == "missing" and not where:
            return error(request, 400, "missing request body")
        return error(request, 400, f"invalid request: {where or 'body'}: {first.get('msg', 'invalid')}")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(request, exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        return error(request, 500, f"internal error: {type(exc).__name__}: {exc}")

    app.add_middleware(_HopMark)
    app.add_middleware(_JsonGuard)
    if config.api_key:
        @app.middleware("http")
        async def check_key(request: Request, call_next):
            if request.url.path not in ("/", "/api/version") and \
                    request.headers.get("authorization") != f"Bearer {config.api_key}":
                return error(request, 401, "missing or wrong API key (send 'Authorization: Bearer KEY')")
            return await call_next(request)

    app.include_router(ollama.router)
    app.include_router(create.router)
    app.include_router(openai.router)
    app.include_router(responses.router)
    return app


def serve(config: ServerConfig) -> None:
    import uvicorn

    if not is_loopback(config.host) and not (config.api_key or config.insecure):
        raise ApiError(400, f"refusing to listen on {config.host} without --api-key (or --insecure): "
                            "anyone on the network could use this machine")
    from ..engine import EngineError, pick_backend

    try:  # an unknown name, or --backend cuda without what it needs, fails here, before listening
        backend = pick_backend(config.backend)
    except EngineError as e:
        raise ApiError(400, str(e)) from None
    if backend != "cuda" and config.host_experts not in ("auto", 0):
        raise ApiError(400, f"--host-experts {config.host_experts} applies to the cuda backend only (models run on the "
                            f"{backend} backend)")
    if backend == "cuda":
        import torch

        from ..cuda import check_cuda

        cap = check_cuda()  # known to pass (cached)
        where = f"cuda backend on {torch.cuda.get_device_name()} (compute capability {cap[0]}.{cap[1]})"
    else:
        where = "torch backend on the CPU (no usable NVIDIA GPU and CuPy)" if config.backend == "auto" else "torch backend on the CPU"
    print(f"dgemma serve: models run on the {where}", flush=True)
    uvicorn.run(create_app(config), host=config.host, port=config.port, log_level="info")
