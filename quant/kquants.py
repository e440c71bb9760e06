"""Q4_0, Q5_0, Q5_1 and the K-quants (Q2_K .. Q6_K): ggml's reference quantizers, vectorised.

Each class reproduces ggml's `quantize_row_*_ref` (ggml/src/ggml-quants.c) bit for bit; that is
what `ggml_quantize_chunk` runs for these types when no importance matrix is given. The searches
run over all blocks at once: values are laid out position-major (`[positions, sub-blocks]`),
and the C's per-element loops become loops over the 16 or 32 positions of a sub-block (or over
the fixed candidate scales), each step one numpy operation across every sub-block.

What bit-exactness takes (float32 throughout, in the C's order of operations):
- every constant is an `np.float32`, so nothing is promoted to float64;
- every running sum is accumulated position by position, as the C loop does (`_seqsum`),
  never with `np.sum`, whose pairwise summation rounds differently;
- `nearest_int` is the C's magic-number trick itself (add 1.5 * 2**23, take the mantissa
  bits), which is round-half-to-even in range and reproduces ggml's garbage out of range;
- fp16 scales use numpy's float16 cast (IEEE round to nearest even), which is what
  ggml's `GGML_FP32_TO_FP16` (`ggml_compute_fp32_to_fp16`, a software conversion) computes;
- "first index wins" ties (`if (ax > amax)`) are `argmax`, and maxima that start at +0.0
  in the C stay +0.0 here (the sign of a zero scale reaches the stored fp16 bytes).
FMA: the libggml-base bundled with llama-cpp-python (like any x86-64 build of ggml-base, which
gets no -march flags) contains no FMA instruction, so the C never fuses a*b+c and plain float32
multiply-then-add matches it exactly; tests/test_kquants.py checks every type against it. A build
that does contract (x86 with -march=native -ffp-contract=fast; aarch64, where GCC contracts by
default) is another reference: against ggml-quants.c compiled that way, 100% of Q4_0/Q5_0
blocks but only ~65% (Q2_K), ~73% (Q5_K), ~89% (Q4_K), ~99.6% (Q3_K, Q6_K) of K-quant blocks
were identical (normal/Cauchy/tiny/huge/mixed rows), with no systematic error difference
either way: the fused roundings move the scale searches' tie-breaks, and one changed choice
changes the whole block.

Dequantizers follow gguf-py's `quants.py` operation for operation (equal results).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType

from .types import QuantType

F = np.float32
QK_K = 256
GROUP_MAX_EPS = F(1e-15)  # ggml-quants.c GROUP_MAX_EPS
_MAGIC = F(12582912.0)  # 1.5 * 2**23

# Work on at most this many values at a time (keeps temporaries in cache), and split arrays
# larger than _PARALLEL_MIN values over threads (numpy releases the GIL inside its loops).
CHUNK_VALUES = 1 << 18
_PARALLEL_MIN = 1 << 20
_THREADS = max(1, min(2, os.cpu_count() or 1))


# ---------------------------------------------------------------- helpers


def nearest_int(v: np.ndarray) -> np.ndarray:
    """ggml's `nearest_int` (ggml-quants.c): float32 -> int32, exactly, any input."""
    bits = (np.asarray(v, dtype=F) + _MAGIC).view(np.int32)
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def _seqsum(terms: np.ndarray, start_zero: bool = True) -> np.ndarray:
    """Sum over axis 0 in index order, in float32: the C's `s = 0; for (i) s += t[i]`.

    With `start_zero=False` the sum starts from `terms[0]` itself (C: `s = t[0]; for (i = 1..)`).
    """
    acc = terms[0] + F(0) if start_zero else terms[0].copy()
    for t in terms[1:]:
        acc += t
    return acc


def _first_absmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """C: `amax = 0; max = 0; for (i) if (|x[i]| > amax) { amax = |x[i]|; max = x[i]; }` over axis 0."""
    ax = np.abs(x)
    ax = np.where(np.isnan(ax), F(0), ax)  # NaN is never `>` (scales can be NaN once x*x overflows)
    i = ax.argmax(axis=0)  # first occurrence, as the strict `>` keeps the first
    amax = np.take_along_axis(ax, i[None], axis=0)[0]
    vmax = np.take_along_axis(x, i[None], axis=0)[0]
    vmax = np.where(amax > 0, vmax, F(0))  # never updated: stays +0.0
    return amax, vmax


