"""The models directory: which DiffusionGemma GGUFs dgemma serves, under which names.

`$DGEMMA_MODELS` (default `~/.dgemma/models`) holds GGUF files and `registry.json`, which maps the
names given by `dgemma import` (from metadata: `diffusiongemma:26b-a4b-q4_K_M`, or `--name`) to files.
A GGUF dropped into the directory by hand is served under its file stem. `default`, the bundled tiny
model, is always there (made on first use). Names resolve with or without Ollama's `:latest` tag.

Models made by `dgemma create` (a Modelfile, modelfile.py) or `dgemma cp` share their base's file: their
entry in registry.json is `{"file": ..., "from": base name, "system": ..., "parameters": {...}, ...}`, and a
file goes when no name uses it any more. Ollama's /api/blobs uploads wait in `blobs/` until a create takes
them.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gguf import LlamaFileType

try:
    import fcntl
    msvcrt = None
except ImportError:  # (Windows: a lock on the lock file's first byte instead)
    fcntl = None
    import msvcrt

from dgemma.convert import constants as C

from .default_model import DEFAULT_NAME, ensure_default_model
from .inspect import InspectError, field_value, open_gguf
from .modelfile import ModelfileError, ModelSettings

MODELS_ENV = "DGEMMA_MODELS"
REGISTRY_FILE = "registry.json"
FAMILY = "diffusiongemma"
LATEST = ":latest"
BLOBS_DIR = "blobs"
LOCK_FILE = ".registry.lock"
NOPRUNE_ENV = "DGEMMA_NOPRUNE"  # set: `dgemma serve` keeps leftover uploads and temporary files (Registry.prune)
PRUNE_AGE = 3600.0  # seconds a leftover file is left alone (another process may still be writing it)
MAX_NAME = 128  # characters in a model name (its file's name must fit the file system's 255 bytes)
_CHANGING = threading.Lock()
DIGESTS_FILE = ".digests.json"  # file name -> [size, mtime_ns, sha256] (file_digest)
DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(:[A-Za-z0-9_][A-Za-z0-9._-]*)?")


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


_DIGESTS: dict[tuple[str, int, int], str] = {}  # (path, size, mtime_ns) -> sha256, in this process


def file_digest(path: Path) -> str:
    """sha256 (hex) of a file, hashed once: remembered in this process and in its folder's .digests.json by
    size and modification time (a 16 GB GGUF takes seconds to hash, and /api/tags gives every model's)."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    side = path.parent / DIGESTS_FILE
    try:
        known = json.loads(side.read_text())
        known = known if isinstance(known, dict) else {}
    except (OSError, ValueError):
        known = {}
    row = known.get(path.name)
    if isinstance(row, list) and len(row) == 3 and row[:2] == [st.st_size, st.st_mtime_ns] and isinstance(row[2], str):
        digest = row[2]
    else:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digest = h.hexdigest()
        known = {k: v for k, v in known.items() if (path.parent / k).is_file()}  # (files gone since: dropped)
        known[path.name] = [st.st_size, st.st_mtime_ns, digest]
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".digests.", suffix=".partial")
            with os.fdopen(fd, "w") as f:
                json.dump(known, f)
            os.replace(tmp, side)
        except OSError:  # (a folder it cannot write: hashed again by the next process)
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    _DIGESTS[key] = digest
    return digest


@dataclass
class ModelEntry:
    name: str
    path: Path
    size: int
    modified_at: datetime
    _digest: str | None = field(default=None, repr=False)
    settings: ModelSettings = field(default_factory=ModelSettings)  # a Modelfile's (empty for a plain import)
    base: str | None = None  # the model it was made from (`dgemma create` / `cp`), None for a file
    # which file it is (device, inode, size, mtime in ns): a path whose file was replaced is another model
    file_id: tuple[int, ...] = ()

    @property
    def digest(self) -> str:
        """sha256 of the file (hex), computed once per entry; for a model made with settings, of the file's
        digest and the settings (as Ollama's digest, of a manifest, differs between a model and one made from it)."""
        if self._digest is None:
            self._digest = file_digest(self.path)
        if not self.settings:
            return self._digest
        made = json.dumps({"file": self._digest, **self.settings.to_json()}, sort_keys=True)
        return hashlib.sha256(made.encode()).hexdigest()


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "model"


def _is_path(name: str) -> bool:
    """Whether a model name is a path to a GGUF file (`model.gguf`, `dir/model`) rather than a model's name."""
    return name.endswith(".gguf") or "/" in name or os.sep in name


