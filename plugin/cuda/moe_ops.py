"""The grouped-expert ops of the cuda backend (csrc/moe.cu): every routed expert of a layer in one launch per
matrix, (token, expert) pairs grouped by expert (ExpertGroups), with the GELU gate and the weighted scatter to
the tokens in the kernels' epilogues; and their torch references. Reached as plugin.cuda.ops.<name> (ops loads
this module on the first such name, so the registry ops.MATMULS, the tests' patches of ops.kernel, ops._launch
and ops.quantize_q8, and their references all go through ops)."""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType

from . import ops
from .ops import (_MOE_MMA_NAMES, _MOE_NAMES, _MOE_Q8_NAMES, MM_THREADS, MM_TILE, MMA_THREADS, MMA_TILE, MMA_WIDE,
                  _check_int, _check_k16, _check_matmul, _dequantized, _f16_rows, _q8_values)


def expert_tiles(counts: list[int], tile: int = MM_TILE) -> tuple[list[int], list[int], list[int]]:
    """Pairs per expert -> (offsets [E+1], tile_expert, tile_m0): the M tiles of csrc/moe.cu, every expert's
    `tile`-row tiles back to back (none for an expert without pairs; 16 rows for the float kernel, 32 for
    the tensor-core ones). The kernels find the same tiles on the device (csrc/moe_tiles.cuh); this list is
    their reference and the CPU reference's grouping."""
    offsets, tile_expert, tile_m0 = [0], [], []
    for e, n in enumerate(counts):
        if n < 0:
            raise ValueError(f"expert_tiles: expert {e} has a negative count ({n})")
        for m0 in range(offsets[-1], offsets[-1] + n, tile):
            tile_expert.append(e)
            tile_m0.append(m0)
        offsets.append(offsets[-1] + n)
    return offsets, tile_expert, tile_m0


