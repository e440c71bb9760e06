"""GGUF block formats: reference quantizers bit-exact with ggml, registered by GGML type."""

from gguf import GGMLQuantizationType

from . import kquants  # noqa: F401  (registers Q4_0, Q5_0, Q2_K..Q6_K)
from .api import QuantError, byte_shape, can_quantize, dequantize, nbytes, qtype_class, quantize
from .types import QTYPES, QuantType

__all__ = [
    "GGMLQuantizationType", "QTYPES", "QuantError", "QuantType",
    "byte_shape", "can_quantize", "dequantize", "nbytes", "qtype_class", "quantize",
]