def _positive_max(v: np.ndarray) -> np.ndarray:
    """C: `m = 0; for (j) if (v[j] > m) m = v[j];` over the last axis (+0.0 when nothing is > 0)."""
    m = np.fmax.reduce(v, axis=-1)  # skips NaN, as the C's `>` does
    return np.where(m > 0, m, F(0))


def _fp16(v: np.ndarray) -> np.ndarray:
    """GGML_FP32_TO_FP16 (round to nearest even; overflow to inf as in ggml)."""
    with np.errstate(over="ignore", invalid="ignore"):
        return np.asarray(v, dtype=F).astype(np.float16)


def _u8(v: np.ndarray) -> np.ndarray:
    """C conversion of an int to uint8_t (keep the low byte)."""
    return (v & 0xFF).astype(np.uint8)


def _i8(v: np.ndarray) -> np.ndarray:
    """C conversion of an int to int8_t (keep the low byte, signed)."""
    return (v & 0xFF).astype(np.uint8).view(np.int8).astype(np.int32)


def _trunc_i8(v: np.ndarray) -> np.ndarray:
    """C `(int8_t)f` for a float f: truncate toward zero, keep the low byte (x86 cvttss2si)."""
    with np.errstate(invalid="ignore"):
        return _i8(v.astype(np.int32))


