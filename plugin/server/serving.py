"""Serving logic shared by the Ollama and OpenAI routers: loaded models, keep-alive, and generation
bridged from the engine's worker thread to async streams.

Models load on first use and unload when their keep-alive expires, or, as Ollama does, where the GPU has too
little free memory for a model being loaded: idle ones, the soonest to expire first. Requests for one model are
queued: the engine runs one generation at a time (a queued request costs nothing while it waits), so concurrent
clients never interleave and each gets exactly what it would get alone. A client that goes away sets
its request's cancel flag; the engine checks it between denoising steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import math
import threading
import time
import weakref
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio

from ..call_format import CallFormat, call_format
from ..engine import DoneEvent, Engine, EngineError, Event, GenerateOptions, GpuMemoryError, MemoryShortageError
from ..json_schema import Node, SchemaError, compile_schema, output_schema
from ..kv_cache import DEFAULT_CACHE_RAM
from ..logprobs import MAX_TOP_LOGPROBS
from ..modelfile import MAXIMUM, MINIMUM
from ..registry import ModelEntry, Registry, read_model_info
from ..reply import ReplyDelta

DEFAULT_KEEP_ALIVE = 300.0  # seconds, Ollama's default "5m"
DEFAULT_NUM_CTX = 4096  # Ollama's default context when a request does not set num_ctx


def parse_keep_alive(value: Any, default: float = DEFAULT_KEEP_ALIVE) -> float:
    """Ollama keep_alive: seconds (number), a duration string ("5m", "1h30m", "10s"), 0 (unload now) or
    negative (forever: inf)."""
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise ValueError(f"keep_alive must be a duration, got {value!r}")
    if isinstance(value, (int, float)):
        if value != value:  # (NaN: it would never expire, nor read as now)
            raise ValueError(f"keep_alive must be a duration, got {value!r}")
        if value < 0:
            return float("inf")
        return float(value) if value < 2**53 else float("inf")  # (past any date: forever)
    text = str(value).strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        if seconds != seconds:
            raise ValueError(f"keep_alive '{value}' is not a duration (examples: 5m, 30s, 1h, 0, -1)")
        return float("inf") if seconds < 0 else seconds
    import re

    parts = re.fullmatch(r"(-)?(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?(?:(\d+(?:\.\d+)?)s)?(?:(\d+)ms)?", text)
    if not parts or not any(parts.groups()[1:]):
        raise ValueError(f"keep_alive '{value}' is not a duration (examples: 5m, 30s, 1h, 0, -1)")
    sign, h, m, s, ms = parts.groups()
    seconds = float(h or 0) * 3600 + float(m or 0) * 60 + float(s or 0) + float(ms or 0) / 1000
    return float("inf") if sign else seconds


def expiry(keep_alive: float) -> float:
    """The monotonic time a model kept alive for keep_alive seconds from now expires (inf: never)."""
    return time.monotonic() + keep_alive if keep_alive != float("inf") else float("inf")


@dataclass
class LoadedModel:
    entry: ModelEntry
    engine: Engine
    info: Any  # registry.ModelInfo
    expires_at: float = float("inf")  # monotonic seconds
    busy: int = 0  # requests holding or waiting for it
    queue: asyncio.Lock = field(default_factory=asyncio.Lock)
    # the request tasks that got it from ModelManager.get (each ends with its response): in use before busy counts
    claims: weakref.WeakSet = field(default_factory=weakref.WeakSet)
    stopping: bool = False  # asked to unload (ModelManager.stop): it goes once no request holds it, whatever they ask
    # the context (num_ctx, within the model's) of the last request that began generating or only loaded it, as
    # `ollama ps` shows the loaded runner's: Ollama loads a model again for another num_ctx, while here each
    # request's only bounds its own generation
    num_ctx: int = DEFAULT_NUM_CTX

    def asked_for(self, num_ctx: int | None) -> None:
        """A request's num_ctx (None: the model's context), as /api/ps reports it: within the model's context."""
        self.num_ctx = min(num_ctx or self.engine.cfg.context_length, self.engine.cfg.context_length)


