"""GGUF tensors -> GPU weights for the `cuda` backend: matrices stay in their GGML block format in VRAM
and are multiplied by csrc/qmatmul.cu; vectors (norms, scales) become float32 on the GPU."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from gguf import GGUFReader, GGMLQuantizationType

from dgemma.convert import constants as C
from dgemma.quant.planner import PLAN_CTX, GiB, Breakdown, kv_cache_bytes, runtime_breakdown

from ..config import ModelConfig
from ..inspect import InspectError, field_value
from ..model import LayerWeights, Weights
from ..weights import tensor_to_torch
from . import head_ops, ops


DOWN_PROJECTIONS = (C.FFN_DOWN, C.FFN_DOWN_EXPS, C.SELF_COND_DOWN)  # tensor base names
# the load check leaves room for the KV cache of this many positions (or the model's context, if shorter): a model
# that loads but cannot hold a long prompt would fail on the first one, halfway through (Ollama counts num_ctx's)
KV_RESERVE_POSITIONS = PLAN_CTX  # (the context --fit plans for)


class QuantLinear:
    """A [N, K] weight kept as GGML blocks on the GPU; calling it computes x @ W^T with the matmul kernel
    `matmul` (a key of ops.MATMULS, set by plugin/cuda/tune.py). `k_in` < K when the rows were zero-padded
    (--pad-experts): the input is padded to match."""

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int, k_in: int | None = None) -> None:
        self.data, self.qtype, self.n, self.k, self.k_in = data, qtype, n, k, k_in or k
        self.matmul = "scalar"
        self.bounded_input = True  # False: its input is not normalised (gelu(gate) * up), f16 could overflow

    @property
    def shape(self) -> tuple[int, int]:
        """[N, K] as the float weight it stands for (K without --pad-experts' zero columns)."""
        return self.n, self.k_in

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = _padded(x.reshape(-1, x.shape[-1]), self.k_in, self.k)
        dense = getattr(ops, ops.MATMULS[self.matmul][0])
        return dense(x2, self.data, self.qtype, self.k).view(*lead, self.n)

    def stats(self, h: torch.Tensor, softcap: float, temperature: float, seed: int, index: int):
        """This matrix as the tied vocabulary head: the sampler's statistics of h [L, D], the [L, V] logits never
        formed (plugin/cuda/head_ops.py): with matmul "scalar" the fused float kernel, with a tensor-core kind
        (f16, int8, either width) the chunked head. Returns plugin.cuda.head_ref.HeadStats."""
        h = _padded(h, self.k_in, self.k)
        if self.matmul == "scalar":
            return head_ops.head_stats(h, self.data, self.qtype, softcap, temperature, seed=seed, step=index)
        return head_ops.head_stats_chunked(h, self.data, self.qtype, softcap, temperature, seed, index, self.matmul)


class QuantEmbedding:
    """The token embedding [V, D] as GGML rows on the GPU: the same bytes as the tied head, so VRAM holds one
    quantized copy instead of a float32 table. `embed[tokens]` dequantizes the looked-up rows
    (csrc/get_rows.cu); `weighted_sum(probs)` is probs @ E (the logits sampler's self-conditioning input,
    `--rng torch`), from row chunks dequantized in turn."""

    dtype = torch.float32
    CHUNK = 16384  # rows dequantized at a time by weighted_sum: 185 MB of float32 at D = 2816

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int) -> None:
        self.data, self.qtype, self.n, self.k = data, qtype, n, k

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.k

    def __getitem__(self, tokens: torch.Tensor) -> torch.Tensor:
        # ids come from checked prompts or the sampler's own draws: no range check (a host sync) per lookup
        return ops.get_rows(tokens.reshape(-1), self.data, self.qtype, self.k, check=False).view(*tokens.shape, self.k)

    def weighted_sum(self, probs: torch.Tensor) -> torch.Tensor:
        """probs [..., V] @ E -> [..., D] float32."""
        flat = probs.reshape(-1, self.n).float()
        out = torch.zeros(flat.shape[0], self.k, dtype=torch.float32, device=flat.device)
        for start in range(0, self.n, self.CHUNK):
            ids = torch.arange(start, min(start + self.CHUNK, self.n), device=self.data.device)
            rows = ops.get_rows(ids, self.data, self.qtype, self.k, check=False).to(flat.device)  # [n, D]
            out += flat[:, start : start + len(ids)] @ rows
        return out.view(*probs.shape[:-1], self.k)


