"""Per-architecture conversion hooks, as llama.cpp's converters lay them out.

A `ModelConverter` subclass registers the HF `architectures` names it handles and provides:
- `set_gguf_parameters(kv)`: the hyperparameter and sampler keys;
- `map_name(hf_name)`: the GGUF name of a checkpoint tensor, or None to drop it;
- `modify_tensors(name, data)`: every weight fix-up, in exactly this one place;
- `generate_extra_tensors()`: tensors that the checkpoint does not store (rope_freqs);
- `expected_shape(name)`: the shape the config implies, checked before anything is written;
- `tensor_force_quant(name, shape)`: a GGML type that overrides the requested one.
The writer runs `modify_tensors` on meta tensors first (to plan names, shapes and types without
reading data) and again on the real data while writing, so both passes share one code path.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from gguf import GGMLQuantizationType

from dgemma.quant.presets import ModelFacts

from . import constants as C
from .source import Checkpoint, ConvertError

ARCHITECTURES: dict[str, type["ModelConverter"]] = {}


def converter_for(ckpt: Checkpoint, *, pad_experts: bool = False) -> "ModelConverter":
    archs = ckpt.config.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise ConvertError(f"{ckpt.root / 'config.json'}: field 'architectures' missing or empty")
    cls = ARCHITECTURES.get(archs[0])
    if cls is None:
        supported = ", ".join(sorted(ARCHITECTURES))
        raise ConvertError(
            f"{ckpt.root / 'config.json'}: architecture '{archs[0]}' is not supported (supported: {supported})"
        )
    conv = cls(ckpt)
    if pad_experts:
        conv.enable_expert_padding()
    return conv


class KV:
    """Ordered GGUF key/values with explicit types: (key, value, gguf writer method name)."""

    def __init__(self) -> None:
        self.items: dict[str, tuple[Any, str]] = {}

    def add(self, key: str, value: Any, kind: str) -> None:
        self.items[key] = (value, kind)


class ModelConverter:
    hf_architectures: ClassVar[tuple[str, ...]] = ()
    n_vocab: int  # rows of the embedding: the token list is padded to this length

    def __init_subclass__(cls) -> None:
        for name in cls.hf_architectures:
            ARCHITECTURES[name] = cls

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt

    def enable_expert_padding(self) -> None:
        raise ConvertError(f"--pad-experts is not available for {type(self).__name__}")

    def set_gguf_parameters(self, kv: KV) -> None:
        raise NotImplementedError

    def map_name(self, hf_name: str) -> str | None:
        raise NotImplementedError

    def modify_tensors(self, name: str, data: torch.Tensor) -> torch.Tensor:
        return data

    def generate_extra_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(())

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        return None

    def tensor_force_quant(self, name: str, shape: tuple[int, ...]) -> GGMLQuantizationType | None:
        return None

    def required_names(self) -> list[str]:
        """GGUF tensors a complete file must have (checked before writing)."""
        return []

    def model_facts(self) -> ModelFacts:
        """What llama.cpp's per-tensor quantization rules read about the model."""
        return ModelFacts(n_layer=1, n_gqa=1, n_expert=1)


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


_BLK = re.compile(r"^model\.decoder\.layers\.(\d+)\.(.+)$")
_ENC_SCALAR = re.compile(r"^model\.encoder\.(?:language_model\.)?layers\.(\d+)\.layer_scalar$")

