"""A chat's turns with the KV cache kept between generations against each turn encoding its whole prompt.

The conversation is what a frontend sends each turn: a system prompt, then the turns so far (each reply as the
model generated it) and a new message, with the generation prompt's few tokens at the end, which the next
turn's rendering of that reply leaves out (Gemma 4's template drops the empty thought channel), so every
turn the cache goes back a few positions (plugin/kv_cache.py). Two engines on the same file, one keeping
its cache and one not (`cache_prompt=False`), run each turn one after the other with the same seed, in this
one process. Prints per turn the prompt's size, and for each the cached tokens, the prompt encode and the whole
turn in ms, and the ratios; and in how many turns both generated the same tokens (a random model's draws are
close enough that encoding the prompt in other chunks, as the cache does and as num_batch does, changes some
of them: tests/test_prompt_cache.py compares the caches themselves).

With --task N a frontend's own prompt of N tokens (Open WebUI's title, tags, follow-ups) goes to both engines
after every turn, untimed, and the baseline is an engine that keeps only its last generation's cache (as
`--cache-ram 0`), against one that also keeps copies of other conversations' caches in host memory (the default).

    python bench/chat_turns.py [--size tiny|small] [--dir /tmp/dg-bench] [--turns 6] [--system 512] [--steps 8]
                               [--task 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engine_cpu import SPECS, every_step, model_arguments, prepared  # noqa: E402

from dgemma.plugin.engine import DoneEvent, Engine, GenerateOptions  # noqa: E402

GEN_PROMPT = 4  # the generation prompt's tokens the next turn renders otherwise (the thought channel)
TURN_END = 2  # the tokens that close a turn after its reply


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(ap, "small")
    ap.add_argument("--turns", type=int, default=6)
    ap.add_argument("--system", type=int, default=512, help="system prompt tokens")
    ap.add_argument("--message", type=int, default=48, help="tokens per user message")
    ap.add_argument("--canvases", type=int, default=2, help="canvases per reply")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--task", type=int, default=0, help="tokens of a frontend's prompt sent between turns (0: none)")
    args = ap.parse_args()
    _, gguf, tmp = prepared(args)
    spec = SPECS[args.size]

    # every canvas runs all its steps: the turns differ only in their prompt
    kept, scratch = every_step(Engine.load(gguf)), every_step(Engine.load(gguf))
    if args.task:
        scratch.prompt_cache.limit = 0  # the last generation's cache, no copies
    g = torch.Generator().manual_seed(0)

    def tokens(n: int) -> list[int]:
        return torch.randint(10, spec.vocab_size, (n,), generator=g).tolist()

    def turn(engine: Engine, ids: list[int], seed: int, cache: bool) -> DoneEvent:
        opts = GenerateOptions(seed=seed, max_tokens=args.canvases * spec.canvas_length, steps=args.steps,
                               eos_ids=set(), cache_prompt=cache)
        return list(engine.generate(ids, opts))[-1]

    warm = tokens(args.system + args.message)  # warm-up at the first turn's size
    turn(kept, warm, 0, False), turn(scratch, warm, 0, False)
    base = "last only" if args.task else "whole"
    history, gen = [2] + tokens(args.system), tokens(GEN_PROMPT)
    print(f"model: {spec.num_hidden_layers} layers, hidden {spec.hidden_size}, window {spec.sliding_window}, canvas "
          f"{spec.canvas_length}; {args.turns} turns of {args.message}-token messages and {args.canvases}-canvas "
          f"replies x {args.steps} steps, system prompt {args.system}, {args.threads} threads"
          + (f"; a {args.task}-token task prompt after each turn" if args.task else ""))
    print(f"{'turn':>4} {'prompt':>6} {'cached':>6} {'kept':>6} | {'encode ms':>9} {'kept':>7} {'ratio':>6} | "
          f"{'turn ms':>8} {'kept':>8} {'ratio':>6}   (first of each pair: {base})")
    totals, same = [0, 0], 0
    for t in range(args.turns):
        ids = history + tokens(args.message) + gen
        if t % 2:  # in turns, which runs first (this VM's timings drift)
            b, a = turn(kept, ids, t, True), turn(scratch, ids, t, bool(args.task))
        else:
            a, b = turn(scratch, ids, t, bool(args.task)), turn(kept, ids, t, True)
        same += a.token_ids == b.token_ids
        ta, tb = (d.prompt_eval_duration + d.eval_duration for d in (a, b))  # (total_duration adds the load's)
        totals[0] += ta
        totals[1] += tb
        print(f"{t:>4} {len(ids):>6} {a.prompt_cached_count:>6} {b.prompt_cached_count:>6} | "
              f"{a.prompt_eval_duration / 1e6:>9.1f} "
              f"{b.prompt_eval_duration / 1e6:>7.1f} {a.prompt_eval_duration / b.prompt_eval_duration:>5.1f}x | "
              f"{ta / 1e6:>8.1f} {tb / 1e6:>8.1f} {ta / tb:>5.2f}x")
        history = ids[:-GEN_PROMPT] + b.token_ids + tokens(TURN_END)  # the reply as rendered, and the turn's end
        if args.task:
            task = [2] + tokens(args.task)
            turn(kept, task, t, True), turn(scratch, task, t, True)
    way = "keeping only the last generation's cache" if args.task else "encoding every prompt whole"
    print(f"conversation: {totals[0] / 1e6:.0f} ms {way}, {totals[1] / 1e6:.0f} ms with the "
          f"cache{'s' if args.task else ''} kept: {totals[0] / totals[1]:.2f}x; the same tokens in {same} of "
          f"{args.turns} turns")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