def _padded(x: torch.Tensor, k_in: int, k: int) -> torch.Tensor:
    """x [M, k_in] as the contiguous float32 [M, k] a matmul over zero-padded rows (--pad-experts) reads."""
    x = x.float()
    return (torch.nn.functional.pad(x, (0, k - k_in)) if k_in != k else x).contiguous()


class QuantExperts:
    """[E, N, K] expert weights as GGML blocks, multiplied by the grouped matmul kernel `matmul` (a key of
    ops.MATMULS): every expert in one launch (csrc/moe.cu)."""

    def __init__(self, data: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int, k_in: int | None = None) -> None:
        self.data, self.qtype, self.n, self.k, self.k_in = data, qtype, n, k, k_in or k
        self.matmul = "scalar"
        self.bounded_input = True  # False: its input is not normalised (gelu(gate) * up), f16 could overflow
        self.stage = None  # streamed experts (in host RAM): the ExpertStage copying them to the GPU, cuda/offload.py

    @property
    def shape(self) -> tuple[int, int, int]:
        """[E, N, K] as the float weights they stand for (K without --pad-experts' zero columns)."""
        return self.data.shape[0], self.n, self.k_in

    def __call__(self, x: torch.Tensor, rows: torch.Tensor | None, groups: ops.ExpertGroups,
                 scatter: ops.Scatter | None = None, gated: bool = False) -> torch.Tensor:
        """The grouped GEMM: pair m reads x[rows[m]] (rows None: x[m]) -> [P, N] float32; with scatter (token
        and weight of each pair, tokens) the weighted sum per token [tokens, N]; gated (gate rows, then up
        rows) gelu_tanh(gate) * up [P, N/2]."""
        grouped = getattr(ops, ops.MATMULS[self.matmul][1])
        return grouped(_padded(x, self.k_in, self.k), rows, groups, self.data, self.qtype, self.k, scatter, gated)

    def grouped(self, x: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor, counts: torch.Tensor,
                down: QuantExperts) -> torch.Tensor:
        """model.grouped_experts on the GPU, self being gate_up: x [N, D]; rows [P] the token of each (token,
        expert) pair grouped by expert, counts [E] (on x's device) pairs per expert; weights [P] their routing
        weights. Two csrc/moe.cu launches for all experts: gate_up's epilogue applies the GELU gate (the
        [P, 2Fe] product is never written), down's adds each pair's weighted row into its token's (nor is
        [P, D]). The tiles are found on the GPU, so nothing waits for the counts. Returns [N, D]."""
        groups = ops.ExpertGroups(counts, x.device, pairs=rows.shape[0])
        tokens = rows.to(torch.int32)
        act = self(x, tokens, groups, gated=True)  # [P, Fe] = gelu_tanh(gate) * up
        return down(act, None, groups, (tokens, weights.float().contiguous(), x.shape[0]))  # [N, D]


class TensorSource(Protocol):
    """Where the cuda weights come from: a GGUF file (GGUFTensors) or synthetic blocks (bench/model_gpu.py)."""

    def shape(self, name: str) -> list[int] | None: ...  # PyTorch order; None: no such tensor

    def qtype(self, name: str) -> GGMLQuantizationType: ...

    def raw(self, name: str, device: str) -> torch.Tensor: ...  # the GGML bytes, uint8 [N, row_bytes] (or [E, N, ..])

    def floats(self, name: str, device: str) -> torch.Tensor: ...  # float32 values in PyTorch shape


