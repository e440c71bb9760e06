"""GGML tensor types: one class per type, registered by its GGMLQuantizationType.

Each class only knows how to turn blocks of float32 values into bytes and back
(`quantize_blocks` / `dequantize_blocks`), as gguf-py's `quants.py` lays it out; the
row/array plumbing lives in `dgemma.quant.api`. Comments name the ggml function each
quantizer matches bit for bit (ggml/src/ggml-quants.c, ggml-impl.h).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

QTYPES: dict[GGMLQuantizationType, type["QuantType"]] = {}


def roundf(x: np.ndarray) -> np.ndarray:
    """C `roundf`: round half away from zero, exactly (no `x + 0.5` double rounding)."""
    t = np.trunc(x)
    frac = np.abs(x - t)  # exact in the input's precision
    return t + np.sign(x) * (frac >= 0.5)


class QuantType:
    """A GGML block format: `block_size` values stored in `type_size` bytes."""

    qtype: ClassVar[GGMLQuantizationType]
    block_size: ClassVar[int]
    type_size: ClassVar[int]

    def __init_subclass__(cls, qtype: GGMLQuantizationType) -> None:
        cls.qtype = qtype
        cls.block_size, cls.type_size = GGML_QUANT_SIZES[qtype]
        QTYPES[qtype] = cls

    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """[n_blocks, block_size] float32 -> [n_blocks, type_size] uint8."""
        raise NotImplementedError

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        """[n_blocks, type_size] uint8 -> [n_blocks, block_size] float32."""
        raise NotImplementedError


class F32(QuantType, qtype=GGMLQuantizationType.F32):
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float32)


class F16(QuantType, qtype=GGMLQuantizationType.F16):
    # ggml_fp32_to_fp16: IEEE round to nearest even, as numpy's cast
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):  # |x| > 65504 becomes inf, as in ggml
            return blocks.astype(np.float16).view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(blocks).view(np.float16).astype(np.float32)


class BF16(QuantType, qtype=GGMLQuantizationType.BF16):
    # ggml_compute_fp32_to_bf16 (ggml-impl.h): NaN -> quiet NaN, otherwise round to nearest even
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        bits = np.ascontiguousarray(blocks, dtype=np.float32).view(np.uint32)
        is_nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
        # no uint32 overflow for non-NaN inputs (at most 0xFF800000 + 0x8000); NaN lanes are replaced
        with np.errstate(over="ignore"):
            rounded = (bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16
        quiet_nan = (bits >> 16) | np.uint32(0x40)
        out = np.where(is_nan, quiet_nan, rounded).astype(np.uint16)
        return out.view(np.uint8)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        halves = np.ascontiguousarray(blocks).view(np.uint16).astype(np.uint32)
        return (halves << 16).view(np.float32)


class Q8_0(QuantType, qtype=GGMLQuantizationType.Q8_0):
    # quantize_row_q8_0_ref: d = amax / 127 (f32), id = d ? 1/d : 0, q = roundf(x * id), d stored as f16
    @classmethod
    def quantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        blocks = blocks.astype(np.float32, copy=False)  # [n, 32]
        d = np.abs(blocks).max(axis=1, keepdims=True) / np.float32(127)  # [n, 1]
        with np.errstate(divide="ignore"):
            inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d)
        q = roundf(blocks * inv_d).astype(np.int8)  # [n, 32]
        return np.concatenate([d.astype(np.float16).view(np.uint8), q.view(np.uint8)], axis=1)

    @classmethod
    def dequantize_blocks(cls, blocks: np.ndarray) -> np.ndarray:
        d = np.ascontiguousarray(blocks[:, :2]).view(np.float16).astype(np.float32)  # [n, 1]
        q = np.ascontiguousarray(blocks[:, 2:]).view(np.int8).astype(np.float32)  # [n, 32]
        return q * d