class ExpertGroups:
    """(token, expert) pairs grouped by expert, counts[e] of them for expert e, as csrc/moe.cu reads them:
    the prefix sums of the pairs (offsets [E+1]) and, per kernel tile height, of the tiles (`tiles`), made
    on the counts' device with no host sync, with an upper bound of the tiles from the number of pairs
    (known on the host: tokens x top-k). Made once per MoE layer and shared by its gate_up and down launches.
    counts: a list, or an integer tensor [E] (then give `pairs`, its sum, to keep the host out of it)."""

    def __init__(self, counts, device: torch.device | str, pairs: int | None = None) -> None:
        counts = torch.as_tensor(counts, device=device).to(torch.int64)
        if counts.dim() != 1:
            raise ValueError(f"ExpertGroups: counts must be [E] (got {tuple(counts.shape)})")
        self.counts, self.experts = counts, counts.shape[0]
        self.pairs = int(counts.sum()) if pairs is None else pairs
        self.offsets = self._prefix(counts)  # [E+1]
        self._tiles: dict[int, tuple[torch.Tensor, int]] = {}
        self.identity = None  # rows 0..pairs-1, made on first use (down reads x already grouped)

    def _prefix(self, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros(1, dtype=torch.int64, device=v.device), v.cumsum(0)]).to(torch.int32)

    def tiles(self, tile: int) -> tuple[torch.Tensor, int]:
        """(tile_offsets [E+1] int32: the prefix sums of ceil(count / tile), an upper bound of the tiles)."""
        if tile not in self._tiles:
            self._tiles[tile] = (self._prefix((self.counts + tile - 1) // tile), self.pairs // tile + self.experts)
        return self._tiles[tile]


Scatter = tuple[torch.Tensor, torch.Tensor, int]  # (token of each pair int32 [P], its weight float32 [P], tokens)


def _check_moe(op: str, x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor, qtype,
               k: int, scatter: Scatter | None = None, gated: bool = False) -> tuple[GGMLQuantizationType, torch.Tensor]:
    """The operands of a grouped expert GEMM; returns the GGML type and the rows every pair reads."""
    qtype = _check_matmul(op, x, w, qtype, k, "[E, N, ")
    E, P = w.shape[0], groups.pairs
    if gated and (w.shape[1] % 2 or scatter is not None):
        raise ValueError(f"{op}: gated needs [E, 2 Fe, ..] gate/up rows and no scatter (got N = {w.shape[1]}"
                         f"{', a scatter' if scatter is not None else ''})")
    if scatter is not None:
        to, wt, tokens = scatter
        if (to.dtype != torch.int32 or to.shape != (P,) or wt.dtype != torch.float32 or wt.shape != (P,)
                or to.device != x.device or wt.device != x.device or tokens < 0 or not to.is_contiguous()
                or not wt.is_contiguous()):
            raise ValueError(f"{op}: scatter must be (int32 [{P}], float32 [{P}], tokens >= 0) contiguous on x's "
                             f"device (got {to.dtype} {tuple(to.shape)}, {wt.dtype} {tuple(wt.shape)}, {tokens})")
    if groups.experts != E or groups.offsets.device != x.device:
        raise ValueError(f"{op}: {groups.experts} expert counts on {groups.offsets.device} for {E} experts on {x.device}")
    if rows is None:
        if x.shape[0] != P:
            raise ValueError(f"{op}: x has {x.shape[0]} rows for {P} grouped pairs")
        if groups.identity is None:
            groups.identity = torch.arange(P, dtype=torch.int32, device=x.device)
        return qtype, groups.identity
    if rows.dtype != torch.int32 or rows.shape != (P,) or rows.device != x.device:
        raise ValueError(f"{op}: rows must be int32 [{P}] on x's device (got {rows.dtype} {tuple(rows.shape)})")
    return qtype, rows.contiguous()


def _moe_out(groups: ExpertGroups, n: int, scatter: Scatter | None, device: torch.device,
             gated: bool = False) -> torch.Tensor:
    """What a grouped GEMM returns: [P, N] by pair ([P, N / 2] gated), or, scattered, zeros [tokens, N] to add
    into."""
    if scatter is None:
        return torch.empty(groups.pairs, n // 2 if gated else n, dtype=torch.float32, device=device)
    return torch.zeros(scatter[2], n, dtype=torch.float32, device=device)


def _launch_moe(name: str, names: tuple[str, ...], tile: tuple[int, int], threads: int, xargs: tuple, rows: torch.Tensor,
                groups: ExpertGroups, w: torch.Tensor, k: int, device: torch.device,
                scatter: Scatter | None = None, gated: bool = False) -> torch.Tensor:
    """Y from a moe.cu kernel taking (*xargs, xrows, offsets, tile_offsets, E, w, expert_bytes, y, ldy, N, K,
    out_rows, out_w, fe) on a grid of (rows, columns) tiles: [P, N] by pair; with `scatter` (tokens of the
    pairs, their weights, the number of tokens) [tokens, N], each pair's row times its weight added into its
    token's row; gated, [P, N / 2] of gelu_tanh(gate) * up (W's rows: gate then up), in the kernel's
    epilogue (csrc/epilogue.cuh)."""
    n = w.shape[1]
    y = _moe_out(groups, n, scatter, device, gated)
    if groups.pairs == 0 or n == 0:
        return y
    tile_offsets, max_tiles = groups.tiles(tile[0])
    cols, per_tile = (n // 2, tile[1] // 2) if gated else (n, tile[1])
    grid = ((cols + per_tile - 1) // per_tile, max_tiles)
    out_rows, out_w = (scatter[0], scatter[1]) if scatter is not None else (np.uint64(0), np.uint64(0))
    ops._launch(ops.kernel("moe.cu", name, names), grid, (threads,),
            (*xargs, rows, groups.offsets, tile_offsets, np.int32(w.shape[0]), w, np.int64(w.stride(0)), y,
             np.int32(y.shape[1]), np.int32(n), np.int32(k), out_rows, out_w, np.int32(n // 2 if gated else 0)))
    return y


def moe_qmatmul(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                qtype: GGMLQuantizationType, k: int, scatter: Scatter | None = None, gated: bool = False) -> torch.Tensor:
    """The grouped expert GEMM (csrc/moe.cu): pair m (grouped by expert, `groups`) reads x[rows[m]] (rows:
    int32 [P]) or x[m] (rows None) and multiplies it by its expert's matrix: w is [E, N, row_bytes] uint8
    in GGML type `qtype` for rows of k. Returns [P, N] float32, or with scatter = (token int32 [P], weight
    float32 [P], tokens) the weighted sum per token [tokens, N] (tokens unchecked: the engine's own), or
    gated (w's rows: N/2 gate rows, then N/2 up rows) gelu_tanh(gate) * up [P, N/2] (model.geglu)."""
    qtype, rows = _check_moe("moe_qmatmul", x, rows, groups, w, qtype, k, scatter, gated)
    return _launch_moe(f"dg::moe_qmatmul<{int(qtype)}>", _MOE_NAMES, (MM_TILE, MM_TILE), MM_THREADS,
                       (x, np.int32(x.stride(0))), rows, groups, w, k, x.device, scatter, gated)


def moe_qmatmul_mma(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                    qtype: GGMLQuantizationType, k: int, scatter: Scatter | None = None,
                    gated: bool = False) -> torch.Tensor:
    """moe_qmatmul on f16 tensor cores (compute capability >= 7.5): X and the dequantized W rounded to f16,
    as qmatmul_mma, in 32 x 32 tiles."""
    return _moe_qmatmul_mma(x, rows, groups, w, qtype, k, scatter, gated, MMA_TILE)


def moe_qmatmul_mma_wide(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                         qtype: GGMLQuantizationType, k: int, scatter: Scatter | None = None,
                         gated: bool = False) -> torch.Tensor:
    """moe_qmatmul_mma in 32 x 128 tiles."""
    return _moe_qmatmul_mma(x, rows, groups, w, qtype, k, scatter, gated, MMA_WIDE)


def _moe_qmatmul_mma(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                     qtype: GGMLQuantizationType, k: int, scatter: Scatter | None, gated: bool,
                     tile_n: int) -> torch.Tensor:
    qtype, rows = _check_moe("moe_qmatmul_mma", x, rows, groups, w, qtype, k, scatter, gated)
    _check_k16("moe_qmatmul_mma", k)
    return _launch_moe(f"dg::moe_qmatmul_mma<{int(qtype)}, {tile_n}>", _MOE_MMA_NAMES[tile_n], (MMA_TILE, tile_n),
                       MMA_THREADS, (_f16_rows(x), np.int32(k)), rows, groups, w, k, x.device, scatter, gated)


def moe_qmatmul_q8(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                   qtype: GGMLQuantizationType, k: int, scatter: Scatter | None = None,
                   gated: bool = False) -> torch.Tensor:
    """moe_qmatmul on int8 tensor cores (compute capability >= 7.5, integer GGML types): x quantized once
    by quantize_q8 (the gathered rows read its rows), as qmatmul_q8, in 32 x 32 tiles."""
    return _moe_qmatmul_q8(x, rows, groups, w, qtype, k, scatter, gated, MMA_TILE)


def moe_qmatmul_q8_wide(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                        qtype: GGMLQuantizationType, k: int, scatter: Scatter | None = None,
                        gated: bool = False) -> torch.Tensor:
    """moe_qmatmul_q8 in 32 x 128 tiles."""
    return _moe_qmatmul_q8(x, rows, groups, w, qtype, k, scatter, gated, MMA_WIDE)


def _moe_qmatmul_q8(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                    qtype: GGMLQuantizationType, k: int, scatter: Scatter | None, gated: bool,
                    tile_n: int) -> torch.Tensor:
    qtype, rows = _check_moe("moe_qmatmul_q8", x, rows, groups, w, qtype, k, scatter, gated)
    _check_int("moe_qmatmul_q8", qtype)
    xq, xd, xs = ops.quantize_q8(x)
    return _launch_moe(f"dg::moe_qmatmul_q8<{int(qtype)}, {tile_n}>", _MOE_Q8_NAMES[tile_n], (MMA_TILE, tile_n),
                       MMA_THREADS, (xq, xd, xs), rows, groups, w, k, x.device, scatter, gated)


def _expert_by_expert(xs: torch.Tensor, groups: ExpertGroups, w: torch.Tensor, qtype: GGMLQuantizationType, k: int,
                      round_w=lambda w: w) -> torch.Tensor:
    """xs [P, k] float64 (each pair's row) times its expert's dequantized (then round_w'd) matrix, on the CPU."""
    counts = groups.counts.tolist()
    offsets = expert_tiles(counts)[0]
    out = [xs[o: o + c] @ round_w(_dequantized(w[e], qtype, k)).T for e, (o, c) in enumerate(zip(offsets, counts))]
    return torch.cat(out).float() if out else torch.zeros(0, w.shape[1])


def _pair_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    return x[rows.long().cpu()] if rows is not None else x


def _scattered(y: torch.Tensor, scatter: Scatter | None, gated: bool = False) -> torch.Tensor:
    """A reference's [P, N] by pair, its gelu_tanh(gate) * up [P, N/2] (gated: the gate in float64 on the
    float32 products), or its weighted sum per token (float64 adds)."""
    if gated:
        from ..model import geglu

        if y.shape[1] % 2 or scatter is not None:  # what _check_moe refuses the kernels
            raise ValueError(f"gated needs [E, 2 Fe, ..] gate/up rows and no scatter (got N = {y.shape[1]})")
        return geglu(y.double()).float()
    if scatter is None:
        return y
    to, wt, tokens = (v.cpu() if isinstance(v, torch.Tensor) else v for v in scatter)
    out = torch.zeros(tokens, y.shape[1], dtype=torch.float64)
    return out.index_add_(0, to.long(), y.double() * wt.double()[:, None]).float()


def moe_qmatmul_reference(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                          qtype: GGMLQuantizationType, k: int, scatter: Scatter | None = None,
                          gated: bool = False) -> torch.Tensor:
    """Expert by expert: dequantize on the CPU, multiply its pairs' rows in float64."""
    return _scattered(_expert_by_expert(_pair_rows(x.double().cpu(), rows), groups, w, qtype, k), scatter, gated)


def moe_qmatmul_mma_reference(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                              qtype: GGMLQuantizationType, k: int, scatter: Scatter | None = None,
                              gated: bool = False) -> torch.Tensor:
    """Expert by expert with X and W rounded to f16 as the kernel rounds them, multiplied in float64."""
    y = _expert_by_expert(_pair_rows(x.cpu().half().double(), rows), groups, w, qtype, k, lambda w: w.half().double())
    return _scattered(y, scatter, gated)


def moe_qmatmul_q8_reference(x: torch.Tensor, rows: torch.Tensor | None, groups: ExpertGroups, w: torch.Tensor,
                             qtype: GGMLQuantizationType, k: int, scatter: Scatter | None = None,
                             gated: bool = False) -> torch.Tensor:
    """Expert by expert with X quantized as quantize_q8 does, in float64."""
    return _scattered(_expert_by_expert(_pair_rows(_q8_values(x), rows), groups, w, qtype, k), scatter, gated)


moe_qmatmul_mma_wide_reference, moe_qmatmul_q8_wide_reference = moe_qmatmul_mma_reference, moe_qmatmul_q8_reference
