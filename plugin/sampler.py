"""The entropy-bound sampler: one denoising loop of small named pieces, as transformers runs it.

Per canvas: start from uniform random tokens; for step N..1 run the decoder, divide the logits by the
annealed temperature, draw a sample, accept the lowest-entropy tokens while their summed entropy (less
the largest) stays within the bound, re-draw the others uniformly; stop early once the argmax canvas
has been stable for `stability_threshold` steps and the mean entropy is below `confidence_threshold`.
The argmax canvas of the last step is the output. Random draws use one torch.Generator in the same
order as transformers' generate() (init, then per step: sample, re-noise), so a seed reproduces it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .config import SamplerDefaults


@dataclass
class StepInfo:
    """What one denoising step did; passed to the `on_step` callback (for --visualize)."""

    step: int  # steps remaining, N..1
    index: int  # 1-based step count within the canvas
    canvas: torch.Tensor  # [C] tokens fed to the next step (accepted + re-noised)
    argmax: torch.Tensor  # [C] current best guess
    accepted: torch.Tensor  # [C] bool
    mean_entropy: float


@dataclass
class CanvasResult:
    tokens: torch.Tensor  # [C] the argmax canvas of the last step
    steps: int
    stopped_early: bool
    entropies: list[float] = field(default_factory=list)


def temperature(step: int, s: SamplerDefaults) -> torch.Tensor:
    """Linear schedule: t_max at the first step (step = N), t_min approached at the last (step = 1).
    Computed in float32 from an int32 step, as transformers does, so that the scaled logits match bit for bit."""
    return s.t_min + (s.t_max - s.t_min) * (torch.tensor(step, dtype=torch.int32) / s.max_steps)


def init_canvas(length: int, vocab_size: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, vocab_size, (1, length), generator=gen)  # [1, C]


def token_entropy(logits: torch.Tensor, probs: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy -Σ p·log p of softmax(logits) per position (torch.distributions.Categorical's value to
    float rounding); probs: softmax(logits) when the caller has it. Logits must be finite (ours are)."""
    probs = torch.softmax(logits, dim=-1) if probs is None else probs
    return -(probs * torch.log_softmax(logits, dim=-1)).sum(-1)  # [1, C]


def _exponential(shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """float32 Exp(1) draws, the numbers `Tensor.exponential_` draws from `gen` (-log1p(-u) of float64
    uniforms, as ATen's CPU kernel computes them), in a few vectorised ops instead of a scalar loop."""
    return torch.log1p(-torch.rand(shape, dtype=torch.float64, generator=gen)).neg_().float()


def _exponential_is_torchs() -> bool:
    """Whether _exponential draws exactly what this torch's exponential_ draws (checked once)."""
    a, b = torch.Generator().manual_seed(1234), torch.Generator().manual_seed(1234)
    want = torch.empty(4096).exponential_(generator=a)
    return torch.equal(_exponential(want.shape, b), want) and torch.equal(a.get_state(), b.get_state())


_FAST_EXPONENTIAL: bool | None = None


def sample(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One token per position from probs [1, C, V]: torch.multinomial(probs, 1), which is the Gumbel-style
    argmax(probs / Exp(1)) with exponential_'s draws; written out with the faster equal draws where this
    torch's exponential_ is known to match them (tests/test_sampler.py compares the two)."""
    global _FAST_EXPONENTIAL
    if _FAST_EXPONENTIAL is None:
        _FAST_EXPONENTIAL = _exponential_is_torchs()
    flat = probs.view(-1, probs.shape[-1])  # [C, V]
    if _FAST_EXPONENTIAL and flat.device.type == "cpu" and flat.dtype == torch.float32:
        drawn = (flat / _exponential(flat.shape, gen)).argmax(dim=-1)
    else:
        drawn = torch.multinomial(flat, num_samples=1, generator=gen)  # [C, 1]
    return drawn.view(probs.shape[:-1])  # [1, C]


def accept(current: torch.Tensor, denoised: torch.Tensor, entropy: torch.Tensor, bound: float):
    """Keep the k lowest-entropy denoised tokens with sum(entropy) - max(entropy) <= bound."""
    sorted_h, order = torch.sort(entropy, dim=-1, descending=False)
    chosen_sorted = torch.cumsum(sorted_h, dim=-1) - sorted_h <= bound
    mask = torch.scatter(torch.zeros_like(chosen_sorted), -1, order, chosen_sorted)  # [1, C] bool
    return torch.where(mask, denoised, current), mask


def renoise(accepted: torch.Tensor, mask: torch.Tensor, vocab_size: int, gen: torch.Generator) -> torch.Tensor:
    fresh = torch.randint(0, vocab_size, accepted.shape, generator=gen)
    return torch.where(mask, accepted, fresh)


class StableAndConfident:
    """Stop when the argmax canvas repeated for `threshold` steps and the mean entropy is low."""

    def __init__(self, s: SamplerDefaults) -> None:
        self.threshold, self.confidence = s.stability_threshold, s.confidence_threshold
        self.history: list[torch.Tensor] = []

    def __call__(self, argmax: torch.Tensor, entropy: torch.Tensor) -> bool:
        stable = len(self.history) == self.threshold and all(torch.equal(h, argmax) for h in self.history)
        if self.threshold:
            self.history = (self.history + [argmax])[-self.threshold:]
        else:
            stable = True
        return bool(stable and (entropy.mean() < self.confidence).item())


Decoder = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (canvas, sc_probs) -> logits


def denoise_canvas(decode: Decoder, length: int, vocab_size: int, s: SamplerDefaults, gen: torch.Generator,
                   on_step: Callable[[StepInfo], bool | None] | None = None) -> CanvasResult:
    """Run the sampler loop on one canvas. `on_step` may return True to cancel (the loop stops there)."""
    canvas = init_canvas(length, vocab_size, gen)
    argmax, probs = canvas, None
    stop = StableAndConfident(s)
    entropies: list[float] = []
    steps, stopped = 0, False
    for step in range(s.max_steps, 0, -1):
        processed = decode(canvas, probs) / temperature(step, s)  # [1, C, V]
        probs = torch.softmax(processed, dim=-1, dtype=torch.float32)  # also the next step's self-conditioning
        denoised = sample(probs, gen)
        argmax = processed.argmax(dim=-1)
        entropy = token_entropy(processed, probs)
        accepted, mask = accept(canvas, denoised, entropy, s.entropy_bound)
        canvas = renoise(accepted, mask, vocab_size, gen)
        steps += 1
        entropies.append(entropy.mean().item())
        done = stop(argmax, entropy)
        if on_step is not None and on_step(StepInfo(step, steps, canvas[0], argmax[0], mask[0], entropies[-1])):
            break
        if done:
            stopped = True
            break
    return CanvasResult(argmax[0], steps, stopped, entropies)