class ModelManager:
    def __init__(self, registry: Registry, default_keep_alive: float = DEFAULT_KEEP_ALIVE, backend: str = "auto",
                 host_experts: int | str = "auto", cache_ram: int = DEFAULT_CACHE_RAM) -> None:
        self.registry, self.backend = registry, backend  # engine.BACKEND_CHOICES
        self.host_experts = host_experts  # Engine.load's: "auto" only once unloading leaves the GPU still short
        self.cache_ram = cache_ram  # each model's PromptCache.limit: host bytes for other conversations' KV caches
        self.default_keep_alive = default_keep_alive
        self.loaded: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Lock] = {}
        self._one_load = asyncio.Lock()  # one load (and its unloading for room) at a time: two would both see the room
        self._wanted: Counter[str] = Counter()  # requests in get, per model name: a load none of them wants is dropped

    async def get(self, name: str) -> LoadedModel:
        """The loaded model for `name`, loading it (in a worker thread) on first use. A load outlives a request
        that goes away meanwhile (a client that gives up, a cancelled task): the thread cannot be stopped, so the
        load goes on in its own task, keeps the model's lock until it ends, and registers the model, which then
        stays for the default keep-alive; a request for it meanwhile waits for that load rather than start another.
        A load that has not begun when every request for the model has gone (queued behind another) is dropped."""
        entry = await asyncio.to_thread(self.registry.resolve, name)  # raises ModelNotFound
        # (one load per file: a model made from another, `dgemma create`, waits for its base's and shares it)
        lock = self._loading.setdefault(str(entry.path), asyncio.Lock())
        me = asyncio.current_task()
        self._wanted[entry.name] += 1
        try:
            await lock.acquire()
            held = True
            try:
                model = self.loaded.get(entry.name)
                if model is None or not _same_file(model.entry, entry):
                    load = asyncio.ensure_future(self._load_registered(entry, me))
                    try:
                        model = await asyncio.shield(load)
                    except asyncio.CancelledError:
                        if not load.done():  # the load keeps the lock, and its error (if any) is retrieved
                            load.add_done_callback(lambda t: (lock.release(), t.cancelled() or t.exception()))
                            held = False
                        raise
                else:
                    model.entry = entry  # (the settings `dgemma create` may have changed since it loaded)
                    if me is not None:
                        model.claims.add(me)
            finally:
                if held:
                    lock.release()
        finally:
            self._wanted[entry.name] -= 1
        return model

    async def _load_registered(self, entry: ModelEntry, claimant: asyncio.Task | None) -> LoadedModel:
        """_load, then the model in self.loaded, claimed for the request that asked (in the same step: no other
        load can take it for idle in between). A model loaded under another name from the same file (made by
        `dgemma create` from it, or copied) lends its engine and queue instead: one copy of the weights, one
        generation at a time on it, as Ollama keeps one runner per model file; each name keeps its own settings
        and keep-alive, and the weights go when the last name holding them unloads."""
        twin = next((m for m in self.loaded.values() if _same_file(m.entry, entry)), None)
        if twin is not None:
            model = self.loaded[entry.name] = LoadedModel(entry, twin.engine, twin.info, queue=twin.queue)
        else:
            engine = await self._load(entry, claimant)
            info = await asyncio.to_thread(read_model_info, entry.path)
            model = self.loaded[entry.name] = LoadedModel(entry, engine, info)
        model.expires_at = expiry(self.default_keep_alive)  # reaped even if no generation ever touches it
        if claimant is not None:
            model.claims.add(claimant)
        return model

    @staticmethod
    def in_use(model: LoadedModel, me: asyncio.Task | None = None) -> bool:
        """Whether a request holds it: generating or queued (busy), or a request's task other than `me` (default:
        the current task) got it from get and has not answered yet."""
        me = me or asyncio.current_task()
        return model.busy > 0 or any(t is not me and not t.done() for t in model.claims)

    async def _load(self, entry: ModelEntry, requester: asyncio.Task | None = None) -> Engine:
        """Engine.load in a worker thread. Where the GPU (or, for the torch backend, the machine) has too little
        free memory for the model, the models there that no request holds are unloaded one at a time, the soonest
        to expire first, until it loads. With none left (also for a model larger than the whole GPU, unless even
        streaming every layer's experts would not fit it, when nothing is unloaded), host_experts "auto" then keeps
        some of its experts in host RAM (as Ollama, which unloads idle models before it splits one between the
        GPU and the CPU), and without that (host_experts 0) or past it the error is the answer. Before the idle
        models themselves go, the KV caches they keep do (all of them at once, for a short GPU those of their last
        generations, for short host RAM also the copies of other conversations')."""
        host = 0 if self.host_experts == "auto" else self.host_experts  # the GPU alone first
        async with self._one_load:
            while True:
                if not self._wanted[entry.name]:  # every request for it went away while it waited: none is begun
                    raise asyncio.CancelledError
                try:
                    engine = await asyncio.to_thread(Engine.load, entry.path, self.backend, host_experts=host)
                    if engine.notice:
                        print(f"dgemma serve: {engine.notice}", flush=True)  # (the server's log)
                    engine.prompt_cache.limit = self.cache_ram
                    return engine
                except MemoryShortageError as e:
                    # (expiry, name) pairs: a list of the models themselves would keep the unloaded one's weights alive
                    # an engine that names share (`dgemma create`) is idle only if all are, and none generates on
                    # it (also a name unloaded meanwhile: their queue is one); it expires with the last of them
                    held = {id(m.engine) for m in self.loaded.values() if self.in_use(m, requester) or m.queue.locked()}
                    last: dict[int, float] = {}
                    for key, t in [(id(m.engine), m.expires_at) for m in self.loaded.values()]:  # (no model kept)
                        last[key] = max(last.get(key, t), t)
                    idle = [(last[id(m.engine)], name) for name, m in self.loaded.items()
                            if _holds(m.engine, e.device_type) and id(m.engine) not in held]
                    streams_next = (isinstance(e, GpuMemoryError) and host == 0 and self.host_experts == "auto"
                                    and not e.streaming_hopeless)
                    short = e.device_type  # the memory that is short ("cuda" or "cpu")
                    kept: list[str] = []  # idle models keeping KV caches (kv_cache.PromptCache) in it
                    if idle and (streams_next or not e.hopeless):  # what unloading frees: room, or fewer layers streamed
                        # their kept caches first: the models stay loaded if that makes room
                        kept = [n for _, n in idle if self.loaded[n].engine.prompt_cache.holds(
                            short, self.loaded[n].engine.device.type)]
                        name = None if kept else min(idle)[1]
                    elif streams_next:
                        host, name = "auto", None  # streamed experts, beside the models requests hold
                    else:  # no unloading makes room, or none is left to unload
                        raise
                # out of the except block: the error no longer holds the failed load's frames
                for n in kept:
                    self.loaded[n].engine.prompt_cache.free(short, self.loaded[n].engine.device.type)
                if name is not None:  # with the names sharing its engine: unloading one alone frees nothing
                    engine = self.loaded[name].engine
                    for n in [n for n, m in self.loaded.items() if m.engine is engine]:
                        self.unload(n)
                    del engine
                if kept or name is not None:
                    gc.collect()  # their tensors go back to PyTorch's allocator, which the next check counts as free

    def touch(self, model: LoadedModel, keep_alive: float) -> None:
        """A request's keep_alive for the model (at its start and end): 0 unloads it now if no request holds it,
        else it expires now and the reaper takes it once they are done, unless a later request keeps it longer;
        after stop(), whatever they ask."""
        model.expires_at = expiry(0 if model.stopping else keep_alive)
        if (model.stopping or keep_alive == 0) and not self.in_use(model) and self.loaded.get(model.entry.name) is model:
            self.unload(model.entry.name)  # (not a newer copy loaded under the same name meanwhile)

    async def stop(self, name: str) -> None:
        """An empty request with keep_alive 0 (`ollama stop`): unload the model now, or once the requests holding
        it are done, whatever keep_alive they ask (as Ollama's expireRunner); nothing where it is not loaded (it
        is not loaded first, to be unloaded)."""
        entry = await asyncio.to_thread(self.registry.resolve, name)  # raises ModelNotFound
        model = self.loaded.get(entry.name)
        if model is not None:
            model.stopping = True
            self.touch(model, 0)

    def unload(self, name: str) -> bool:
        return self.loaded.pop(name, None) is not None

    def reap(self) -> None:
        now = time.monotonic()
        for name, model in list(self.loaded.items()):
            if model.expires_at <= now and not self.in_use(model):
                self.unload(name)

    async def reaper(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            self.reap()


def _same_file(a: ModelEntry, b: ModelEntry) -> bool:
    """Whether two entries are the same file (not only the same path: a path reused for another file, once its
    file went, is another model)."""
    return a.path == b.path and a.file_id == b.file_id


def _holds(engine: Engine, device_type: str) -> bool:
    """Whether unloading this engine frees memory of that kind: its device's, and host RAM ("cpu") for the
    experts a cuda model streams from there (page-locked, plugin/cuda/offload.py) and for the KV caches it keeps
    there (kv_cache.PromptCache)."""
    return (engine.device.type == device_type or (device_type == "cpu" and engine.host_bytes > 0)
            or engine.prompt_cache.holds(device_type, engine.device.type))


def generate_stream(manager: ModelManager, model: LoadedModel, prompt: Any, options: GenerateOptions,
                    keep_alive: float, **template_kwargs: Any) -> AsyncIterator[Event]:
    """Run one generation in a worker thread, one request at a time per model, yielding engine events.
    Closing the iterator early (client gone) cancels the generation at the next denoising step. Called in the
    request's task, which claimed the model (ModelManager.get); once the generation counts as busy the claim is
    dropped, so that the keep-alive at its end sees no request but others."""
    return _generate_stream(asyncio.current_task(), manager, model, prompt, options, keep_alive, **template_kwargs)


async def _generate_stream(claimant: asyncio.Task | None, manager: ModelManager, model: LoadedModel, prompt: Any,
                           options: GenerateOptions, keep_alive: float, **template_kwargs: Any) -> AsyncIterator[Event]:
    cancel = threading.Event()
    options.cancel = cancel
    model.busy += 1
    if claimant is not None:
        model.claims.discard(claimant)
    try:
        async with model.queue:
            # prompt errors (chat template, vocabulary) surface here, before any output
            iterator = model.engine.generate(prompt, options, **template_kwargs)
            model.asked_for(options.num_ctx)
            loop = asyncio.get_running_loop()
            events: asyncio.Queue[Any] = asyncio.Queue()
            sentinel = object()

            def work() -> None:
                try:
                    for event in iterator:
                        loop.call_soon_threadsafe(events.put_nowait, event)
                except BaseException as e:  # noqa: BLE001 - handed to the async side
                    loop.call_soon_threadsafe(events.put_nowait, e)
                finally:
                    loop.call_soon_threadsafe(events.put_nowait, sentinel)

            worker = threading.Thread(target=work, name="dgemma-generate", daemon=True)
            worker.start()
            try:
                while True:
                    item = await events.get()
                    if item is sentinel:
                        break
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                cancel.set()
                # shielded: a cancelled stream (the client went away) must not release the model and its queue while
                # the worker is still generating (until its next denoising step)
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(worker.join)
    finally:
        model.busy -= 1
        manager.touch(model, keep_alive)


async def collect(stream: AsyncIterator[Event]) -> tuple[ReplyDelta, DoneEvent]:
    """The whole reply (its answer, thinking and tool calls) and the final event."""
    reply, done = ReplyDelta(), None
    async for event in stream:
        if isinstance(event, DoneEvent):
            done = event
        else:
            reply.extend(event.reply)
    if done is None:
        raise EngineError("generation ended without a result")
    return reply, done


class ApiError(Exception):
    """An error answered with an HTTP status: {"error": message} on /api, OpenAI's shape on /v1."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


MIN_TEMPERATURE = 1e-3


def _number(options: dict[str, Any], key: str, kind: type) -> Any:
    """An option's number in its type, within the bounds a Modelfile's PARAMETER has (modelfile.MINIMUM/MAXIMUM)."""
    value = options.get(key)
    if value is None:
        return None
    try:
        finite = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    except OverflowError:  # (an integer past any float)
        finite = False
    if not finite:
        raise ApiError(400, f"option '{key}' must be a finite number (got {str(value)[:40]})")
    if kind is int and value != int(value):
        raise ApiError(400, f"option '{key}' must be an integer (got {value!r})")
    if key in MINIMUM and value < MINIMUM[key]:
        raise ApiError(400, f"option '{key}' must be at least {MINIMUM[key]} (got {value!r})")
    if key in MAXIMUM and value > MAXIMUM[key]:
        raise ApiError(400, f"option '{key}' must be at most {MAXIMUM[key]} (got {value!r})")
    return kind(value)


def generate_options(engine: Engine, options: dict[str, Any] | None, *, max_tokens: int | None = None,
                     temperature: float | None = None, seed: int | None = None, stop: Any = None) -> GenerateOptions:
    """Ollama `options` (and OpenAI's top-level fields) -> GenerateOptions; unknown options are ignored.

    temperature T rescales the annealed schedule: t_max becomes T and t_min keeps its ratio to t_max.
    num_batch: prompt tokens per encoder pass (Engine's default when absent). A prompt too long for num_ctx is
    fitted into it (truncate, as Ollama's requests are unless they say `truncate: false`; num_keep: plugin/fit.py).
    Diffusion options: diffusion_steps, entropy_bound, t_min, t_max. num_predict < 0 (Ollama's default,
    "infinite") runs until an end-of-generation token or the context (num_ctx, default 4096) is full."""
    o = dict(options or {})
    s = engine.cfg.sampler
    out = GenerateOptions()
    out.num_ctx = _number(o, "num_ctx", int) or DEFAULT_NUM_CTX
    out.num_batch = _number(o, "num_batch", int)
    out.truncate = True
    num_keep = _number(o, "num_keep", int)
    out.num_keep = out.num_keep if num_keep is None or num_keep < 0 else num_keep  # (Ollama's -1: all: as absent)
    num_predict = max_tokens if max_tokens is not None else _number(o, "num_predict", int)
    out.max_tokens = out.num_ctx if num_predict is None or num_predict < 0 else num_predict
    seed = _number({"seed": seed}, "seed", int) if seed is not None else _number(o, "seed", int)  # (OpenAI's too)
    out.seed = seed if seed is not None and seed >= 0 else None
    temp = _number({"temperature": temperature}, "temperature", float) if temperature is not None else \
        _number(o, "temperature", float)
    if temp is not None:
        t = max(temp, MIN_TEMPERATURE)
        out.t_max, out.t_min = t, s.t_min * t / s.t_max
    for key, attr, kind in (("t_min", "t_min", float), ("t_max", "t_max", float),
                            ("diffusion_steps", "steps", int), ("entropy_bound", "entropy_bound", float)):
        value = _number(o, key, kind)
        if value is not None:
            setattr(out, attr, value)
    if out.steps is not None and out.steps < 1:
        raise ApiError(400, f"option 'diffusion_steps' must be at least 1 (got {out.steps})")
    stop = stop if stop is not None else o.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(x, str) for x in stop)):
        raise ApiError(400, f"option 'stop' must be a string or a list of strings (got {stop!r})")
    out.stop = list(stop or [])
    return out


def logprobs_option(logprobs: bool | None, top: int | None, *, strict: bool = False) -> int | None:
    """A request's `logprobs` and `top_logprobs` as GenerateOptions.logprobs: None without logprobs, else the
    number of alternatives per token (0 where top_logprobs is absent), at most MAX_TOP_LOGPROBS. top_logprobs
    without logprobs is ignored (Ollama's API), or (strict: OpenAI's) a 400, as OpenAI answers it."""
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS} (got {top})")
    if not logprobs:
        if strict and top is not None:
            raise ApiError(400, "top_logprobs needs logprobs set to true")
        return None
    return top or 0


def json_format(value: Any, openai: str | None = None) -> Node | None:
    """A request's ask for structured output as GenerateOptions.format (plugin/json_format.py: the schema the reply
    follows, compiled; None: free text). Ollama's `format`: "json" (any object) or a JSON schema; or (openai: the
    field's name, for its errors) an OpenAI response format: type "json_object", "json_schema" (its schema under
    json_schema.schema; text.format's flat: under schema; none given: any JSON value), or "text" / none. A schema
    that cannot be followed is a 400 naming where in it."""
    try:
        if openai:
            kind = value.get("type") if isinstance(value, dict) else value
            if kind in (None, "text"):
                return None
            if kind == "json_object":
                return output_schema("json")
            if kind == "json_schema":
                inner = value.get("json_schema", value) if openai == "response_format" else value
                if not isinstance(inner, dict):
                    raise ApiError(400, f"{openai}.json_schema: expected an object", code="invalid_request")
                return compile_schema(inner.get("schema", True), f"{openai}.schema")
            raise ApiError(400, f"{openai}.type {str(kind)[:40]!r} is not supported (have: text, json_object, "
                           "json_schema)", code="invalid_request")
        if value is None or value == "":
            return None
        if value == "json" or isinstance(value, dict):
            return output_schema(value)
        raise ApiError(400, f'invalid format: expected "json" or a JSON schema (got {json.dumps(value)[:40]})')
    except SchemaError as e:
        raise ApiError(400, str(e), code="invalid_request" if openai else None) from None


def forced_call(tools: list[dict[str, Any]] | None, choice: Any, parallel: bool | None = None) -> CallFormat | None:
    """OpenAI's tool_choice over the request's checked tools as GenerateOptions.format (plugin/call_format.py: a
    forced call, "required" or a named function; None: the model calls a tool or not); a 400 naming the field."""
    try:
        return call_format(tools or [], choice, parallel)
    except SchemaError as e:
        raise ApiError(400, str(e), code="invalid_request") from None


def check_json_thinking(fmt: Node | CallFormat | None, thinking: Any) -> None:
    """JSON mode or a forced tool call with thinking asked for (a truthy think, enable_thinking): a 400, before the
    model loads."""
    if fmt and thinking:
        what = "a forced tool call (tool_choice)" if isinstance(fmt, CallFormat) else "JSON mode"
        raise ApiError(400, f"{what} leaves out the thought channel: ask for it without thinking (think false)")


def fitted_ids(engine: Engine, prompt: Any, options: GenerateOptions, *, raw: bool = False,
               variables: dict[str, Any] | None = None) -> list[int]:
    """prompt_ids, fitted into num_ctx where options.truncate (Engine.fitted_ids: a conversation's oldest messages
    left out but its system messages and its last, as Ollama's chatPrompt; then, where the rest is still too long,
    cut as Ollama's runner cuts it), saying so in the server's log as Ollama does."""
    with _prompt_errors():
        f = engine.fitted_ids(prompt, options, raw, variables)
    if f.dropped:
        print(f"dgemma serve: left out the {f.dropped} oldest message(s) to fit num_ctx {engine.context(options)}",
              flush=True)
    if f.cut:
        print(f"dgemma serve: truncating input prompt: limit={engine.prompt_budget(options)} prompt="
              f"{len(f.ids) + f.cut} keep={options.num_keep} new={len(f.ids)} (num_ctx {engine.context(options)}, "
              "less the reply's room)", flush=True)
    return f.ids


def prompt_ids(engine: Engine, prompt: Any, *, raw: bool = False, variables: dict[str, Any] | None = None,
               **template_kwargs: Any) -> list[int]:
    """Tokenize (through the chat template unless raw) before any response is sent, so that a bad
    prompt is a 400 and not a broken stream."""
    with _prompt_errors():
        return engine.prompt_ids(prompt, raw, {**(variables or {}), **template_kwargs})


@contextlib.contextmanager
def _prompt_errors() -> Iterator[None]:
    """A prompt the engine or the chat template refuses, as a 400 with its one line."""
    from ..chat import ChatTemplateError

    try:
        yield
    except (EngineError, ChatTemplateError) as e:
        raise ApiError(400, str(e)) from None


def check_request(engine: Engine, ids: list[int], options: GenerateOptions) -> None:
    try:
        engine.settings(ids, options)
    except EngineError as e:
        raise ApiError(400, str(e)) from None
