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

from dgemma.plugin import sampler as S
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
    torch.testing.assert_close(token_entropy(logits), ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(token_entropy(logits, torch.softmax(logits, -1)), ref, atol=1e-6, rtol=1e-6)
    assert token_entropy(logits)[0, 3] < 1e-6


@pytest.mark.parametrize("shape", [(1, 1, 2), (1, 7, 300), (1, 256, 4096)])
def test_sample_draws_what_multinomial_draws(shape):
    """The written-out Gumbel-style draw takes the same tokens and leaves the generator in the same state
    as torch.multinomial, so a seed reproduces transformers' generate() either way."""
    assert S._exponential_is_torchs()
    for seed in range(20):
        probs = torch.softmax(torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3, -1)
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = torch.multinomial(probs.view(-1, shape[-1]), 1, generator=a).view(shape[:-1])
        assert torch.equal(S.sample(probs, b), want)
        assert torch.equal(a.get_state(), b.get_state())


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
        stop, mean = ours(argmax, token_entropy(logits).mean())
        assert mean == token_entropy(logits).mean().item()
        got.append(stop)
        want.append(bool(ref(argmax, logits)[0]))
    assert got == want and any(want) and not all(want)


def test_temperature_schedule_equals_processor():
    s = SamplerDefaults(max_steps=48, t_min=0.4, t_max=0.8)
    proc = LinearTemperatureScheduleLogitsProcessor(t_min=0.4, t_max=0.8, max_denoising_steps=48)
    scores = torch.randn(1, 4, 10)
    for step in (48, 31, 1):
        ref = proc(None, scores, cur_step=torch.tensor(step, dtype=torch.int32))
        assert torch.equal(scores / temperature(step, s), ref)


def test_counter_gumbel_sample_draws_from_the_distribution():
    """The counter-based Gumbel-max draw (the fused head's, plugin/sampler.gumbel_sample) takes each token
    with its softmax probability: 20,000 positions of one 5-token distribution, frequencies within 0.015
    (about 4 standard deviations)."""
    p = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])
    processed = p.log().expand(1, 20_000, 5).contiguous() * 1.7 - 3.0  # softmax of a scaled-and-shifted log p
    want = torch.softmax(processed[0, 0], -1)
    drawn = S.gumbel_sample(processed, seed=7, index=3)[0]
    freq = torch.bincount(drawn, minlength=5).float() / drawn.numel()
    assert float((freq - want).abs().max()) < 0.015
    again, other = S.gumbel_sample(processed, 7, 3), S.gumbel_sample(processed, 7, 4)
    assert torch.equal(again[0], drawn) and not torch.equal(other[0], drawn)


def test_counter_tokens_are_uniform_and_their_streams_differ():
    from dgemma.plugin import rng

    pos = torch.arange(50_000).numpy()
    renoise = rng.sampler_tokens(11, 5, pos, 10, rng.RENOISE)
    counts = torch.bincount(torch.from_numpy(renoise), minlength=10)
    assert int(counts.min()) > 4_700 and int(counts.max()) < 5_300  # 5,000 ± 4.4 sd
    for other in (rng.sampler_tokens(11, 5, pos, 10, rng.INIT), rng.sampler_tokens(11, 6, pos, 10, rng.RENOISE),
                  rng.sampler_tokens(12, 5, pos, 10, rng.RENOISE)):
        assert (other == renoise).mean() < 0.15  # independent draws agree 10% of the time
    with pytest.raises(ValueError, match="vocab"):
        rng.sampler_tokens(1, 0, pos, 0, rng.RENOISE)


def test_counter_steps_number_their_passes_across_canvases():
    """CounterSteps draws pass k's sample, re-noised tokens and (for a canvas starting at pass k) initial
    canvas from counter k: a seed reproduces every canvas, and consecutive canvases differ."""
    from dgemma.plugin import rng

    g = torch.Generator().manual_seed(0)
    table = torch.randn(64, 33, generator=g) * 2  # logits of a fake decoder: a function of the token
    decode = lambda canvas, sc: table[canvas]  # noqa: E731  [1, C, V]
    s = SamplerDefaults(max_steps=6, t_min=0.5, t_max=1.0, entropy_bound=0.5, stability_threshold=2,
                        confidence_threshold=1e-9)
    runs = []
    for _ in range(2):
        steps = S.CounterSteps(S.logits_stats(decode), 33, seed=99)
        seen: list[S.StepInfo] = []
        results = [S.denoise_canvas(steps, 16, s, seen.append) for _ in range(2)]
        runs.append(([r.tokens for r in results], [(i.canvas, i.accepted) for i in seen], steps.index))
    (tokens, infos, passes), (tokens2, infos2, _) = runs
    assert passes == 12 and all(torch.equal(a, b) for a, b in zip(tokens, tokens2))
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(infos, infos2))
    assert torch.equal(S.CounterSteps(None, 33, 99).init(16)[0],
                       torch.from_numpy(rng.sampler_tokens(99, 0, range(16), 33, rng.INIT)))
    # pass 0's re-noised positions hold pass 0's RENOISE tokens; its accepted ones the pass's sample
    canvas0, accepted0 = infos[0]
    fresh = torch.from_numpy(rng.sampler_tokens(99, 0, range(16), 33, rng.RENOISE))
    assert bool((~accepted0).any()) and torch.equal(canvas0[~accepted0], fresh[~accepted0])
    init = torch.from_numpy(rng.sampler_tokens(99, 0, range(16), 33, rng.INIT))[None]
    sample0 = S.gumbel_sample(decode(init, None) / S.temperature(6, s), 99, 0)[0]
    assert bool(accepted0.any()) and torch.equal(canvas0[accepted0], sample0[accepted0])
    assert not torch.equal(infos[0][0], infos[6][0])  # the second canvas starts from other draws


@pytest.mark.parametrize("threshold", [0, 1, 3])
def test_one_host_read_per_pass(monkeypatch, threshold):
    """denoise_canvas reads each pass's results on the host once: the mean entropy and the stability
    comparisons come back in one transfer (on a GPU each read is a sync that stalls the next pass's
    launches). Counted over every way a tensor reaches the host; the passes' own work reads nothing."""
    from dgemma.plugin.sampler import Denoised, denoise_canvas

    C, passes = 6, []

    class Fixed:  # a decoder that is sure of one canvas from the third pass on
        def init(self, length: int) -> torch.Tensor:
            return torch.zeros(1, length, dtype=torch.long)

        def denoise(self, canvas, sc, t) -> Denoised:
            passes.append(len(reads))
            tokens = torch.full((1, C), min(len(passes), 3))
            return Denoised(tokens, torch.full((1, C), 1e-4 if len(passes) >= 3 else 2.0), tokens, None)

        def accept_renoise(self, canvas, out, bound):
            return out.sample, torch.ones_like(canvas, dtype=torch.bool)

    reads: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "__array__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name: (reads.append(_n), _f(self, *a))[1])
    equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda *a: (reads.append("equal"), equal(*a))[1])
    result = denoise_canvas(Fixed(), C, SamplerDefaults(stability_threshold=threshold))
    counted = list(reads)
    monkeypatch.undo()
    assert result.stopped_early and result.steps == 3 + threshold
    assert len(counted) == result.steps and passes == list(range(result.steps)), counted
