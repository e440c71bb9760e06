"""transformers as the oracle: load a tiny checkpoint, run its encoder/decoder and generate()."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch


@lru_cache(maxsize=1)
def _patch_duplicate_is_causal() -> None:
    """transformers 5.23's generate() passes `is_causal` twice into the attention forward (DESIGN.md §2):
    drop the duplicate so that the oracle runs."""
    from transformers.models.diffusion_gemma import modeling_diffusion_gemma as mdg

    for cls in (mdg.DiffusionGemmaEncoderTextAttention, mdg.DiffusionGemmaDecoderTextAttention):
        original = cls.forward

        def forward(self, *args, _original=original, **kwargs):
            kwargs.pop("is_causal", None)
            return _original(self, *args, **kwargs)

        cls.forward = forward


@lru_cache(maxsize=8)
def hf_model(ckpt: Path):
    from transformers import DiffusionGemmaForBlockDiffusion

    _patch_duplicate_is_causal()
    return DiffusionGemmaForBlockDiffusion.from_pretrained(ckpt, dtype=torch.float32).eval()


@torch.no_grad()
def hf_logits(ckpt: Path, prompt: torch.Tensor, canvas: torch.Tensor, sc_logits: torch.Tensor | None = None,
              second_chunk: torch.Tensor | None = None) -> torch.Tensor:
    """Decoder logits for `canvas` after encoding `prompt` (and then `second_chunk`, if given)."""
    from transformers.cache_utils import DynamicCache

    model = hf_model(ckpt)
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    cache = model.model.encoder(input_ids=prompt, past_key_values=cache).past_key_values
    if second_chunk is not None:
        start = prompt.shape[1]
        positions = torch.arange(start, start + second_chunk.shape[1])[None]
        cache = model.model.encoder(input_ids=second_chunk, past_key_values=cache, position_ids=positions).past_key_values
    return model(decoder_input_ids=canvas, past_key_values=cache, self_conditioning_logits=sc_logits).logits


@torch.no_grad()
def hf_generate(ckpt: Path, prompt: list[int], seed: int, **kwargs) -> tuple[list[int], float]:
    """Generated ids (whole canvases, after the prompt) and tokens_per_forward, with the global RNG seeded."""
    model = hf_model(ckpt)
    torch.manual_seed(seed)
    out = model.generate(torch.tensor([prompt]), **kwargs)
    return out.sequences[0, len(prompt):].tolist(), float(out.tokens_per_forward[0])
