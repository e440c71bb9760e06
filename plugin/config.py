"""ModelConfig: DiffusionGemma's shape and sampler defaults, read from GGUF metadata."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gguf import GGUFReader

from dgemma.convert import constants as C

from .inspect import InspectError, field_value

if TYPE_CHECKING:
    from dgemma.quant.planner import ModelDims


@dataclass
class SamplerDefaults:
    """The entropy-bound sampler's parameters (`diffusion.eb_*`, reader defaults when absent)."""

    max_steps: int = 48
    t_min: float = 0.4
    t_max: float = 0.8
    entropy_bound: float = 0.1
    stability_threshold: int = 1
    confidence_threshold: float = 0.005


_SAMPLER_FIELDS = {
    C.EB_MAX_STEPS: "max_steps", C.EB_T_MIN: "t_min", C.EB_T_MAX: "t_max", C.EB_ENTROPY_BOUND: "entropy_bound",
    C.EB_STABILITY_THRESHOLD: "stability_threshold", C.EB_CONFIDENCE_THRESHOLD: "confidence_threshold",
}


@dataclass
class ModelConfig:
    n_layer: int
    n_embd: int
    n_ff: int  # dense MLP (and self-conditioning MLP) width
    n_head: int
    n_head_kv: list[int]  # per layer
    is_swa: list[bool]  # per layer: True = sliding-window layer
    head_dim_swa: int
    head_dim_full: int
    n_expert: int
    n_expert_used: int
    n_ff_exp: int
    sliding_window: int
    rope_base: float
    rope_base_swa: float
    rms_eps: float
    softcap: float
    vocab_size: int
    canvas_length: int
    context_length: int
    sampler: SamplerDefaults = field(default_factory=SamplerDefaults)
    # derived
    head_dim: list[int] = field(init=False)
    embed_scale: float = field(init=False)
    decode_flops_per_token: int = field(init=False)  # matmul FLOPs of one canvas position (attention scores aside)

    def __post_init__(self) -> None:
        self.head_dim = [self.head_dim_swa if s else self.head_dim_full for s in self.is_swa]
        self.embed_scale = self.n_embd**0.5
        D = self.n_embd
        per_layer = sum(
            (2 * self.n_head + 2 * kv) * hd * D  # q, k, v, o
            + 3 * self.n_ff * D + self.n_expert * D + 3 * self.n_expert_used * self.n_ff_exp * D  # dense MLP, router, experts
            for kv, hd in zip(self.n_head_kv, self.head_dim))
        # the layers, the self-conditioning input (probs @ E, its MLP) and the tied head
        self.decode_flops_per_token = 2 * (per_layer + 2 * self.vocab_size * D + 3 * self.n_ff * D)

    def model_dims(self) -> "ModelDims":
        """The shapes the planner's VRAM estimates read (quant/planner.py ModelDims): the converter's --fit
        plan makes them from config.json, the cuda backend's load check from this file's metadata."""
        from dgemma.quant.planner import ModelDims

        return ModelDims(n_layer=self.n_layer, n_embd=self.n_embd, canvas=self.canvas_length,
                         sliding_window=self.sliding_window,
                         layers=list(zip(self.is_swa, self.n_head_kv, self.head_dim)),
                         n_expert_used=self.n_expert_used, n_ff_exp=self.n_ff_exp, n_ff=self.n_ff)

    @classmethod
    def from_gguf(cls, reader: GGUFReader, path: str | Path = "") -> "ModelConfig":
        tokens = field_value(reader, C.TOKENIZER_TOKENS)
        embd = next((t for t in reader.tensors if t.name == C.gguf_name(C.TOKEN_EMBD)), None)
        if embd is None:
            raise InspectError(f"{path}: tensor '{C.gguf_name(C.TOKEN_EMBD)}' missing")
        vocab_size = int(embd.shape[1])
        if tokens is not None and len(tokens) != vocab_size:
            raise InspectError(f"{path}: {len(tokens)} tokens but token_embd has {vocab_size} rows")
        return cls.from_fields(lambda key, default=None: field_value(reader, key, default), vocab_size, path)

    @classmethod
    def from_fields(cls, get: Callable[..., Any], vocab_size: int, path: str | Path = "") -> "ModelConfig":
        """From GGUF metadata values: get(key, default=None) -> value (a GGUF reader's fields, or the
        converter's KV before any file is written: bench/model_gpu.py builds the 26B shapes that way)."""
        def need(key: str) -> Any:
            value = get(key)
            if value is None:
                raise InspectError(f"{path}: metadata key '{key}' missing")
            return value

        n_layer = int(need(C.BLOCK_COUNT))
        kv = need(C.HEAD_COUNT_KV)
        n_head_kv = [int(x) for x in kv] if isinstance(kv, list) else [int(kv)] * n_layer
        pattern = need(C.SLIDING_WINDOW_PATTERN)
        is_swa = [bool(x) for x in pattern] if isinstance(pattern, list) else [(i + 1) % int(pattern) != 0 for i in range(n_layer)]
        if len(n_head_kv) != n_layer or len(is_swa) != n_layer:
            raise InspectError(f"{path}: per-layer metadata does not have {n_layer} entries")
        sampler = SamplerDefaults()
        for key, attr in _SAMPLER_FIELDS.items():
            value = get(key)
            if value is not None:
                setattr(sampler, attr, type(getattr(sampler, attr))(value))
        n_rot_swa = get(C.ROPE_DIMENSION_COUNT_SWA)
        head_dim_swa = int(need(C.KEY_LENGTH_SWA))
        if n_rot_swa is not None and int(n_rot_swa) != head_dim_swa:
            raise InspectError(f"{path}: partial RoPE on sliding layers ({n_rot_swa} of {head_dim_swa}) is not supported")
        return cls(
            n_layer=n_layer, n_embd=int(need(C.EMBEDDING_LENGTH)), n_ff=int(need(C.FEED_FORWARD_LENGTH)),
            n_head=int(need(C.HEAD_COUNT)), n_head_kv=n_head_kv, is_swa=is_swa, head_dim_swa=head_dim_swa,
            head_dim_full=int(need(C.KEY_LENGTH)), n_expert=int(need(C.EXPERT_COUNT)),
            n_expert_used=int(need(C.EXPERT_USED_COUNT)), n_ff_exp=int(need(C.EXPERT_FEED_FORWARD_LENGTH)),
            sliding_window=int(need(C.SLIDING_WINDOW)), rope_base=float(need(C.ROPE_FREQ_BASE)),
            rope_base_swa=float(get(C.ROPE_FREQ_BASE_SWA, 10000.0)),
            rms_eps=float(get(C.RMS_EPS, 1e-6)),
            softcap=float(get(C.FINAL_LOGIT_SOFTCAPPING, 0.0)),
            vocab_size=vocab_size, canvas_length=int(need(C.CANVAS_LENGTH)),
            context_length=int(get(C.CONTEXT_LENGTH, 131072)), sampler=sampler,
        )