# HF sub-name (under model.decoder.layers.N.) -> GGUF per-layer name and suffix
_LAYER_MAP: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": (C.ATTN_NORM, "weight"),
    "self_attn.q_proj.weight": (C.ATTN_Q, "weight"),
    "self_attn.k_proj.weight": (C.ATTN_K, "weight"),
    "self_attn.v_proj.weight": (C.ATTN_V, "weight"),
    "self_attn.o_proj.weight": (C.ATTN_OUTPUT, "weight"),
    "self_attn.q_norm.weight": (C.ATTN_Q_NORM, "weight"),
    "self_attn.k_norm.weight": (C.ATTN_K_NORM, "weight"),
    "post_attention_layernorm.weight": (C.POST_ATTN_NORM, "weight"),
    "pre_feedforward_layernorm.weight": (C.FFN_NORM, "weight"),
    "post_feedforward_layernorm.weight": (C.POST_FFW_NORM, "weight"),
    "pre_feedforward_layernorm_2.weight": (C.PRE_FFW_NORM_2, "weight"),
    "post_feedforward_layernorm_1.weight": (C.POST_FFW_NORM_1, "weight"),
    "post_feedforward_layernorm_2.weight": (C.POST_FFW_NORM_2, "weight"),
    "mlp.gate_proj.weight": (C.FFN_GATE, "weight"),
    "mlp.up_proj.weight": (C.FFN_UP, "weight"),
    "mlp.down_proj.weight": (C.FFN_DOWN, "weight"),
    "router.proj.weight": (C.FFN_GATE_INP, "weight"),
    "router.scale": (C.FFN_GATE_INP, "scale"),
    "router.per_expert_scale": (C.FFN_DOWN_EXPS, "scale"),
    "experts.gate_up_proj": (C.FFN_GATE_UP_EXPS, "weight"),
    "experts.down_proj": (C.FFN_DOWN_EXPS, "weight"),
    "layer_scalar": (C.LAYER_OUTPUT_SCALE, "weight"),
}
_GLOBAL_MAP: dict[str, str] = {
    "model.decoder.embed_tokens.weight": C.gguf_name(C.TOKEN_EMBD),
    "model.decoder.norm.weight": C.gguf_name(C.OUTPUT_NORM),
    "model.decoder.self_conditioning.pre_norm.weight": C.gguf_name(C.SELF_COND_PRE_NORM),
    "model.decoder.self_conditioning.gate_proj.weight": C.gguf_name(C.SELF_COND_GATE),
    "model.decoder.self_conditioning.up_proj.weight": C.gguf_name(C.SELF_COND_UP),
    "model.decoder.self_conditioning.down_proj.weight": C.gguf_name(C.SELF_COND_DOWN),
}


