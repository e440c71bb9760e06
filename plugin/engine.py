"""The engine: load a DiffusionGemma GGUF, generate text canvas by canvas, report what happened.

    engine = Engine.load("model.gguf")                      # backend="torch", device="cpu"
    for event in engine.generate("Why is the sky blue?", GenerateOptions(seed=1)):
        if isinstance(event, TextEvent): print(event.text, end="")
        else: print(event.done_reason, event.eval_count)

A prompt string is wrapped in the model's chat template as a single user turn (as `ollama run` does)
unless `raw=True`; a list of messages always goes through the template; `prompt_ids` feeds tokens as-is.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dgemma.quant.planner import KV_SPARE, GiB

from .chat import continues_final, render_chat
from .config import ModelConfig, SamplerDefaults
from .cuda.tune import CHOICES as MATMULS
from .fast_decode import FastDecoder
from .inspect import open_gguf
from .fit import DEFAULT_NUM_KEEP, Fitted, fit_messages, fit_tokens, reply_room
from .call_format import CallFormat
from .json_format import JsonPrefix, read_canvas
from .json_schema import Node, SchemaError, output_schema
from .kv_cache import KVCache, PromptCache
from .logprobs import MAX_TOP_LOGPROBS, TokenLogprob, token_logprobs
from .model import DiffusionGemma
from .reply import ReplyDelta, ReplyParser, TextAssembler, ToolCall
from .sampler import CounterSteps, Denoised, Steps, StepInfo, TorchSteps, denoise_canvas, logits_stats
from .tokenizer import Tokenizer
from .weights import load_weights, ram_shortage

DEFAULT_MAX_TOKENS = 1024
# finished canvases the KV cache's global-layer buffers are made with room for (KVCache.until): they are made
# again every KV_LOOKAHEAD canvases instead of for every one, and never hold more than that many unused
# (a server request's max_tokens is its whole num_ctx: presizing for all of it would take VRAM up front)
KV_LOOKAHEAD = 4
DEFAULT_NUM_BATCH = 512  # prompt tokens per encoder pass (Ollama's num_batch and its default)
BACKENDS = ("torch", "cuda")
BACKEND_CHOICES = ("auto", *BACKENDS)  # auto: cuda where it can run, else torch (pick_backend)
RNGS = ("torch", "counter")  # the sampler's draws (plugin/sampler.py): a torch.Generator, or counter-based
KV_DTYPES = {"f32": torch.float32, "f16": torch.float16}  # what the KV cache stores (kv_cache.KVCache)


class EngineError(ValueError):
    """A one-line, user-facing error from loading or generating."""


class MemoryShortageError(EngineError):
    """Too little free memory for a model where `device_type` says ("cuda", "cpu"): a server can unload idle models
    there and try again. `need` and `total` (the model's bytes and the memory's in all) where known: need > total,
    and no unloading makes room."""

    device_type = ""

    def __init__(self, message: str, need: int | None = None, total: int | None = None) -> None:
        super().__init__(message)
        self.need, self.total = need, total

    @property
    def hopeless(self) -> bool:
        return self.need is not None and self.total is not None and self.need > self.total


class GpuMemoryError(MemoryShortageError):
    """The GPU's: found before loading (need and total, and `least`: the need with every layer's experts
    streamed from host RAM, plugin/cuda/offload.py), or CUDA ran out during the load (none known)."""

    device_type = "cuda"

    def __init__(self, message: str, need: int | None = None, total: int | None = None,
                 least: int | None = None) -> None:
        super().__init__(message, need, total)
        self.least = least

    @property
    def streaming_hopeless(self) -> bool:
        """Too large for the whole GPU even with every layer's experts streamed."""
        return self.least is not None and self.total is not None and self.least > self.total


class RamShortageError(MemoryShortageError):
    """The machine's, for the torch backend's float32 weights, found before loading them."""

    device_type = "cpu"


def host_experts_choice(value: int | str | None) -> int | str:
    """Engine.load's host_experts (and --host-experts) as vram_plan takes it: "auto" (None too) or a count of
    layers >= 0; anything else is an EngineError."""
    if value is None or value == "auto":
        return "auto"
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or isinstance(value, bool | float):
        raise EngineError(f"host_experts {value!r} is not understood (have: auto, or a number of layers)")
    return n


