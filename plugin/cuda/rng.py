"""numpy reference of csrc/philox.cuh: Philox4x32-10 and the sampler's uniforms, bit-exact.

The GPU sampler draws the number of any (seed, step, position, vocabulary index) from a counter, with no
generator state (issue 5: the Gumbel-max sample of the fused head). This module gives the same numbers on
the CPU, so that the torch backend can be given the cuda backend's draws and the two compared token for
token."""

from __future__ import annotations

import numpy as np

M0, M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
W0, W1 = 0x9E3779B9, 0xBB67AE85
MASK = np.uint64(0xFFFFFFFF)


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
    """float32 in (0, 1) from uint32 words: the top 24 bits, centred (csrc/philox.cuh philox_uniform)."""
    return (words >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24) + np.float32(2.0**-25)


def sampler_uniforms(seed: int, step: int, positions: np.ndarray | int, vocab: int) -> np.ndarray:
    """[P, V] float32: the uniform csrc/philox.cuh's sampler_uniform draws for every (position, index)."""
    pos = np.atleast_1d(np.asarray(positions, dtype=np.uint64))[:, None]
    v = np.arange(vocab, dtype=np.uint64)[None, :]
    w = philox4x32_10(v, pos, np.uint64(step), np.uint64(0), seed & 0xFFFFFFFF, seed >> 32)[0]
    return uniform(w)
