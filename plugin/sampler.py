"""The entropy-bound sampler: one denoising loop of small named pieces, as transformers runs it.

Per canvas: start from uniform random tokens; for step N..1 run the decoder, divide the logits by the
annealed temperature, draw a sample, accept the lowest-entropy tokens while their summed entropy (less
the largest) stays within the bound, re-draw the others uniformly; stop early once the argmax canvas
has been stable for `stability_threshold` steps and the mean entropy is below `confidence_threshold`.
The argmax canvas of the last step is the output.

The loop asks a `Steps` object for the three things that depend on the backend and the random numbers:
the initial canvas, one denoising pass (argmax, entropy, sample and the next self-conditioning input),
and the accept/re-noise step. Two kinds of draws:
- `TorchSteps` (`--rng torch`, the torch backend's default): one torch.Generator, drawn in the same
  order as transformers' generate() (init, then per step: sample, re-noise), so a seed reproduces it.
- `CounterSteps` (`--rng counter`, the cuda backend's): every number is Philox of (seed, pass, position,
  row) (plugin/rng.py, csrc/philox.cuh), so the GPU draws them where it needs them, in any order, and the
  torch backend given the same seed draws the same tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from . import rng
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
    logits: RowLogits | None = None  # the last pass's (the one tokens is the argmax of), where the steps keep them


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

    def __call__(self, argmax: torch.Tensor, mean_entropy: torch.Tensor) -> tuple[bool, float]:
        """argmax [1, C] and the pass's mean token entropy (a float32 scalar tensor), both on the pass's device.
        Both tests' inputs come to the host in one read, a GPU pass's only sync. Returns (stop, the mean
        entropy as a float)."""
        full = len(self.history) == self.threshold  # threshold 0: always, with nothing to compare
        same = [(h == argmax).all() for h in self.history] if full else []
        mean, *equal = torch.stack([mean_entropy.reshape(()).float(), *(e.float() for e in same)]).tolist()
        if self.threshold:
            self.history = (self.history + [argmax])[-self.threshold:]
        # transformers compares the float32 mean with the threshold rounded to float32
        return full and all(equal) and mean < float(np.float32(self.confidence)), mean


Decoder = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (canvas, sc_probs) -> logits
# positions (a slice of the canvas) -> their softcapped logits at temperature 1 [r, V], formed when asked, in a tensor
# of their own that the caller may overwrite (for logprobs, plugin/logprobs.py: the cuda backend forms them a few rows
# at a time, never [C, V])
RowLogits = Callable[[slice], torch.Tensor]


@dataclass
class Denoised:
    """What the loop needs from one decoder pass over the canvas ([1, C] each)."""

    argmax: torch.Tensor
    entropy: torch.Tensor  # of the processed (temperature-scaled) distribution
    sample: torch.Tensor  # a draw from it
    sc: Any  # the next pass's self-conditioning input, in the form the backend's decoder takes
    logits: RowLogits | None = None  # the pass's logits by rows, where the steps were asked to keep them


class Steps(Protocol):
    def init(self, length: int) -> torch.Tensor: ...  # [1, C] the starting canvas

    def denoise(self, canvas: torch.Tensor, sc: Any, temperature: torch.Tensor) -> Denoised: ...

    def accept_renoise(self, canvas: torch.Tensor, out: Denoised, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
        ...  # (next canvas [1, C], accepted mask [1, C])


def processed_logits(logits: torch.Tensor, temperature: torch.Tensor, keep: bool = False):
    """(logits / T [1, C, V], their softmax: the next step's self-conditioning input, and where `keep` a RowLogits
    over the logits themselves, else None: the caller holds no reference, so they go once this returns)."""
    processed = logits / temperature
    kept = (lambda rows: logits[0, rows].clone()) if keep else None
    return processed, torch.softmax(processed, dim=-1, dtype=torch.float32), kept


class TorchSteps:
    """The logits-based step with one torch.Generator, in transformers' order of draws. keep_logits: each
    Denoised keeps its pass's logits (for logprobs; else they go once the pass is done)."""

    def __init__(self, decode: Decoder, vocab_size: int, gen: torch.Generator, keep_logits: bool = False) -> None:
        self.decode, self.vocab_size, self.gen, self.keep_logits = decode, vocab_size, gen, keep_logits

    def init(self, length: int) -> torch.Tensor:
        return init_canvas(length, self.vocab_size, self.gen)

    def denoise(self, canvas: torch.Tensor, sc: Any, temperature: torch.Tensor) -> Denoised:
        processed, probs, kept = processed_logits(self.decode(canvas, sc), temperature, self.keep_logits)
        denoised = sample(probs, self.gen)
        return Denoised(processed.argmax(dim=-1), token_entropy(processed, probs), denoised, probs, kept)

    def accept_renoise(self, canvas: torch.Tensor, out: Denoised, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
        accepted, mask = accept(canvas, out.sample, out.entropy, bound)
        return renoise(accepted, mask, self.vocab_size, self.gen), mask


# (canvas, sc, temperature, seed, pass index) -> Denoised, its sample the Gumbel-max draw of that pass
StatsDecoder = Callable[[torch.Tensor, Any, torch.Tensor, int, int], Denoised]
# (entropy [1, C], sample [1, C], seed, pass index, vocab, bound) -> (next canvas, accepted mask)
AcceptRenoise = Callable[[torch.Tensor, torch.Tensor, int, int, int, float], tuple[torch.Tensor, torch.Tensor]]


def gumbel_sample(processed: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """argmax_v (z_v - log(-log u_v)) per position of processed logits [1, C, V], u the counter-based
    uniforms of (seed, pass index, position, v): a draw from softmax(z), in float64 (the reference of the
    fused head's sample; at the 26B's vocabulary it makes [C, 262144] numpy draws per pass, slow but
    exact). Returns [1, C]."""
    C, V = processed.shape[-2:]
    u = torch.from_numpy(rng.sampler_uniforms(seed, index, np.arange(C), V)).double()  # [C, V]
    return (processed[0].double().cpu() - torch.log(-torch.log(u))).argmax(dim=-1)[None].to(processed.device)


def logits_stats(decode: Decoder, keep_logits: bool = False) -> StatsDecoder:
    """A StatsDecoder from a logits decoder (the torch backend's reference for the cuda head kernel); keep_logits
    as TorchSteps'."""

    def stats(canvas: torch.Tensor, sc: Any, temperature: torch.Tensor, seed: int, index: int) -> Denoised:
        processed, probs, kept = processed_logits(decode(canvas, sc), temperature, keep_logits)
        return Denoised(processed.argmax(dim=-1), token_entropy(processed, probs), gumbel_sample(processed, seed, index),
                        probs, kept)

    return stats


def counter_accept_renoise(entropy: torch.Tensor, denoised: torch.Tensor, seed: int, index: int, vocab: int,
                           bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """accept() with the re-noised tokens of pass `index` from the counter stream (csrc/accept.cu's reference)."""
    fresh = torch.from_numpy(rng.sampler_tokens(seed, index, np.arange(denoised.numel()), vocab, rng.RENOISE))
    return accept(fresh.view_as(denoised).to(denoised.device), denoised, entropy, bound)


class CounterSteps:
    """Counter-based draws: pass k of a generation (k = 0, 1, ... over all its canvases) samples with the
    uniforms of (seed, k) and re-noises with the tokens of (seed, k, RENOISE); the canvas that pass k starts
    is drawn with (seed, k, INIT). No generator state: any device can draw any of them."""

    def __init__(self, stats: StatsDecoder, vocab_size: int, seed: int,
                 accept_renoise: AcceptRenoise = counter_accept_renoise, device: torch.device | str = "cpu") -> None:
        self.stats, self.vocab_size, self.seed, self._accept = stats, vocab_size, seed, accept_renoise
        self.device, self.index = torch.device(device), 0

    def init(self, length: int) -> torch.Tensor:
        tokens = rng.sampler_tokens(self.seed, self.index, np.arange(length), self.vocab_size, rng.INIT)
        return torch.from_numpy(tokens)[None].to(self.device)  # [1, C]

    def denoise(self, canvas: torch.Tensor, sc: Any, temperature: torch.Tensor) -> Denoised:
        return self.stats(canvas, sc, temperature, self.seed, self.index)

    def accept_renoise(self, canvas: torch.Tensor, out: Denoised, bound: float) -> tuple[torch.Tensor, torch.Tensor]:
        nxt, mask = self._accept(out.entropy, out.sample, self.seed, self.index, self.vocab_size, bound)
        self.index += 1
        return nxt, mask


def denoise_canvas(steps: Steps, length: int, s: SamplerDefaults,
                   on_step: Callable[[StepInfo], bool | None] | None = None) -> CanvasResult:
    """Run the sampler loop on one canvas. `on_step` may return True to cancel (the loop stops there)."""
    canvas = steps.init(length)
    argmax, sc = canvas, None
    stop = StableAndConfident(s)
    entropies: list[float] = []
    n, stopped = 0, False
    for step in range(s.max_steps, 0, -1):
        out = None  # (the last pass's kept logits go before the next pass forms its own)
        out = steps.denoise(canvas, sc, temperature(step, s))
        argmax, sc = out.argmax, out.sc
        canvas, mask = steps.accept_renoise(canvas, out, s.entropy_bound)
        n += 1
        done, mean_entropy = stop(argmax, out.entropy.mean())  # the pass's one read on the host
        entropies.append(mean_entropy)
        if on_step is not None and on_step(StepInfo(step, n, canvas[0], argmax[0], mask[0], entropies[-1])):
            break
        if done:
            stopped = True
            break
    return CanvasResult(argmax[0], n, stopped, entropies, out.logits)