def normalize_name(name: str) -> str:
    return name[: -len(LATEST)] if name.endswith(LATEST) else name


@dataclass
class _Record:
    """One name in registry.json: its file in the models directory, and what a Modelfile added."""

    file: str
    base: str | None = None
    settings: ModelSettings = field(default_factory=ModelSettings)

    def to_json(self) -> str | dict[str, Any]:
        if self.base is None and not self.settings:
            return self.file  # (the plain form, as before models could be made from others)
        return {"file": self.file, **({"from": self.base} if self.base else {}), **self.settings.to_json()}

    @classmethod
    def from_json(cls, value: Any) -> _Record:
        if isinstance(value, str):
            return cls(value)
        if not isinstance(value, dict) or not isinstance(value.get("file"), str):
            raise ValueError(f"expected a file name or {{\"file\": ...}}, got {value!r}")
        base = value.get("from")
        return cls(value["file"], base if isinstance(base, str) else None, ModelSettings.from_json(value))


def _lock_file(f: Any, lock: bool) -> None:
    """Lock (waiting for it) or unlock an open file for this process alone: flock, or on Windows its first byte."""
    if fcntl is not None:
        fcntl.flock(f, fcntl.LOCK_EX if lock else fcntl.LOCK_UN)
        return
    f.seek(0)
    while True:
        try:  # (LK_LOCK tries for 10 s, then raises: another process holds it longer, try again)
            msvcrt.locking(f.fileno(), msvcrt.LK_LOCK if lock else msvcrt.LK_UNLCK, 1)
            return
        except OSError:
            if not lock:
                raise


def _locked(method):
    """A Registry change, run under Registry._changing."""

    @functools.wraps(method)
    def run(self: Registry, *args: Any, **kwargs: Any) -> Any:
        with self._changing():
            return method(self, *args, **kwargs)

    return run