def _blockwise(fn, blocks: np.ndarray, values_per_block: int) -> np.ndarray:
    """Apply `fn` ([n, bs] f32 -> [n, ts] u8) in chunks, on two threads for big arrays.

    Floating-point warnings are silenced: like ggml, the quantizers let inf and NaN flow through
    (fp16 scales that overflow, 0 * inf); the bytes are the same either way.
    """
    blocks = np.ascontiguousarray(blocks, dtype=F)
    n = blocks.shape[0]

    def run(a: int, b: int) -> np.ndarray:
        with np.errstate(all="ignore"):  # numpy's error state is per thread: set it in each
            return fn(blocks[a:b])

    step = max(1, CHUNK_VALUES // values_per_block)
    spans = [(i, min(n, i + step)) for i in range(0, n, step)]
    if len(spans) == 1:
        return run(0, n)
    if _THREADS > 1 and n * values_per_block > _PARALLEL_MIN:
        with ThreadPoolExecutor(_THREADS) as pool:
            parts = list(pool.map(lambda span: run(*span), spans))
    else:
        parts = [run(a, b) for a, b in spans]
    return np.concatenate(parts, axis=0)


def _positions(blocks: np.ndarray, sub: int) -> np.ndarray:
    """[n, bs] -> [sub, n * bs // sub]: sub-blocks of `sub` values, position-major."""
    return np.ascontiguousarray(blocks.reshape(-1, sub).T)


def _blocks_of(a: np.ndarray, n: int) -> np.ndarray:
    """Inverse of `_positions` for per-value arrays: [sub, n_sub] -> [n, bs]."""
    return np.ascontiguousarray(a.T).reshape(n, -1)


# ---------------------------------------------------------------- scale searches


def _round_clip_into(v: np.ndarray, lo: int, hi: int, exact: bool) -> np.ndarray:
    """clamp(nearest_int(v), lo, hi) as float32, in place in `v` when the fast path applies.

    `exact=False` promises |v| < 4194303 and no NaN, where nearest_int is round-half-even, i.e. `np.rint`.
    """
    if exact:
        return np.clip(nearest_int(v), lo, hi).astype(F)
    np.rint(v, out=v)
    return np.clip(v, F(lo), F(hi), out=v)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int, use_mad: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml's `make_qkx2_quants` over sub-blocks: x, w [k, n] -> (L [k, n] int32, scale [n], the_min [n])."""
    nmax_f = F(nmax)
    # C: min = max = x[0], then `if (x[i] < min) min = x[i]` (a NaN is skipped, unless it is x[0])
    finite = bool(np.isfinite(x).all())  # else: the exact nearest_int (NaN must round as ggml's trick does)
    first_nan = np.isnan(x[0])
    xmin = np.where(first_nan, x[0], np.fmin.reduce(x, axis=0))
    mx = np.where(first_nan, x[0], np.fmax.reduce(x, axis=0))
    sum_w = _seqsum(w, start_zero=False)
    sum_x = _seqsum(w * x, start_zero=False)
    mn = np.where(xmin > 0, F(0), xmin)
    flat_min = mn
    flat = mx == mn
    err = np.abs if use_mad else np.square

    v = np.empty_like(x)  # iscale * (x - min), then the candidate's quants
    e = np.empty_like(x)  # the candidate's weighted error terms
    sums = np.empty((x.shape[0], 3) + x.shape[1:], dtype=F)  # per position: w*l, w*l*l, w*l*x

    def quants(iscale: np.ndarray, m: np.ndarray) -> np.ndarray:
        """clamp(nearest_int(iscale * (x - m)), 0, nmax) as float32 (in `v`, or a new array)."""
        np.subtract(x, m, out=v)
        np.multiply(v, iscale, out=v)
        # |iscale * (x - m)| is at most |iscale| * max(|max - m|, |xmin - m|), rounding being monotonic:
        # below 2**22 everywhere, `nearest_int` is `rint` and the float path is exact
        bound = np.abs(iscale) * np.maximum(np.abs(mx - m), np.abs(xmin - m))
        return _round_clip_into(v, 0, nmax, exact=not (finite and bool((bound < F(4194303)).all())))

    def weighted_error(scale: np.ndarray, the_min: np.ndarray, lf: np.ndarray) -> np.ndarray:
        """sum_i w * err(scale * l + min - x), in the C's order."""
        np.multiply(lf, scale, out=e)
        np.add(e, the_min, out=e)
        np.subtract(e, x, out=e)
        err(e, out=e)
        np.multiply(e, w, out=e)
        return _seqsum(e)

    iscale = nmax_f / (mx - mn)
    scale = F(1) / iscale
    best_error = weighted_error(scale, mn, quants(iscale, mn))
    # the quants of the best candidate are recomputed at the end from its grid (iscale and the min
    # it was computed with): the same operations on the same values, so the same quants
    best_iscale, best_grid_min = iscale, mn

    for step in range(nstep + 1):
        # `min` is the best candidate's so far: it moves the grid of the following candidates
        iscale = (F(rmin) + F(rdelta) * F(step) + nmax_f) / (mx - mn)
        lf = quants(iscale, mn)
        wl = np.multiply(w, lf, out=sums[:, 0])
        np.multiply(wl, lf, out=sums[:, 1])
        np.multiply(wl, x, out=sums[:, 2])
        sum_l, sum_l2, sum_xl = _seqsum(sums)
        D = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        clamp = this_min > 0
        this_min = np.where(clamp, F(0), this_min)
        this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
        cur_error = weighted_error(this_scale, this_min, lf)
        better = (D > 0) & (cur_error < best_error)
        best_iscale = np.where(better, iscale, best_iscale)
        best_grid_min = np.where(better, mn, best_grid_min)
        best_error = np.where(better, cur_error, best_error)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)

    L = quants(best_iscale, best_grid_min).astype(np.int32)

    # max == min: the C returns before the search with L = 0, scale = 0, the_min = -min
    return np.where(flat, 0, L), np.where(flat, F(0), scale), -np.where(flat, flat_min, mn)