def _check_choices(**choices: tuple[str, Any]) -> None:
    """name=(value, allowed): an EngineError naming the first value not allowed."""
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise EngineError(f"{name} '{value}' is not available (have: {', '.join(allowed)})")


def pick_backend(choice: str) -> str:
    """"auto" -> "cuda" where the cuda backend can run (CuPy and an NVIDIA GPU of compute capability 7.5 or
    newer: plugin/cuda/loader.check_cuda), else "torch"; "torch" as given; "cuda" where it can run, else an
    EngineError saying what is missing."""
    _check_choices(backend=(choice, BACKEND_CHOICES))
    if choice == "torch":
        return choice
    from .cuda import CudaUnavailable, check_cuda

    try:
        check_cuda()
    except CudaUnavailable as e:
        if choice == "cuda":
            raise EngineError(str(e)) from None
        return "torch"
    return "cuda"


@dataclass
class GenerateOptions:
    max_tokens: int | None = None  # None: DEFAULT_MAX_TOKENS; generation stops at an end-of-generation token
    num_ctx: int | None = None  # context limit for prompt + output (None: the model's context length)
    seed: int | None = None  # None: a random seed (reported in the final event)
    steps: int | None = None  # max denoising steps per canvas (diffusion.eb_max_steps)
    t_min: float | None = None
    t_max: float | None = None
    entropy_bound: float | None = None
    stop: list[str] = field(default_factory=list)
    num_batch: int | None = None  # prompt tokens per encoder pass (None: DEFAULT_NUM_BATCH)
    raw: bool = False  # a string prompt is used as-is (BOS prepended) instead of a chat turn
    eos_ids: set[int] | None = None  # None: the model's end-of-generation tokens
    cancel: threading.Event | Callable[[], bool] | None = None  # checked between denoising steps
    on_step: Callable[[StepInfo], None] | None = None
    # start from the KV cache a kept conversation left where this prompt begins with its tokens (kv_cache.PromptCache;
    # llama.cpp's cache_prompt); False: encode the whole prompt, and keep nothing of it for the next (the live cache
    # is dropped; the copies put aside stay)
    cache_prompt: bool = True
    # the reply's parts (plugin/reply.py): the thought channel into TextEvent.thinking; tool calls read into
    # TextEvent.tool_calls. Off: every special token is left out of the text (a raw prompt's completion)
    split_thinking: bool = False
    tool_calls: bool = False
    # the generated tokens' logprobs (plugin/logprobs.py), each with this many most likely alternatives (0: none);
    # None: no logprobs
    logprobs: int | None = None
    # a prompt that leaves the reply less than fit.reply_room is cut to fit (plugin/fit.py, as Ollama's runner cuts
    # one): its first num_keep tokens after BOS and its last; False: such a prompt is generated for as it is, and
    # one that leaves no room at all is an EngineError
    truncate: bool = False
    num_keep: int = DEFAULT_NUM_KEEP
    # "json" (any object: JSON mode), a JSON schema (dict) or one compiled (json_schema.Node): each canvas read out
    # as the next part of one JSON value the schema takes (plugin/json_format.py); a call_format.CallFormat: the
    # reply is tool calls (the prompt ends with the call's opening); None: as denoised
    format: Any = None

    def cancelled(self) -> bool:
        if self.cancel is None:
            return False
        return self.cancel.is_set() if isinstance(self.cancel, threading.Event) else bool(self.cancel())


@dataclass
class TextEvent:
    text: str  # new answer text from the canvas just finished
    token_ids: list[int]  # the canvas's tokens that count (cut at EOG / max_tokens)
    canvas: int  # 0-based canvas index
    steps: int
    thinking: str = ""  # new thought-channel text (GenerateOptions.split_thinking)
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls the canvas finished (GenerateOptions.tool_calls)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # token_ids' (GenerateOptions.logprobs)

    @property
    def reply(self) -> ReplyDelta:
        """The canvas's new parts: answer, thinking, tool calls."""
        return ReplyDelta(self.text, self.thinking, self.tool_calls)


