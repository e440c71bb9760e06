"""Thin checked wrappers over the csrc kernels: torch tensors in and out, readable errors, no surprises.

Every op has a plain torch reference beside it (`*_reference`) and tests/test_cuda_kernels.py compares
them on odd shapes with a stated tolerance.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .loader import kernel

MM_TILE = 16
MM_THREADS = 256
SUPPORTED = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16, GGMLQuantizationType.Q4_0,
             GGMLQuantizationType.Q5_0, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q8_0,
             GGMLQuantizationType.Q2_K, GGMLQuantizationType.Q3_K, GGMLQuantizationType.Q4_K,
             GGMLQuantizationType.Q5_K, GGMLQuantizationType.Q6_K)
_QMATMUL_NAMES = tuple(f"dg::qmatmul<{int(t)}>" for t in SUPPORTED)


def _cupy(t: torch.Tensor):
    import cupy

    return cupy.from_dlpack(t)


def _launch(fn, grid, block, args) -> None:
    import cupy

    with cupy.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
        fn(grid, block, args)


def row_bytes(qtype: GGMLQuantizationType, k: int) -> int:
    bs, ts = GGML_QUANT_SIZES[qtype]
    if k % bs:
        raise ValueError(f"K={k} is not a multiple of the {qtype.name} block ({bs})")
    return k // bs * ts


def qmatmul(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """x [M, K] float32 @ W^T, W: [N, row_bytes] uint8 in GGML type `qtype` -> [M, N] float32."""
    qtype = GGMLQuantizationType(qtype)
    if qtype not in SUPPORTED:
        raise ValueError(f"qmatmul: GGML type {qtype.name} is not supported (have {', '.join(t.name for t in SUPPORTED)})")
    if not (x.is_cuda and w.is_cuda and x.device == w.device):
        raise ValueError("qmatmul: x and w must be CUDA tensors on the same device")
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != k or x.stride(1) != 1:
        raise ValueError(f"qmatmul: x must be float32 [M, {k}] with unit stride in K (got {x.dtype} {tuple(x.shape)})")
    if w.dtype != torch.uint8 or w.dim() != 2 or w.shape[1] != row_bytes(qtype, k) or not w.is_contiguous():
        raise ValueError(f"qmatmul: w must be contiguous uint8 [N, {row_bytes(qtype, k)}] for {qtype.name} rows of {k} "
                         f"(got {w.dtype} {tuple(w.shape)})")
    m, n = x.shape[0], w.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device=x.device)
    if m == 0 or n == 0:
        return y
    import numpy as np

    fn = kernel("qmatmul.cu", f"dg::qmatmul<{int(qtype)}>", _QMATMUL_NAMES)
    grid = ((n + MM_TILE - 1) // MM_TILE, (m + MM_TILE - 1) // MM_TILE)
    _launch(fn, grid, (MM_THREADS,), (_cupy(x), np.int32(x.stride(0)), _cupy(w), _cupy(y), np.int32(n), np.int32(m),
                                      np.int32(n), np.int32(k)))
    return y


def qmatmul_reference(x: torch.Tensor, w: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    """Dequantize on the CPU with dgemma.quant, multiply in float64."""
    from dgemma import quant

    wf = quant.dequantize(w.cpu().numpy(), qtype).reshape(w.shape[0], k)
    return (x.double().cpu() @ torch.from_numpy(wf).double().T).float()


def accept_renoise(entropy: torch.Tensor, denoised: torch.Tensor, fresh: torch.Tensor, bound: float):
    """[B, C] entropies, denoised and fresh tokens -> (next canvas [B, C] int32, accepted [B, C] bool)."""
    import numpy as np

    if entropy.dim() != 2 or entropy.shape[1] > 1024:
        raise ValueError(f"accept_renoise: entropy must be [B, C<=1024] (got {tuple(entropy.shape)})")
    if denoised.shape != entropy.shape or fresh.shape != entropy.shape:
        raise ValueError("accept_renoise: entropy, denoised and fresh must have the same [B, C] shape")
    b, c = entropy.shape
    ent = entropy.float().contiguous()
    den, fre = denoised.int().contiguous(), fresh.int().contiguous()
    nxt = torch.empty_like(den)
    acc = torch.empty(b, c, dtype=torch.uint8, device=entropy.device)
    fn = kernel("accept.cu", "accept_renoise")
    _launch(fn, (b,), (min(1024, max(32, c)),), (_cupy(ent), _cupy(den), _cupy(fre), _cupy(nxt), _cupy(acc),
                                                 np.int32(c), np.float32(bound)))
    return nxt, acc.bool()


def accept_renoise_reference(entropy, denoised, fresh, bound: float):
    from ..sampler import accept

    accepted, mask = accept(torch.zeros_like(denoised), denoised, entropy, bound)
    return torch.where(mask, accepted, fresh), mask
