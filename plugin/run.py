"""`dgemma run MODEL PROMPT`: stream text canvas by canvas, or watch it condense out of noise."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from dgemma.quant.planner import PLAN_CTX

from .engine import (BACKEND_CHOICES, KV_DTYPES, MATMULS, RNGS, DoneEvent, Engine, EngineError, GenerateOptions, TextEvent,
                     host_experts_choice)
from .chat import template_features
from .interactive import ThoughtPrinter, chat
from .json_schema import Node, SchemaError, output_schema
from .modelfile import ModelSettings
from .registry import ModelNotFound, Registry, RegistryError
from .sampler import StepInfo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="a .gguf path, 'default' (the bundled tiny model) or a model name")
    p.add_argument("prompt", metavar="PROMPT", nargs="?",
                   help="the prompt (read from stdin when omitted; at a terminal, an interactive chat as ollama run "
                        "opens: /? for its commands)")
    p.add_argument("--seed", type=int, help="random seed (default: random, shown by --stats)")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (default 1024)")
    p.add_argument("--steps", type=int, help="max denoising steps per canvas (default: the model's, usually 48)")
    p.add_argument("--system", help="a system message for the chat template")
    p.add_argument("--raw", action="store_true", help="send PROMPT as-is (with BOS), without the chat template")
    p.add_argument("--think", action="store_true",
                   help="turn the chat template's thinking mode on: the model reasons first, printed between "
                        "'Thinking...' and '...done thinking.' (as ollama run --think)")
    p.add_argument("--hidethinking", action="store_true", help="leave the model's thinking out of the output")
    p.add_argument("--format", metavar="json|SCHEMA",
                   help="json: the reply is one JSON object (JSON mode; as ollama run --format json); or a JSON schema "
                        "(its text, or a .json file's path) the reply follows (docs/SERVER.md)")
    p.add_argument("--prompt-ids", metavar="IDS", help="comma-separated token ids to use as the prompt, e.g. 2,10,11")
    p.add_argument("--stats", action="store_true", help="print timings, steps per canvas and tokens per forward")
    p.add_argument("--visualize", action="store_true", help="redraw the canvas at every denoising step")
    p.add_argument("--json", action="store_true", help="print one JSON object with the token ids and the stats")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                   help="auto (the default: cuda where CuPy and an NVIDIA GPU are there, else torch), torch (the "
                        "reference; CPU or --device cuda) or cuda (quantized weights in VRAM, csrc kernels)")
    p.add_argument("--device", help="torch device for the torch backend (default cpu)")
    p.add_argument("--rng", choices=RNGS,
                   help="the sampler's random draws: torch (transformers' order; the torch backend's default) or "
                        "counter (Philox per position, drawn on the GPU; the cuda backend's). With the same --rng, "
                        "--kv-cache and --seed (and --matmul scalar) both backends give the same tokens up to float "
                        "rounding")
    p.add_argument("--kv-cache", choices=list(KV_DTYPES),
                   help="what the KV cache stores: f32 (the torch backend's default) or f16 (the cuda backend's; "
                        "attention then runs in f16)")
    p.add_argument("--matmul", choices=MATMULS,
                   help="cuda backend: the quantized matmul kernel, auto (the default: the fastest on this GPU per "
                        "weight shape and for the vocabulary head, timed once and cached), scalar (float FMAs, the "
                        "torch backend's numbers), f16 or int8 (tensor cores, compute capability 7.5), f16-wide or "
                        "int8-wide (the same in tiles 128 columns wide), f16-cublas (dense weights decoded to f16, then "
                        "cuBLAS; the experts as with f16)")
    p.add_argument("--host-experts", metavar="auto|N", type=host_experts_arg,
                   help=f"cuda backend: where the GPU is short of memory for the model (with room for a KV cache of "
                        f"{PLAN_CTX} positions), keep the routed experts of some "
                        "layers in host RAM and copy them to the GPU as each pass reaches them (slower, by PCIe); auto "
                        "(the default) as few layers as the GPU needs, N that many (short or not), 0 never (too little "
                        "memory is then an error). Without CUDA graphs")
    p.add_argument("--no-graphs", action="store_true",
                   help="cuda backend with --rng counter (its default): launch the decoder's kernels one by one "
                        "instead of replaying each canvas's pass from a CUDA graph")


def _format(value: str | None) -> Node | None:
    """--format: "json", a file holding a JSON schema, or a schema's text, compiled (EngineError where it is none)."""
    if value is None or value == "json":
        return output_schema(value)
    what, text = f"{value[:60]!r} is neither a file nor JSON", value
    if Path(value).is_file():
        what = f"{value} is not JSON"
        try:
            text = Path(value).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise EngineError(f"--format: {value}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return output_schema(json.loads(text), "--format")
    except json.JSONDecodeError as e:
        raise EngineError(f"--format: expected json, a JSON schema or a file holding one; {what} ({e})") from None
    except SchemaError as e:
        raise EngineError(str(e)) from None


def _prompt(args: argparse.Namespace, settings: ModelSettings) -> str | list[Any]:
    """The prompt: ids, raw text, or a chat (with the model's Modelfile SYSTEM, unless --system, and MESSAGEs)."""
    if args.prompt_ids:
        try:
            return [int(x) for x in args.prompt_ids.split(",") if x.strip()]
        except ValueError:
            raise EngineError(f"--prompt-ids must be comma-separated integers (got '{args.prompt_ids}')") from None
    text = args.prompt
    if text is None:  # (at a terminal, cmd_run chats instead)
        text = sys.stdin.read()
    if args.raw:
        return text
    return settings.prompt(text, args.system)


def run_options(engine: Engine, settings: ModelSettings, args: argparse.Namespace) -> GenerateOptions:
    """The flags over the model's Modelfile PARAMETERs (as a request's options over them); without either, the
    engine's defaults (DEFAULT_MAX_TOKENS tokens, the model's whole context)."""
    from .server.serving import ApiError, generate_options

    flags = {"seed": args.seed, "num_predict": args.max_tokens, "diffusion_steps": args.steps}
    merged = settings.options({k: v for k, v in flags.items() if v is not None})
    try:
        opts = generate_options(engine, merged)
    except ApiError as e:
        raise EngineError(e.message) from None
    if "num_predict" not in merged:
        opts.max_tokens = None
    if "num_ctx" not in merged:
        opts.num_ctx = None
    return opts


def stats_lines(d: DoneEvent) -> list[str]:
    def rate(n: int, ns: int) -> str:
        return f"{n / (ns / 1e9):.2f} tokens/s" if ns else "-"

    return [
        f"total duration:       {d.total_duration / 1e6:.1f} ms",
        f"load duration:        {d.load_duration / 1e6:.1f} ms",
        f"prompt eval count:    {d.prompt_eval_count} token(s)" + (
            f" ({d.prompt_cached_count} from the kept KV cache)" if d.prompt_cached_count else ""),
        f"prompt eval duration: {d.prompt_eval_duration / 1e6:.1f} ms "
        f"({rate(d.prompt_eval_count - d.prompt_cached_count, d.prompt_eval_duration)})",
        f"eval count:           {d.eval_count} token(s)",
        f"eval duration:        {d.eval_duration / 1e6:.1f} ms ({rate(d.eval_count, d.eval_duration)})",
        f"canvases:             {len(d.steps_per_canvas)} (steps: {', '.join(map(str, d.steps_per_canvas))})",
        f"tokens per forward:   {d.tokens_per_forward:.2f}",
        f"seed:                 {d.seed}",
        f"done reason:          {d.done_reason}",
    ]


class CanvasView:
    """A rich Live view: finished text, then the current canvas, accepted tokens bright, noise dim."""

    def __init__(self, engine: Engine) -> None:
        from rich.console import Console
        from rich.live import Live

        self.engine, self.done_text = engine, ""
        self.console = Console()
        self.live = Live(console=self.console, auto_refresh=False, transient=False)

    def __enter__(self) -> "CanvasView":
        self.live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.live.__exit__(*exc)

    def step(self, info: StepInfo) -> None:
        from rich.text import Text

        tok = self.engine.tokenizer
        view = Text(self.done_text)
        for token, ok in zip(info.canvas.tolist(), info.accepted.tolist()):
            view.append(tok.token_text(token), style="bold green" if ok else "dim")
        view.append(f"\n[step {info.index}, {int(info.accepted.sum())}/{len(info.canvas)} accepted, "
                    f"mean entropy {info.mean_entropy:.3f}]", style="cyan")
        self.live.update(view, refresh=True)

    def finish_canvas(self, text: str) -> None:
        from rich.text import Text

        self.done_text += text
        self.live.update(Text(self.done_text), refresh=True)


def host_experts_arg(text: str) -> int | str:
    """--host-experts: auto or a number of layers (engine.host_experts_choice), as argparse wants its errors."""
    try:
        return host_experts_choice(text)
    except EngineError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def cmd_run(args: argparse.Namespace) -> int:
    from .cli import EXIT_INTERRUPTED, _fail

    chatting = args.prompt is None and not args.prompt_ids and sys.stdin.isatty()
    try:
        if chatting and (args.raw or args.json or args.visualize):
            flag = "--raw" if args.raw else "--json" if args.json else "--visualize"
            raise EngineError(f"{flag} needs a PROMPT (an argument or stdin); without one, at a terminal, "
                              "dgemma run opens a chat")
        fmt = _format(args.format)
        if args.think and fmt:
            raise EngineError("--format leaves out the thinking: not with --think")
        if args.think and (args.raw or args.prompt_ids):
            raise EngineError(f"--think needs the chat template; {'--raw' if args.raw else '--prompt-ids'} leaves it out")
        entry = Registry().resolve(args.model)
        path, settings = entry.path, entry.settings
        engine = Engine.load(path, backend=args.backend, device=args.device, rng=args.rng, kv_cache=args.kv_cache,
                             matmul=args.matmul, graphs=False if args.no_graphs else None,
                             host_experts=args.host_experts)
        if engine.notice:
            print(f"dgemma: {engine.notice}", file=sys.stderr)
        if args.think and not template_features(engine.tokenizer).thinking:
            raise EngineError(f"--think: the chat template of {path.name} has no thinking mode")
        opts = run_options(engine, settings, args)
        opts.format = fmt
        if chatting:
            return chat(engine, opts, args.system or settings.system, stats=stats_lines if args.stats else None,
                        think=True if args.think else None, hide_thinking=args.hidethinking, history=settings.messages)
        prompt = _prompt(args, settings)
        cancel = threading.Event()
        # the thinking apart where text is printed as it comes (--json and --visualize show every token as before)
        opts.raw, opts.cancel = args.raw, cancel
        opts.split_thinking = not (args.raw or args.prompt_ids or args.json or args.visualize)
        printer = ThoughtPrinter(sys.stdout, args.hidethinking)
        view = CanvasView(engine) if args.visualize and not args.json else None
        if view is not None:
            opts.on_step = view.step
        done: DoneEvent | None = None
        try:
            if view is not None:
                view.__enter__()
            for event in engine.generate(prompt, opts, **({"enable_thinking": True} if args.think else {})):
                if isinstance(event, TextEvent):
                    if view is not None:
                        view.finish_canvas(event.text)
                    elif not args.json:
                        printer.write(event)
                else:
                    done = event
            printer.close()
        finally:
            if view is not None:
                view.__exit__(None, None, None)
    except (EngineError, ModelNotFound, RegistryError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return _fail("interrupted", EXIT_INTERRUPTED)
    assert done is not None
    if args.json:
        stats = {k: v for k, v in vars(done).items() if k not in ("token_ids", "canvases")}
        print(json.dumps({"model": str(path), "token_ids": done.token_ids, "canvases": done.canvases,
                          "text": engine.tokenizer.decode(done.token_ids, skip_special=True), **stats}))
    elif not args.visualize:
        print()
    if args.stats and not args.json:
        print("\n".join(stats_lines(done)), file=sys.stderr)
        print("\n".join(backend_lines(engine)), file=sys.stderr)
    return 0


def backend_lines(engine: Engine) -> list[str]:
    """--stats' lines on what ran the model: the backend, and on the cuda backend its matmul kernels and the
    vocabulary head's form."""
    lines = [f"backend:              {engine.describe()}"]
    if engine.matmul:
        uses = ", ".join(f"{k} for {n}" for k, n in sorted(Counter(engine.matmul.values()).items()))
        lines.append(f"matmul kernels:       {uses} weight shapes")
        head = next((k for c, k in engine.matmul.items() if c.startswith("head ")), None)
        if head is not None:
            form = "fused float kernel" if head == "scalar" else f"by vocabulary chunks on {head} tensor cores"
            lines.append(f"vocabulary head:      {form}")
    return lines
