"""GGUF tensors -> the model's torch weights (the CPU reference path dequantizes to float32)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf import quants as gguf_quants

from dgemma import quant
from dgemma.convert import constants as C
from dgemma.quant.planner import GiB

from .config import ModelConfig
from .hostmem import available_ram
from .inspect import InspectError, field_value
from .model import LayerWeights, Weights


def float32_bytes(reader: GGUFReader, cfg: ModelConfig) -> int:
    """What load_weights holds: 4 bytes per value of every tensor, whatever the file's types, the expert down rows
    of a --pad-experts file at the model's width (load_weights drops the zero columns)."""
    padded = field_value(reader, C.DGEMMA_EXPERT_DOWN_PADDED)
    total = 0
    for t in reader.tensors:
        n = int(t.n_elements)
        if padded is not None and t.name.endswith(f"{C.FFN_DOWN_EXPS}.weight"):
            n = n // int(padded) * cfg.n_ff_exp
        total += 4 * n
    return total


def ram_shortage(reader: GGUFReader, cfg: ModelConfig, path: str | Path, cuda_error: str | None = None) -> str | None:
    """None where this machine's available memory holds the torch backend's float32 weights (float32_bytes) or
    cannot be known, else the one-line error saying so (cuda_error: why the cuda backend, which it would advise,
    already failed to load the model)."""
    need, avail = float32_bytes(reader, cfg), available_ram()
    if avail is None or need <= avail:
        return None
    advice = ("run the model on an NVIDIA GPU with the cuda backend (pip install 'dgemma[cuda12]' or "
              "'dgemma[cuda13]'), which keeps them quantized" if cuda_error is None else
              f"the cuda backend, which keeps them quantized, could not load it ({cuda_error})")
    return (f"{path}: the torch backend holds the weights as float32, about {need / GiB:.1f} GiB, but this machine "
            f"has {avail / GiB:.1f} GiB of memory available: {advice}")


def tensor_to_torch(t: ReaderTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantize one GGUF tensor to a torch tensor in PyTorch order."""
    shape = tuple(int(x) for x in reversed(t.shape))
    try:
        values = quant.dequantize(t.data, t.tensor_type)
    except quant.QuantError:  # types dgemma.quant does not implement yet: gguf-py's reference
        values = gguf_quants.dequantize(t.data, t.tensor_type)
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(shape)
    if not values.flags.writeable:  # F32 data is a view of the read-only file mapping
        values = values.copy()
    return torch.from_numpy(values).to(dtype)


def load_weights(reader: GGUFReader, cfg: ModelConfig, path: str | Path = "", dtype: torch.dtype = torch.float32) -> Weights:
    tensors = {t.name: t for t in reader.tensors}

    def get(name: str, optional: bool = False) -> torch.Tensor | None:
        t = tensors.get(name)
        if t is None:
            if optional:
                return None
            raise InspectError(f"{path}: tensor '{name}' missing")
        return tensor_to_torch(t, dtype)

    def blk(i: int, base: str, suffix: str = "weight", optional: bool = False) -> torch.Tensor | None:
        return get(C.blk(i, base, suffix), optional)

    padded = field_value(reader, C.DGEMMA_EXPERT_DOWN_PADDED)

    def down_exps(i: int) -> torch.Tensor:
        """[E, D, Fe]; a --pad-experts file stores [E, D, Fe_padded] with zero columns: drop them."""
        w = blk(i, C.FFN_DOWN_EXPS)
        if w.shape[-1] != cfg.n_ff_exp:
            if padded is None or w.shape[-1] != int(padded):
                raise InspectError(f"{path}: tensor '{C.blk(i, C.FFN_DOWN_EXPS)}' has rows of {w.shape[-1]}, "
                                   f"expected {cfg.n_ff_exp}")
            w = w[..., : cfg.n_ff_exp].contiguous()
        return w

    sc_pre_norm = get(C.gguf_name(C.SELF_COND_PRE_NORM), optional=True)
    if sc_pre_norm is None:  # PR #24427 names it self_cond_norm
        sc_pre_norm = get(C.gguf_name(C.SELF_COND_NORM_ALT))
    layers = [
        LayerWeights(
            attn_norm=blk(i, C.ATTN_NORM), wq=blk(i, C.ATTN_Q), wk=blk(i, C.ATTN_K),
            wv=blk(i, C.ATTN_V, optional=True), wo=blk(i, C.ATTN_OUTPUT), q_norm=blk(i, C.ATTN_Q_NORM),
            k_norm=blk(i, C.ATTN_K_NORM), post_attn_norm=blk(i, C.POST_ATTN_NORM), ffn_norm=blk(i, C.FFN_NORM),
            ffn_gate=blk(i, C.FFN_GATE), ffn_up=blk(i, C.FFN_UP), ffn_down=blk(i, C.FFN_DOWN),
            post_ffw_norm_1=blk(i, C.POST_FFW_NORM_1), pre_ffw_norm_2=blk(i, C.PRE_FFW_NORM_2),
            router=blk(i, C.FFN_GATE_INP), router_scale=blk(i, C.FFN_GATE_INP, "scale"),
            expert_scale=blk(i, C.FFN_DOWN_EXPS, "scale"), gate_up_exps=blk(i, C.FFN_GATE_UP_EXPS),
            down_exps=down_exps(i), post_ffw_norm_2=blk(i, C.POST_FFW_NORM_2),
            post_ffw_norm=blk(i, C.POST_FFW_NORM), dec_scale=blk(i, C.LAYER_OUTPUT_SCALE),
            enc_scale=blk(i, C.ENC_LAYER_OUTPUT_SCALE),
        )
        for i in range(cfg.n_layer)
    ]
    return Weights(
        embed=get(C.gguf_name(C.TOKEN_EMBD)), output_norm=get(C.gguf_name(C.OUTPUT_NORM)),
        rope_freqs=get(C.gguf_name(C.ROPE_FREQS), optional=True), sc_pre_norm=sc_pre_norm,
        sc_gate=get(C.gguf_name(C.SELF_COND_GATE)), sc_up=get(C.gguf_name(C.SELF_COND_UP)),
        sc_down=get(C.gguf_name(C.SELF_COND_DOWN)), layers=layers,
    )
