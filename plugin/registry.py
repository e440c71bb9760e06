"""The models directory: which DiffusionGemma GGUFs dgemma serves, under which names.

`$DGEMMA_MODELS` (default `~/.dgemma/models`) holds GGUF files and `registry.json`, which maps the
names given by `dgemma import` (from metadata: `diffusiongemma:26b-a4b-q4_K_M`, or `--name`) to files.
A GGUF dropped into the directory by hand is served under its file stem. `default`, the bundled tiny
model, is always there (made on first use). Names resolve with or without Ollama's `:latest` tag.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gguf import LlamaFileType

from dgemma.convert import constants as C

from .default_model import DEFAULT_NAME, ensure_default_model
from .inspect import InspectError, field_value, open_gguf

MODELS_ENV = "DGEMMA_MODELS"
REGISTRY_FILE = "registry.json"
FAMILY = "diffusiongemma"
LATEST = ":latest"


class ModelNotFound(LookupError):
    """A model name that is neither a file nor in the models directory."""


class RegistryError(ValueError):
    """A one-line, user-facing registry error (bad file, name taken, ...)."""


def models_dir() -> Path:
    return Path(os.environ.get(MODELS_ENV) or Path.home() / ".dgemma" / "models")


def _count(n: float) -> str:
    for unit, scale in (("b", 1e9), ("m", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.0f}{unit}"
    return str(int(n))


def quant_label(file_type: int | None) -> str:
    """`general.file_type` as Ollama shows it (`Q8_0`, `F16`, `Q4_K_M`)."""
    if file_type is None:
        return "unknown"
    try:
        name = LlamaFileType(file_type).name  # e.g. MOSTLY_Q4_K_M, ALL_F32
    except ValueError:
        return f"type{file_type}"
    return name.split("_", 1)[1] if "_" in name else name


@dataclass
class ModelInfo:
    """What a GGUF says about itself, for listings and /api/show."""

    n_params: int
    n_active: int
    quantization: str  # Q8_0, F16, ...
    context_length: int
    metadata: dict[str, Any]

    @property
    def parameter_size(self) -> str:
        n = self.n_params
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"

    def default_name(self) -> str:
        size = _count(self.n_params) + (f"-a{_count(self.n_active)}" if self.n_active < self.n_params else "")
        return f"{FAMILY}:{size}-{self.quantization.lower().replace('_k_', '_K_')}"


def read_model_info(path: Path) -> ModelInfo:
    reader = open_gguf(path)
    n_params = sum(int(t.n_elements) for t in reader.tensors)
    n_expert = int(field_value(reader, C.EXPERT_COUNT, 0) or 0)
    n_used = int(field_value(reader, C.EXPERT_USED_COUNT, 0) or 0)
    expert = sum(int(t.n_elements) for t in reader.tensors
                 if t.name.endswith((f"{C.FFN_GATE_UP_EXPS}.weight", f"{C.FFN_DOWN_EXPS}.weight")))
    active = n_params - expert + (expert * n_used // n_expert if n_expert else 0)
    metadata = {}
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in (C.TOKENIZER_TOKENS, C.TOKENIZER_SCORES, C.TOKENIZER_TOKEN_TYPE,
                                              C.TOKENIZER_MERGES, C.TOKENIZER_CHAT_TEMPLATE):
            continue
        metadata[key] = field_value(reader, key)
    metadata["general.parameter_count"] = n_params
    return ModelInfo(n_params, active, quant_label(field_value(reader, C.GENERAL_FILE_TYPE)),
                     int(field_value(reader, C.CONTEXT_LENGTH, 0) or 0), metadata)


@dataclass
class ModelEntry:
    name: str
    path: Path
    size: int
    modified_at: datetime
    _digest: str | None = field(default=None, repr=False)

    @property
    def digest(self) -> str:
        """sha256 of the file (hex), computed once per entry."""
        if self._digest is None:
            h = hashlib.sha256()
            with self.path.open("rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            self._digest = h.hexdigest()
        return self._digest


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def normalize_name(name: str) -> str:
    return name[: -len(LATEST)] if name.endswith(LATEST) else name


class Registry:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else models_dir()

    # ---- the index ------------------------------------------------------------------------------
    def _index(self) -> dict[str, str]:
        path = self.root / REGISTRY_FILE
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            return {str(k): str(v) for k, v in data.get("models", {}).items()}
        except (json.JSONDecodeError, AttributeError):
            raise RegistryError(f"{path}: corrupt (expected {{\"models\": {{name: file}}}})") from None

    def _write_index(self, index: dict[str, str]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".registry.", suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump({"models": dict(sorted(index.items()))}, f, indent=2)
        os.replace(tmp, self.root / REGISTRY_FILE)

    @staticmethod
    def _entry(name: str, path: Path) -> ModelEntry:
        st = path.stat()
        return ModelEntry(name, path, st.st_size, datetime.fromtimestamp(st.st_mtime, tz=timezone.utc))

    # ---- queries --------------------------------------------------------------------------------
    def list(self) -> list[ModelEntry]:
        default = ensure_default_model(self.root)
        entries = {DEFAULT_NAME: self._entry(DEFAULT_NAME, default)}
        index = self._index()
        named_files = set(index.values())
        for name, file in index.items():
            if (self.root / file).is_file():
                entries[name] = self._entry(name, self.root / file)
        for p in sorted(self.root.glob("*.gguf")):
            if p.name not in named_files and p.stem not in entries and p != default:
                entries[p.stem] = self._entry(p.stem, p)
        return list(entries.values())

    def resolve(self, name: str) -> ModelEntry:
        """A registered name (with or without `:latest`), `default`, or a path to a .gguf file."""
        path = Path(name).expanduser()
        if name.endswith(".gguf") or os.sep in name:
            if not path.exists():
                raise ModelNotFound(f"{path}: no such file")
            return self._entry(path.stem, path)
        wanted = normalize_name(name)
        if wanted == DEFAULT_NAME:
            return self._entry(DEFAULT_NAME, ensure_default_model(self.root))
        index = self._index()
        if wanted in index and (self.root / index[wanted]).is_file():
            return self._entry(wanted, self.root / index[wanted])
        loose = self.root / f"{wanted}.gguf"
        if loose.is_file():
            return self._entry(wanted, loose)
        known = sorted({DEFAULT_NAME, *index, *(p.stem for p in self.root.glob("*.gguf") if p.name not in index.values())})
        raise ModelNotFound(f"model '{name}' not found in {self.root} (have: {', '.join(known)})")

    # ---- changes --------------------------------------------------------------------------------
    def import_file(self, src: str | Path, name: str | None = None, *, force: bool = False) -> ModelEntry:
        src = Path(src)
        try:
            info = read_model_info(src)
        except InspectError as e:
            raise RegistryError(str(e)) from None
        name = normalize_name(name or info.default_name())
        if name == DEFAULT_NAME:
            raise RegistryError(f"the name '{DEFAULT_NAME}' is reserved for the bundled model")
        index = self._index()
        if name in index and not force:
            raise RegistryError(f"model '{name}' already exists in {self.root} (use --force to replace it)")
        self.root.mkdir(parents=True, exist_ok=True)
        file = f"{_slug(name)}.gguf"
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{file}.", suffix=".partial")
        os.close(fd)
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, self.root / file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        index[name] = file
        self._write_index(index)
        return self._entry(name, self.root / file)

    def remove(self, name: str) -> None:
        wanted = normalize_name(name)
        if wanted == DEFAULT_NAME:
            raise RegistryError(f"'{DEFAULT_NAME}' is the bundled model and cannot be removed")
        index = self._index()
        if wanted in index:
            (self.root / index.pop(wanted)).unlink(missing_ok=True)
            self._write_index(index)
            return
        loose = self.root / f"{wanted}.gguf"
        if loose.is_file():
            loose.unlink()
            return
        raise ModelNotFound(f"model '{name}' not found in {self.root}")


def resolve_model(name: str) -> Path:
    """The GGUF path for a name on the command line (see Registry.resolve)."""
    return Registry().resolve(name).path