@dataclass
class DoneEvent:
    done_reason: str  # "stop" (EOG or stop string), "length" (max_tokens) or "cancelled"
    prompt_eval_count: int  # the prompt's tokens, those taken from the kept KV cache included (as Ollama counts)
    eval_count: int  # generated tokens reported
    token_ids: list[int]
    canvases: list[list[int]]  # every whole canvas, as denoised (before cutting)
    steps_per_canvas: list[int]
    tokens_per_forward: float
    seed: int
    total_duration: int  # nanoseconds
    load_duration: int
    prompt_eval_duration: int
    eval_duration: int
    prompt_cached_count: int = 0  # the prompt's first tokens, whose keys and values the last generation left
    logprobs: list[TokenLogprob] | None = None  # token_ids' (GenerateOptions.logprobs; None: not asked for)


Event = TextEvent | DoneEvent


class Engine:
    def __init__(self, path: Path, cfg: ModelConfig, tokenizer: Tokenizer, model: DiffusionGemma, load_ns: int,
                 device: torch.device | None = None, rng: str = "torch", kv_cache: str = "f32",
                 graphs: bool = False) -> None:
        _check_choices(rng=(rng, RNGS), kv_cache=(kv_cache, KV_DTYPES))
        self.kv_cache = kv_cache
        self.path, self.cfg, self.tokenizer, self.model, self.load_duration = path, cfg, tokenizer, model, load_ns
        self.device, self.rng = device or torch.device("cpu"), rng
        # small float32 models on the CPU: the same decoder step in fewer torch calls (plugin/fast_decode.py)
        self.decode_step = FastDecoder(model).decode if FastDecoder.supports(model) else model.decode
        self._lock = threading.Lock()  # one generation at a time per engine
        self.matmul: dict[str, str] = {}  # cuda backend: {weight shape class: matmul kernel} (plugin/cuda/tune.py)
        self.backend = "torch"  # set by load: the backend that runs the model ("cuda" or "torch")
        self.graphs = graphs  # replay the decoder pass from a CUDA graph (plugin/cuda/graph.py; rng counter only)
        self.graphed = None  # the last generation's GraphedDecoder (its captures, replays, fallback)
        self._graph_stream = None  # where every generation's decoder warms up and captures
        self.host_layers: list[int] = []  # cuda backend: layers whose experts stream from host RAM (cuda/offload.py)
        self.prompt_cache = PromptCache()  # the last generation's KV cache (and copies of earlier conversations'),
        # for a prompt that starts the same

    @classmethod
    def load(cls, path: str | Path, backend: str = "torch", device: str | None = None, rng: str | None = None,
             kv_cache: str | None = None, matmul: str | None = None, graphs: bool | None = None,
             host_experts: int | str | None = None) -> "Engine":
        """backend "torch": the reference (float32 weights, CPU or a CUDA device; a machine with too little memory
        available for them is a RamShortageError before loading, plugin/weights.py ram_shortage); "cuda": weights stay
        quantized in VRAM and csrc kernels multiply them (needs CuPy and an NVIDIA GPU); "auto": cuda where
        it can run (pick_backend), else torch on the CPU (also, with a warning, when the GPU side fails
        while loading: a kernel that does not compile; but a GPU with too little free memory for the model is a
        GpuMemoryError, mostly found before anything is loaded (plugin/cuda/weights.py vram_plan), not a
        fallback: the torch backend would hold the weights in RAM as float32, several times the file's size). rng: the sampler's
        draws, "torch" (transformers' order, the torch backend's default) or "counter" (the cuda backend's, which samples
        on the GPU; the torch backend with "counter" draws the same tokens). kv_cache: "f32"
        (the torch backend's default, transformers' numbers) or "f16" (the cuda backend's: half the VRAM).
        matmul (cuda backend): the quantized matmul kernel, "auto" (the default: per weight shape, the fastest
        on this GPU, timed once and cached; plugin/cuda/tune.py), "scalar" (float FMAs: the torch backend's
        numbers up to float rounding), "f16" or "int8" (tensor cores, compute capability 7.5; "f16-wide" and
        "int8-wide": the same in tiles 128 columns wide instead of 32; "f16-cublas": dense weights decoded to
        f16 once per product and multiplied by cuBLAS, the experts as with "f16"). graphs (cuda
        backend, default True): with rng "counter", each canvas's decoder pass is captured once into a CUDA
        graph and replayed (plugin/cuda/graph.py); False launches its kernels one by one. host_experts (cuda
        backend): "auto" (the default: where the GPU's free memory is short of the model, the experts of as few
        layers as make up for it stay in host RAM and are copied to the GPU as each pass reaches them,
        plugin/cuda/offload.py; without graphs), a number of layers to do that for, or 0: never (too little
        memory is then a GpuMemoryError)."""
        if backend == "auto" and pick_backend("auto") == "cuda":
            try:
                return cls.load(path, "cuda", device, rng, kv_cache, matmul, graphs, host_experts)
            except EngineError:
                raise  # the file, the model or an option: the torch backend would say the same
            except Exception as e:  # noqa: BLE001 - the GPU side (NVRTC, a kernel, CUDA): auto falls back
                first = str(e).splitlines()[0] if str(e) else type(e).__name__
                warnings.warn(f"the cuda backend could not load {path} ({first}); using the torch backend on the CPU",
                              RuntimeWarning, stacklevel=2)
            try:
                return cls.load(path, "torch", None, rng, kv_cache)
            except RamShortageError as e:  # the fallback cannot hold the model either: say why not the cuda backend
                reader = open_gguf(path)
                raise RamShortageError(ram_shortage(reader, ModelConfig.from_gguf(reader, path), path, cuda_error=first)
                                       or str(e)) from None
        backend = pick_backend(backend)
        # graphs=False and host_experts=0 are what the others do
        for name, value in (("matmul", matmul), ("graphs", graphs or None), ("host_experts", host_experts or None)):
            if value is not None and backend != "cuda":
                raise EngineError(f"{name}={value!r} applies to the cuda backend only (backend is '{backend}')")
        if backend == "cuda":
            matmul = matmul or "auto"
            _check_choices(matmul=(matmul, MATMULS))
            host_experts = host_experts_choice(host_experts)
        rng = rng or ("counter" if backend == "cuda" else "torch")
        kv_cache = kv_cache or ("f16" if backend == "cuda" else "f32")
        _check_choices(rng=(rng, RNGS), kv_cache=(kv_cache, KV_DTYPES))
        device = device or ("cuda" if backend == "cuda" else "cpu")
        if backend == "torch" and device.startswith("cuda") and not torch.cuda.is_available():
            raise EngineError("no CUDA GPU is visible to PyTorch (use device='cpu')")
        if backend == "cuda" and device.startswith("cuda:") and torch.device(device).index != torch.cuda.current_device():
            # (its kernels launch on the current GPU's stream)
            raise EngineError(f"device={device!r}: the cuda backend runs on the current GPU "
                              f"(cuda:{torch.cuda.current_device()}); for another, set CUDA_VISIBLE_DEVICES "
                              "(CUDA_VISIBLE_DEVICES=1 dgemma serve: the second GPU)")
        t0 = time.perf_counter_ns()
        path, plan, out_of_memory, host_layers = Path(path), {}, False, []
        try:
            reader = open_gguf(path)
            cfg = ModelConfig.from_gguf(reader, path)
            tokenizer = Tokenizer.from_gguf(reader, path)
            if backend == "cuda":
                from .cuda.tune import choose
                from .cuda.offload import host_ram_shortage
                from .cuda.weights import load_cuda_weights, vram_plan

                if isinstance(host_experts, int) and host_experts > cfg.n_layer:
                    raise EngineError(f"host_experts={host_experts}: {path} has {cfg.n_layer} layers")
                # say so before loading, not CUDA halfway
                host_layers, shortage = vram_plan(reader, cfg, path, host_experts, device,
                                                  KV_DTYPES[kv_cache].itemsize)
                if shortage:
                    raise GpuMemoryError(*shortage)
                shortage = host_ram_shortage(reader, cfg, path, host_layers)
                if shortage:
                    raise RamShortageError(shortage)
                weights = load_cuda_weights(reader, cfg, path, device, host_layers)
                plan = choose(weights, matmul, rows=cfg.canvas_length, device=device, top_k=cfg.n_expert_used)
            else:
                shortage = ram_shortage(reader, cfg, path)  # say so, rather than be ended by the kernel's OOM killer
                if shortage:
                    raise RamShortageError(shortage)
                weights = load_weights(reader, cfg, path)
                if device != "cpu":
                    weights = _to_device(weights, device)
            model = DiffusionGemma(cfg, weights)
        except EngineError:
            raise
        except torch.cuda.OutOfMemoryError:  # the estimate fell short (or another load took the memory meanwhile)
            out_of_memory = True  # raised below, outside this block: CUDA's error would keep the partial load alive
        except ValueError as e:  # InspectError and friends
            raise EngineError(str(e)) from None
        if out_of_memory:
            weights = None
            advice = ("convert it with a smaller --fit" if backend == "cuda" else
                      "the torch backend holds the weights as float32: use the cuda backend")
            raise GpuMemoryError(f"{path}: the GPU ran out of memory while loading this model: {advice}, or free GPU "
                                 "memory")
        if graphs and host_layers:  # (asked for: the default is quietly off)
            warnings.warn(f"{path}: CUDA graphs are off while experts stream from host RAM (graphs=True ignored)",
                          RuntimeWarning, stacklevel=2)
        engine = cls(path, cfg, tokenizer, model, time.perf_counter_ns() - t0, torch.device(device), rng, kv_cache,
                     graphs=backend == "cuda" and graphs is not False and not host_layers)
        engine.matmul, engine.backend, engine.host_layers = plan, backend, host_layers
        return engine

    @property
    def host_bytes(self) -> int:
        """Bytes of the weights kept in host RAM (streamed experts, cuda/offload.py); the rest are on self.device."""
        layers = [self.model.w.layers[i] for i in self.host_layers]
        return sum(lw.gate_up_exps.data.nbytes + lw.down_exps.data.nbytes for lw in layers)

    @property
    def notice(self) -> str | None:
        """A line for the user where the model runs slower than it could: experts streamed from host RAM."""
        if not self.host_layers:
            return None
        return (f"{self.path.name}: the experts of {len(self.host_layers)} of {self.cfg.n_layer} layers "
                f"({self.host_bytes / GiB:.2f} GiB) stay in host RAM and are copied to the GPU on every pass: "
                f"slower (--host-experts 0: none, or an error where the GPU is short)")

    @property
    def slot_bytes(self) -> int:
        """Bytes of the VRAM slots streamed experts are copied into (none without them)."""
        stage = self.model.w.layers[self.host_layers[0]].gate_up_exps.stage if self.host_layers else None
        return sum(b.nbytes for b in stage.buffers) if stage else 0

    @property
    def kv_dtype(self) -> torch.dtype:
        return KV_DTYPES[self.kv_cache]

    def describe(self) -> str:
        """One line on what runs the model: 'cuda on NVIDIA H100 (rng counter, KV cache f16, CUDA graphs)'."""
        where = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "the CPU"
        graphs = ", CUDA graphs" if self.graphs and self.rng == "counter" else ""
        host = (f", experts of {len(self.host_layers)} of {self.cfg.n_layer} layers streamed from host RAM"
                if self.host_layers else "")
        return f"{self.backend} on {where} (rng {self.rng}, KV cache {self.kv_cache}{graphs}{host})"

    # ---- prompt ---------------------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[dict[str, Any]] | list[int], raw: bool = False,
                   variables: dict[str, Any] | None = None, **template_kwargs) -> list[int]:
        """The prompt's token ids: given, a raw string (BOS first), or a conversation (a string: one user turn)
        through the chat template with its variables (`variables` and template_kwargs)."""
        tok = self.tokenizer
        if isinstance(prompt, list) and all(isinstance(x, int) for x in prompt) and prompt:
            ids = list(prompt)
        elif isinstance(prompt, str) and raw:
            ids = tok.encode(prompt, add_bos=True)
        else:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            ids = tok.encode(render_chat(tok, messages, continue_final=continues_final(messages),
                                         variables={**(variables or {}), **template_kwargs}))
        if not ids:
            raise EngineError("empty prompt")
        bad = [i for i in ids if not 0 <= i < self.cfg.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary of {self.cfg.vocab_size}")
        return ids

    def fitted_ids(self, prompt: str | list[dict[str, Any]] | list[int], o: GenerateOptions, raw: bool = False,
                   variables: dict[str, Any] | None = None, **template_kwargs) -> Fitted:
        """prompt_ids, fitted to leave the reply its room in o's context where o.truncate (plugin/fit.py, as
        Ollama fits a prompt): a conversation's oldest messages left out (not its system messages, nor its last),
        then what is still too long cut to its first o.num_keep tokens after BOS and its last."""
        def render(p) -> list[int]:
            return self.prompt_ids(p, raw, variables, **template_kwargs)

        if not o.truncate:
            return Fitted(render(prompt))
        budget = self.prompt_budget(o)
        if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            ids, dropped = fit_messages(render, prompt, budget)
        else:
            ids, dropped = render(prompt), 0
        out = fit_tokens(ids, budget, o.num_keep, self.tokenizer.bos_id)
        return Fitted(out, dropped, len(ids) - len(out))

    def sampler_settings(self, o: GenerateOptions) -> SamplerDefaults:
        s = replace(self.cfg.sampler)
        for attr, value in (("max_steps", o.steps), ("t_min", o.t_min), ("t_max", o.t_max), ("entropy_bound", o.entropy_bound)):
            if value is not None:
                setattr(s, attr, value)
        if s.max_steps < 1:
            raise EngineError(f"steps must be at least 1 (got {s.max_steps})")
        return s

    # ---- generation -----------------------------------------------------------------------------
    def _steps(self, cache: KVCache, seed: int, keep_logits: bool = False) -> Steps:
        """The sampler's backend for one generation (plugin/sampler.py); keep_logits: each pass's logits can be
        formed afterwards (Denoised.logits, for logprobs and JSON mode)."""
        dev, V, counter_seed = self.device, self.cfg.vocab_size, seed % 2**64
        if self.rng == "counter" and hasattr(self.model.w.head, "stats"):
            decode = None
            if self.graphed is not None and self.graphed.fallback is not None:
                self.graphs = False  # a capture failed: the next ones would too, each costing a sync
            if self.graphs:
                from .cuda.graph import GraphedDecoder

                self._graph_stream = self._graph_stream or torch.cuda.Stream(self.device)
                decode = self.graphed = GraphedDecoder(self.model, cache, self._graph_stream)
            return _fused_steps(self.model, cache, V, counter_seed, dev, decode, keep_logits)

        def decode(canvas: torch.Tensor, sc: torch.Tensor | None) -> torch.Tensor:
            # the sampler runs on the CPU, so every backend draws the same numbers
            logits = self.decode_step(canvas.to(dev), cache, None if sc is None else sc.to(dev))
            return logits.cpu()

        if self.rng == "counter":
            return CounterSteps(logits_stats(decode, keep_logits), V, counter_seed)
        return TorchSteps(decode, V, torch.Generator().manual_seed(seed), keep_logits)

    def context(self, o: GenerateOptions) -> int:
        """The positions a generation has for its prompt and reply: num_ctx, within the model's context length."""
        return min(self.cfg.context_length, o.num_ctx or self.cfg.context_length)

    def prompt_budget(self, o: GenerateOptions) -> int:
        """The most prompt tokens that leave the reply its room (plugin/fit.py): what o.truncate fits a prompt to."""
        context = self.context(o)
        max_tokens = DEFAULT_MAX_TOKENS if o.max_tokens is None else o.max_tokens
        return context - reply_room(context, max_tokens, self.cfg.canvas_length)

    def prefill(self, o: GenerateOptions) -> list[int]:
        """What the prompt ends with for a forced tool call (call_format.CallFormat.prefill), as tokens."""
        return self.tokenizer.encode(o.format.prefill) if isinstance(o.format, CallFormat) else []

    def settings(self, ids: list[int], o: GenerateOptions) -> tuple[SamplerDefaults, int, set[int],
                                                                     Node | CallFormat | None]:
        """Check a request before generating (ids: the prompt, without a forced call's prefill): sampler settings,
        token budget, end-of-generation ids, the output's schema (plugin/json_schema.py) or forced call."""
        s = self.sampler_settings(o)
        context = self.context(o)
        room = context - len(ids) - len(self.prefill(o))
        if room <= 0:
            raise EngineError(f"prompt of {len(ids)} tokens does not fit the context of {context}")
        if o.num_batch is not None and o.num_batch < 1:
            raise EngineError(f"num_batch must be at least 1 (got {o.num_batch})")
        try:
            schema = o.format if isinstance(o.format, CallFormat) else output_schema(o.format)
        except SchemaError as e:
            raise EngineError(str(e)) from None
        if o.logprobs is not None and not 0 <= o.logprobs <= MAX_TOP_LOGPROBS:
            raise EngineError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS} (got {o.logprobs})")
        max_tokens = min(DEFAULT_MAX_TOKENS if o.max_tokens is None else o.max_tokens, room)
        if isinstance(schema, CallFormat):
            least, shortest, what = *schema.least(self.tokenizer), "a forced tool call"
        elif schema is not None:
            shortest, what = schema.shortest.decode(), "JSON mode"
            least = len(self.tokenizer.encode(shortest, parse_special=False))
        else:
            least = 0
        if 0 < max_tokens < least:
            raise EngineError(f"{what} needs room for {least} tokens at least (num_predict {max_tokens}, or the "
                              f"context left), for {shortest[:60]}")
        eos = self.tokenizer.eog_ids if o.eos_ids is None else set(o.eos_ids)
        return s, max_tokens, eos, schema

    def generate(self, prompt: str | list[dict[str, Any]] | list[int], options: GenerateOptions | None = None,
                 **template_kwargs) -> Iterator[Event]:
        o = options or GenerateOptions()
        ids = self.fitted_ids(prompt, o, o.raw, **template_kwargs).ids
        s, max_tokens, eos, schema = self.settings(ids, o)
        ids = ids + self.prefill(o)
        seed = o.seed if o.seed is not None else int.from_bytes(os.urandom(4), "little")
        with self._lock:
            yield from self._generate(ids, o, s, max_tokens, eos, seed, schema)

    @torch.inference_mode()  # on a generator: torch enters and leaves the mode around each resumption
    def _generate(self, ids: list[int], o: GenerateOptions, s: SamplerDefaults, max_tokens: int, eos: set[int],
                  seed: int, schema: Node | CallFormat | None) -> Iterator[Event]:
        t_start = time.perf_counter_ns()
        C = self.cfg.canvas_length
        kept = self.prompt_cache
        n_canvases = math.ceil(max_tokens / C)  # every one but the last is encoded after the prompt
        dev = self.device
        cancelled = False

        def on_step(info: StepInfo) -> bool:
            nonlocal cancelled
            if o.on_step is not None:
                o.on_step(info)
            cancelled = o.cancelled()
            return cancelled

        text = TextAssembler(ReplyParser(self.tokenizer, thinking=o.split_thinking, tools=o.tool_calls), o.stop)
        text.parser.prime(ids)
        out_ids: list[int] = []
        logprobs: list[TokenLogprob] | None = None if o.logprobs is None else []
        canvases: list[list[int]] = []
        steps: list[int] = []
        reason = "length"
        out_of_memory = False
        cache, cached = None, 0
        held, whole = [], False  # the tokens the cache holds; whole: it holds them (not half-way through an encode)
        try:
            if o.cache_prompt:  # (in here: going back copies, and may run out of memory)
                cache, cached = kept.take(ids, dev)
            else:
                kept.drop()
            if cache is None:
                cache = KVCache(dtype=self.kv_dtype, reserve=C, spare=KV_SPARE)
            held, whole = ids[:cached], True
            cache.until = len(ids) + min(n_canvases - 1, KV_LOOKAHEAD) * C
            if cached < len(ids):
                whole = False
                self.model.encode(torch.tensor([ids[cached:]], device=dev), cache, chunk=o.num_batch or DEFAULT_NUM_BATCH)
            held, whole = list(ids), True
            t_prompt = time.perf_counter_ns()
            sampler = self._steps(cache, seed, keep_logits=logprobs is not None or schema is not None)
            json_state = schema.start(self.tokenizer) if isinstance(schema, CallFormat) else \
                JsonPrefix(schema) if schema is not None else None
            for index in range(n_canvases):
                if o.cancelled():
                    reason = "cancelled"
                    break
                result = denoise_canvas(sampler, C, s, on_step)
                canvas = result.tokens.tolist()
                if json_state is not None:
                    canvas = read_canvas(result.logits, C, json_state, self.tokenizer, eos, max_tokens - len(out_ids),
                                         canvas)
                canvases.append(canvas)
                steps.append(result.steps)
                keep = canvas[: max_tokens - len(out_ids)]
                hit_eos = next((n for n, t in enumerate(keep) if t in eos), None)
                if hit_eos is not None:
                    keep = keep[:hit_eos]
                elif json_state is not None and json_state.complete and not json_state.pending:
                    hit_eos = len(keep)  # the object closed on the canvas's last position: the reply ends here
                out_ids += keep
                scored = [] if logprobs is None else token_logprobs(result.logits, keep, o.logprobs)
                result.logits = None  # (not kept through the next canvas)
                if logprobs is not None:
                    logprobs += scored
                new, hit_stop = text.add(keep, final=hit_eos is not None or len(out_ids) >= max_tokens or cancelled)
                if new or keep:
                    yield TextEvent(new.content, keep, index, result.steps, new.thinking, new.tool_calls, scored)
                if cancelled:
                    reason = "cancelled"
                    break
                if hit_eos is not None or hit_stop:
                    reason = "stop"
                    break
                if len(out_ids) >= max_tokens:
                    break
                # where the global layers' buffers are full, the new ones have room for KV_LOOKAHEAD canvases
                cache.until = max(cache.until, cache.length + min(n_canvases - 1 - index, KV_LOOKAHEAD) * C)
                if index == 0 and o.cache_prompt:
                    kept.mark(cache)  # the prompt's end, before the sliding windows move past it
                whole = False
                self.model.encode(torch.tensor([canvas], device=dev), cache)
                held += canvas
                whole = True
        except torch.cuda.OutOfMemoryError:  # one line, not CUDA's paragraph
            out_of_memory, whole = True, False  # raised below, outside this block: CUDA's error would keep its frames'
            # tensors alive; and its cache is not kept
        finally:  # also when the caller stops early (the generator closed at a yield)
            if self.graphed is not None:
                self.graphed.release()  # the graph's memory pool; the cache is kept or dropped below
            if o.cache_prompt and whole:
                kept.put(cache, held, len(ids))
            else:
                kept.drop()
        if out_of_memory:
            positions = 0 if cache is None else cache.length
            cache, sampler, result = None, None, None  # this frame lives on in the error's
            # traceback: no tensors held by it
            raise EngineError(f"the GPU ran out of memory with {positions} positions in the KV cache (the prompt and "
                              f"{len(out_ids)} tokens generated): a smaller num_ctx or num_predict, a shorter prompt, "
                              "or a model converted with a smaller --fit needs less")
        t_end = time.perf_counter_ns()
        forwards = sum(steps)
        yield DoneEvent(
            done_reason=reason, prompt_eval_count=len(ids), eval_count=len(out_ids), token_ids=out_ids,
            canvases=canvases, steps_per_canvas=steps, tokens_per_forward=len(out_ids) / forwards if forwards else 0.0,
            seed=seed, total_duration=t_end - t_start + self.load_duration, load_duration=self.load_duration,
            prompt_eval_duration=t_prompt - t_start, eval_duration=t_end - t_prompt, prompt_cached_count=cached,
            logprobs=logprobs,
        )


