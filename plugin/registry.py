"""Where models live and how a name on the command line becomes a GGUF path."""

from __future__ import annotations

import os
from pathlib import Path

from .default_model import DEFAULT_NAME, ensure_default_model

MODELS_ENV = "DGEMMA_MODELS"


class ModelNotFound(LookupError):
    """A model name that is neither a file nor in the models directory."""


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or Path.home() / ".dgemma" / "models")


def resolve_model(name: str) -> Path:
    """A path to a .gguf file, `default`, or the name of a file in the models directory."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or os.sep in name or path.exists():
        if not path.exists():
            raise ModelNotFound(f"{path}: no such file")
        return path
    if name == DEFAULT_NAME:
        return ensure_default_model(models_dir())
    candidate = models_dir() / f"{name}.gguf"
    if candidate.exists():
        return candidate
    known = sorted({DEFAULT_NAME} | {p.stem for p in models_dir().glob("*.gguf")})
    raise ModelNotFound(f"model '{name}' not found in {models_dir()} (have: {', '.join(known)})")
