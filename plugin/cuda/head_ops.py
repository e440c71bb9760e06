"""The vocabulary head's kernels (csrc/head.cu), checked wrappers beside their torch references, as in ops.py:
the sampler's per-position statistics of softcap(h · E_v) / T (max, argmax, log-sum-exp, entropy, the
Gumbel-max sample, sc = softmax @ E) without the [L, V] logits.

- head_stats: the fused float kernel (head_partials over vocabulary splits, then head_merge), any GPU.
- head_stats_chunked: the two products on tensor cores, one vocabulary chunk at a time (the chunk's
  logits by a matmul kernel, head_chunk_stats, P @ the chunk's f16 rows by cuBLAS, then head_merge).
plugin/cuda/head_ref.py holds the contract in torch; tests/test_cuda_kernels.py compares the kernels with
the references on a GPU.
"""

from __future__ import annotations


import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import ops
from .loader import kernel
from .ops import _HEAD_NAMES, _check_matmul, _dequantized, _launch, _mm_f32

HEAD_L, HEAD_THREADS, HEAD_MAX_D, HEAD_MAX_SPLITS = 4, 256, 4096, 1024  # csrc/head.cu
HEAD_CHUNK = ops.F16_ROWS  # vocabulary rows per chunk of head_stats_chunked: logits [L, 8192] at a time


def _check_head(op: str, h: torch.Tensor, temperature: float, seed: int, step: int, max_d: int | None = None) -> None:
    """What both heads need of h [L >= 1, D >= 1 (<= max_d)], the temperature and the draws' counters."""
    if h.dim() != 2 or h.shape[0] < 1 or not 1 <= h.shape[1] <= (max_d or h.shape[1]):
        raise ValueError(f"{op}: h must be [L>=1, D{f'<={max_d}' if max_d else '>=1'}] (got {tuple(h.shape)})")
    if not temperature > 0:
        raise ValueError(f"{op}: temperature must be > 0 (got {temperature})")
    if not (0 <= seed < 2**64 and 0 <= step < 2**31):
        raise ValueError(f"{op}: seed must be in [0, 2**64) and step in [0, 2**31) (got {seed}, {step})")


