"""The bundled default model: a deterministic tiny DiffusionGemma, made on first use with no download.

Until a trained small model ships (issue 6), `default` is random weights of the real architecture
(MoE, sliding/global layers, encoder/decoder scalars, self-conditioning) with a Gemma 4-format
tokenizer. It is built as a Hugging Face checkpoint folder (config, seeded safetensors, tokenizer
files, written without transformers) and converted by `dgemma convert`, so it takes the same path as
a real model. Same seed, same bytes.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from dgemma.convert import ConvertError, convert
from dgemma.convert.arch import DiffusionGemma as DiffusionGemmaConverter
from dgemma.convert.source import Checkpoint
from dgemma.convert.tiny_tokenizer import write_tokenizer_files

DEFAULT_NAME = "default"
SEED = 20261127
TEXT_CONFIG = {
    "vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
    "layer_types": ["sliding_attention"] * 3 + ["full_attention"], "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_global_key_value_heads": 1, "head_dim": 32, "global_head_dim": 64,
    "num_experts": 4, "top_k_experts": 2, "moe_intermediate_size": 128, "sliding_window": 64,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
    "hidden_activation": "gelu_pytorch_tanh", "enable_moe_block": True, "model_type": "diffusion_gemma_text",
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
    },
    "bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0,
}
CONFIG = {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
          "canvas_length": 32, "text_config": TEXT_CONFIG}
GENERATION_CONFIG = {"max_denoising_steps": 16, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
                     "confidence_threshold": 0.005, "sampler_config": {"entropy_bound": 0.1,
                                                                       "_cls_name": "EntropyBoundSamplerConfig"}}


def write_checkpoint(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2))
    (out / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer_files(out, TEXT_CONFIG["vocab_size"])
    conv = DiffusionGemmaConverter(Checkpoint(out, CONFIG, GENERATION_CONFIG, {}))
    gen = torch.Generator().manual_seed(SEED)
    tensors = {}
    for name in conv.hf_names():
        shape = conv.expected_shape(conv.map_name(name))
        if len(shape) == 1:  # norms, scales, scalars: around one
            tensors[name] = 1.0 + 0.05 * torch.randn(shape, generator=gen)
        else:
            tensors[name] = 0.05 * torch.randn(shape, generator=gen)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def ensure_default_model(models_dir: Path) -> Path:
    """Path of the default model in `models_dir`, generating it (a second or two) if it is not there."""
    path = models_dir / f"{DEFAULT_NAME}.gguf"
    if path.exists():
        return path
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="dgemma-default-") as tmp:
        ckpt = write_checkpoint(Path(tmp) / "diffusiongemma-tiny-random")
        try:
            convert(ckpt, path, "Q8_0", quiet=True)
        except ConvertError:
            if not path.exists():  # another process may have made it meanwhile
                raise
    return path
