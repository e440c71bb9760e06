"""The sampler's deterministic pieces against transformers' own classes, on crafted inputs."""

from __future__ import annotations

import pytest
import torch
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSampler,
    EntropyBoundSamplerConfig,
    LinearTemperatureScheduleLogitsProcessor,
    StableAndConfidentStoppingCriteria,
)

from dgemma.plugin.config import SamplerDefaults
from dgemma.plugin.sampler import StableAndConfident, accept, temperature, token_entropy


def logits_with_entropy(levels: list[float], vocab: int = 50) -> torch.Tensor:
    """[1, C, V] logits whose peakedness varies per position (lower level = more confident)."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(len(levels), vocab, generator=g)
    base[:, 0] += torch.tensor([40.0 / max(x, 1e-3) for x in levels])
    return base[None]


def test_entropy_equals_categorical():
    logits = torch.randn(1, 7, 300) * 4
    logits[0, 3, 5] = 1e4  # one-hot-ish: p log p with p = 0 must not give NaN
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.equal(token_entropy(logits), ref)


@pytest.mark.parametrize("bound", [0.0, 0.1, 1.0, 50.0])
def test_accept_equals_entropy_bound_sampler(bound):
    logits = logits_with_entropy([0.1, 5, 0.5, 2, 0.05, 9, 1, 0.2])
    current = torch.arange(8)[None] + 100
    denoised = torch.arange(8)[None] + 200
    hf = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=float(bound) if bound else 1e-9), 8, 50, 48)
    ref = hf.accept_canvas(current, denoised, logits, cur_step=1)
    ours, mask = accept(current, denoised, token_entropy(logits), bound if bound else 1e-9)
    assert torch.equal(ours, ref) and torch.equal(mask, hf.accepted_token_mask)


@pytest.mark.parametrize("threshold", [0, 1, 2])
def test_stopping_equals_stable_and_confident(threshold):
    a, b, c = (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 4]]), torch.tensor([[9, 9, 9]]))
    sequence = [a, b, b, b, c, c, c, a]
    confident = logits_with_entropy([1e-3] * 3)
    unsure = logits_with_entropy([50.0] * 3)
    s = SamplerDefaults(stability_threshold=threshold, confidence_threshold=0.5)
    ours = StableAndConfident(s)
    ref = StableAndConfidentStoppingCriteria(stability_threshold=threshold, confidence_threshold=0.5)
    got, want = [], []
    for n, argmax in enumerate(sequence):
        logits = unsure if n == 5 else confident
        got.append(ours(argmax, token_entropy(logits)))
        want.append(bool(ref(argmax, logits)[0]))
    assert got == want and any(want) and not all(want)


def test_temperature_schedule_equals_processor():
    s = SamplerDefaults(max_steps=48, t_min=0.4, t_max=0.8)
    proc = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=48)
    scores = torch.randn(1, 4, 10)
    for step in (48, 31, 1):
        ref = proc(None, scores, cur_step=torch.tensor(step, dtype=torch.int32))
        assert torch.equal(scores / temperature(step, s), ref)