def head_stats(h: torch.Tensor, embed: torch.Tensor, qtype: GGMLQuantizationType, softcap: float, temperature: float,
               splits: int | None = None, seed: int = 0, step: int = 0):
    """Per-position max, argmax, log-sum-exp, entropy of softcap(h · E_v) / T, sc = softmax @ E and the
    Gumbel-max sample drawn with (seed, step) (csrc/philox.cuh), for h [L, D] float32 and the head E as
    GGML rows [V, row_bytes] uint8 (csrc/head.cu; the [L, V] logits are never formed). Returns
    plugin.cuda.head_ref.HeadStats; head_stats_reference is its reference."""
    _check_head("head_stats", h, temperature, seed, step, HEAD_MAX_D)
    L, D = h.shape
    qtype = _check_matmul("head_stats", h, embed, qtype, D, "[V, ")
    V = embed.shape[0]
    S = splits or min(HEAD_MAX_SPLITS, V, max(1, 4 * torch.cuda.get_device_properties(h.device).multi_processor_count
                                               // max(1, (L + HEAD_L - 1) // HEAD_L)))
    if not 1 <= S <= min(V, HEAD_MAX_SPLITS):
        raise ValueError(f"head_stats: splits must be in 1..{min(V, HEAD_MAX_SPLITS)} (got {S})")
    rows = (V + S - 1) // S
    S = (V + rows - 1) // rows  # no empty split
    h = h.contiguous()  # unit stride in D (checked); rows may be strided
    dev = h.device
    mst = torch.empty(S, L, 3, dtype=torch.float32, device=dev)
    arg = torch.empty(S, L, dtype=torch.int32, device=dev)
    gmax, gidx = torch.empty(S, L, dtype=torch.float32, device=dev), torch.empty(S, L, dtype=torch.int32, device=dev)
    acc = torch.empty(S, L, D, dtype=torch.float32, device=dev)
    f32 = np.float32
    part = kernel("head.cu", f"dg::head_partials<{int(qtype)}>", _HEAD_NAMES)
    _launch(part, (S, (L + HEAD_L - 1) // HEAD_L), (HEAD_THREADS,),
            (h, np.int32(L), np.int32(D), embed, np.int32(V), np.int32(rows), f32(softcap),
             f32(1.0 / temperature), np.uint64(seed), np.int32(step), mst, arg, gmax, gidx,
             acc), shared_mem=D * 4)
    return head_merge(mst, arg, gmax, gidx, acc)


def head_merge(mst: torch.Tensor, arg: torch.Tensor, g: torch.Tensor, sample: torch.Tensor, acc: torch.Tensor):
    """S partials of the head's statistics, in row order ((m, s, t) [S, L, 3], arg, g, sample [S, L], acc
    [S, L, D]; csrc/head.cuh) merged into plugin.cuda.head_ref.HeadStats (csrc/head.cu head_merge)."""
    from .head_ref import HeadStats

    S, L, D = acc.shape
    dev = acc.device
    out = HeadStats(torch.empty(L, device=dev), torch.empty(L, dtype=torch.int32, device=dev), torch.empty(L, device=dev),
                    torch.empty(L, device=dev), torch.empty(L, D, device=dev), torch.empty(L, dtype=torch.int32, device=dev))
    merge = kernel("head.cu", "head_merge", _HEAD_NAMES)
    _launch(merge, (L,), (HEAD_THREADS,), (mst, arg, g, sample, acc, np.int32(S), np.int32(L), np.int32(D), out.max,
                                           out.argmax, out.lse, out.entropy, out.sample, out.sc))
    out.argmax, out.sample = out.argmax.long(), out.sample.long()
    return out


def head_merge_reference(mst: torch.Tensor, arg: torch.Tensor, g: torch.Tensor, sample: torch.Tensor,
                         acc: torch.Tensor):
    """head_merge in float64 on the CPU: every split rescaled to the overall max; ties go to the earlier
    split (its rows are the lower ones)."""
    from .head_ref import HeadStats

    mst, acc = mst.double().cpu(), acc.double().cpu()
    arg, g, sample = arg.long().cpu(), g.double().cpu(), sample.long().cpu()
    empty = arg < 0  # [S, L]
    m_s = mst[..., 0].masked_fill(empty, float("-inf"))
    m = m_s.max(dim=0).values  # [L]
    f = torch.exp(m_s - m).masked_fill(empty, 0.0)  # [S, L]
    s, t = (f * mst[..., 1]).sum(0), (f * mst[..., 2]).sum(0)
    first = lambda hit: hit.double().argmax(dim=0)  # noqa: E731  the first split where hit holds
    cols = torch.arange(arg.shape[1])
    best = g.masked_fill(empty, float("-inf"))
    return HeadStats(m, arg[first(m_s == m), cols], m + torch.log(s), m + torch.log(s) - t / s,
                     (f[..., None] * acc).sum(0) / s[:, None], sample[first(best == best.max(dim=0).values), cols])


def _check_partials(run: tuple[torch.Tensor, ...], part: tuple[torch.Tensor, ...], acc: torch.Tensor) -> None:
    """A running partial ((m, s, t) [L, 3], arg [L], g [L], sample [L], acc [L, D]) and a chunk's (the same
    four, and its acc [L, D]): contiguous, of the kernels' types."""
    L, D = acc.shape if acc.dim() == 2 else (-1, -1)
    want = ((torch.float32, (L, 3)), (torch.int32, (L,)), (torch.float32, (L,)), (torch.int32, (L,)))
    tensors = (*run, *part, acc)
    shapes = (*want, (torch.float32, (L, D)), *want, (torch.float32, (L, D)))
    if len(run) != 5 or len(part) != 4 or any(t.dtype != d or tuple(t.shape) != s or not t.is_contiguous()
                                              for t, (d, s) in zip(tensors, shapes)):
        raise ValueError("head_merge_into: run must be contiguous (float32 [L, 3], int32 [L], float32 [L], int32 [L], "
                         "float32 [L, D]) and the chunk's the same four and float32 [L, D] (got "
                         f"{[f'{str(t.dtype)[6:]} {list(t.shape)}' for t in tensors]})")


def head_merge_into(run: tuple[torch.Tensor, ...], part: tuple[torch.Tensor, ...], acc: torch.Tensor,
                    check: bool = True) -> None:
    """Merge a chunk's partial (part = its (m, s, t), arg, g, sample; acc = P @ E_chunk [L, D]) into the running
    partial `run` of the chunks before it, in place (csrc/head.cu head_merge_into). A run whose arg is -1 has
    no rows yet and takes the chunk's; its values must be finite (its acc is multiplied by 0). check=False:
    the caller checked tensors of these shapes already (head_stats_chunked's middle chunks)."""
    if check:
        _check_partials(run, part, acc)
    if not acc.is_cuda:
        raise ValueError("head_merge_into: the partials must be CUDA tensors")
    L, D = acc.shape
    fn = kernel("head.cu", "head_merge_into", _HEAD_NAMES)
    _launch(fn, (L,), (HEAD_THREADS,), (*run, *part, acc, np.int32(D)))


def head_merge_into_reference(run: tuple[torch.Tensor, ...], part: tuple[torch.Tensor, ...], acc: torch.Tensor,
                              check: bool = True) -> None:
    """head_merge_into in float64 on the CPU: csrc/head.cuh's head_merge for each position (ties keep the run's
    row: its rows are the lower ones)."""
    if check:
        _check_partials(run, part, acc)
    mst, arg, g, sample, racc = run
    am, as_, at, ag = (x.double() for x in (mst[:, 0], mst[:, 1], mst[:, 2], g))
    bm, bs, bt, bg = (x.double() for x in (part[0][:, 0], part[0][:, 1], part[0][:, 2], part[2]))
    has_a, has_b = arg >= 0, part[1] >= 0
    m = torch.where(has_a & has_b, torch.maximum(am, bm), torch.where(has_a, am, bm))
    fa = torch.where(~has_b, 1.0, torch.where(has_a, torch.exp(am - m), 0.0))
    fb = torch.where(has_b, torch.exp(bm - m), 0.0)
    take_arg = has_b & (~has_a | (bm > am))
    take_g = has_b & (~has_a | (bg > ag))
    new_acc = racc.double() * fa[:, None] + acc.double() * fb[:, None]
    mst.copy_(torch.stack([m, as_ * fa + bs * fb, at * fa + bt * fb], dim=1).where(has_a[:, None] | has_b[:, None], mst.double()))
    arg.copy_(torch.where(take_arg, part[1], arg))
    g.copy_(torch.where(take_g, bg, ag))
    sample.copy_(torch.where(take_g, part[3], sample))
    racc.copy_(new_acc)


def _check_chunk(z: torch.Tensor, out: tuple[torch.Tensor, ...]) -> None:
    """z contiguous float32 [L, n]; out as head_chunk_stats writes it, each contiguous (the kernel writes rows of
    n and of 3): (m, s, t) float32 [L, 3], arg int32 [L], g float32 [L], sample int32 [L], P float16 [L, n]."""
    L, n = z.shape if z.dim() == 2 else (-1, -1)
    want = ((torch.float32, (L, 3)), (torch.int32, (L,)), (torch.float32, (L,)), (torch.int32, (L,)), (torch.float16, (L, n)))
    if (z.dtype != torch.float32 or n < 1 or not z.is_contiguous() or len(out) != 5
            or any(t.dtype != d or tuple(t.shape) != s or not t.is_contiguous() for t, (d, s) in zip(out, want))):
        raise ValueError(f"head_chunk_stats: z must be contiguous float32 [L, n>=1] and out contiguous "
                         f"{[f'{str(d)[6:]} {list(s)}' for d, s in want]} (got z {z.dtype} {tuple(z.shape)}, out "
                         f"{[f'{str(t.dtype)[6:]} {list(t.shape)}' for t in out]})")


def head_chunk_stats(z: torch.Tensor, v0: int, softcap: float, temperature: float, seed: int, step: int,
                     out: tuple[torch.Tensor, ...], check: bool = True) -> None:
    """The partial statistics of one vocabulary chunk's raw logits z [L, n] (rows v0..v0+n-1) into out =
    ((m, s, t) [L, 3], arg [L], g [L], sample [L] int32, P [L, n] float16 = exp(z' - m)), z' = softcap(z) / T
    (csrc/head.cu head_chunk_stats): a split of head_merge, whose acc is P @ E_chunk. check=False: as
    head_merge_into's."""
    if check:
        _check_chunk(z, out)
    if not z.is_cuda:
        raise ValueError("head_chunk_stats: z must be a CUDA tensor")
    mst, arg, g, sample, p = out
    L, n = z.shape
    fn = kernel("head.cu", "head_chunk_stats", _HEAD_NAMES)
    _launch(fn, (L,), (HEAD_THREADS,), (z, np.int32(n), np.int32(v0), np.float32(softcap), np.float32(1.0 / temperature),
                                        np.uint64(seed), np.int32(step), mst, arg, g, sample, p))


def head_chunk_stats_reference(z: torch.Tensor, v0: int, softcap: float, temperature: float, seed: int, step: int,
                               out: tuple[torch.Tensor, ...], check: bool = True) -> None:
    """head_chunk_stats in float64 on the CPU (the Gumbel uniforms from plugin/rng.py); refuses what it refuses."""
    from .. import rng

    if check:
        _check_chunk(z, out)
    mst, arg, g, sample, p = out
    L, n = z.shape
    zz = z.double().cpu()
    zz = (torch.tanh(zz / softcap) * softcap if softcap > 0 else zz) / temperature
    m, a = zz.max(dim=1).values, zz.argmax(dim=1)  # argmax: the first of equal maxima
    w = torch.exp(zz - m[:, None])
    u = torch.from_numpy(rng.sampler_uniforms(seed, step, np.arange(L), v0 + n, start=v0)).double()
    gz = zz - torch.log(-torch.log(u))
    mst.copy_(torch.stack([m, w.sum(1), (w * zz).sum(1)], dim=1))
    arg.copy_(a + v0)
    g.copy_(gz.max(dim=1).values)
    sample.copy_(gz.argmax(dim=1) + v0)
    p.copy_(w)


def head_stats_chunked(h: torch.Tensor, embed: torch.Tensor, qtype: GGMLQuantizationType, softcap: float,
                       temperature: float, seed: int = 0, step: int = 0, matmul: str = "f16",
                       chunk: int = HEAD_CHUNK, decoded: torch.Tensor | None = None):
    """head_stats with the two products on tensor cores, one vocabulary chunk at a time. Per chunk: its rows
    decoded once to float16 (get_rows_f16); the logits [L, chunk], h16 @ rows^T by cuBLAS with a float32
    result ("f16", "f16-wide"; the f16 tile of that width from the GGML rows where torch.mm has no out_dtype) or
    by the int8 tile on h quantized once ("int8", "int8-wide"); their partial statistics and weights P (head_chunk_stats); P @ rows for the
    partial's acc, merged into one running partial (head_merge_into), which head_merge finalises. No more
    than [L, chunk] of logits ever exists. Rounding: h and the head to f16 (int8: h per 32), P to f16 (and
    P @ E's result too where torch.mm has no out_dtype, before torch 2.8 or so). decoded: the whole head
    already in float16 [V, D] (get_rows_f16 of every row, kept by the caller: 1.5 GB at the 26B's head),
    whose chunks are read instead of decoded on every pass; the same numbers."""
    _check_head("head_stats_chunked", h, temperature, seed, step)
    L, D = h.shape
    qtype = GGMLQuantizationType(qtype)
    if h.dtype != torch.float32 or embed.dtype != torch.uint8 or embed.dim() != 2 or embed.shape[0] < 1 \
            or embed.shape[1] != ops.row_bytes(qtype, D):
        raise ValueError(f"head_stats_chunked: h must be float32 [L, {D}] and the head uint8 [V>=1, "
                         f"{ops.row_bytes(qtype, D)}] {qtype.name} rows (got {h.dtype}, {embed.dtype} "
                         f"{tuple(embed.shape)})")  # devices: the kernels check
    tensor_core = [m for m in ops.MATMULS if m != "scalar"]
    if matmul not in tensor_core or chunk < 1:
        raise ValueError(f"head_stats_chunked: matmul must be one of {', '.join(tensor_core)} and chunk >= 1 "
                         f"(got {matmul}, {chunk})")
    tile = getattr(ops, ops.MATMULS[matmul][0])  # the dense tile of that kind and width
    V, dev = embed.shape[0], h.device
    if decoded is not None and (decoded.dtype != torch.float16 or tuple(decoded.shape) != (V, D) or decoded.device != dev):
        raise ValueError(f"head_stats_chunked: decoded must be the head in float16 [{V}, {D}] on {dev} (got "
                         f"{decoded.dtype} {tuple(decoded.shape)} on {decoded.device})")

    def partial() -> tuple[torch.Tensor, ...]:  # (m, s, t), arg (-1: no rows yet), g, sample
        return (torch.zeros(L, 3, device=dev), torch.full((L,), -1, dtype=torch.int32, device=dev),
                torch.zeros(L, device=dev), torch.full((L,), -1, dtype=torch.int32, device=dev))

    run, part = (*partial(), torch.zeros(L, D, device=dev)), partial()  # the chunks so far; this chunk's
    p = torch.empty(L, min(chunk, V), dtype=torch.float16, device=dev)
    h = h.contiguous()
    int8 = ops.matmul_family(matmul) == "int8"
    h16, hq = (None, ops.quantize_q8(h)) if int8 else (h.half(), None)  # once for every chunk
    for v0 in range(0, V, chunk):
        n = min(V, v0 + chunk) - v0
        check = v0 == 0 or v0 + chunk >= V  # the first and the last chunk: the middle ones repeat the first's shapes
        head = embed[v0 : v0 + n]
        # [n, D]: the chunk's rows in f16, for both products (int8 decodes them again in its tile, from their integer form)
        e = ops.get_rows_f16(None, head, qtype, D) if decoded is None else decoded[v0 : v0 + n]  # every row of it
        z = tile(h, head, qtype, D, quantized=hq) if hq is not None else _mm_f32(h16, e.T)  # [L, n]
        if z is None:
            z = tile(h, head, qtype, D)
        pc = p.view(-1)[: L * n].view(L, n)  # contiguous: the kernel writes rows of n
        head_chunk_stats(z, v0, softcap, temperature, seed, step, (*part, pc), check=check)
        acc = _mm_f32(pc, e)
        head_merge_into(run, part, torch.mm(pc, e).float() if acc is None else acc, check=check)
    return head_merge(*(x[None] for x in run))  # the one running partial, finalised


def head_stats_reference(h: torch.Tensor, embed: torch.Tensor, qtype: GGMLQuantizationType, softcap: float,
                         temperature: float, splits: int | None = None, seed: int = 0, step: int = 0):
    """Dequantize the head on the CPU and compute the statistics on the full logits in float64 (`splits`
    is head_stats' and changes nothing: the kernel's result does not depend on it)."""
    from .head_ref import head_stats_reference as full

    return full(h.double().cpu(), _dequantized(embed, qtype, h.shape[1]), softcap, temperature, seed, step)
