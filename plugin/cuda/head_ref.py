"""The fused vocabulary head's contract, in torch: per-position statistics of the processed logits
computed one vocabulary tile at a time, never holding the [L, V] logits (docs/CUDA.md, step 4).

Per position, with z_v = softcap(h · E_v) / T (the sampler's processed logits):
  max, argmax            of z
  lse = log Σ exp(z)
  entropy = lse - Σ p·z  (p = softmax(z); what the sampler's token_entropy computes)
  sc = Σ p_v · E_v       (the self-conditioning input's `softmax @ E`, before the √D scale)
  sample = argmax (z_v + G_v), G_v = -log(-log u_v): a draw from p (Gumbel-max), with u_v the
           counter-based uniform of (seed, step, position, v) (csrc/philox.cuh, plugin/rng.py)
Each tile contributes (m, s = Σ exp(z - m), t = Σ exp(z - m)·z, acc = Σ exp(z - m)·E_v, argmax), and two
partials merge by rescaling the one with the smaller max: the same online rescaling as flash attention,
over the vocabulary. A CUDA kernel splits the vocabulary over blocks and merges partials this way;
tests/test_head_ref.py checks this reference against the plain computation on the full logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class HeadStats:
    max: torch.Tensor  # [L]
    argmax: torch.Tensor  # [L] int64
    lse: torch.Tensor  # [L]
    entropy: torch.Tensor  # [L]
    sc: torch.Tensor  # [L, D]
    sample: torch.Tensor | None = None  # [L] int64: the Gumbel-max draw (head_stats_reference with a seed)


@dataclass
class _Partial:
    m: torch.Tensor  # [L] running max
    s: torch.Tensor  # [L] Σ exp(z - m)
    t: torch.Tensor  # [L] Σ exp(z - m) · z
    acc: torch.Tensor  # [L, D] Σ exp(z - m) · E_v
    arg: torch.Tensor  # [L] index of the max

    def merge(self, o: _Partial) -> _Partial:
        m = torch.maximum(self.m, o.m)
        a, b = torch.exp(self.m - m), torch.exp(o.m - m)  # rescale both to the common max
        arg = torch.where(o.m > self.m, o.arg, self.arg)  # ties keep the lower index, as argmax does
        return _Partial(m, self.s * a + o.s * b, self.t * a + o.t * b, self.acc * a[:, None] + o.acc * b[:, None], arg)


def _processed(h: torch.Tensor, e: torch.Tensor, softcap: float, temperature: float) -> torch.Tensor:
    """softcap(h · e_v) / T for the rows of e: [L, n]."""
    z = h @ e.T
    if softcap:
        z = torch.tanh(z / softcap) * softcap
    return z / temperature


def _tile(h: torch.Tensor, e: torch.Tensor, offset: int, softcap: float, temperature: float) -> _Partial:
    """One vocabulary tile: h [L, D], e [n, D] rows offset..offset+n-1 of the embedding."""
    z = _processed(h, e, softcap, temperature)  # [L, n]
    m, arg = z.max(dim=-1)
    w = torch.exp(z - m[:, None])  # [L, n]
    return _Partial(m, w.sum(-1), (w * z).sum(-1), w @ e, arg + offset)


def head_stats_tiled(h: torch.Tensor, embed: torch.Tensor, softcap: float, temperature: float,
                     tile: int = 4096) -> HeadStats:
    """h: [L, D] final-normed hidden states; embed: [V, D] (the tied head). Never forms [L, V]."""
    if h.dim() != 2 or embed.dim() != 2 or h.shape[1] != embed.shape[1]:
        raise ValueError(f"head_stats: h must be [L, D] and embed [V, D] (got {tuple(h.shape)}, {tuple(embed.shape)})")
    if tile < 1 or temperature <= 0:
        raise ValueError(f"head_stats: tile must be >= 1 and temperature > 0 (got {tile}, {temperature})")
    part = None
    for start in range(0, embed.shape[0], tile):
        p = _tile(h, embed[start : start + tile], start, softcap, temperature)
        part = p if part is None else part.merge(p)
    lse = part.m + torch.log(part.s)
    return HeadStats(part.m, part.arg, lse, lse - part.t / part.s, part.acc / part.s[:, None])


def head_stats_reference(h: torch.Tensor, embed: torch.Tensor, softcap: float, temperature: float,
                         seed: int | None = None, step: int = 0) -> HeadStats:
    """The plain computation on the full [L, V] logits, with the sampler's own entropy; with a seed, also
    the Gumbel-max sample from the counter-based uniforms of positions 0..L-1 at `step`."""
    from ..sampler import token_entropy

    z = _processed(h, embed, softcap, temperature)  # [L, V]
    m, arg = z.max(dim=-1)
    p = torch.softmax(z, dim=-1)
    sample = None
    if seed is not None:
        from ..sampler import gumbel_sample

        sample = gumbel_sample(z[None], seed, step)[0]
    return HeadStats(m, arg, torch.logsumexp(z, dim=-1), token_entropy(z[None])[0], p @ embed, sample)
