"""Thin checked wrappers over the csrc kernels: torch tensors in and out, readable errors, no surprises.

Every op has a plain torch reference beside it (`*_reference`) and tests/test_cuda_kernels.py compares
them on odd shapes with a stated tolerance.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .loader import MIN_CAPABILITY, kernel

MM_TILE = 16
MM_THREADS = 256
SUPPORTED = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q4_0,
             GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0,
             GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K,
             GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
_QMATMUL_NAMES = tuple(f"dg::qmatmul<{int(t)}>" for t in SUPPORTED)
_MOE_NAMES = tuple(f"dg::moe_qmatmul<{int(t)}>" for t in SUPPORTED)
_HEAD_NAMES = tuple(f"dg::head_partials<{int(t)}>" for t in SUPPORTED)
_GET_ROWS_NAMES = tuple(f"dg::get_rows{v}<{int(t)}>" for v in ("", "_f16") for t in SUPPORTED)
MMA_TILE, MMA_THREADS = 32, 128  # csrc/mma_tile.cuh: rows per tensor-core tile (MMA_TM), threads per tile
# the tensor-core tiles run on every GPU the loader takes: sm_80's m16n8k16 MMAs, or on sm_75 (Turing) two of its
# own per m16n8k16 (csrc/mma_tile.cuh); `usable` keeps the rule for the capabilities the tuner is given
MMA_MIN_CAPABILITY = MIN_CAPABILITY
MMA_WIDE = 128  # csrc/mma_tile.cuh MmaShape: the wide tiles' columns (the narrow ones': MMA_TILE)
INT_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0,
             GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K, GGMLQuantizationType.Q5_K,
             GGMLQuantizationType.Q6_K)  # csrc/quant/decompose.cuh: the types with an integer form


def _tile_names(kernel: str, types: tuple, width: int) -> tuple[str, ...]:
    """The name expressions of a tensor-core tile kernel of one width: one module per width, so a plan that uses
    one width compiles only that one."""
    return tuple(f"dg::{kernel}<{int(t)}, {width}>" for t in types)


_WIDTHS = (MMA_TILE, MMA_WIDE)
_QMMA_NAMES = {tn: _tile_names("qmatmul_mma", SUPPORTED, tn) for tn in _WIDTHS}
_Q8_NAMES = {tn: _tile_names("qmatmul_q8", INT_TYPES, tn) for tn in _WIDTHS}
_MOE_MMA_NAMES = {tn: _tile_names("moe_qmatmul_mma", SUPPORTED, tn) for tn in _WIDTHS}
_MOE_Q8_NAMES = {tn: _tile_names("moe_qmatmul_q8", INT_TYPES, tn) for tn in _WIDTHS}
# every module the wrappers compile, as the loader compiles it: (source, name expressions, extern "C" kernels
# fetched by their plain name); tests/test_nvrtc.py compiles each with NVRTC for the oldest and newest targets
MODULES = (
    ("get_rows.cu", _GET_ROWS_NAMES, ()), ("qmatmul.cu", _QMATMUL_NAMES, ()),
    *(("qmatmul_mma.cu", _QMMA_NAMES[tn], ()) for tn in _WIDTHS), ("qmatmul_q8.cu", (), ("quantize_q8",)),
    *(("qmatmul_q8.cu", _Q8_NAMES[tn], ()) for tn in _WIDTHS), ("moe.cu", _MOE_NAMES, ()),
    *(("moe.cu", names[tn], ()) for names in (_MOE_MMA_NAMES, _MOE_Q8_NAMES) for tn in _WIDTHS),
    ("accept.cu", (), ("accept_renoise",)), ("head.cu", _HEAD_NAMES, ("head_merge", "head_chunk_stats", "head_merge_into")),
)
# the matmul kernels (dense op, grouped-expert op or None), one of which each quantized weight uses
# (plugin/cuda/tune.py picks per GPU): float FMAs, f16 tensor cores, int8 tensor cores on q8 activations; the
# tensor-core tiles in 32 x 32 and in 32 x 128 ("-wide": X read once per 128 columns of W, a quarter of the
# blocks); and "f16-cublas", W decoded to f16 once per call and multiplied by cuBLAS (dense weights only: the
# tiles decode W once per 32 rows of X, 8 times at the canvas's 256, this once; an expert's 16 or so pairs
# are one tile already)
MATMULS: dict[str, tuple[str, str | None]] = {
    "scalar": ("qmatmul", "moe_qmatmul"), "f16": ("qmatmul_mma", "moe_qmatmul_mma"),
    "f16-wide": ("qmatmul_mma_wide", "moe_qmatmul_mma_wide"), "int8": ("qmatmul_q8", "moe_qmatmul_q8"),
    "int8-wide": ("qmatmul_q8_wide", "moe_qmatmul_q8_wide"), "f16-cublas": ("qmatmul_f16_cublas", None)}
GET_ROWS_THREADS = 128
F16_ROWS = 8192  # rows of W decoded to f16 at a time, for cuBLAS: 46 MB at K = 2816, about an H100's L2 cache
GROUP = 16  # csrc/quant/decompose.cuh DG_GROUP: values per unit a thread decodes (a float type's unit: one value)
ACCEPT_MAX_CANVAS = 1024  # csrc/accept.cu: one thread per canvas position, one block per canvas


def matmul_family(matmul: str) -> str:
    """A key of MATMULS without its tile width or form: "scalar", "f16" or "int8" (what it computes: the width, or
    cuBLAS over the same f16 values, changes neither what it takes nor its numbers beyond the sums' order); each
    family is itself a key of MATMULS."""
    if matmul not in MATMULS:
        raise ValueError(f"matmul '{matmul}' is not one of {', '.join(MATMULS)}")
    return matmul.partition("-")[0]


def usable(matmul: str, qtype: GGMLQuantizationType, k: int, capability: tuple[int, int],
           bounded_input: bool = True, experts: bool = False) -> bool:
    """Whether matmul kernel `matmul` (a key of MATMULS) takes rows of k values of type qtype on a GPU of
    this compute capability: the tensor-core kinds need 7.5; f16 (any form) steps 16 values of K and rounds X to
    f16, so its input must stay far below 65504 (`bounded_input`: normalised, not gelu(gate) * up); int8 needs an
    integer type (its per-32 scales take any range); `experts` (the grouped op) a kind that has one."""
    family = matmul_family(matmul)
    if experts and MATMULS[matmul][1] is None:
        return False
    if family == "scalar":
        return True
    if capability < MMA_MIN_CAPABILITY:
        return False
    return k % 16 == 0 and bounded_input if family == "f16" else GGMLQuantizationType(qtype) in INT_TYPES


_STREAMS: dict[tuple[int, int], object] = {}  # (device, torch stream pointer) -> its cupy.cuda.ExternalStream


def _launch(fn, grid, block, args, shared_mem: int = 0) -> None:
    """Launch fn on torch's current stream. Tensors in args go by their device pointer (the kernels take
    raw pointers; shapes and strides travel as separate arguments): no DLPack exchange, so no stream
    event per tensor and nothing that stops a CUDA graph capture (plugin/cuda/graph.py)."""
    import cupy

    current = torch.cuda.current_stream()
    key = (current.device.index, current.cuda_stream)  # the legacy default stream is 0 on every device
    stream = _STREAMS.get(key)
    if stream is None:
        if len(_STREAMS) > 64:  # streams come and go (a capture's): keep the map small
            _STREAMS.clear()
        try:
            stream = cupy.cuda.ExternalStream(key[1], key[0])
        except TypeError:  # CuPy before 12 takes the pointer alone (the current device's stream)
            stream = cupy.cuda.ExternalStream(key[1])
        _STREAMS[key] = stream
    ptrs = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)  # args keeps them alive
    with stream:
        fn(grid, block, ptrs, shared_mem=shared_mem)


def _dequantized(w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """GGML rows [N, row_bytes] -> float64 [N, k] on the CPU (dgemma.quant): the references' weights."""
    from dgemma import quant

    return torch.from_numpy(quant.dequantize(w.cpu().numpy(), qtype).reshape(w.shape[0], k)).double()