def _fused_steps(model: DiffusionGemma, cache: KVCache, vocab_size: int, seed: int, device: torch.device,
                 decode: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
                 keep_logits: bool = False) -> Steps:
    """Counter-based steps where the head is a backend object with `stats` (the cuda backend): the head
    kernel gives argmax, entropy, sample and softmax @ E, and csrc/accept.cu accepts and re-noises on the
    device; the [C, V] logits are never formed. decode(canvas, soft): the decoder pass (default
    model.decode_hidden on `cache`; the engine passes a GraphedDecoder). keep_logits: each pass keeps a copy of
    its last layer's output [1, C, D] (a CUDA graph's is overwritten by the next replay), from which the head
    forms the logits of a few rows when asked (Denoised.logits)."""
    from .cuda import ops

    decode = decode or (lambda canvas, soft: model.decode_hidden(canvas, cache, soft))

    def stats(canvas: torch.Tensor, soft, temperature: torch.Tensor, seed: int, index: int) -> Denoised:
        hidden = decode(canvas, soft)  # [1, C, D]
        hs = model.hidden_stats(hidden, float(temperature), seed, index)
        logits = model.head_rows(hidden.clone()) if keep_logits else None
        return Denoised(hs.argmax[None], hs.entropy[None], hs.sample[None], hs.sc[None], logits)  # [1, C], soft [1, C, D]

    return CounterSteps(stats, vocab_size, seed, ops.accept_renoise, device)


def _to_device(w, device: str):
    """Every tensor of a Weights (and its layers) moved to `device`."""
    from dataclasses import fields, replace as dc_replace

    def move(obj):
        if isinstance(obj, torch.Tensor):
            return obj.to(device)
        if isinstance(obj, list):
            return [move(x) for x in obj]
        if hasattr(obj, "__dataclass_fields__"):
            return dc_replace(obj, **{f.name: move(getattr(obj, f.name)) for f in fields(obj)})
        return obj

    return move(w)