class Registry:
    def __init__(self, root: Path | None = None, *, paths: bool = True) -> None:
        self.root = Path(root) if root is not None else models_dir()
        self.paths = paths  # whether resolve takes a path to a .gguf file (the CLI's); the server's takes names only

    # ---- the index ------------------------------------------------------------------------------
    def _index(self) -> dict[str, _Record]:
        path = self.root / REGISTRY_FILE
        if not path.exists():
            return {}
        try:
            data = json.loads(path.read_text())
            return {str(k): _Record.from_json(v) for k, v in data.get("models", {}).items()}
        except (json.JSONDecodeError, AttributeError) as e:
            raise RegistryError(f"{path}: corrupt (expected {{\"models\": {{name: file}}}}: {e})") from None
        except (ValueError, ModelfileError) as e:
            raise RegistryError(f"{path}: corrupt entry ({e})") from None

    def _write_index(self, index: dict[str, _Record]) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".registry.", suffix=".partial")
        with os.fdopen(fd, "w") as f:
            json.dump({"models": {k: r.to_json() for k, r in sorted(index.items())}}, f, indent=2)
        os.replace(tmp, self.root / REGISTRY_FILE)

    @staticmethod
    def _entry(name: str, path: Path, record: _Record | None = None) -> ModelEntry:
        st = path.stat()
        return ModelEntry(name, path, st.st_size, datetime.fromtimestamp(st.st_mtime, tz=timezone.utc),
                          settings=record.settings if record else ModelSettings(), base=record.base if record else None,
                          file_id=(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))

    # ---- queries --------------------------------------------------------------------------------
    def list(self) -> list[ModelEntry]:
        default = ensure_default_model(self.root)
        entries = {DEFAULT_NAME: self._entry(DEFAULT_NAME, default)}
        index = self._index()
        named_files = {r.file for r in index.values()}
        for name, record in index.items():
            if (self.root / record.file).is_file():
                entries[name] = self._entry(name, self.root / record.file, record)
        for p in sorted(self.root.glob("*.gguf")):
            if p.name not in named_files and p.stem not in entries and p != default:
                entries[p.stem] = self._entry(p.stem, p)
        return list(entries.values())

    def resolve(self, name: str) -> ModelEntry:
        """A registered name (with or without `:latest`), `default`, or a path to a .gguf file."""
        if _is_path(name):
            if not self.paths:  # (a client of the server names models; it does not open the server's files)
                raise ModelNotFound(f"model '{name}' not found: give a model's name (dgemma list), not a path")
            path = Path(name)
            try:
                path = path.expanduser()
                exists = path.exists()
            except (RuntimeError, OSError):  # (no home directory for ~, a name too long)
                exists = False
            if not exists:
                raise ModelNotFound(f"{path}: no such file")
            return self._entry(path.stem, path)
        wanted = normalize_name(name)
        if wanted == DEFAULT_NAME:
            return self._entry(DEFAULT_NAME, ensure_default_model(self.root))
        index = self._index()
        if wanted in index and (self.root / index[wanted].file).is_file():
            return self._entry(wanted, self.root / index[wanted].file, index[wanted])
        files = {r.file for r in index.values()}
        loose = self._loose(wanted)
        try:
            is_loose = loose is not None and loose.is_file() and loose.name not in files  # (a made model's stays its)
        except OSError:  # (a name too long for a file name)
            is_loose = False
        if is_loose:
            return self._entry(wanted, loose)
        known = sorted({DEFAULT_NAME, *index, *(p.stem for p in self.root.glob("*.gguf") if p.name not in files)})
        raise ModelNotFound(f"model '{name}' not found in {self.root} (have: {', '.join(known)})")

    def _loose(self, name: str) -> Path | None:
        """The file a GGUF dropped into the models directory by hand would have under `name`: in that directory
        only (on Windows `C:x` would name a file on drive C's current directory)."""
        path = self.root / f"{name}.gguf"
        return path if path.parent == self.root and path.name == f"{name}.gguf" else None

    # ---- changes --------------------------------------------------------------------------------
    def _new_name(self, name: str) -> str:
        name = normalize_name(name)
        if name == DEFAULT_NAME:
            raise RegistryError(f"the name '{DEFAULT_NAME}' is reserved for the bundled model")
        if len(name) > MAX_NAME:
            raise RegistryError(f"model name too long ({len(name)} characters, at most {MAX_NAME})")
        if not NAME.fullmatch(name):
            raise RegistryError(f"invalid model name '{name}' (letters, digits, '.', '_', '-' and one ':' before a tag)")
        if _is_path(name.split(":")[0]):
            raise RegistryError(f"invalid model name '{name}': a name ending in .gguf is read as a file's path")
        return name

    @contextlib.contextmanager
    def _changing(self):
        """One change to the directory at a time (read registry.json, write it, drop the files it leaves): in
        this process, and across processes through a lock on .registry.lock. Not nested."""
        with _CHANGING:
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / LOCK_FILE, "a") as f:
                _lock_file(f, True)
                try:
                    yield
                finally:
                    _lock_file(f, False)

    def _file_for(self, name: str, index: dict[str, _Record]) -> str:
        """A file name for a new GGUF under `name`: its slug, or the slug numbered where a file of that name
        is there or named (also the name's own: a model loaded from it keeps it until it reloads)."""
        slug, n = _slug(name), 1
        used = {r.file for r in index.values()} | {f"{DEFAULT_NAME}.gguf"}
        file = f"{slug}.gguf"
        while file in used or (self.root / file).exists():
            n += 1
            file = f"{slug}-{n}.gguf"
        return file

    @contextlib.contextmanager
    def _staged(self, src: Path):
        """src (a GGUF) copied to a temporary file in the models directory, before and outside the lock (a large
        one takes minutes, and changes by other requests and commands go on meanwhile); gone afterwards unless
        _add_file moved it into place."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".copy.{secrets.token_hex(6)}.partial"
        try:
            try:
                shutil.copyfile(src, tmp)
            except OSError as e:
                raise RegistryError(f"{src}: cannot copy it into {self.root} ({e.strerror or e})") from None
            yield tmp
        finally:
            tmp.unlink(missing_ok=True)

    def _add_file(self, src: Path, file: str) -> None:
        """A file in the models directory (_staged's, or an upload's blob) renamed into place as `file`."""
        try:
            os.replace(src, self.root / file)
        except OSError as e:
            raise RegistryError(f"{src}: cannot add it to {self.root} as {file} ({e.strerror or e})") from None

    def _set(self, index: dict[str, _Record], name: str, record: _Record) -> ModelEntry:
        """Write `name` (replacing what it was) and drop the file it leaves that no name uses."""
        old = index.get(name)
        index[name] = record
        self._write_index(index)
        if old is not None:
            self._release(old.file, index)
        return self._entry(name, self.root / record.file, record)

    def _release(self, file: str, index: dict[str, _Record]) -> None:
        if file != f"{DEFAULT_NAME}.gguf" and all(r.file != file for r in index.values()):
            (self.root / file).unlink(missing_ok=True)

    @staticmethod
    def _check_gguf(path: Path) -> ModelInfo:
        try:
            return read_model_info(path)
        except InspectError as e:
            raise RegistryError(str(e)) from None

    def import_file(self, src: str | Path, name: str | None = None, *, force: bool = False) -> ModelEntry:
        src = Path(src)
        info = self._check_gguf(src)
        name = self._new_name(name or info.default_name())
        self._refuse_existing(name, self._index(), force)  # (before the copy; again under the lock)
        with self._staged(src) as tmp:
            return self._import(tmp, name, force)

    def _refuse_existing(self, name: str, index: dict[str, _Record], force: bool) -> None:
        if name in index and not force:
            raise RegistryError(f"model '{name}' already exists in {self.root} (use --force to replace it)")

    @_locked
    def _import(self, tmp: Path, name: str, force: bool) -> ModelEntry:
        index = self._index()
        self._refuse_existing(name, index, force)
        file = self._file_for(name, index)
        self._add_file(tmp, file)
        return self._set(index, name, _Record(file))

    def _record_of(self, entry: ModelEntry, index: dict[str, _Record]) -> _Record:
        """The record of a model in this directory, adopting a loose file under its stem (so that a model made
        from it does not hide it)."""
        if entry.path.parent.resolve() != self.root.resolve():
            raise RegistryError(f"{entry.path}: not in the models directory {self.root} (import it first)")
        if entry.name not in index and entry.name != DEFAULT_NAME:
            index[entry.name] = _Record(entry.path.name)
        return _Record(entry.path.name, entry.base, entry.settings)

    def create(self, name: str, base: str, settings: ModelSettings, *, folder: Path | None = None,
               blob: Path | None = None, quantize: str | None = None) -> ModelEntry:
        """A model from a Modelfile: FROM a model name (it shares that model's file and builds on its
        settings), a .gguf path (relative to `folder`; the file is copied in) or an uploaded blob (moved in).
        An existing name is replaced, as Ollama's create does. `quantize` (a type, as `dgemma quantize --type`):
        the model gets its own file, the base's (F16/BF16/F32) quantized, first and outside the lock (minutes
        for a large model)."""
        if not quantize:
            if blob is None and _is_path(base):  # (the file copied in first, outside the lock)
                self._new_name(name)
                path = self._from_file(base, folder)
                with self._staged(path) as tmp:
                    return self._create(name, base, settings, blob=tmp)
            if blob is not None:
                self._check_gguf(blob)  # (an upload: checked before the lock, as a FROM file is)
            return self._create(name, base, settings, blob=blob)
        from dgemma.convert import ConvertError
        from dgemma.convert.requant import requantize

        self._new_name(name)  # (refused before any work)
        parent = None
        if blob is None and not _is_path(base):
            try:
                parent = self.resolve(base)
            except ModelNotFound as e:
                raise RegistryError(f"FROM {base}: {e}") from None
        source = parent.path if parent is not None else blob if blob is not None else self._from_file(base, folder)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".quantize.{secrets.token_hex(6)}.partial"
        try:
            requantize(source, tmp, quantize, quiet=True, force=True)
            if parent is not None:
                with contextlib.suppress(ModelNotFound):  # (its settings as they are now, minutes later)
                    parent = self.resolve(base)
                settings = settings.over(parent.settings)
            return self._create(name, str(source), settings, blob=tmp,
                                parent=display_name(parent.name) if parent is not None else None)
        except ConvertError as e:
            raise RegistryError(f"quantize {quantize}: {e}") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _from_file(self, base: str, folder: Path | None) -> Path:
        """FROM a .gguf path (relative to the Modelfile's folder): the file, a GGUF of this architecture."""
        path = Path(base).expanduser()
        if not path.is_absolute() and folder is not None:
            path = folder / path
        if not path.is_file():
            raise RegistryError(f"FROM {base}: no such file")
        self._check_gguf(path)
        return path

    @_locked
    def _create(self, name: str, base: str, settings: ModelSettings, *, blob: Path | None = None,
                parent: str | None = None) -> ModelEntry:
        """create under the lock: FROM a model (its file shared), or a file moved into place (`blob`: an upload,
        or one _staged or quantized in the models directory, checked before; `parent`: the model it was quantized
        from)."""
        name = self._new_name(name)
        index = self._index()
        if blob is not None:
            if not blob.is_file():
                raise RegistryError(f"FROM {base}: no such file")
            file = self._file_for(name, index)
            self._add_file(blob, file)
            return self._set(index, name, _Record(file, parent, settings))
        try:
            parent = self.resolve(base)
        except ModelNotFound as e:
            raise RegistryError(f"FROM {base}: {e}") from None
        record = self._record_of(parent, index)
        return self._set(index, name, _Record(record.file, display_name(parent.name), settings.over(record.settings)))

    @_locked
    def copy(self, source: str, destination: str) -> ModelEntry:
        """`dgemma cp` / /api/copy: another name for a model, with its settings (ModelNotFound for the source)."""
        entry = self.resolve(source) if not _is_path(source) else None
        if entry is None:
            raise ModelNotFound(f"model '{source}' not found")
        name = self._new_name(destination)
        index = self._index()
        return self._set(index, name, self._record_of(entry, index))

    @_locked
    def remove(self, name: str) -> None:
        wanted = normalize_name(name)
        if wanted == DEFAULT_NAME:
            raise RegistryError(f"'{DEFAULT_NAME}' is the bundled model and cannot be removed")
        if _is_path(wanted):  # (`../x`, an absolute path: never a file outside the models directory)
            raise ModelNotFound(f"model '{name}' not found in {self.root} (give a model's name, not a path)")
        index = self._index()
        if wanted in index:
            record = index.pop(wanted)
            self._write_index(index)
            self._release(record.file, index)
            return
        loose = self._loose(wanted)
        try:
            loose = loose if loose is not None and loose.is_file() else None
        except OSError:  # (a name too long for a file name: not found)
            loose = None
        if loose is not None and all(r.file != loose.name for r in index.values()):
            loose.unlink()
            return
        raise ModelNotFound(f"model '{name}' not found in {self.root}")

    def prune(self, max_age: float = PRUNE_AGE) -> list[Path]:
        """What `dgemma serve` removes at its start (as `ollama serve` prunes unused blobs, unless OLLAMA_NOPRUNE;
        here DGEMMA_NOPRUNE): uploads that no create took (/api/create moves the blob it uses into place) and
        temporary files a killed write left (`.*.partial`: copies, quantizations, uploads), GBs each for a large
        model; only those not written for max_age seconds (another process may be writing one now)."""
        if os.environ.get(NOPRUNE_ENV) or not self.root.is_dir():
            return []
        gone, old = [], time.time() - max_age
        for path in [*self.root.glob(".*.partial"), *(self.root / BLOBS_DIR).glob("*")]:
            with contextlib.suppress(OSError):  # (gone meanwhile, or not ours to remove)
                if path.is_file() and path.stat().st_mtime < old:
                    path.unlink()
                    gone.append(path)
        return gone

    # ---- uploads (Ollama's /api/blobs) ------------------------------------------------------------
    def blob_path(self, digest: str) -> Path:
        """Where the blob `sha256:<hex>` is kept (RegistryError for another form)."""
        m = DIGEST.fullmatch(digest)
        if not m:
            raise RegistryError(f"invalid digest '{digest}' (expected sha256:<64 hex digits>)")
        return self.root / BLOBS_DIR / f"sha256-{m.group(1)}"

    def blob_writer(self, digest: str) -> BlobWriter:
        return BlobWriter(self.blob_path(digest), DIGEST.fullmatch(digest).group(1))


class BlobWriter:
    """An upload to a temporary file beside its place, hashed as it comes; `finish` checks the digest and puts
    it in place (a mismatch leaves nothing), `abort` drops it."""

    def __init__(self, path: Path, hexdigest: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.expected = path, hexdigest
        fd, self.tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        self.file, self.hash = os.fdopen(fd, "wb"), hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.hash.update(data)
        self.file.write(data)

    def finish(self) -> None:
        self.file.close()
        got = self.hash.hexdigest()
        if got != self.expected:
            self.abort()
            raise RegistryError(f"digest mismatch: the upload's sha256 is {got}, not {self.expected}")
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self.file.close()
        Path(self.tmp).unlink(missing_ok=True)


def display_name(name: str) -> str:
    """A name as Ollama shows it, with its tag (`default:latest`)."""
    return name if ":" in name else name + LATEST


def resolve_model(name: str) -> Path:
    """The GGUF path for a name on the command line (see Registry.resolve)."""
    return Registry().resolve(name).path