def row_bytes(qtype: GGMLQuantizationType, k: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    if k % bs:
        raise ValueError(f"K={k} is not a multiple of the {qtype.name} block ({bs})")
    return k // bs * ts


def block_align(qtype: GGMLQuantizationType) -> int:
    """The address alignment the kernels read a type's blocks with (csrc/quant/base.cuh Align<T>: gcd of the
    block's bytes and 16; Q4_K/Q5_K 16, Q2_K 4, Q6_K 2): the weights must start at a multiple of it."""
    return math.gcd(GGML_QUANT_SIZES[qtype][1], 16)


def _check_weights(op: str, w: torch.Tensor, qtype, k: int, w_lead: str) -> GGMLQuantizationType:
    """w: contiguous uint8 GGML rows of k values with len(w_lead) leading dims ("[N, " or "[E, N, ") on a
    CUDA device, of a supported type, starting at a multiple of block_align. Returns the GGML type."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in SUPPORTED:
        raise ValueError(f"{op}: GGML type {qtype.name} is not supported (have {', '.join(t.name for t in SUPPORTED)})")
    if not w.is_cuda:
        raise ValueError(f"{op}: w must be a CUDA tensor")
    rb, dims = row_bytes(qtype, k), w_lead.count(",") + 1
    if w.dtype != torch.uint8 or w.dim() != dims or w.shape[-1] != rb or not w.is_contiguous():
        raise ValueError(f"{op}: w must be contiguous uint8 {w_lead}{rb}] for {qtype.name} rows of {k} "
                         f"(got {w.dtype} {tuple(w.shape)})")
    if w.data_ptr() % block_align(qtype):
        raise ValueError(f"{op}: w must start at a multiple of {block_align(qtype)} bytes for {qtype.name} blocks "
                         f"(its address is {w.data_ptr() % 16} past a multiple of 16)")
    return qtype


def _check_matmul(op: str, x: torch.Tensor, w: torch.Tensor, qtype, k: int, w_lead: str) -> GGMLQuantizationType:
    """The operands of a quantized matmul: x float32 [rows, k], w as _check_weights, both on one CUDA
    device. Returns the GGML type."""
    qtype = _check_weights(op, w, qtype, k, w_lead)
    if not (x.is_cuda and x.device == w.device):
        raise ValueError(f"{op}: x and w must be CUDA tensors on the same device")
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or (x.stride(1) != 1 and x.numel() > 0):
        raise ValueError(f"{op}: x must be float32 [rows, {k}] with unit stride in K (got {x.dtype} {tuple(x.shape)})")
    return qtype


def get_rows(rows: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int, check: bool = True) -> torch.Tensor:
    """Rows `rows` [M] (integers in [0, N)) of W [N, row_bytes] uint8 in GGML type `qtype`, dequantized to
    float32 [M, k] (csrc/get_rows.cu): the embedding lookup from the quantized table. check: verify the
    rows are in range (a host sync); the engine passes False for ids it has checked or drawn itself."""
    qtype = _check_weights("get_rows", w, qtype, k, "[N, ")
    if rows.dim() != 1 or rows.device != w.device or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"get_rows: rows must be integer [M] on w's device (got {rows.dtype} {tuple(rows.shape)})")
    y = torch.empty(rows.shape[0], k, dtype=torch.float32, device=w.device)
    if rows.shape[0] == 0:
        return y
    if check:
        lo, hi = (int(v) for v in torch.aminmax(rows))
        if lo < 0 or hi >= w.shape[0]:
            raise ValueError(f"get_rows: row {lo if lo < 0 else hi} is outside [0, {w.shape[0]})")
    _launch_get_rows("get_rows", rows.to(torch.int32), w, qtype, y)
    return y


def _launch_get_rows(name: str, rows: torch.Tensor | None, w: torch.Tensor, qtype: GGMLQuantizationType,
                     y: torch.Tensor) -> None:
    """csrc/get_rows.cu's kernel `name` for Y [M, K]: one thread per unit of Y (a 16-value group; a float type's
    value), over as many blocks as that takes; rows None: row m of Y is row m of W."""
    m, k = y.shape
    units = m * (k // _unit_values(qtype))
    if units >= 2**31:  # the kernel counts units in 32 bits (its divisions are the cheap ones)
        raise ValueError(f"{name}: {m} rows of {k} values are {units} units, more than the kernel counts (2^31 - 1)")
    fn = kernel("get_rows.cu", f"dg::{name}<{int(qtype)}>", _GET_ROWS_NAMES)
    ids = np.uint64(0) if rows is None else rows.contiguous()  # the kernel's null rows: every row in order
    _launch(fn, (-(-units // GET_ROWS_THREADS),), (GET_ROWS_THREADS,), (ids, w, y, np.int32(m), np.int32(k)))


def _unit_values(qtype: GGMLQuantizationType) -> int:
    """Values per unit a thread decodes (csrc/quant/blocks.cuh Unit): a 16-value group, or a float type's value."""
    return 1 if GGML_QUANT_SIZES[GGMLQuantizationType(qtype)][0] == 1 else GROUP


