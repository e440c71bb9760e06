"""The `dgemma` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from dgemma import __version__

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"dgemma: error: {message}", file=sys.stderr)
    return code


def cmd_convert(args: argparse.Namespace) -> int:
    from dgemma.convert import ConvertError, convert
    from dgemma.convert.plan import format_plan, make_plan

    try:
        overrides = None
        if args.dry_run or args.fit:
            plan = make_plan(args.src, args.type, args.fit, args.ctx, args.pad_experts)
            if args.dry_run or not args.quiet:
                print(format_plan(plan, per_tensor=args.dry_run))
            if args.dry_run:
                return 0
            if plan.fit is not None and not plan.fit.fits:
                return _fail(f"--fit {args.fit}: no plan fits (see the notes above)")
            overrides = plan.overrides()
        if not args.output:
            return _fail("-o/--output is required (or use --dry-run)")
        result = convert(args.src, args.output, args.type, force=args.force, quiet=args.quiet, overrides=overrides,
                         pad_experts=args.pad_experts, threads=args.threads)
    except ConvertError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail(f"{args.output}: interrupted; nothing was written", EXIT_INTERRUPTED)
    if not args.quiet:
        print(f"wrote {result.path} ({result.n_tensors} tensors, {result.nbytes:,} bytes, {args.type.upper()})")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from dgemma.convert import ConvertError
    from dgemma.convert.requant import requantize

    try:
        result = requantize(args.src, args.output, args.type, fit_size=args.fit, ctx=args.ctx,
                            allow_requantize=args.allow_requantize, force=args.force, quiet=args.quiet,
                            threads=args.threads)
    except ConvertError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail(f"{args.output}: interrupted; nothing was written", EXIT_INTERRUPTED)
    if not args.quiet:
        what = f"--fit {args.fit}" if args.fit else args.type.upper()
        print(f"wrote {result.path} ({result.n_tensors} tensors, {result.nbytes:,} bytes, {what})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .inspect import InspectError, format_summary, summarize
    from .registry import ModelNotFound, resolve_model

    try:  # a file, or a model's name as dgemma run takes it (as ollama show)
        print(format_summary(summarize(args.file if Path(args.file).is_file() else resolve_model(args.file))))
    except (InspectError, ModelNotFound) as e:
        return _fail(str(e))
    return 0


def cmd_make_tiny(args: argparse.Namespace) -> int:
    try:
        from dgemma.convert.tiny import TinySpec, build_checkpoint
    except ImportError as e:
        return _fail(f"make-tiny needs transformers: pip install -e '.[tiny]' ({e})")
    spec = TinySpec(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=len(args.layers),
                    layer_types=tuple("full_attention" if c == "G" else "sliding_attention" for c in args.layers),
                    seed=args.seed, dtype=args.dtype)
    out = build_checkpoint(spec, args.out)
    print(f"wrote a tiny random DiffusionGemma checkpoint to {out}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .run import cmd_run as run

    return run(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .server.app import ServerConfig, serve
    from .server.serving import ApiError, parse_keep_alive

    try:
        keep = parse_keep_alive(args.keep_alive)
        serve(ServerConfig(host=args.host, port=args.port, models=Path(args.models) if args.models else None,
                           api_key=args.api_key, insecure=args.insecure, upstream=args.upstream,
                           upstream_openai=args.upstream_openai, upstream_openai_key=args.upstream_openai_key,
                           keep_alive=keep, backend=args.backend, host_experts=args.host_experts,
                           cache_ram=args.cache_ram))
    except (ApiError, ValueError) as e:
        return _fail(getattr(e, "message", str(e)))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .inspect import InspectError
    from .registry import Registry, RegistryError, read_model_info
    from .server.protocol import human_number

    try:
        rows = []
        for e in Registry().list():
            info = read_model_info(e.path)
            rows.append((e.name, info.quantization, human_number(info.n_params), e.size, e.modified_at))
    except (RegistryError, InspectError) as e:
        return _fail(str(e))
    print(f"{'NAME':<40} {'QUANT':<8} {'PARAMS':>8} {'SIZE':>10}  MODIFIED")
    for name, q, params, size, mtime in rows:
        print(f"{name:<40} {q:<8} {params:>8} {size / 1e6:>8.1f}MB  {mtime:%Y-%m-%d %H:%M}")
    return 0


def cmd_ps(args: argparse.Namespace) -> int:
    from .remote import RemoteError, ps_table, running, server_url

    try:
        print(ps_table(running(server_url(args.host, args.port), args.api_key)))
    except RemoteError as e:
        return _fail(str(e))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from .remote import RemoteError, server_url, stop

    try:
        stop(server_url(args.host, args.port), args.name, args.api_key)
    except RemoteError as e:
        return _fail(str(e))
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from .registry import Registry, RegistryError

    try:
        entry = Registry().import_file(args.file, args.name, force=args.force)
    except RegistryError as e:
        return _fail(str(e))
    print(f"imported {args.file} as {entry.name} ({entry.path})")
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    from .registry import ModelNotFound, Registry, RegistryError

    try:
        Registry().remove(args.name)
    except (ModelNotFound, RegistryError) as e:
        return _fail(str(e))
    print(f"deleted {args.name}")
    return 0


def cmd_create(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .modelfile import ModelfileError, read_modelfile
    from .registry import Registry, RegistryError

    try:
        made = read_modelfile(args.file)
        entry = Registry().create(args.name, made.base, made.settings, folder=Path(args.file).parent,
                                  quantize=args.quantize)
    except (ModelfileError, RegistryError) as e:
        return _fail(str(e))
    print(f"created {entry.name} from {made.base} ({entry.path.name})")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    from .registry import ModelNotFound, Registry, RegistryError

    try:
        Registry().copy(args.source, args.destination)
    except (ModelNotFound, RegistryError) as e:
        return _fail(str(e))
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from .inspect import InspectError, format_summary, open_gguf, summarize
    from .modelfile import parameter_lines, render_modelfile
    from .registry import ModelNotFound, Registry, RegistryError, display_name, read_model_info
    from .server.protocol import show_parameters
    from .tokenizer import Tokenizer

    try:
        entry = Registry().resolve(args.name)
        if args.modelfile or args.parameters:
            tok = Tokenizer.from_gguf(open_gguf(entry.path), entry.path)
            params = show_parameters(entry, [tok.tokens[i] for i in sorted(tok.eog_ids)], read_model_info(entry.path))
        if args.modelfile:
            print(render_modelfile(str(entry.path), entry.settings, params, display_name(entry.name)), end="")
        elif args.parameters:
            print("\n".join(f"{k:<30} {json.dumps(v)}" for k, v in parameter_lines(params)))
        elif args.system:
            print(entry.settings.system or "")
        elif args.template:
            print(Tokenizer.from_gguf(open_gguf(entry.path), entry.path).chat_template or "")
        elif args.license:
            print("\n".join(entry.settings.license))
        else:
            print(format_summary(summarize(entry.path)))
            for title, lines in (("Parameters", [f"{k:<30} {json.dumps(v)}" for k, v in
                                                 parameter_lines(entry.settings.parameters)]),
                                 ("System", (entry.settings.system or "").splitlines()),
                                 ("Messages", [f"{m['role']}: {m['content']}" for m in entry.settings.messages]),
                                 ("License", "\n".join(entry.settings.license).splitlines())):
                if lines:
                    print(f"\n{title}\n" + "\n".join(f"  {line}" for line in lines))
    except (InspectError, ModelNotFound, RegistryError) as e:
        return _fail(str(e))
    return 0


def cmd_manifests(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .manifests import render, write
    from .registry import Registry, RegistryError
    from .server.protocol import display_name

    try:
        models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else \
            [display_name(e.name) for e in Registry().list()]
    except RegistryError as e:
        return _fail(str(e))
    host = f"[{args.host}]" if ":" in args.host else args.host
    for path in write(Path(args.out), render(f"http://{host}:{args.port}", models)):
        print(path)
    return 0


def cmd_quant_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .engine import Engine, EngineError
    from .quant_eval import evaluate, plot

    try:
        ref = Engine.load(args.ref)
        quants = [Engine.load(p) for p in args.quant]
        text = None
        if args.text:
            try:
                text = Path(args.text).read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise ValueError(f"--text {args.text}: cannot read it as UTF-8 text ({e})") from None
        results = evaluate(ref, quants, args.cases, text)
        source = f"windows of {args.text}" if text is not None else "random"
        print(f"reference {args.ref}; {args.cases} {source} prompts x 2 steps x canvas {ref.cfg.canvas_length}")
        for r in results:
            print(r.line())
        if args.plot:
            plot(results, Path(args.plot), title=f"KLD vs {Path(args.ref).name}")
            print(f"wrote {args.plot}")
    except (EngineError, ValueError) as e:
        return _fail(str(e))
    return 0


def cache_ram_arg(text: str) -> int:
    """--cache-ram: a size (planner.parse_size: 8GiB, 512MiB), or as llama.cpp's option a number of MiB (0: none,
    -1: no limit), as argparse wants its errors."""
    from dgemma.quant.planner import MiB, parse_size

    if text.strip() == "-1":
        return sys.maxsize
    if text.strip().isdigit():
        return int(text) * MiB
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    from dgemma.convert.writer import OUTPUT_TYPES
    from dgemma.quant.planner import PLAN_CTX, GiB

    from .engine import BACKEND_CHOICES
    from .kv_cache import DEFAULT_CACHE_RAM
    from .run import add_arguments as add_run_arguments
    from .run import host_experts_arg
    from .server import DEFAULT_HOST, DEFAULT_PORT

    p = argparse.ArgumentParser(prog="dgemma", description="Run DiffusionGemma locally: convert, inspect, run, serve.")
    p.add_argument("--version", action="version", version=f"dgemma {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("run", help="generate text with a DiffusionGemma GGUF (streams one canvas at a time)",
                       description="Generate text: the prompt goes through the model's chat template as a user "
                                   "turn (unless --raw), and text streams out a canvas at a time.")
    add_run_arguments(r)
    r.set_defaults(func=cmd_run)

    sv = sub.add_parser("serve", help="serve models over the Ollama and OpenAI APIs",
                        description="An Ollama-compatible (/api) and OpenAI-compatible (/v1) server for the models "
                                    "in the models directory ($DGEMMA_MODELS, default ~/.dgemma/models), plus the "
                                    "bundled default model.")
    sv.add_argument("--host", default=DEFAULT_HOST, help=f"address to listen on (default {DEFAULT_HOST})")
    sv.add_argument("--port", type=int, default=DEFAULT_PORT,
                    help=f"port (default {DEFAULT_PORT}; Ollama itself uses 11434)")
    sv.add_argument("--models", metavar="DIR", help="models directory (default: $DGEMMA_MODELS or ~/.dgemma/models)")
    sv.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (needed to listen beyond loopback)")
    sv.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without --api-key")
    sv.add_argument("--upstream", metavar="URL", help="an Ollama server whose models are listed and proxied too")
    sv.add_argument("--upstream-openai", metavar="URL",
                    help="an OpenAI-compatible server (e.g. vLLM at http://host:8000/v1) merged into /v1")
    sv.add_argument("--upstream-openai-key", metavar="KEY", help="API key for --upstream-openai")
    sv.add_argument("--keep-alive", default="5m", help="how long an idle model stays loaded (default 5m; -1: forever)")
    sv.add_argument("--backend", choices=BACKEND_CHOICES, default="auto",
                    help="auto (the default: the cuda backend where CuPy and an NVIDIA GPU are there, else torch on "
                         "the CPU), torch or cuda")
    sv.add_argument("--host-experts", metavar="auto|N", type=host_experts_arg, default="auto",
                    help="cuda backend: a model that does not fit beside the models no request holds unloads them; one "
                         "that does not fit the GPU even then keeps the routed experts of some layers in host RAM, "
                         "copied to the GPU as each pass reaches them: auto (the default) as few layers as needed, N "
                         "that many for every model, 0 never (the request gets the error)")
    sv.add_argument("--cache-ram", metavar="SIZE", type=cache_ram_arg, default=DEFAULT_CACHE_RAM,
                    help="host memory per model for the KV caches of conversations other than the last one, so that a "
                         "chat whose turns alternate with other requests (a frontend's title and tags prompts, another "
                         f"user) still encodes only what is new (default {DEFAULT_CACHE_RAM // GiB}GiB; e.g. 8GiB, or "
                         "in MiB as llama.cpp's option, 8192; 0: none, only the last generation's cache is kept; -1: "
                         "no limit but half the free RAM)")
    sv.set_defaults(func=cmd_serve)

    mf = sub.add_parser("manifests", help="write provider files for Open WebUI, Continue, LiteLLM, AnythingLLM, Jan, "
                                          "LM Studio", description="Render drop-in provider files pointing at dgemma serve.")
    mf.add_argument("--out", required=True, metavar="DIR")
    mf.add_argument("--host", default=DEFAULT_HOST)
    mf.add_argument("--port", type=int, default=DEFAULT_PORT)
    mf.add_argument("--models", help="comma-separated model names (default: every model dgemma serves)")
    mf.set_defaults(func=cmd_manifests)

    qe = sub.add_parser("quant-eval", help="KL divergence and top-1 agreement of quantized files against a reference",
                        description="Compare decoder logits of QUANT files with REF (e.g. the F16 file) on fixed, "
                                    "seeded prompts and canvases, as llama.cpp's --kl-divergence reports them.")
    qe.add_argument("ref", metavar="REF.gguf")
    qe.add_argument("quant", metavar="QUANT.gguf", nargs="+")
    qe.add_argument("--cases", type=int, default=8, help="number of prompt/canvas pairs (default 8)")
    qe.add_argument("--text", metavar="FILE", help="prompts from this UTF-8 text (windows spread over it) instead of "
                                                   "random tokens")
    qe.add_argument("--plot", metavar="FILE.png", help="draw file size against mean KLD (needs matplotlib)")
    qe.set_defaults(func=cmd_quant_eval)

    ls = sub.add_parser("list", help="list the models dgemma serves")
    ls.set_defaults(func=cmd_list)
    ps = sub.add_parser("ps", help="list the models a running dgemma serve has loaded (as ollama ps)",
                        description="The models a running `dgemma serve` has loaded: size, where their bytes are "
                                    "(GPU, CPU, or split where experts stream from host RAM), context, keep-alive.")
    st = sub.add_parser("stop", help="unload a model from a running dgemma serve (as ollama stop)",
                        description="Unload a model that a running `dgemma serve` has loaded.")
    st.add_argument("name", metavar="NAME")
    for client in (ps, st):
        client.add_argument("--host", default=DEFAULT_HOST,
                            help=f"the server's address, or its URL (default {DEFAULT_HOST})")
        client.add_argument("--port", type=int, default=DEFAULT_PORT,
                            help=f"the server's port (default {DEFAULT_PORT})")
        client.add_argument("--api-key", help="the key the server was started with (--api-key)")
    ps.set_defaults(func=cmd_ps)
    st.set_defaults(func=cmd_stop)
    im = sub.add_parser("import", help="add a DiffusionGemma GGUF to the models directory")
    im.add_argument("file", metavar="FILE.gguf")
    im.add_argument("--name", help="model name (default from metadata, e.g. diffusiongemma:26b-a4b-q4_K_M)")
    im.add_argument("--force", action="store_true", help="replace a model of the same name")
    im.set_defaults(func=cmd_import)
    rm = sub.add_parser("rm", help="remove a model from the models directory")
    rm.add_argument("name", metavar="NAME")
    rm.set_defaults(func=cmd_rm)
    cr = sub.add_parser("create", help="make a model from a Modelfile (as ollama create): a system prompt, "
                                       "parameters and messages over a model or a .gguf file",
                        description="Make a model from an Ollama Modelfile: FROM (a model name, or a .gguf path "
                                    "relative to the Modelfile, copied in), SYSTEM, PARAMETER, MESSAGE, LICENSE. A "
                                    "model made from another shares its file. TEMPLATE and ADAPTER are refused: the "
                                    "GGUF's own chat template is used. An existing NAME is replaced.")
    cr.add_argument("name", metavar="NAME")
    cr.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default ./Modelfile)")
    cr.add_argument("-q", "--quantize", metavar="TYPE",
                    help="give the model its own file, FROM's (F16/BF16/F32) quantized to TYPE (e.g. q4_K_M), as "
                         "ollama create --quantize")
    cr.set_defaults(func=cmd_create)
    cp = sub.add_parser("cp", help="copy a model under another name (as ollama cp; the file is shared)")
    cp.add_argument("source", metavar="SOURCE")
    cp.add_argument("destination", metavar="DESTINATION")
    cp.set_defaults(func=cmd_cp)
    sh = sub.add_parser("show", help="show a model's information, or its Modelfile, parameters, system prompt, "
                                     "template or license (as ollama show)")
    sh.add_argument("name", metavar="NAME", help="a model name (dgemma list), 'default' or a .gguf path")
    what = sh.add_mutually_exclusive_group()
    for flag, text in (("modelfile", "the Modelfile that makes the model again"),
                       ("parameters", "the parameters a request starts from"), ("system", "the system prompt"),
                       ("template", "the chat template (Jinja, from the GGUF)"), ("license", "the license")):
        what.add_argument(f"--{flag}", action="store_true", help=f"only {text}")
    sh.set_defaults(func=cmd_show)

    c = sub.add_parser("convert", help="convert a Hugging Face DiffusionGemma checkpoint folder to one GGUF file",
                       description="Convert a Hugging Face DiffusionGemma checkpoint folder (config.json, "
                                   "safetensors shards, tokenizer) into one GGUF file that dgemma and llama.cpp read.")
    c.add_argument("src", metavar="SRC_DIR", help="checkpoint folder")
    c.add_argument("-o", "--output", metavar="OUT.gguf", help="output file")
    c.add_argument("--type", default="BF16", metavar="TYPE",
                   help=f"preset: {', '.join(OUTPUT_TYPES)} (default BF16). K presets follow llama.cpp's per-tensor "
                        "rules; norms, scales and the router stay F32")
    c.add_argument("--dry-run", action="store_true", help="print the per-tensor plan and the file size; write nothing "
                                                          "(works from config.json alone)")
    c.add_argument("--fit", metavar="SIZE", help="choose types so that the VRAM estimate stays under SIZE (e.g. 12GB; "
                                                 "GB means GiB), starting from --type (a K preset, default Q4_K_M); "
                                                 "where even the lowest types do not, the plan says how many layers' "
                                                 "experts the cuda backend then streams from host RAM (8GB: 11)")
    c.add_argument("--ctx", type=int, default=PLAN_CTX,
                   help=f"context length the --fit estimate reserves KV cache for (default {PLAN_CTX})")
    c.add_argument("--pad-experts", action="store_true",
                   help="zero-pad expert down rows to a multiple of 256 so K-quants apply (a dgemma-only layout "
                        "that llama.cpp cannot read)")
    c.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    c.add_argument("--threads", type=int, metavar="N",
                   help="quantizing worker processes (default 1; bench/quantize_parallel.py measures what more give "
                        "here); the file is the same for any N")
    c.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    c.set_defaults(func=cmd_convert)

    q = sub.add_parser("quantize", help="a DiffusionGemma GGUF in another type, e.g. BF16 to Q4_K_M (as llama-quantize)",
                       description="Quantize a DiffusionGemma GGUF (F16, BF16 or F32: one downloaded, or one dgemma "
                                   "convert wrote) to another type, with the per-tensor rules and --fit planner of "
                                   "dgemma convert: the same file convert writes from the checkpoint.")
    q.add_argument("src", metavar="IN.gguf")
    q.add_argument("output", metavar="OUT.gguf")
    q.add_argument("--type", default="Q4_K_M", metavar="TYPE",
                   help="the output type, as dgemma convert --type (default Q4_K_M)")
    q.add_argument("--fit", metavar="SIZE", help="choose types so that the VRAM estimate stays under SIZE (e.g. 12GB), "
                                                 "starting from --type, as dgemma convert --fit")
    q.add_argument("--ctx", type=int, default=PLAN_CTX,
                   help=f"context length the --fit estimate reserves KV cache for (default {PLAN_CTX})")
    q.add_argument("--allow-requantize", action="store_true",
                   help="quantize a file that is already quantized (loses more than starting from F16/BF16)")
    q.add_argument("--force", action="store_true", help="overwrite OUT.gguf if it exists")
    q.add_argument("--threads", type=int, metavar="N",
                   help="quantizing worker processes (default 1; bench/quantize_parallel.py measures what more give "
                        "here); the file is the same for any N")
    q.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    q.set_defaults(func=cmd_quantize)

    i = sub.add_parser("inspect", help="summarize a DiffusionGemma GGUF file (or a model by name)",
                       description="Architecture, parameter count, tensors per GGML type, sampler defaults, tokenizer.")
    i.add_argument("file", metavar="FILE.gguf|MODEL", help="a .gguf path, 'default' or a model name (dgemma list)")
    i.set_defaults(func=cmd_inspect)

    t = sub.add_parser("make-tiny", help="write a tiny random DiffusionGemma checkpoint (needs the tiny or dev extra)",
                       description="Build a tiny random DiffusionGemma checkpoint with transformers, for trying "
                                   "the converter without downloading a model.")
    t.add_argument("out", metavar="OUT_DIR")
    t.add_argument("--vocab", type=int, default=512, help="vocabulary size (>= 509; default 512)")
    t.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    t.add_argument("--layers", default="ssG", help="layer pattern, s = sliding, G = global; last must be G (default ssG)")
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=cmd_make_tiny)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_ERROR
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
