"""Array-level quantize / dequantize with gguf-py's signatures.

`quantize(array, qtype)` takes float values shaped [..., n] with n a multiple of the block
size and returns uint8 bytes shaped [..., n // block_size * type_size]; `dequantize` inverts it.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from .types import QTYPES, QuantType


class QuantError(ValueError):
    """A tensor that cannot be stored in the requested type (e.g. rows not a multiple of the block)."""


def qtype_class(qtype: GGMLQuantizationType) -> type[QuantType]:
    try:
        return QTYPES[GGMLQuantizationType(qtype)]
    except (KeyError, ValueError):
        known = ", ".join(t.name for t in QTYPES)
        raise QuantError(f"GGML type {qtype!r} is not implemented (have: {known})") from None


def can_quantize(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> bool:
    return len(shape) > 0 and shape[-1] % qtype_class(qtype).block_size == 0


def byte_shape(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[int, ...]:
    """Shape of the stored bytes for values shaped `shape`."""
    cls = qtype_class(qtype)
    if not can_quantize(shape, qtype):
        raise QuantError(f"row length {shape[-1] if shape else 0} is not a multiple of {cls.block_size} for {cls.qtype.name}")
    return (*shape[:-1], shape[-1] // cls.block_size * cls.type_size)


def nbytes(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> int:
    return int(np.prod(byte_shape(shape, qtype), dtype=np.int64))


def quantize(array: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    cls = qtype_class(qtype)
    out_shape = byte_shape(array.shape, qtype)
    if cls.qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(array, dtype=np.float32).view(np.uint8).reshape(out_shape)
    blocks = np.ascontiguousarray(array, dtype=np.float32).reshape(-1, cls.block_size)  # [n_blocks, bs]
    return cls.quantize_blocks(blocks).reshape(out_shape)


def dequantize(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    cls = qtype_class(qtype)
    data = np.ascontiguousarray(data).view(np.uint8)
    if data.shape[-1] % cls.type_size:
        raise QuantError(f"{data.shape[-1]} bytes per row is not a multiple of {cls.type_size} for {cls.qtype.name}")
    shape = (*data.shape[:-1], data.shape[-1] // cls.type_size * cls.block_size)
    blocks = data.reshape(-1, cls.type_size)  # [n_blocks, type_size]
    return cls.dequantize_blocks(blocks).reshape(shape)
