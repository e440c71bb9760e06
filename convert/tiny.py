"""Tiny random DiffusionGemma checkpoints, built with transformers (the oracle) for tests and demos.

`build_checkpoint(TinySpec(...), out_dir)` instantiates `DiffusionGemmaForBlockDiffusion` from a
small config, seeded, and saves it with `save_pretrained` (sharded, with an index), plus a
`generation_config.json` carrying the sampler fields and a tokenizer in Gemma 4's format
(see `dgemma.convert.tiny_tokenizer`). Needs the `dev` extra (transformers, tokenizers).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

# A deliberately small vision tower: real checkpoints carry one, the converter must skip it.
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=2, head_dim=16, patch_size=4, position_embedding_size=64)

SAMPLER_DEFAULTS = dict(max_denoising_steps=48, t_min=0.4, t_max=0.8, stability_threshold=1,
                        confidence_threshold=0.005, entropy_bound=0.1)


@dataclass(frozen=True)
class TinySpec:
    """Every knob a test varies; defaults give a ~1 MB model with all DiffusionGemma features."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 96  # dense MLP
    num_hidden_layers: int = 3
    layer_types: tuple[str, ...] | None = ("sliding_attention", "sliding_attention", "full_attention")
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    num_global_key_value_heads: int = 1
    head_dim: int = 16
    global_head_dim: int = 32
    num_experts: int = 4
    top_k_experts: int = 2
    moe_intermediate_size: int = 64
    sliding_window: int = 8
    canvas_length: int = 16
    max_position_embeddings: int = 2048
    dtype: str = "float32"  # or "bfloat16"
    max_shard_size: str = "200KB"  # small, so that even tiny models are sharded with an index
    seed: int = 0
    sampler: dict = field(default_factory=lambda: dict(SAMPLER_DEFAULTS))
    with_vision: bool = True

    def text_config(self) -> dict:
        return dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            layer_types=list(self.layer_types) if self.layer_types else None,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            num_global_key_value_heads=self.num_global_key_value_heads, head_dim=self.head_dim,
            global_head_dim=self.global_head_dim, num_experts=self.num_experts, top_k_experts=self.top_k_experts,
            moe_intermediate_size=self.moe_intermediate_size, enable_moe_block=True,
            sliding_window=self.sliding_window, max_position_embeddings=self.max_position_embeddings,
        )

    def key(self) -> str:
        """A stable, filesystem-safe name for caching a built checkpoint."""
        import hashlib

        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def make_config(spec: TinySpec):
    from transformers import DiffusionGemmaConfig

    kwargs = dict(text_config=spec.text_config(), canvas_length=spec.canvas_length)
    if spec.with_vision:
        kwargs["vision_config"] = dict(model_type="gemma4_vision", **TINY_VISION)
    return DiffusionGemmaConfig(**kwargs)


def generation_config(spec: TinySpec) -> dict:
    s = spec.sampler
    return {
        "max_new_tokens": spec.canvas_length,
        "max_denoising_steps": s["max_denoising_steps"],
        "t_min": s["t_min"],
        "t_max": s["t_max"],
        "stability_threshold": s["stability_threshold"],
        "confidence_threshold": s["confidence_threshold"],
        # transformers 5.23 needs `_cls_name` to rebuild the sampler dataclass (DESIGN.md §2)
        "sampler_config": {"entropy_bound": s["entropy_bound"], "_cls_name": "EntropyBoundSamplerConfig"},
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }


def build_model(spec: TinySpec):
    """The seeded random model itself (float32 or bfloat16), in eval mode."""
    from transformers import DiffusionGemmaForBlockDiffusion

    torch.manual_seed(spec.seed)
    model = DiffusionGemmaForBlockDiffusion(make_config(spec))
    # Random init leaves every norm at 1 and every scalar at 1: perturb them so that a wrong
    # mapping or a spurious "+1" shows up in the logits.
    gen = torch.Generator().manual_seed(spec.seed + 1)
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if p.dtype.is_floating_point and (p.ndim == 1 or name.endswith("layer_scalar")):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
    return model.to(getattr(torch, spec.dtype)).eval()


def build_checkpoint(spec: TinySpec, out_dir: str | Path) -> Path:
    """Write a complete checkpoint folder (weights, configs, tokenizer) and return it."""
    from .tiny_tokenizer import save_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(spec)
    model.save_pretrained(out, max_shard_size=spec.max_shard_size)
    (out / "generation_config.json").write_text(json.dumps(generation_config(spec), indent=2) + "\n")
    save_tokenizer(out, vocab_size=spec.vocab_size)
    return out
