"""`--type` presets and their per-tensor rules, following llama.cpp's llama_tensor_get_type (llama-quant.cpp).

A preset is a default GGML type plus rules that give some tensors more bits: attention V on a
`use_more_bits` pattern of layers, FFN down likewise, the (tied) token embedding at Q6_K, and so on.
Tensors whose rows are not a multiple of the chosen type's block fall back as llama.cpp does
(Q4_K -> Q5_0, Q6_K -> Q8_0, Q2_K/Q3_K -> Q4_0, Q5_K -> Q5_1, a 32-block type that still does not fit
-> F16). Rules for the quantization types dgemma writes; MoE-8 and Falcon special cases do not apply to
DiffusionGemma and are left out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

Q = GGMLQuantizationType


@dataclass(frozen=True)
class Preset:
    name: str
    ftype: LlamaFileType
    default: GGMLQuantizationType

    @property
    def quantized(self) -> bool:
        return self.default not in (Q.F32, Q.F16, Q.BF16)


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("F32", LlamaFileType.ALL_F32, Q.F32),
    Preset("F16", LlamaFileType.MOSTLY_F16, Q.F16),
    Preset("BF16", LlamaFileType.MOSTLY_BF16, Q.BF16),
    Preset("Q8_0", LlamaFileType.MOSTLY_Q8_0, Q.Q8_0),
    Preset("Q6_K", LlamaFileType.MOSTLY_Q6_K, Q.Q6_K),
    Preset("Q5_K_M", LlamaFileType.MOSTLY_Q5_K_M, Q.Q5_K),
    Preset("Q5_K_S", LlamaFileType.MOSTLY_Q5_K_S, Q.Q5_K),
    Preset("Q4_K_M", LlamaFileType.MOSTLY_Q4_K_M, Q.Q4_K),
    Preset("Q4_K_S", LlamaFileType.MOSTLY_Q4_K_S, Q.Q4_K),
    Preset("Q3_K_M", LlamaFileType.MOSTLY_Q3_K_M, Q.Q3_K),
    Preset("Q2_K", LlamaFileType.MOSTLY_Q2_K, Q.Q2_K),
)}

# llama.cpp's tensor_type_fallback: rows that do not fill whole blocks of the target type
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def bits_per_weight(qtype: GGMLQuantizationType) -> float:
    bs, ts = GGML_QUANT_SIZES[qtype]
    return ts * 8 / bs


def fallback(qtype: GGMLQuantizationType, ncols: int) -> GGMLQuantizationType:
    """tensor_type_fallback: a type whose block divides the row length."""
    if ncols % block_size(qtype) == 0:
        return qtype
    alt = FALLBACK.get(qtype, qtype)
    return alt if ncols % block_size(alt) == 0 else Q.F16


def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def category(name: str) -> str:
    """llama.cpp's tensor_get_category, by substring, in its order."""
    if name == "output.weight":
        return "output"
    if name == "token_embd.weight":
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_v.weight", "attn_v"), ("attn_k.weight", "attn_k"),
                     ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"),
                     ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def allows_quantization(name: str, shape: tuple[int, ...]) -> bool:
    """tensor_allows_quantization, for the tensors DiffusionGemma has."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


@dataclass(frozen=True)
class ModelFacts:
    """What the rules read about the model (llama.cpp's hparams)."""

    n_layer: int
    n_gqa: int  # n_head / n_head_kv of layer 0
    n_expert: int
    tied_embeddings: bool = True


def _layer(name: str) -> int:
    return int(name.split(".")[1]) if name.startswith("blk.") else -1


def preset_types(tensors: Iterable[tuple[str, tuple[int, ...]]], preset: Preset, facts: ModelFacts,
                 ) -> dict[str, GGMLQuantizationType]:
    """GGML type of every tensor for `preset`. `tensors`: (GGUF name, PyTorch-order shape) in file order;
    tensors that are never quantized (1-D, norms, router) come back as F32."""
    items = list(tensors)
    n_attn_v = sum(category(n) in ("attn_v", "attn_qkv") for n, _ in items)
    i_attn_v = 0
    ft = preset.ftype
    out: dict[str, GGMLQuantizationType] = {}
    for name, shape in items:
        if not allows_quantization(name, shape):
            out[name] = Q.F32
            continue
        t = preset.default
        if not preset.quantized:
            out[name] = t
            continue
        cat, ncols, layer = category(name), shape[-1], _layer(name)
        if cat == "output" or (cat == "token_embd" and facts.tied_embeddings):
            if ncols % block_size(t) != 0:
                t = Q.Q8_0
            elif t != Q.Q8_0:
                t = Q.Q6_K
        elif cat in ("attn_v", "attn_qkv"):
            if ft == LlamaFileType.MOSTLY_Q2_K:
                t = Q.Q4_K if facts.n_gqa >= 4 else Q.Q3_K
            elif ft == LlamaFileType.MOSTLY_Q3_K_M:
                t = Q.Q5_K if i_attn_v < 2 else Q.Q4_K
            elif ft in (LlamaFileType.MOSTLY_Q4_K_M, LlamaFileType.MOSTLY_Q5_K_M) and use_more_bits(i_attn_v, n_attn_v):
                t = Q.Q6_K
            elif ft == LlamaFileType.MOSTLY_Q4_K_S and i_attn_v < 4:
                t = Q.Q5_K
            i_attn_v += 1
        elif cat == "ffn_down":
            n = facts.n_layer
            if ft == LlamaFileType.MOSTLY_Q2_K:
                t = Q.Q3_K
            elif ft == LlamaFileType.MOSTLY_Q3_K_M:
                t = Q.Q5_K if layer < n // 16 else Q.Q4_K
            elif ft in (LlamaFileType.MOSTLY_Q4_K_M, LlamaFileType.MOSTLY_Q5_K_M) and use_more_bits(layer, n):
                t = Q.Q6_K
            elif ft == LlamaFileType.MOSTLY_Q4_K_S and layer < n // 8:
                t = Q.Q5_K
        elif cat == "attn_output" and facts.n_expert != 8:
            if ft == LlamaFileType.MOSTLY_Q2_K:
                t = Q.Q3_K
            elif ft == LlamaFileType.MOSTLY_Q3_K_M:
                t = Q.Q4_K
        out[name] = fallback(t, ncols)
    return out
