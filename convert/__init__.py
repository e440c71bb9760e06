"""Hugging Face DiffusionGemma checkpoint -> GGUF (llama.cpp-compatible names and metadata)."""

from .arch import ARCHITECTURES, ModelConverter, converter_for
from .source import Checkpoint, ConvertError
from .writer import OUTPUT_TYPES, ConvertResult, convert

__all__ = [
    "ARCHITECTURES", "Checkpoint", "ConvertError", "ConvertResult", "ModelConverter", "OUTPUT_TYPES",
    "convert", "converter_for",
]