def get_rows_reference(rows: torch.Tensor | None, w: torch.Tensor, qtype: GGMLQuantizationType, k: int,
                       check: bool = True) -> torch.Tensor:
    """Dequantize the chosen rows (None: every row) on the CPU with dgemma.quant."""
    return _dequantized(w.cpu() if rows is None else w.cpu()[rows.long().cpu()], qtype, k).float()


def get_rows_f16(rows: torch.Tensor | None, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """get_rows rounded to float16 [M, k] (csrc/get_rows.cu get_rows_f16), rows unchecked: int32 [M] in range,
    or None for every row of W in order (the head's chunks, f16-cublas's weights)."""
    qtype = _check_weights("get_rows_f16", w, qtype, k, "[N, ")
    if rows is not None and (rows.dim() != 1 or rows.device != w.device or rows.dtype != torch.int32):
        raise ValueError(f"get_rows_f16: rows must be int32 [M] on w's device (got {rows.dtype} {tuple(rows.shape)})")
    y = torch.empty(w.shape[0] if rows is None else rows.shape[0], k, dtype=torch.float16, device=w.device)
    if y.shape[0]:
        _launch_get_rows("get_rows_f16", rows, w, qtype, y)
    return y


def get_rows_f16_reference(rows: torch.Tensor | None, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    return get_rows_reference(rows, w, qtype, k).half()


def qmatmul(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """x [M, K] float32 @ W^T, W: [N, row_bytes] uint8 in GGML type `qtype` -> [M, N] float32."""
    qtype = _check_matmul("qmatmul", x, w, qtype, k, "[N, ")
    return _launch_matmul("qmatmul.cu", f"dg::qmatmul<{int(qtype)}>", _QMATMUL_NAMES, (MM_TILE, MM_TILE), MM_THREADS,
                          x, w, k)


def _launch_matmul(source: str, name: str, names: tuple[str, ...], tile: tuple[int, int], threads: int,
                   x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Y [M, N] from a (checked) matmul kernel taking (x, lda, w, y, ldy, M, N, K) on a grid of (rows, columns)
    tiles."""
    m, n = x.shape[0], w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y
    grid = ((n + tile[1] - 1) // tile[1], (m + tile[0] - 1) // tile[0])
    _launch(kernel(source, name, names), grid, (threads,), (x, np.int32(x.stride(0)), w, y,
                                                            np.int32(n), np.int32(m), np.int32(n), np.int32(k)))
    return y


def qmatmul_mma(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """qmatmul on tensor cores (csrc/qmatmul_mma.cu, compute capability >= 7.5): X and the dequantized W
    rounded to f16, products accumulated in f32, in 32 x 32 tiles. X must stay within f16's range
    (|x| <= 65504)."""
    return _qmatmul_mma(x, w, qtype, k, MMA_TILE)


def qmatmul_mma_wide(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """qmatmul_mma in 32 x 128 tiles."""
    return _qmatmul_mma(x, w, qtype, k, MMA_WIDE)


def _qmatmul_mma(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int, tile_n: int) -> torch.Tensor:
    qtype = _check_matmul("qmatmul_mma", x, w, qtype, k, "[N, ")
    _check_k16("qmatmul_mma", k)
    return _launch_mma(x, w, qtype, k, tile_n)


def _launch_mma(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int, tile_n: int) -> torch.Tensor:
    return _launch_matmul("qmatmul_mma.cu", f"dg::qmatmul_mma<{int(qtype)}, {tile_n}>", _QMMA_NAMES[tile_n],
                          (MMA_TILE, tile_n), MMA_THREADS, _f16_rows(x), w, k)


def qmatmul_f16_cublas(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """qmatmul with W decoded to f16 once (get_rows_f16 over every row: the values the f16 tiles stage) and X
    rounded to f16, multiplied by cuBLAS with a float32 result: the f16 tiles' numbers, summed in cuBLAS's order.
    For many rows of X (the tiles decode W once per 32 of them); holds a transient f16 copy of W [N, K], F16_ROWS
    rows at a time (the 26B's dense matrices are one such chunk; its vocabulary head, 32). For at
    most 32 rows (one row tile: a prompt's short last chunk), and where torch.mm has no out_dtype (old torch),
    the f16 tile instead."""
    qtype = _check_matmul("qmatmul_f16_cublas", x, w, qtype, k, "[N, ")
    _check_k16("qmatmul_f16_cublas", k)
    if x.shape[0] <= MMA_TILE or (x.device.type == "cuda" and not _mm_out_dtype(str(x.device))):
        return _launch_mma(x, w, qtype, k, MMA_TILE)  # one row tile decodes W once too; old torch: no f32 result
    x16 = _f16_rows(x)
    parts = [_mm_f32(x16, get_rows_f16(None, w[n0 : n0 + F16_ROWS], qtype, k).T)  # [M, <= F16_ROWS] each
             for n0 in range(0, w.shape[0], F16_ROWS)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [M, N]


@lru_cache(maxsize=None)
def _mm_out_dtype(device: str) -> bool:
    """Whether torch.mm takes out_dtype here (float16 operands, float32 result: cuBLAS on tensor cores)."""
    a = torch.zeros(1, 1, dtype=torch.float16, device=device)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """a @ b of float16 operands with the float32 result: cuBLAS on a GPU where torch.mm takes out_dtype, a
    float32 product of the same values on the CPU (the references' runs); None where torch can only give f16."""
    if a.device.type != "cuda":  # (not is_cuda: the tests' CPU emulator makes every tensor say it is)
        return a.float() @ b.float()
    return torch.mm(a, b, out_dtype=torch.float32) if _mm_out_dtype(str(a.device)) else None


def _f16_rows(x: torch.Tensor) -> torch.Tensor:
    """X rounded to f16 once for every column tile that reads it (nearest even, as the f16 tiles' reference
    rounds it), contiguous: rows of K (a multiple of 16) halves start at multiples of 16 bytes, which the
    tiles' 16-byte copies of X (cp.async) need."""
    return x.to(torch.float16).contiguous()


def _check_k16(op: str, k: int) -> None:
    """The f16 tile steps 16 values of K at a time (GGML block types always are multiples of 16, float rows may
    not be). (The GPU's capability needs no check: the tiles run on every GPU the loader takes.)"""
    if k % 16:
        raise ValueError(f"{op}: K must be a multiple of 16 (got {k}); use the float kernel")


def _check_int(op: str, qtype: GGMLQuantizationType) -> None:
    if qtype not in INT_TYPES:
        raise ValueError(f"{op}: {qtype.name} has no integer form (have {', '.join(t.name for t in INT_TYPES)})")


def quantize_q8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x float32 [M, K] (K a multiple of 32, on a GPU) -> (int8 q [M, K], float32 scale per 32 values
    [M, K/32], int32 sum of q per 16 values [M, K/16]): d = max|x| / 127, q = rint(x / d) (csrc/qmatmul_q8.cu)."""
    if not x.is_cuda or x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] % 32 or (x.stride(1) != 1 and x.numel() > 0):
        raise ValueError(f"quantize_q8: x must be CUDA float32 [M, K] with K a multiple of 32 and unit stride in K "
                         f"(got {x.dtype} {tuple(x.shape)} on {x.device})")
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8, device=x.device)
    xd = torch.empty(m, k // 32, dtype=torch.float32, device=x.device)
    xs = torch.empty(m, k // 16, dtype=torch.int32, device=x.device)
    blocks = m * (k // 32)
    if blocks:
        warps = MMA_THREADS // 32
        _launch(kernel("qmatmul_q8.cu", "quantize_q8"), ((blocks + warps - 1) // warps,), (MMA_THREADS,),
                (x, np.int32(x.stride(0)), np.int32(m), np.int32(k), xq, xd, xs))
    return xq, xd, xs


def quantize_q8_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """quantize_q8 in torch on the CPU: the same float32 division and round-half-to-even."""
    x = x.cpu().float()
    m, k = x.shape
    blocks = x.view(m, k // 32, 32)
    d = blocks.abs().amax(dim=-1) / 127.0  # [M, K/32] float32
    live = d[..., None] > 0  # a block whose scale rounds to 0 (all zeros, or all below ~1e-43) quantizes to 0
    q = torch.where(live, torch.round(blocks / torch.where(live, d[..., None], torch.ones(()))), torch.zeros(()))
    q = q.to(torch.int8).view(m, k)
    return q, d, q.view(m, k // 16, 16).sum(-1, dtype=torch.int32)


def qmatmul_q8(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int,
               quantized: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """qmatmul on int8 tensor cores (csrc/qmatmul_q8.cu, compute capability >= 7.5, integer GGML types):
    X quantized to int8 per 32 values (quantize_q8), W in its integer form (int8, per-16 scale and offset),
    integer dot products per 16 values, scaled and summed in f32, in 32 x 32 tiles. quantized:
    quantize_q8(x) already made (one X against several W: the head's vocabulary chunks)."""
    return _qmatmul_q8(x, w, qtype, k, quantized, MMA_TILE)


def qmatmul_q8_wide(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int,
                    quantized: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """qmatmul_q8 in 32 x 128 tiles."""
    return _qmatmul_q8(x, w, qtype, k, quantized, MMA_WIDE)


def _qmatmul_q8(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int,
                quantized: tuple[torch.Tensor, ...] | None, tile_n: int) -> torch.Tensor:
    qtype = _check_matmul("qmatmul_q8", x, w, qtype, k, "[N, ")
    _check_int("qmatmul_q8", qtype)
    m, n = x.shape[0], w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y
    xq, xd, xs = quantized or quantize_q8(x)
    grid = ((n + tile_n - 1) // tile_n, (m + MMA_TILE - 1) // MMA_TILE)
    _launch(kernel("qmatmul_q8.cu", f"dg::qmatmul_q8<{int(qtype)}, {tile_n}>", _Q8_NAMES[tile_n]), grid, (MMA_THREADS,),
            (xq, xd, xs, w, y, np.int32(n), np.int32(m), np.int32(n), np.int32(k)))
    return y


def _q8_values(x: torch.Tensor) -> torch.Tensor:
    """The values quantize_q8 leaves of x: q * d per 32, float64 [M, K] on the CPU."""
    xq, xd, _ = quantize_q8_reference(x)
    return xq.double() * xd.double().repeat_interleave(32, dim=1)


def qmatmul_q8_reference(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int,
                         quantized: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """X quantized as quantize_q8 does (`quantized` is that, and changes nothing here), times the dequantized W,
    in float64 (either width)."""
    return (_q8_values(x) @ _dequantized(w, qtype, k).T).float()


def qmatmul_mma_reference(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """X and the dequantized W rounded to f16 (as the kernel rounds them), multiplied in float64 (either width)."""
    return (x.cpu().half().double() @ _dequantized(w, qtype, k).half().double().T).float()


qmatmul_mma_wide_reference, qmatmul_q8_wide_reference = qmatmul_mma_reference, qmatmul_q8_reference
qmatmul_f16_cublas_reference = qmatmul_mma_reference


def qmatmul_reference(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """Dequantize on the CPU with dgemma.quant, multiply in float64."""
    return (x.double().cpu() @ _dequantized(w, qtype, k).T).float()


def accept_renoise(entropy: torch.Tensor, denoised: torch.Tensor, seed: int, step: int, vocab: int, bound: float):
    """[B, C] entropies and denoised tokens -> (next canvas [B, C] int32, accepted [B, C] bool): the
    lowest-entropy tokens within the bound are kept, the others re-drawn from the counter-based stream
    (plugin.rng.sampler_tokens(seed, step, b*C + i, vocab, RENOISE)) inside the kernel (csrc/accept.cu)."""
    if entropy.dim() != 2 or entropy.shape[1] > ACCEPT_MAX_CANVAS:
        raise ValueError(f"accept_renoise: entropy must be [B, C<={ACCEPT_MAX_CANVAS}] (got {tuple(entropy.shape)})")
    if denoised.shape != entropy.shape or denoised.device != entropy.device or not entropy.is_cuda:
        raise ValueError("accept_renoise: entropy and denoised must be CUDA tensors of the same [B, C] shape")
    if not (1 <= vocab < 2**31 and 0 <= seed < 2**64 and 0 <= step < 2**31):
        raise ValueError(f"accept_renoise: need 1 <= vocab < 2**31, 0 <= seed < 2**64, 0 <= step < 2**31 "
                         f"(got {vocab}, {seed}, {step})")
    b, c = entropy.shape
    ent, den = entropy.float().contiguous(), denoised.int().contiguous()
    nxt = torch.empty_like(den)
    acc = torch.empty(b, c, dtype=torch.uint8, device=entropy.device)
    if b * c == 0:
        return nxt, acc.bool()
    fn = kernel("accept.cu", "accept_renoise")
    _launch(fn, (b,), (min(ACCEPT_MAX_CANVAS, max(32, c)),), (ent, den, nxt, acc, np.int32(c),
                                                 np.float32(bound), np.uint64(seed), np.int32(step), np.int32(vocab)))
    return nxt, acc.bool()


def accept_renoise_reference(entropy: torch.Tensor, denoised: torch.Tensor, seed: int, step: int, vocab: int,
                             bound: float):
    """plugin/sampler.py's counter_accept_renoise (accept() per canvas row, fresh tokens from plugin/rng.py)
    on the CPU."""
    from ..sampler import counter_accept_renoise

    return counter_accept_renoise(entropy.cpu(), denoised.cpu().long(), seed, step, vocab, bound)


def __getattr__(name: str):
    """The grouped-expert ops (ExpertGroups, moe_qmatmul*, their references) live in moe_ops, loaded on the first
    such name: moe_ops imports this module, which therefore cannot import it at the top."""
    if not name.startswith("__"):
        from . import moe_ops

        if name in vars(moe_ops):
            globals()[name] = value = vars(moe_ops)[name]  # found once: later lookups are plain attributes
            return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
