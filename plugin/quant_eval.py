"""`dgemma quant-eval REF.gguf QUANT.gguf...`: what quantization costs, as llama.cpp's --kl-divergence reports it.

For a fixed, seeded set of prompts and canvases, both models' decoder logits are compared position by
position: KL(P_ref || P_quant) (mean, median, p99, max) and how often their top-1 tokens agree. Each
case is one denoising step on a random canvas (the first step of a canvas: no self-conditioning) and one
with self-conditioning taken from the reference's own first step, so both decoder paths are measured.
Prompts are random tokens, or with `--text FILE` consecutive windows of that text (as llama.cpp reads a
text file; a trained model's activations on real text are what its quantization has to keep).
`--plot FILE.png` draws file size against mean KLD (matplotlib).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import Engine
from .kv_cache import KVCache

DEFAULT_CASES = 8
DEFAULT_PROMPT_LEN = 48
SEED = 1234


@dataclass
class EvalResult:
    path: Path
    size: int
    mean_kld: float
    median_kld: float
    p99_kld: float
    max_kld: float
    top1: float  # share of positions whose argmax agrees with the reference
    positions: int

    def line(self) -> str:
        return (f"{self.path.name:<40} {self.size / 2**20:9.1f} MiB  mean KLD {self.mean_kld:.6f}  "
                f"median {self.median_kld:.6f}  p99 {self.p99_kld:.6f}  max {self.max_kld:.6f}  "
                f"same top-1 {self.top1 * 100:6.2f}%  ({self.positions} positions)")


def cases(vocab: int, canvas: int, n: int = DEFAULT_CASES, prompt_len: int = DEFAULT_PROMPT_LEN, seed: int = SEED,
          text_ids: list[int] | None = None):
    """n (prompt [1, prompt_len], canvas [1, canvas]) pairs: random prompts, or windows of text_ids spread
    evenly over it (text_ids starts with BOS, kept in front of every window); canvases are random (a
    canvas's first denoising step)."""
    g = torch.Generator().manual_seed(seed)
    if text_ids is not None and len(text_ids) < prompt_len:
        raise ValueError(f"--text: {len(text_ids) - 1} tokens, need at least {prompt_len - 1}")
    for i in range(n):
        if text_ids is None:
            prompt = torch.randint(0, vocab, (1, prompt_len), generator=g)
        else:
            start = (len(text_ids) - prompt_len) * i // max(1, n)
            prompt = torch.tensor([text_ids[:1] + text_ids[1 + start : start + prompt_len]])
        yield prompt, torch.randint(0, vocab, (1, canvas), generator=g)


def logits_for(engine: Engine, prompt: torch.Tensor, canvas: torch.Tensor, sc_probs: torch.Tensor | None):
    cache = KVCache()
    engine.model.encode(prompt, cache)
    return engine.model.decode(canvas, cache, sc_probs)  # [1, C, V]


def kld(ref_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(P_ref || P_q) per position, in nats: [N]."""
    lp = torch.log_softmax(ref_logits.double(), dim=-1)
    lq = torch.log_softmax(q_logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


def evaluate(ref: Engine, quants: list[Engine], n_cases: int = DEFAULT_CASES, text: str | None = None) -> list[EvalResult]:
    cfg = ref.cfg
    text_ids = ref.tokenizer.encode(text, add_bos=True) if text is not None else None
    for q in quants:
        if (q.cfg.vocab_size, q.cfg.n_embd, q.cfg.n_layer) != (cfg.vocab_size, cfg.n_embd, cfg.n_layer):
            raise ValueError(f"{q.path}: not the same model as {ref.path} (vocabulary, width or depth differ)")
    klds: list[list[torch.Tensor]] = [[] for _ in quants]
    agree = [0 for _ in quants]
    total = 0
    for prompt, canvas in cases(cfg.vocab_size, cfg.canvas_length, n_cases, text_ids=text_ids):
        r1 = logits_for(ref, prompt, canvas, None)
        sc = torch.softmax(r1 / cfg.sampler.t_max, dim=-1)
        r2 = logits_for(ref, prompt, canvas, sc)
        for i, q in enumerate(quants):
            for r, s in ((r1, None), (r2, sc)):
                ql = logits_for(q, prompt, canvas, s)
                klds[i].append(kld(r[0], ql[0]))
                agree[i] += int((r[0].argmax(-1) == ql[0].argmax(-1)).sum())
        total += 2 * cfg.canvas_length
    out = []
    for i, q in enumerate(quants):
        k = torch.cat(klds[i]).clamp(min=0)
        out.append(EvalResult(q.path, q.path.stat().st_size, float(k.mean()), float(k.median()),
                              float(torch.quantile(k, 0.99)), float(k.max()), agree[i] / total, total))
    return out


def plot(results: list[EvalResult], path: Path, title: str = "") -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [r.size / 2**20 for r in results]
    ys = [max(r.mean_kld, 1e-9) for r in results]
    ax.plot(xs, ys, "o-")
    for r, x, y in zip(results, xs, ys, strict=True):
        ax.annotate(r.path.stem, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KL divergence vs reference (nats, log scale)")
    ax.set_yscale("log")
    ax.set_title(title or "quantization cost")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