class DiffusionGemma(ModelConverter):
    """DiffusionGemma (Gemma 4 backbone, causal encoder + bidirectional decoder sharing weights)."""

    hf_architectures = C.HF_ARCHITECTURES

    def __init__(self, ckpt: Checkpoint) -> None:
        super().__init__(ckpt)
        cfg_path = ckpt.root / "config.json"
        text = ckpt.config.get("text_config")
        if not isinstance(text, dict):
            raise ConvertError(f"{cfg_path}: field 'text_config' missing (expected DiffusionGemma's text config)")
        self.hp = hp = {**ckpt.config, **text}  # text_config overrides root keys, root-only ones kept

        def need(key: str, kind: type = int) -> Any:
            value = hp.get(key)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise ConvertError(f"{cfg_path}: field '{key}' missing or not {kind.__name__} (got {value!r})")
            return value

        self.n_layer = need("num_hidden_layers")
        self.n_embd = need("hidden_size")
        self.n_ff = need("intermediate_size")
        self.n_head = need("num_attention_heads")
        self.n_vocab = need("vocab_size")
        self.head_dim = need("head_dim")
        self.n_expert = need("num_experts")
        self.n_expert_used = need("top_k_experts")
        self.n_ff_exp = need("moe_intermediate_size")
        self.sliding_window = need("sliding_window")
        self.ff_exp_padded = self.n_ff_exp  # expert down row length as stored (see enable_expert_padding)
        self.canvas_length = need("canvas_length")
        if self.canvas_length <= 0:
            raise ConvertError(f"{cfg_path}: field 'canvas_length' must be positive (got {self.canvas_length})")
        types = hp.get("layer_types")
        if not isinstance(types, list) or len(types) != self.n_layer or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ConvertError(
                f"{cfg_path}: field 'layer_types' must list {self.n_layer} entries of sliding_attention/full_attention"
            )
        self.is_swa = [t == "sliding_attention" for t in types]
        # Global (full-attention) layers take their head dim and KV heads from per_layer_config.
        per_layer = {int(k): v for k, v in (hp.get("per_layer_config") or {}).items()}
        full = [i for i, swa in enumerate(self.is_swa) if not swa]
        overrides = per_layer.get(full[0], {}) if full else {}
        self.global_head_dim = int(hp.get("global_head_dim", overrides.get("head_dim", self.head_dim)))
        self.n_head_kv_swa = need("num_key_value_heads")
        self.n_head_kv_full = int(hp.get("num_global_key_value_heads", overrides.get("num_key_value_heads", self.n_head_kv_swa)))
        rope = hp.get("rope_parameters") or {}
        try:
            self.rope_full = rope["full_attention"]
            self.rope_swa = rope["sliding_attention"]
            self.partial_rotary_full = float(self.rope_full.get("partial_rotary_factor", 1.0))
            self.theta_full = float(self.rope_full["rope_theta"])
            self.theta_swa = float(self.rope_swa["rope_theta"])
        except (KeyError, TypeError, AttributeError):
            raise ConvertError(
                f"{cfg_path}: field 'rope_parameters' must have full_attention and sliding_attention with rope_theta"
            ) from None

    # ---- metadata -------------------------------------------------------------------------------
    def set_gguf_parameters(self, kv: KV) -> None:
        hp = self.hp
        kv.add(C.CONTEXT_LENGTH, int(hp.get("max_position_embeddings", 131072)), "uint32")
        kv.add(C.EMBEDDING_LENGTH, self.n_embd, "uint32")
        kv.add(C.BLOCK_COUNT, self.n_layer, "uint32")
        kv.add(C.FEED_FORWARD_LENGTH, self.n_ff, "uint32")
        kv.add(C.HEAD_COUNT, self.n_head, "uint32")
        kv.add(C.HEAD_COUNT_KV, [self.n_head_kv_swa if s else self.n_head_kv_full for s in self.is_swa], "int32_array")
        kv.add(C.ROPE_FREQ_BASE, self.theta_full, "float32")
        kv.add(C.ROPE_FREQ_BASE_SWA, self.theta_swa, "float32")
        kv.add(C.RMS_EPS, float(hp.get("rms_norm_eps", 1e-6)), "float32")
        kv.add(C.EXPERT_COUNT, self.n_expert, "uint32")
        kv.add(C.EXPERT_USED_COUNT, self.n_expert_used, "uint32")
        kv.add(C.KEY_LENGTH, self.global_head_dim, "uint32")
        kv.add(C.VALUE_LENGTH, self.global_head_dim, "uint32")
        # transformers keeps the softcap as a class default that config.json may omit: write it anyway
        softcap = hp.get("final_logit_softcapping", C.DEFAULT_FINAL_LOGIT_SOFTCAPPING)
        if softcap:
            kv.add(C.FINAL_LOGIT_SOFTCAPPING, float(softcap), "float32")
        kv.add(C.SLIDING_WINDOW, self.sliding_window, "uint32")
        kv.add(C.SHARED_KV_LAYERS, 0, "uint32")
        kv.add(C.EMBEDDING_LENGTH_PER_LAYER_INPUT, 0, "uint32")
        kv.add(C.SLIDING_WINDOW_PATTERN, list(self.is_swa), "bool_array")
        kv.add(C.KEY_LENGTH_SWA, self.head_dim, "uint32")
        kv.add(C.VALUE_LENGTH_SWA, self.head_dim, "uint32")
        kv.add(C.EXPERT_FEED_FORWARD_LENGTH, self.n_ff_exp, "uint32")
        if self.ff_exp_padded != self.n_ff_exp:
            kv.add(C.DGEMMA_EXPERT_DOWN_PADDED, self.ff_exp_padded, "uint32")
        kv.add(C.ROPE_DIMENSION_COUNT, self.global_head_dim, "uint32")  # partial rotation lives in rope_freqs
        kv.add(C.ROPE_DIMENSION_COUNT_SWA, self.head_dim, "uint32")
        kv.add(C.CAUSAL, False, "bool")
        kv.add(C.CANVAS_LENGTH, self.canvas_length, "uint32")
        gen = self.ckpt.generation_config
        for key, (field, section, kind, _default) in C.SAMPLER_KEYS.items():
            src = gen.get(section) if section else gen
            value = src.get(field) if isinstance(src, dict) else None
            if value is None:
                continue  # readers fall back to the defaults in constants.SAMPLER_KEYS
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                where = f"{section}.{field}" if section else field
                raise ConvertError(f"{self.ckpt.root / 'generation_config.json'}: field '{where}' must be a number (got {value!r})")
            kv.add(key, kind(value), "uint32" if kind is int else "float32")

    # ---- tensors --------------------------------------------------------------------------------
    def map_name(self, hf_name: str) -> str | None:
        if hf_name in _GLOBAL_MAP:
            return _GLOBAL_MAP[hf_name]
        if m := _ENC_SCALAR.match(hf_name):
            return C.blk(int(m.group(1)), C.ENC_LAYER_OUTPUT_SCALE)
        if m := _BLK.match(hf_name):
            entry = _LAYER_MAP.get(m.group(2))
            if entry is None:
                raise ConvertError(f"{self.ckpt.root}: tensor '{hf_name}' is not part of DiffusionGemma's text model")
            return C.blk(int(m.group(1)), *entry)
        if hf_name.startswith("model.encoder.") or hf_name == "lm_head.weight":
            return None  # vision tower, embed_vision, encoder backbone and head are tied or not used
        raise ConvertError(f"{self.ckpt.root}: tensor '{hf_name}' is not part of DiffusionGemma's text model")

    def enable_expert_padding(self) -> None:
        """--pad-experts: zero-pad expert down rows (704 in the 26B) to a multiple of 256, so that K-quants
        and 2-bit types apply. A dgemma-only layout, flagged in metadata; dgemma's engine slices it back."""
        self.ff_exp_padded = -(-self.n_ff_exp // C.EXPERT_PAD_MULTIPLE) * C.EXPERT_PAD_MULTIPLE

    def modify_tensors(self, name: str, data: torch.Tensor) -> torch.Tensor:
        # Gemma 4 stores norm weights as the multiplier itself (x̂·w): no "+1" shift, unlike
        # Gemma 1-3; experts stay fused (gate half first) and untransposed. The only change is the
        # opt-in zero padding of expert down rows.
        if self.ff_exp_padded != self.n_ff_exp and name.endswith(f".{C.FFN_DOWN_EXPS}.weight"):
            return torch.nn.functional.pad(data, (0, self.ff_exp_padded - data.shape[-1]))  # [E, D, Fe_pad]
        return data

    def generate_extra_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        # Proportional RoPE on global layers: rotate the first partial·d/2 pairs, freeze the rest.
        half = self.global_head_dim // 2
        n_rot = int(self.global_head_dim * self.partial_rotary_full / 2)
        values = [1.0] * n_rot + [C.ROPE_FREQ_UNROTATED] * (half - n_rot)
        yield C.gguf_name(C.ROPE_FREQS), torch.tensor(values, dtype=torch.float32)

    def expected_shape(self, name: str) -> tuple[int, ...] | None:
        """PyTorch-order shape implied by the config (ggml order is the reverse)."""
        d, ff, e, ffe = self.n_embd, self.n_ff, self.n_expert, self.n_ff_exp
        glob = {
            C.gguf_name(C.TOKEN_EMBD): (self.n_vocab, d),
            C.gguf_name(C.OUTPUT_NORM): (d,),
            C.gguf_name(C.SELF_COND_PRE_NORM): (d,),
            C.gguf_name(C.SELF_COND_GATE): (ff, d),
            C.gguf_name(C.SELF_COND_UP): (ff, d),
            C.gguf_name(C.SELF_COND_DOWN): (d, ff),
            C.gguf_name(C.ROPE_FREQS): (self.global_head_dim // 2,),
        }
        if name in glob:
            return glob[name]
        _, bid, rest = name.split(".", 2)
        swa = self.is_swa[int(bid)]
        hd = self.head_dim if swa else self.global_head_dim
        kvh = self.n_head_kv_swa if swa else self.n_head_kv_full
        per_layer = {
            C.ATTN_Q: (self.n_head * hd, d), C.ATTN_K: (kvh * hd, d), C.ATTN_V: (kvh * hd, d),
            C.ATTN_OUTPUT: (d, self.n_head * hd), C.ATTN_Q_NORM: (hd,), C.ATTN_K_NORM: (hd,),
            C.FFN_GATE: (ff, d), C.FFN_UP: (ff, d), C.FFN_DOWN: (d, ff),
            C.FFN_GATE_UP_EXPS: (e, 2 * ffe, d), C.LAYER_OUTPUT_SCALE: (1,), C.ENC_LAYER_OUTPUT_SCALE: (1,),
        }
        base, suffix = rest.rsplit(".", 1)
        if base == C.FFN_GATE_INP:
            return (d,) if suffix == "scale" else (e, d)
        if base == C.FFN_DOWN_EXPS:
            return (e,) if suffix == "scale" else (e, d, self.ff_exp_padded)
        return per_layer.get(base, (d,))  # every remaining per-layer tensor is a [hidden] norm

    def hf_names(self) -> list[str]:
        """The checkpoint tensors a complete text-only DiffusionGemma folder holds (inverse of map_name)."""
        names = list(_GLOBAL_MAP)
        for bid in range(self.n_layer):
            names += [f"model.decoder.layers.{bid}.{sub}" for sub, (base, _) in _LAYER_MAP.items()
                      if base != C.ATTN_V or self.is_swa[bid]]
            names.append(f"model.encoder.language_model.layers.{bid}.layer_scalar")
        return names

    def required_names(self) -> list[str]:
        """Every GGUF tensor a complete file has (v_proj only on sliding layers: K = V on global ones)."""
        names = [C.gguf_name(n) for n in (C.TOKEN_EMBD, C.OUTPUT_NORM, C.SELF_COND_PRE_NORM, C.SELF_COND_GATE,
                                          C.SELF_COND_UP, C.SELF_COND_DOWN)]
        for bid in range(self.n_layer):
            for base, suffix in _LAYER_MAP.values():
                if base == C.ATTN_V and not self.is_swa[bid]:
                    continue
                names.append(C.blk(bid, base, suffix))
            names.append(C.blk(bid, C.ENC_LAYER_OUTPUT_SCALE))
        return names

    def gguf_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(GGUF name, shape) of every tensor of a complete file, from the config alone (no weights)."""
        names = [self.map_name(n) for n in self.hf_names()] + [name for name, _ in self.generate_extra_tensors()]
        return [(n, tuple(self.expected_shape(n))) for n in sorted(names, key=_natural_key)]

    def model_dims(self):
        from dgemma.quant.planner import ModelDims

        layers = [(swa, self.n_head_kv_swa if swa else self.n_head_kv_full,
                   self.head_dim if swa else self.global_head_dim) for swa in self.is_swa]
        return ModelDims(n_layer=self.n_layer, n_embd=self.n_embd, canvas=self.canvas_length,
                         sliding_window=self.sliding_window, layers=layers, n_expert_used=self.n_expert_used,
                         n_ff_exp=self.n_ff_exp, n_ff=self.n_ff)

    def model_facts(self) -> ModelFacts:
        kv0 = self.n_head_kv_swa if self.is_swa[0] else self.n_head_kv_full  # llama.cpp reads layer 0
        return ModelFacts(n_layer=self.n_layer, n_gqa=self.n_head // kv0, n_expert=self.n_expert)

    def tensor_force_quant(self, name: str, shape: tuple[int, ...]) -> GGMLQuantizationType | None:
        return force_quant(name, shape)


def force_quant(name: str, shape: tuple[int, ...]) -> GGMLQuantizationType | None:
    """The type a GGUF tensor keeps whatever the file type (the converter's and `dgemma quantize`'s rule)."""
    # llama.cpp keeps these in F32 whatever the file type: vectors, norms, the router, scales
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return GGMLQuantizationType.F32
    if name.endswith(f".{C.FFN_GATE_INP}.weight"):
        return GGMLQuantizationType.F32
    return None
