"""The bundled default model: a small DiffusionGemma trained on Debian's fortune cookies.

`plugin/models/default.gguf` (Q8_0) ships inside the package; `ensure_default_model` copies it into the
models directory under the reserved name `default`, so it takes the same path as any imported model.
How it was trained: docs/DEFAULT_MODEL.md, scripts/train_tiny.py; its settings and loss curve:
`plugin/models/default-train.json`.
"""

from __future__ import annotations

import filecmp
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_NAME = "default"
BUNDLED = Path(__file__).resolve().parent / "models" / f"{DEFAULT_NAME}.gguf"


def bundled_model() -> Path:
    if not BUNDLED.is_file():
        raise FileNotFoundError(f"the bundled default model is missing ({BUNDLED}); reinstall dgemma")
    return BUNDLED


def ensure_default_model(models_dir: Path) -> Path:
    """Path of the default model in `models_dir`, copied from the package if it is missing or differs
    (an older default is replaced). The copy goes to a temporary file in the same folder, renamed when
    complete, so a reader never sees half a file and concurrent callers are safe."""
    src = bundled_model()
    models_dir = Path(models_dir)
    path = models_dir / f"{DEFAULT_NAME}.gguf"
    if path.is_file() and path.stat().st_size == src.stat().st_size and filecmp.cmp(path, src, shallow=False):
        return path
    models_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{DEFAULT_NAME}-", suffix=".partial", dir=models_dir)
    try:
        with os.fdopen(fd, "wb") as out, src.open("rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