def make_qx_quants_rmse1(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_qx_quants(n, nmax, x, L, rmse_type=1, qw=NULL)`: x [k, n] -> (L [k, n], scale [n])."""
    amax, vmax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    finite = bool(np.isfinite(x).all())
    w = x * x
    wx = w * x
    v = np.empty_like(x)
    sums = np.empty((x.shape[0], 2) + x.shape[1:], dtype=F)

    def quants(iscale: np.ndarray) -> np.ndarray:
        """clamp(nearest_int(iscale * x), -nmax, nmax - 1) as float32; |iscale * x| <= |iscale| * amax."""
        np.multiply(x, iscale, out=v)
        exact = not (finite and bool((np.abs(iscale) * amax < F(4194303)).all()))
        return _round_clip_into(v, -nmax, nmax - 1, exact)

    def sums_for(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lf = quants(iscale)
        np.multiply(wx, lf, out=sums[:, 0])  # w*x[i]*l
        np.multiply(np.multiply(w, lf, out=sums[:, 1]), lf, out=sums[:, 1])  # w*l*l
        sumlx, suml2 = _seqsum(sums)
        return sumlx, suml2

    best_iscale = F(-nmax) / vmax
    sumlx, suml2 = sums_for(best_iscale)
    scale = np.where(suml2 != 0, sumlx / suml2, F(0))
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(step)) / vmax
        sumlx, suml2 = sums_for(iscale)
        better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
        best_iscale = np.where(better, iscale, best_iscale)
        scale = np.where(better, sumlx / suml2, scale)
        best = np.where(better, scale * sumlx, best)
    L = quants(best_iscale).astype(np.int32) + nmax  # the best candidate's quants, recomputed

    return np.where(zero, 0, L), np.where(zero, F(0), scale)


def make_q3_quants_rmse(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """ggml's `make_q3_quants(n, nmax, x, L, do_rmse=true)`: x [k, n] -> (L [k, n], scale [n])."""
    amax, vmax = _first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    iscale = F(-nmax) / vmax
    L = np.clip(nearest_int(iscale * x), -nmax, nmax - 1).astype(F)  # [k, n], exact small ints
    sumlx = _seqsum(wx * L)
    suml2 = _seqsum(w * L * L)
    # A pass that changes nothing leaves the state as it was, so running all 5 passes on every
    # sub-block equals the C's early `break` when a pass made no change.
    for _ in range(5):
        for i in range(x.shape[0]):
            wi, wxi, li = w[i], wx[i], L[i]
            slx = sumlx - wxi * li
            sl2 = suml2 - wi * li * li
            new_l = np.clip(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1).astype(F)
            take = (slx > 0) & (new_l != li)
            slx = slx + wxi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take &= (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
            L[i] = np.where(take, new_l, li)
            sumlx = np.where(take, slx, sumlx)
            suml2 = np.where(take, sl2, suml2)
    scale = np.where(suml2 > 0, sumlx / suml2, F(0))
    L = L.astype(np.int32) + nmax
    return np.where(zero, 0, L), np.where(zero, F(0), scale)


# ---------------------------------------------------------------- Q4_0, Q5_0


def _legacy_scale(blocks: np.ndarray, div: float) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0/Q5_0: d = max / div with max the first value of largest |x| (+0.0 if none), id = d ? 1/d : 0."""
    _, vmax = _first_absmax(blocks.T)
    d = vmax / F(div)
    inv_d = np.where(d != 0, F(1) / d, F(0))
    return d, inv_d


class Q4_0(QuantType, qtype=GGMLQuantizationType.Q4_0):
    # quantize_row_q4_0_ref: d = max / -8, q = MIN(15, (int8_t)(x * id + 8.5f)); qs[j] = q[j] | q[j + 16] << 4
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _blockwise(cls._quantize, blocks, 32)

    @classmethod
    def _quantize(cls, blocks: np.ndarray) -> np.ndarray:  # [n, 32]
        d, inv_d = _legacy_scale(blocks, -8)
        q = _u8(np.minimum(15, _trunc_i8(blocks * inv_d[:, None] + F(8.5))))
        qs = q[:, :16] | (q[:, 16:] << 4)
        return np.concatenate([_fp16(d)[:, None].view(np.uint8), qs], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # gguf-py Q4_0.dequantize_blocks
        blocks = np.ascontiguousarray(blocks)
        d = blocks[:, :2].copy().view(np.float16).astype(F)  # [n, 1]
        qs = blocks[:, 2:]
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - np.int8(8)
        return d * q.astype(F)


class Q5_0(QuantType, qtype=GGMLQuantizationType.Q5_0):
    # quantize_row_q5_0_ref: d = max / -16, q = MIN(31, (int8_t)(x * id + 16.5f)); low nibbles as Q4_0, bit 4 in qh
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _blockwise(cls._quantize, blocks, 32)

    @classmethod
    def _quantize(cls, blocks: np.ndarray) -> np.ndarray:  # [n, 32]
        d, inv_d = _legacy_scale(blocks, -16)
        q = _u8(np.minimum(31, _trunc_i8(blocks * inv_d[:, None] + F(16.5))))
        qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
        qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")  # bit j of the little-endian uint32 = q[j] >> 4
        return np.concatenate([_fp16(d)[:, None].view(np.uint8), qh, qs], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # gguf-py Q5_0.dequantize_blocks
        blocks = np.ascontiguousarray(blocks)
        d = blocks[:, :2].copy().view(np.float16).astype(F)
        qh = np.unpackbits(blocks[:, 2:6], axis=1, bitorder="little")  # [n, 32]
        qs = blocks[:, 6:]
        ql = np.concatenate([qs & 0x0F, qs >> 4], axis=1)
        q = (ql | (qh << 4)).astype(np.int8) - np.int8(16)
        return d * q.astype(F)


class Q5_1(QuantType, qtype=GGMLQuantizationType.Q5_1):
    # quantize_row_q5_1_ref: d = (max - min) / 31, m = min, q = (uint8_t)((x - min) * id + 0.5f);
    # layout d, m (fp16), qh (bit 4 of each q), qs (low nibbles: j and j + 16 share a byte).
    # The llama.cpp fallback for Q5_K rows that are not a multiple of 256.
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _blockwise(cls._quantize, blocks, 32)

    @classmethod
    def _quantize(cls, blocks: np.ndarray) -> np.ndarray:  # [n, 32]
        rows = np.arange(len(blocks))
        # the first minimum / maximum, as the C's strict `<` / `>` keep it (the sign of a zero min is stored)
        lo, hi = blocks[rows, blocks.argmin(axis=1)], blocks[rows, blocks.argmax(axis=1)]  # [n]
        d = (hi - lo) / F(31)
        with np.errstate(divide="ignore"):
            inv_d = np.where(d != 0, F(1) / d, F(0)).astype(F)
        with np.errstate(invalid="ignore"):
            q = _u8(((blocks - lo[:, None]) * inv_d[:, None] + F(0.5)).astype(np.int32))  # [n, 32]
        qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
        qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
        head = np.stack([_fp16(d), _fp16(lo)], axis=1).view(np.uint8)  # [n, 4]
        return np.concatenate([head, qh, qs], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # gguf-py Q5_1.dequantize_blocks
        blocks = np.ascontiguousarray(blocks)
        d = blocks[:, 0:2].copy().view(np.float16).astype(F)
        m = blocks[:, 2:4].copy().view(np.float16).astype(F)
        qh = np.unpackbits(blocks[:, 4:8], axis=1, bitorder="little")  # [n, 32]
        qs = blocks[:, 8:]
        q = (np.concatenate([qs & 0x0F, qs >> 4], axis=1) | (qh << 4)).astype(F)
        return d * q + m


# ---------------------------------------------------------------- K-quants


def _pack_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K 12-byte scales from 6-bit ls, lm [n, 8] (inverse of get_scale_min_k4)."""
    lo = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    mid = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    hi = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def _unpack_k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """get_scale_min_k4 for j = 0..7: [n, 12] uint8 -> (sc [n, 8], m [n, 8]) (gguf-py Q4_K.get_scale_min)."""
    d, m, md = scales[:, 0:4], scales[:, 4:8], scales[:, 8:12]
    sc = np.concatenate([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], axis=1)
    mn = np.concatenate([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], axis=1)
    return sc, mn


def _affine_requant(xs: np.ndarray, d: np.ndarray, dm: np.ndarray, L: np.ndarray, nmax: int) -> np.ndarray:
    """C: `if (!d) continue; L = clamp(nearest_int((x + dm) / d), 0, nmax)` per sub-block; x [k, n], d, dm [n]."""
    new = np.clip(nearest_int((xs + dm) / d), 0, nmax)
    return np.where(d != 0, new, L)


def _qkx_superblock(blocks: np.ndarray, sub: int, nmax: int, rmin: float, nstep: int) -> tuple:
    """The shared front half of quantize_row_q4_K_ref / q5_K_ref: search, 6-bit scales, requant.

    Returns (d16 [n], dmin16 [n], scales bytes [n, 12], L [n, 256] int32).
    """
    n = blocks.shape[0]
    xs = _positions(blocks, sub)  # [32, n * 8]
    sum_x2 = _seqsum(xs * xs)
    av_x = np.sqrt(sum_x2 / F(32))
    w = av_x + np.abs(xs)
    L, scales, mins = make_qkx2_quants(xs, w, nmax, rmin, 0.1, nstep, use_mad=False)
    scales = scales.reshape(n, 8)
    mins = mins.reshape(n, 8)
    max_scale = _positive_max(scales)
    max_min = _positive_max(mins)
    inv_scale = np.where(max_scale > 0, F(63) / max_scale, F(0))
    inv_min = np.where(max_min > 0, F(63) / max_min, F(0))
    ls = np.minimum(63, nearest_int(inv_scale[:, None] * scales) & 0xFF)  # uint8_t ls = nearest_int(..); MIN(63, ls)
    lm = np.minimum(63, nearest_int(inv_min[:, None] * mins) & 0xFF)
    d16 = _fp16(max_scale / F(63))
    dmin16 = _fp16(max_min / F(63))
    d = (d16.astype(F)[:, None] * ls.astype(F)).reshape(-1)  # [n * 8]
    dm = (dmin16.astype(F)[:, None] * lm.astype(F)).reshape(-1)
    L = _affine_requant(xs, d, dm, L, nmax)
    return d16, dmin16, _pack_k_scales(ls, lm), _blocks_of(L, n)


class Q4_K(QuantType, qtype=GGMLQuantizationType.Q4_K):
    # quantize_row_q4_K_ref: 8 sub-blocks of 32, weights av_x + |x|,
    # make_qkx2_quants(32, 15, .., rmin=-1, rdelta=0.1, nstep=20, use_mad=false), 6-bit scales/mins
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _blockwise(cls._quantize, blocks, QK_K)

    @classmethod
    def _quantize(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d16, dmin16, scales, L = _qkx_superblock(blocks, 32, 15, -1.0, 20)
        L = L.astype(np.uint8).reshape(n, 4, 2, 32)
        qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, 128)
        return np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), scales, qs], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # gguf-py Q4_K.dequantize_blocks: (d * sc) * q - (dmin * m)
        blocks = np.ascontiguousarray(blocks)
        n = blocks.shape[0]
        d = blocks[:, 0:2].copy().view(np.float16).astype(F)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(F)
        sc, m = _unpack_k_scales(blocks[:, 4:16])
        dl = (d * sc.astype(F)).reshape(n, 8, 1)
        ml = (dmin * m.astype(F)).reshape(n, 8, 1)
        qs = blocks[:, 16:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = (qs & 0x0F).reshape(n, 8, 32).astype(F)
        return (dl * q - ml).reshape(n, QK_K)


class Q5_K(QuantType, qtype=GGMLQuantizationType.Q5_K):
    # quantize_row_q5_K_ref: as Q4_K with make_qkx2_quants(32, 31, .., rmin=-0.5, rdelta=0.1, nstep=15, false);
    # bit 4 of the quant of sub-block s goes to bit s of qh[position]
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _blockwise(cls._quantize, blocks, QK_K)

    @classmethod
    def _quantize(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        d16, dmin16, scales, L = _qkx_superblock(blocks, 32, 31, -0.5, 15)
        L = L.astype(np.uint8).reshape(n, 8, 32)
        hi = L >> 4  # [n, 8, 32]
        qh = np.zeros((n, 32), np.uint8)
        for s in range(8):
            qh |= hi[:, s] << s
        lo = (L & 0x0F).reshape(n, 4, 2, 32)
        qs = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
        return np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), scales, qh, qs], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # gguf-py Q5_K.dequantize_blocks
        blocks = np.ascontiguousarray(blocks)
        n = blocks.shape[0]
        d = blocks[:, 0:2].copy().view(np.float16).astype(F)
        dmin = blocks[:, 2:4].copy().view(np.float16).astype(F)
        sc, m = _unpack_k_scales(blocks[:, 4:16])
        dl = (d * sc.astype(F)).reshape(n, 8, 1)
        ml = (dmin * m.astype(F)).reshape(n, 8, 1)
        qh = blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        ql = blocks[:, 48:].reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
        q = ((ql & 0x0F).reshape(n, 8, 32) | ((qh & 1) << 4)).astype(F)
        return (dl * q - ml).reshape(n, QK_K)


def _pack_2bit(L: np.ndarray) -> np.ndarray:
    """qs[j/4 + l] = L[j+l] | L[j+l+32] << 2 | L[j+l+64] << 4 | L[j+l+96] << 6, j = 0, 128: [n, 256] -> [n, 64]."""
    n = L.shape[0]
    q = L.astype(np.uint8).reshape(n, 2, 4, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)


class Q2_K(QuantType, qtype=GGMLQuantizationType.Q2_K):
    # quantize_row_q2_K_ref: 16 sub-blocks of 16, weights |x|,
    # make_qkx2_quants(16, 3, .., rmin=-0.5, rdelta=0.1, nstep=15, use_mad=true), 4-bit scales and mins
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _blockwise(cls._quantize, blocks, QK_K)

    @classmethod
    def _quantize(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        xs = _positions(blocks, 16)  # [16, n * 16]
        L, scales, mins = make_qkx2_quants(xs, np.abs(xs), 3, -0.5, 0.1, 15, use_mad=True)
        scales = scales.reshape(n, 16)
        mins = mins.reshape(n, 16)
        max_scale = _positive_max(scales)
        max_min = _positive_max(mins)
        q4scale = F(15)
        ls = np.where(max_scale[:, None] > 0, nearest_int((q4scale / max_scale)[:, None] * scales), 0)
        lm = np.where(max_min[:, None] > 0, nearest_int((q4scale / max_min)[:, None] * mins), 0)
        sc = _u8(ls) | _u8(lm << 4)  # y.scales[j] = l; y.scales[j] |= (l << 4)
        d16 = _fp16(np.where(max_scale > 0, max_scale / q4scale, F(0)))
        dmin16 = _fp16(np.where(max_min > 0, max_min / q4scale, F(0)))
        d = (d16.astype(F)[:, None] * (sc & 0x0F).astype(F)).reshape(-1)
        dm = (dmin16.astype(F)[:, None] * (sc >> 4).astype(F)).reshape(-1)
        L = _blocks_of(_affine_requant(xs, d, dm, L, 3), n)
        return np.concatenate([sc, _pack_2bit(L), d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # gguf-py Q2_K.dequantize_blocks: (d * (sc & 15)) * q - (dmin * (sc >> 4))
        blocks = np.ascontiguousarray(blocks)
        n = blocks.shape[0]
        sc = blocks[:, :16]
        d = blocks[:, 80:82].copy().view(np.float16).astype(F)
        dmin = blocks[:, 82:84].copy().view(np.float16).astype(F)
        dl = (d * (sc & 0x0F).astype(F)).reshape(n, 16, 1)
        ml = (dmin * (sc >> 4).astype(F)).reshape(n, 16, 1)
        qs = blocks[:, 16:80].reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
        q = (qs & 3).reshape(n, 16, 16).astype(F)
        return (dl * q - ml).reshape(n, QK_K)


class Q3_K(QuantType, qtype=GGMLQuantizationType.Q3_K):
    # quantize_row_q3_K_ref: 16 sub-blocks of 16, make_q3_quants(16, 4, .., do_rmse=true),
    # 6-bit signed scales (iscale = -32 / max_scale), d = 1 / iscale; high bit of each quant in hmask
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _blockwise(cls._quantize, blocks, QK_K)

    @classmethod
    def _quantize(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        xs = _positions(blocks, 16)  # [16, n * 16]
        L, scales = make_q3_quants_rmse(xs, 4)
        scales = scales.reshape(n, 16)
        _, max_scale = _first_absmax(scales.T)  # first of largest |scale|, +0.0 if all zero
        nonzero = max_scale != 0
        iscale = F(-32) / max_scale
        sc6 = np.clip(_i8(nearest_int(iscale[:, None] * scales)), -32, 31) + 32  # int8_t l = nearest_int(..)
        d16 = _fp16(np.where(nonzero, F(1) / iscale, F(0)))
        sc6 = np.where(nonzero[:, None], sc6, 0).astype(np.uint8)  # [n, 16] 6-bit; scales stay 0 otherwise
        packed = np.concatenate([
            (sc6[:, :8] & 0x0F) | ((sc6[:, 8:] & 0x0F) << 4),
            (sc6[:, 0:4] >> 4) | ((sc6[:, 4:8] >> 4) << 2) | ((sc6[:, 8:12] >> 4) << 4) | ((sc6[:, 12:16] >> 4) << 6),
        ], axis=1)
        d = (d16.astype(F)[:, None] * (sc6.astype(F) - F(32))).reshape(-1)  # d * (sc - 32), sc from the bytes
        new = np.clip(nearest_int(xs / d), -4, 3) + 4
        L = _blocks_of(np.where(d != 0, new, L), n)  # [n, 256] in 0..7
        hi = (L >> 2) & 1  # L > 3
        hmask = np.zeros((n, 32), np.uint8)
        hib = hi.astype(np.uint8).reshape(n, 8, 32)
        for b in range(8):
            hmask |= hib[:, b] << b
        return np.concatenate([hmask, _pack_2bit(L & 3), packed, d16[:, None].view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # gguf-py Q3_K.dequantize_blocks: (d * (sc - 32)) * (q - 4 * !hbit)
        blocks = np.ascontiguousarray(blocks)
        n = blocks.shape[0]
        hmask, qs, scales = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
        d = blocks[:, 108:110].copy().view(np.float16).astype(F)
        lsc = (scales[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
        hsc = (scales[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
        sc = ((lsc & 0x0F) | ((hsc & 3) << 4)).astype(np.int8) - np.int8(32)
        dl = (d * sc.astype(F)).reshape(n, 16, 1)
        ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)).reshape(n, 16, 16) & 3
        qh = (hmask.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)).reshape(n, 16, 16) & 1
        q = (ql.astype(np.int8) - ((qh ^ 1) << 2).astype(np.int8)).astype(F)
        return (dl * q).reshape(n, QK_K)


class Q6_K(QuantType, qtype=GGMLQuantizationType.Q6_K):
    # quantize_row_q6_K_ref: 16 sub-blocks of 16, make_qx_quants(16, 32, .., rmse_type=1, NULL),
    # int8 scales (iscale = -128 / max_scale), d = 1 / iscale; if every |scale| < GROUP_MAX_EPS the block is zeros
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return _blockwise(cls._quantize, blocks, QK_K)

    @classmethod
    def _quantize(cls, blocks: np.ndarray) -> np.ndarray:
        n = blocks.shape[0]
        xs = _positions(blocks, 16)  # [16, n * 16]
        L, scales = make_qx_quants_rmse1(xs, 32)
        scales = scales.reshape(n, 16)
        max_abs, max_scale = _first_absmax(scales.T)
        zero = max_abs < GROUP_MAX_EPS
        iscale = F(-128) / max_scale
        d16 = _fp16(np.where(zero, F(0), F(1) / iscale))
        sc = _i8(np.minimum(127, nearest_int(iscale[:, None] * scales)))  # int8 scales[ib] = MIN(127, ..)
        sc = np.where(zero[:, None], 0, sc)
        d = (d16.astype(F)[:, None] * sc.astype(F)).reshape(-1)
        new = np.clip(nearest_int(xs / d), -32, 31) + 32
        L = _blocks_of(np.where(d != 0, new, L), n)
        L = np.where(zero[:, None], 0, L).astype(np.uint8).reshape(n, 2, 4, 32)  # [n, half, quarter, l]
        ql = np.concatenate([
            (L[:, :, 0] & 0x0F) | ((L[:, :, 2] & 0x0F) << 4),
            (L[:, :, 1] & 0x0F) | ((L[:, :, 3] & 0x0F) << 4),
        ], axis=2).reshape(n, 128)
        qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)).reshape(n, 64)
        return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), d16[:, None].view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        # gguf-py Q6_K.dequantize_blocks: (d * sc) * (q - 32)
        blocks = np.ascontiguousarray(blocks)
        n = blocks.shape[0]
        ql, qh = blocks[:, :128], blocks[:, 128:192]
        sc = blocks[:, 192:208].view(np.int8).astype(F)
        d = blocks[:, 208:210].copy().view(np.float16).astype(F)
        dl = (d * sc).reshape(n, 16, 1)
        ql = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        ql = ql.reshape(n, 8, 32)
        qh = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
        qh = qh.reshape(n, 8, 32)
        q = (ql | (qh << 4)).astype(np.int8) - np.int8(32)
        return (dl * q.reshape(n, 16, 16).astype(F)).reshape(n, QK_K)
