"""ms per denoising step on CPU: dgemma's torch engine against transformers' generate(), same model, same steps.

Builds a small random DiffusionGemma with transformers (or reuses --dir), converts it to an F32 GGUF,
then times both with the stopping criteria off (every canvas runs all --steps steps), after a warm-up
run each, in this one process. Prints ms/step for each and the ratio (goal: >= 3x).

    python bench/engine_cpu.py [--size tiny|small] [--dir /tmp/dg-bench] [--steps 16] [--canvases 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import hf_model  # noqa: E402

from dgemma.convert import convert  # noqa: E402
from dgemma.convert.tiny import TinySpec, build_checkpoint  # noqa: E402
from dgemma.plugin.engine import Engine, GenerateOptions  # noqa: E402

SPECS = {
    # the test fixtures' size: per-op overhead dominates
    "tiny": TinySpec(with_vision=False, max_shard_size="50MB"),
    # 20x the FLOPs: the matmuls and the sampler's draws over the vocabulary dominate
    "small": TinySpec(
    vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=6,
    layer_types=("sliding_attention",) * 5 + ("full_attention",), num_attention_heads=4, num_key_value_heads=2,
    num_global_key_value_heads=1, head_dim=64, global_head_dim=128, num_experts=8, top_k_experts=2,
    moe_intermediate_size=128, sliding_window=64, canvas_length=64, with_vision=False, max_shard_size="50MB",
    ),
}


def built(size: str, where: Path) -> tuple[Path, Path]:
    """The checkpoint of SPECS[size] under where/size and its F32 GGUF, built unless they are there."""
    root = where / size
    ckpt, gguf = root / "ckpt", root / "model-f32.gguf"
    if not (ckpt / "config.json").exists():
        build_checkpoint(SPECS[size], ckpt)
    if not gguf.exists():
        convert(ckpt, gguf, "F32", quiet=True)
    return ckpt, gguf


def model_arguments(ap: argparse.ArgumentParser, size: str) -> None:
    """--dir, --size (default `size`) and --threads, which prepared() reads."""
    ap.add_argument("--dir", type=Path, help="where the model is built once (default: a temporary directory)")
    ap.add_argument("--size", choices=sorted(SPECS), default=size)
    ap.add_argument("--threads", type=int, default=2)


def prepared(args: argparse.Namespace) -> tuple[Path, Path, tempfile.TemporaryDirectory | None]:
    """torch's threads set, and the model of --size built in --dir (else in a temporary directory, returned for
    the caller to clean up): its checkpoint and F32 GGUF."""
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory() if args.dir is None else None
    return (*built(args.size, args.dir or Path(tmp.name)), tmp)


def every_step(engine: Engine) -> Engine:
    """Stopping off: stability 0 with an unreachable confidence (1e-30) keeps every step of every canvas."""
    engine.cfg.sampler.stability_threshold, engine.cfg.sampler.confidence_threshold = 0, 1e-30
    return engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(ap, "tiny")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--canvases", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ckpt, gguf, tmp = prepared(args)
    SPEC = SPECS[args.size]

    prompt = list(range(10, 10 + 2 * SPEC.canvas_length))
    n_tokens = args.canvases * SPEC.canvas_length
    total_steps = args.canvases * args.steps
    engine = every_step(Engine.load(gguf))
    # every run encodes its prompt (the same each time), as transformers' does: no kept cache (bench/chat_turns.py)
    opts = GenerateOptions(seed=0, max_tokens=n_tokens, steps=args.steps, eos_ids=set(), cache_prompt=False)
    hf = hf_model(ckpt)
    hf_kwargs = dict(max_new_tokens=n_tokens, max_denoising_steps=args.steps, stability_threshold=0,
                     confidence_threshold=1e-30, eos_token_id=None)

    def ours() -> float:
        done = list(engine.generate(prompt, opts))[-1]
        assert sum(done.steps_per_canvas) == total_steps
        return done.eval_duration / 1e9

    def theirs() -> float:
        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.no_grad():
            hf.generate(torch.tensor([prompt]), **hf_kwargs)
        return time.perf_counter() - t

    ours(), theirs()  # warm-up
    # interleaved, so that both see the same background load (this VM's timings drift by 15% and more)
    runs = [(ours(), theirs()) for _ in range(args.repeats)]
    t_ours, t_hf = min(r[0] for r in runs), min(r[1] for r in runs)
    pair_ratios = sorted(h / o for o, h in runs)
    print(f"model: {SPEC.num_hidden_layers} layers, hidden {SPEC.hidden_size}, vocab {SPEC.vocab_size}, "
          f"{SPEC.num_experts} experts top-{SPEC.top_k_experts}, canvas {SPEC.canvas_length}; "
          f"{args.canvases} canvases x {args.steps} steps, {args.threads} threads, best of {args.repeats}")
    print(f"transformers generate(): {t_hf / total_steps * 1e3:7.2f} ms/step (includes its prompt encoding)")
    print(f"dgemma torch engine:     {t_ours / total_steps * 1e3:7.2f} ms/step (decode steps + canvas encoding)")
    print(f"ratio:                   {t_hf / t_ours:7.2f}x faster (goal >= 3x); per interleaved pair: "
          f"median {pair_ratios[len(runs) // 2]:.2f}x, range {pair_ratios[0]:.2f}-{pair_ratios[-1]:.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
