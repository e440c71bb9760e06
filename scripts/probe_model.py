#!/usr/bin/env python
"""Diagnostics for a default-model candidate (docs/DEFAULT_MODEL.md, "Session 3"): how readable its text
is and how well its decoder predicts a canvas.

    python scripts/probe_model.py MODEL.gguf [--max-fortunes N]

1. Readability proxies over 5 prompts x 3 seeds (64 tokens each, chat template): the share of generated
   words, word bigrams and word trigrams that occur in the training text (train/data.py's short fortunes,
   or the --max-fortunes subset a run trained on).
2. Cross-entropy (nats) per position of the first canvas after a prompt made of a fortune's first 1-6
   words (training and held-out fortunes), canvas all noise, half noise and clean (decoder), and
   teacher-forced (encoder).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from train.data import read_fortunes, split, subset, words  # noqa: E402

from dgemma.plugin.engine import Engine, GenerateOptions, TextEvent  # noqa: E402
from dgemma.plugin.kv_cache import KVCache  # noqa: E402

PROMPTS = ("Once upon a time", "Tell me a fortune.", "Why is the sky blue?", "A fool", "Never")


def readability(engine: Engine, texts: list[str]) -> None:
    vocab, bigrams, trigrams = set(), set(), set()
    for t in texts:
        w = words(t)
        vocab.update(w), bigrams.update(zip(w, w[1:])), trigrams.update(zip(w, w[1:], w[2:]))
    counts = {"words": [0, 0], "bigrams": [0, 0], "trigrams": [0, 0]}
    for prompt in PROMPTS:
        for seed in (1, 2, 3):
            events = list(engine.generate(prompt, GenerateOptions(seed=seed, max_tokens=64)))
            text = "".join(e.text for e in events if isinstance(e, TextEvent))
            w = words(text)
            for name, grams, known in (("words", w, vocab), ("bigrams", list(zip(w, w[1:])), bigrams),
                                       ("trigrams", list(zip(w, w[1:], w[2:])), trigrams)):
                counts[name][0] += sum(g in known for g in grams)
                counts[name][1] += len(grams)
            if seed == 1:
                print(f"  {prompt!r}: {text[:100]!r}")
    print("in the training text: " + ", ".join(f"{k} {a}/{n} = {a / max(n, 1):.0%}" for k, (a, n) in counts.items()))


def encoder_logits(engine: Engine, ids: list[int]) -> torch.Tensor:
    """The causal encoder's next-token logits [T, V] over ids (a fresh cache)."""
    m = engine.model
    return m.head(m.encode(torch.tensor([ids]), KVCache()))[0]


def canvas_cross_entropy(engine: Engine, texts: list[str], label: str, n: int = 120) -> None:
    m, C, V = engine.model, engine.cfg.canvas_length, engine.cfg.vocab_size
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    rows = {"decoder, all noise": torch.zeros(C), "decoder, half noise": torch.zeros(C), "decoder, clean": torch.zeros(C),
            "encoder, teacher-forced": torch.zeros(C)}
    count = 0
    for t in rng.sample(texts, min(n, len(texts))):
        w = t.split(" ")
        if len(w) < 4:
            continue
        prompt = engine.prompt_ids(" ".join(w[: rng.randint(1, min(6, len(w) - 2))]), raw=True)
        full = engine.prompt_ids(t, raw=True) + sorted(engine.tokenizer.eog_ids)[:1]
        cont = full[len(prompt):]
        if len(cont) < C or full[: len(prompt)] != prompt:
            continue
        cache = KVCache()
        m.encode(torch.tensor([prompt]), cache)
        clean = torch.tensor([cont[:C]])  # [1, C]
        for name, noise in (("decoder, all noise", 1.0), ("decoder, half noise", 0.5), ("decoder, clean", 0.0)):
            noisy = torch.rand(1, C, generator=gen) < noise
            canvas = torch.where(noisy, torch.randint(0, V, (1, C), generator=gen), clean)
            rows[name] += F.cross_entropy(m.decode(canvas, cache)[0], clean[0], reduction="none")
        P = len(prompt)
        rows["encoder, teacher-forced"] += F.cross_entropy(encoder_logits(engine, full)[P - 1 : P - 1 + C], clean[0],
                                                           reduction="none")
        count += 1
    print(f"cross-entropy per canvas position, {count} {label} fortunes:")
    for name, ce in rows.items():
        print(f"  {name:24s} " + " ".join(f"{x:5.2f}" for x in (ce / max(count, 1)).tolist()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--max-fortunes", type=int, default=0, help="the training subset the run used (0: all)")
    ap.add_argument("--max-chars", type=int, default=80)
    args = ap.parse_args()
    torch.set_num_threads(2)
    engine = Engine.load(args.model)
    train, held = split([f for f in read_fortunes() if len(f.text) <= args.max_chars])
    texts = [f.text for f in subset(train, args.max_fortunes)]
    readability(engine, texts)
    canvas_cross_entropy(engine, texts, "training")
    canvas_cross_entropy(engine, [f.text for f in held], "held-out")
    return 0


if __name__ == "__main__":
    sys.exit(main())
