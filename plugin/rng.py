"""numpy reference of csrc/philox.cuh: Philox4x32-10 and the sampler's uniforms, bit-exact.

The GPU sampler draws the number of any (seed, step, position, vocabulary index) from a counter, with no
generator state (issue 5: the Gumbel-max sample of the fused head, the re-noised tokens of the accept
step). This module gives the same numbers on the CPU: the torch backend's `--rng counter` sampler
(plugin/sampler.py, CounterSteps) draws them, so it can be compared with the cuda backend token for token.

Streams (the counter's last word): 0, the Gumbel uniforms, counter (v // 4, pos, step, 0), word v % 4 for
vocabulary row v (one Philox call per four rows); 1, uniform tokens,
counter (kind, pos, step, 1) with kind RENOISE or INIT (csrc/philox.cuh's SAMPLER_* constants)."""

from __future__ import annotations

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = np.uint64(0xFFFFFFFF)
RENOISE, INIT, TOKEN_STREAM = 0, 1, 1  # csrc/philox.cuh SAMPLER_RENOISE, SAMPLER_INIT, SAMPLER_TOKEN_STREAM


def philox4x32_10(c0, c1, c2, c3, k0: int, k1: int) -> tuple[np.ndarray, ...]:
    """Philox4x32 with 10 rounds on arrays of counters (any broadcastable uint32 arrays), one key.
    Returns the four uint32 words."""
    c = [np.asarray(x, dtype=np.uint64) & MASK for x in (c0, c1, c2, c3)]
    k0, k1 = k0 & 0xFFFFFFFF, k1 & 0xFFFFFFFF
    for rnd in range(10):
        if rnd:
            k0, k1 = (k0 + W0) & 0xFFFFFFFF, (k1 + W1) & 0xFFFFFFFF
        p0, p1 = M0 * c[0], M1 * c[2]  # < 2**64: no overflow in uint64
        hi0, lo0, hi1, lo1 = p0 >> np.uint64(32), p0 & MASK, p1 >> np.uint64(32), p1 & MASK
        c = [hi1 ^ c[1] ^ np.uint64(k0), lo1, hi0 ^ c[3] ^ np.uint64(k1), lo0]
    return tuple(x.astype(np.uint32) for x in c)


def uniform(words: np.ndarray) -> np.ndarray:
    """float32 in (0, 1), never 0 or 1, from uint32 words: the top 23 bits, centred, (2k + 1) / 2^24, exact
    (csrc/philox.cuh philox_uniform; 24 bits made the largest word exactly 1.0)."""
    return (words >> np.uint32(9)).astype(np.float32) * np.float32(2.0**-23) + np.float32(2.0**-24)


def sampler_uniforms(seed: int, step: int, positions: np.ndarray | int, vocab: int, start: int = 0) -> np.ndarray:
    """[P, vocab - start] float32: philox_uniform of csrc/philox.cuh's sampler_word for every (position,
    index), indices start .. vocab-1: word v % 4 of counter (v // 4, pos, step, 0)."""
    pos = np.atleast_1d(np.asarray(positions, dtype=np.uint64))[:, None]
    c0 = start // 4
    c = np.arange(c0, (vocab + 3) // 4, dtype=np.uint64)[None, :]  # the counters of rows 4 c0 .. past vocab - 1
    words = philox4x32_10(c, pos, np.uint64(step), np.uint64(0), seed & 0xFFFFFFFF, seed >> 32)  # 4 x [P, C]
    w = np.stack(words, axis=-1).reshape(len(pos), 4 * c.shape[1])  # [P, 4C]: row 4 c0 + k is word k % 4 of counter c0 + k // 4
    return uniform(w[:, start - 4 * c0:vocab - 4 * c0])


def sampler_tokens(seed: int, step: int, positions: np.ndarray | int, vocab: int, kind: int) -> np.ndarray:
    """[P] int64 tokens in [0, vocab): csrc/philox.cuh's sampler_token, floor(word * vocab / 2**32)."""
    if not 1 <= vocab < 2**31 or kind not in (RENOISE, INIT):
        raise ValueError(f"sampler_tokens: vocab must be in [1, 2**31) and kind RENOISE or INIT (got {vocab}, {kind})")
    pos = np.atleast_1d(np.asarray(positions, dtype=np.uint64))
    w = philox4x32_10(np.uint64(kind), pos, np.uint64(step), np.uint64(TOKEN_STREAM), seed & 0xFFFFFFFF, seed >> 32)[0]
    return ((w.astype(np.uint64) * np.uint64(vocab)) >> np.uint64(32)).astype(np.int64)