class GGUFTensors:
    """A GGUF file's tensors as a TensorSource."""

    def __init__(self, reader: GGUFReader) -> None:
        self.tensors = {t.name: t for t in reader.tensors}

    def shape(self, name: str) -> list[int] | None:
        t = self.tensors.get(name)
        return None if t is None else [int(x) for x in reversed(t.shape)]

    def qtype(self, name: str) -> GGMLQuantizationType:
        return self.tensors[name].tensor_type

    def raw(self, name: str, device: str) -> torch.Tensor:
        shape = self.shape(name)
        data = np.ascontiguousarray(self.tensors[name].data).view(np.uint8)
        return torch.from_numpy(data.copy()).to(device).view(*shape[:-1], -1)

    def floats(self, name: str, device: str) -> torch.Tensor:
        return tensor_to_torch(self.tensors[name]).to(device)


def vram_estimate(reader: GGUFReader, cfg: ModelConfig, host_layers: Sequence[int] = (),
                  kv_bytes: int = 2) -> Breakdown:
    """What the cuda backend holds for this file: its tensors as cuda_weights loads them (matrices as their GGML
    blocks; vectors as float32, which is how GGUF files keep them), less the experts of `host_layers` plus the
    slots they stream through (plugin/cuda/offload.py), the KV cache of min(context, KV_RESERVE_POSITIONS)
    positions at kv_bytes a value, and one canvas step's working memory, the converter's --fit estimates
    (quant/planner.py). No CUDA context: the free memory it is held against is counted after it."""
    from . import offload  # (which builds on this module's QuantExperts)

    weights = sum(int(t.n_bytes) for t in reader.tensors)
    if host_layers:
        weights -= offload.vram_saving(offload.expert_bytes(reader, cfg.n_layer), host_layers)
    dims = cfg.model_dims()
    kv = kv_cache_bytes(dims, min(cfg.context_length, KV_RESERVE_POSITIONS), kv_bytes)
    return replace(runtime_breakdown(weights, dims, None, cuda_context=0), kv_cache=kv)


def free_vram(device: str = "cuda") -> tuple[int, int]:
    """(free, total) bytes of the GPU, counting as free what PyTorch's allocator keeps cached but unused (an
    unloaded model's blocks, an earlier generation's KV cache), which it hands out again before asking CUDA."""
    index = torch.device(device).index
    index = torch.cuda.current_device() if index is None else index  # torch 2.4's mem_get_info wants an index
    free, total = torch.cuda.mem_get_info(index)
    return free + torch.cuda.memory_reserved(index) - torch.cuda.memory_allocated(index), total


def vram_plan(reader: GGUFReader, cfg: ModelConfig, path: str | Path, host_experts: int | str = "auto",
              device: str = "cuda", kv_bytes: int = 2) -> tuple[list[int], tuple[str, int, int, int] | None]:
    """Which layers' experts stay in host RAM, streamed to the GPU (host_experts: "auto", as few as the GPU's free
    memory needs; or a number of layers, 0 for none), and None where the GPU's free memory then holds the
    estimate (vram_estimate: with room for the KV cache of KV_RESERVE_POSITIONS at kv_bytes a value), else (the
    one-line error saying so, instead of CUDA's out-of-memory error halfway through the load or the first long
    prompt, and which --fit plan would fit the card; bytes needed; the GPU's bytes in all; bytes needed with
    every layer's experts streamed)."""
    from . import offload

    sizes = offload.expert_bytes(reader, cfg.n_layer)
    every = offload.spread(cfg.n_layer, cfg.n_layer)
    whole, (free, total) = vram_estimate(reader, cfg, kv_bytes=kv_bytes), free_vram(device)
    if host_experts == "auto":
        layers = offload.host_layers_for(sizes, whole.total - free)
        if layers is None:  # not even with every layer's: say what that would still need
            layers = every
    else:
        layers = offload.spread(int(host_experts), cfg.n_layer)
    need = replace(whole, weights=whole.weights - offload.vram_saving(sizes, layers))  # = vram_estimate(.., layers)
    if need.total <= free:
        return layers, None
    streamed = f" with the experts of {len(layers)} of {cfg.n_layer} layers in host RAM" if layers else ""
    return layers, (f"{path}: the cuda backend needs about {need.total / GiB:.2f} GiB of GPU memory for this model "
                    f"with a KV cache of {min(cfg.context_length, KV_RESERVE_POSITIONS)} positions{streamed} "
                    f"(weights {need.weights / GiB:.2f} GiB), but {torch.cuda.get_device_name(device)} has "
                    f"{free / GiB:.2f} GiB free of {total / GiB:.2f}: convert the model for this GPU (dgemma convert "
                    f"... --fit {max(1, int(total / GiB))}GB) or free GPU memory",
                    need.total, total, whole.total - offload.vram_saving(sizes, every))


