"""GGUF tensors -> GPU weights for the `cuda` backend: matrices stay in their GGML block format in VRAM
and are multiplied by csrc/qmatmul.cu; vectors (norms, scales) become float32 on the GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, GGMLQuantizationType, ReaderTensor

from dgemma.convert import constants as C

from ..config import ModelConfig
from ..inspect import InspectError, field_value
from ..model import LayerWeights, Weights, geglu
from ..weights import tensor_to_torch
from . import ops


class QuantLinear:
    """A [N, K] weight kept as GGML blocks on the GPU; calling it computes x @ W^T. `k_in` < K when the rows
    were zero-padded (--pad-experts): the input is padded to match."""

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int, k_in: int | None = None) -> None:
        self.data, self.qtype, self.n, self.k, self.k_in = data, qtype, n, k, k_in or k

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _padded(x.reshape(-1, x.shape[-1]), self.k_in, self.k)
        return ops.qmatmul(x2, self.data, self.qtype, self.k).view(*lead, self.n)


def _padded(x: torch.Tensor, k_in: int, k: int) -> torch.Tensor:
    """x [M, k_in] as the contiguous float32 [M, k] a matmul over zero-padded rows (--pad-experts) reads."""
    x = x.float()
    return (torch.nn.functional.pad(x, (0, k - k_in)) if k_in != k else x).contiguous()


class QuantExperts:
    """[E, N, K] expert weights as GGML blocks; experts[e] is that expert's QuantLinear."""

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int, k_in: int | None = None) -> None:
        self.data, self.qtype, self.n, self.k, self.k_in = data, qtype, n, k, k_in or k

    def __getitem__(self, e: int) -> QuantLinear:
        return QuantLinear(self.data[e], self.qtype, self.n, self.k, self.k_in)

    def grouped(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, counts: list[int],
                down: QuantExperts) -> torch.Tensor:
        """model.grouped_experts on the GPU, self being gate_up: x [N, D]; rows [P] the token of each (token,
        expert) pair grouped by expert, counts[e] pairs for expert e; weights [P] their routing weights.
        Two csrc/moe.cu launches (gate_up, down) for all experts, then the weighted scatter. Returns [N, D]."""
        groups = ops.ExpertGroups(counts, x.device)
        h = ops.moe_qmatmul(_padded(x, self.k_in, self.k), rows.to(torch.int32), groups, self.data, self.qtype, self.k)
        act = _padded(geglu(h), down.k_in, down.k)  # [P, Fe], zero columns for --pad-experts
        y = ops.moe_qmatmul(act, None, groups, down.data, down.qtype, down.k)  # [P, D]
        return torch.zeros_like(x).index_add_(0, rows, y * weights[:, None].to(y.dtype))


def _raw(t: ReaderTensor, device: str) -> torch.Tensor:
    data = np.ascontiguousarray(t.data).view(np.uint8)
    return torch.from_numpy(data.copy()).to(device)


def load_cuda_weights(reader: GGUFReader, cfg: ModelConfig, path: str | Path = "", device: str = "cuda") -> Weights:
    tensors = {t.name: t for t in reader.tensors}
    padded = field_value(reader, C.DGEMMA_EXPERT_DOWN_PADDED)

    def t(name: str, optional: bool = False) -> ReaderTensor | None:
        if name not in tensors and not optional:
            raise InspectError(f"{path}: tensor '{name}' missing")
        return tensors.get(name)

    def vec(name: str, optional: bool = False) -> torch.Tensor | None:
        r = t(name, optional)
        return None if r is None else tensor_to_torch(r).to(device)

    def mat(name: str, optional: bool = False):
        r = t(name, optional)
        if r is None:
            return None
        shape = [int(x) for x in reversed(r.shape)]  # PyTorch order
        raw = _raw(r, device)
        if len(shape) == 3:
            k_in = cfg.n_ff_exp if name.endswith(f"{C.FFN_DOWN_EXPS}.weight") and padded is not None else None
            return QuantExperts(raw.view(shape[0], shape[1], -1), r.tensor_type, shape[1], shape[2], k_in)
        return QuantLinear(raw.view(shape[0], -1), r.tensor_type, shape[0], shape[1])

    def blk(i: int, base: str, suffix: str = "weight", optional: bool = False, matrix: bool = False):
        name = C.blk(i, base, suffix)
        return mat(name, optional) if matrix else vec(name, optional)

    layers = [
        LayerWeights(
            attn_norm=blk(i, C.ATTN_NORM), wq=blk(i, C.ATTN_Q, matrix=True), wk=blk(i, C.ATTN_K, matrix=True),
            wv=blk(i, C.ATTN_V, optional=True, matrix=True), wo=blk(i, C.ATTN_OUTPUT, matrix=True),
            q_norm=blk(i, C.ATTN_Q_NORM), k_norm=blk(i, C.ATTN_K_NORM), post_attn_norm=blk(i, C.POST_ATTN_NORM),
            ffn_norm=blk(i, C.FFN_NORM), ffn_gate=blk(i, C.FFN_GATE, matrix=True), ffn_up=blk(i, C.FFN_UP, matrix=True),
            ffn_down=blk(i, C.FFN_DOWN, matrix=True), post_ffw_norm_1=blk(i, C.POST_FFW_NORM_1),
            pre_ffw_norm_2=blk(i, C.PRE_FFW_NORM_2), router=blk(i, C.FFN_GATE_INP),
            router_scale=blk(i, C.FFN_GATE_INP, "scale"), expert_scale=blk(i, C.FFN_DOWN_EXPS, "scale"),
            gate_up_exps=blk(i, C.FFN_GATE_UP_EXPS, matrix=True), down_exps=blk(i, C.FFN_DOWN_EXPS, matrix=True),
            post_ffw_norm_2=blk(i, C.POST_FFW_NORM_2), post_ffw_norm=blk(i, C.POST_FFW_NORM),
            dec_scale=blk(i, C.LAYER_OUTPUT_SCALE), enc_scale=blk(i, C.ENC_LAYER_OUTPUT_SCALE),
        )
        for i in range(cfg.n_layer)
    ]
    sc_pre_norm = vec(C.gguf_name(C.SELF_COND_PRE_NORM), optional=True)
    if sc_pre_norm is None:
        sc_pre_norm = vec(C.gguf_name(C.SELF_COND_NORM_ALT))
    embd = C.gguf_name(C.TOKEN_EMBD)
    # the embedding is looked up and mixed (self-conditioning) in float32; the head multiplies the blocks
    return Weights(
        embed=vec(embd), output_norm=vec(C.gguf_name(C.OUTPUT_NORM)), rope_freqs=vec(C.gguf_name(C.ROPE_FREQS), True),
        sc_pre_norm=sc_pre_norm, sc_gate=mat(C.gguf_name(C.SELF_COND_GATE)), sc_up=mat(C.gguf_name(C.SELF_COND_UP)),
        sc_down=mat(C.gguf_name(C.SELF_COND_DOWN)), layers=layers, head=mat(embd),
    )