def load_cuda_weights(reader: GGUFReader, cfg: ModelConfig, path: str | Path = "", device: str = "cuda",
                      host_layers: Sequence[int] = ()) -> Weights:
    padded = field_value(reader, C.DGEMMA_EXPERT_DOWN_PADDED) is not None
    return cuda_weights(GGUFTensors(reader), cfg, padded, path, device, host_layers)


def cuda_weights(src: TensorSource, cfg: ModelConfig, padded: bool = False, path: str | Path = "",
                 device: str = "cuda", host_layers: Sequence[int] = ()) -> Weights:
    """Weights for the cuda backend: matrices as GGML blocks (QuantLinear, QuantExperts, QuantEmbedding),
    vectors as float32, all on `device` but the experts of `host_layers`, which stay in host RAM and stream
    through VRAM slots (plugin/cuda/offload.py). padded: the expert down rows were zero-padded (--pad-experts)."""
    from . import offload

    hosted = {C.blk(i, base) for i in host_layers for base in (C.FFN_GATE_UP_EXPS, C.FFN_DOWN_EXPS)}

    def need(name: str, optional: bool) -> bool:
        if src.shape(name) is None:
            if optional:
                return False
            raise InspectError(f"{path}: tensor '{name}' missing")
        return True

    def vec(name: str, optional: bool = False) -> torch.Tensor | None:
        return src.floats(name, device) if need(name, optional) else None

    def mat(name: str, optional: bool = False):
        if not need(name, optional):
            return None
        shape, qtype = src.shape(name), src.qtype(name)
        raw = src.raw(name, "cpu" if name in hosted else device)  # (the stage page-locks the hosted ones)
        if len(shape) == 3:
            k_in = cfg.n_ff_exp if name.endswith(f"{C.FFN_DOWN_EXPS}.weight") and padded else None
            obj = QuantExperts(raw.view(shape[0], shape[1], -1), qtype, shape[1], shape[2], k_in)
        else:
            obj = QuantLinear(raw.view(shape[0], -1), qtype, shape[0], shape[1])
        # the down projections read gelu(gate) * up, not a normalised vector: no f16 rounding of it (65504)
        obj.bounded_input = not any(name.endswith(f"{base}.weight") for base in DOWN_PROJECTIONS)
        return obj

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
    offload.stream_experts(layers, host_layers, device)
    head = mat(C.gguf_name(C.TOKEN_EMBD))  # the tied head and the embedding: one quantized copy
    return Weights(
        embed=QuantEmbedding(head.data, head.qtype, head.n, head.k), output_norm=vec(C.gguf_name(C.OUTPUT_NORM)),
        rope_freqs=vec(C.gguf_name(C.ROPE_FREQS), True), sc_pre_norm=sc_pre_norm,
        sc_gate=mat(C.gguf_name(C.SELF_COND_GATE)), sc_up=mat(C.gguf_name(C.SELF_COND_UP)),
        sc_down=mat(C.gguf_name(C.SELF_COND_DOWN)), layers=layers, head=head,
    )
