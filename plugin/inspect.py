"""`dgemma inspect FILE.gguf`: what a DiffusionGemma GGUF holds, read with gguf-py's GGUFReader (its metadata
arrays at once: gguf_reader.FastReader)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType

from dgemma.convert import constants as C

from .gguf_reader import FastReader


class InspectError(ValueError):
    """A one-line, user-facing error about a GGUF file."""


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A field's value; float32 scalars come back at float32 precision (0.1, not 0.10000000149)."""
    f = reader.fields.get(key)
    if f is None:
        return default
    value = f.contents()
    if f.types and f.types[0] == GGUFValueType.ARRAY:
        return list(value)
    if f.types and f.types[0] == GGUFValueType.FLOAT32:
        return float(f"{value:.7g}")
    return value


def open_gguf(path: str | Path, *, require_arch: bool = True) -> GGUFReader:
    path = Path(path)
    if path.is_dir():
        raise InspectError(f"{path}: is a directory, not a GGUF file (convert a checkpoint with 'dgemma convert')")
    if not path.is_file():
        raise InspectError(f"{path}: no such file")
    with path.open("rb") as f:
        if f.read(4) != b"GGUF":
            raise InspectError(f"{path}: not a GGUF file (bad magic)")
    try:
        try:
            reader = FastReader(path)
        except (AttributeError, TypeError):  # (a gguf-py whose reader internals differ: read its own, slower way)
            reader = GGUFReader(path)
    except Exception as e:  # gguf-py raises ValueError/struct.error/IndexError on damaged files
        raise InspectError(f"{path}: unreadable GGUF ({type(e).__name__}: {e})") from None
    arch = field_value(reader, C.GENERAL_ARCHITECTURE)
    if require_arch and arch != C.ARCH:
        raise InspectError(f"{path}: architecture is '{arch}', not '{C.ARCH}' (not a DiffusionGemma model)")
    return reader


@dataclass
class Summary:
    path: Path
    architecture: str
    name: str | None
    file_size: int
    n_params: int
    n_tensors: int
    by_type: dict[str, tuple[int, int]]  # GGML type -> (tensor count, bytes)
    hparams: dict[str, Any]
    sampler: dict[str, Any]  # diffusion.* values, defaults filled in and marked
    tokenizer: dict[str, Any] = field(default_factory=dict)


def summarize(path: str | Path) -> Summary:
    reader = open_gguf(path)
    by_type: dict[str, list[int]] = {}
    n_params = 0
    for t in reader.tensors:
        entry = by_type.setdefault(t.tensor_type.name, [0, 0])
        entry[0] += 1
        entry[1] += int(t.n_bytes)
        n_params += int(t.n_elements)
    hkeys = {
        "layers": C.BLOCK_COUNT, "hidden": C.EMBEDDING_LENGTH, "heads": C.HEAD_COUNT, "kv_heads": C.HEAD_COUNT_KV,
        "head_dim_swa": C.KEY_LENGTH_SWA, "head_dim_global": C.KEY_LENGTH, "ffn": C.FEED_FORWARD_LENGTH,
        "experts": C.EXPERT_COUNT, "experts_used": C.EXPERT_USED_COUNT, "expert_ffn": C.EXPERT_FEED_FORWARD_LENGTH,
        "sliding_window": C.SLIDING_WINDOW, "context": C.CONTEXT_LENGTH, "softcap": C.FINAL_LOGIT_SOFTCAPPING,
    }
    hparams = {k: field_value(reader, key) for k, key in hkeys.items()}
    pattern = field_value(reader, C.SLIDING_WINDOW_PATTERN) or []
    hparams["layer_pattern"] = "".join("s" if s else "G" for s in pattern)
    padded = field_value(reader, C.DGEMMA_EXPERT_DOWN_PADDED)
    if padded is not None:
        hparams["layout"] = f"dgemma-only: expert down rows padded {hparams['expert_ffn']} -> {padded} (llama.cpp cannot read it)"
    sampler: dict[str, Any] = {"canvas_length": field_value(reader, C.CANVAS_LENGTH)}
    for key, (fname, _section, _kind, default) in C.SAMPLER_KEYS.items():
        value = field_value(reader, key)
        sampler[fname] = value if value is not None else f"{default} (default)"
    types = field_value(reader, C.TOKENIZER_TOKEN_TYPE) or []
    type_counts = Counter(C.TokenType(int(t)).name.lower() for t in types)
    tokenizer = {
        "model": field_value(reader, C.TOKENIZER_MODEL),
        "tokens": len(field_value(reader, C.TOKENIZER_TOKENS) or []),
        "merges": len(field_value(reader, C.TOKENIZER_MERGES) or []),
        "types": dict(sorted(type_counts.items())),
        **{role: field_value(reader, key) for role, key in C.SPECIAL_TOKEN_KEYS.items() if key in reader.fields},
        "chat_template": "yes" if C.TOKENIZER_CHAT_TEMPLATE in reader.fields else "no",
    }
    if C.TOKENIZER_CHAT_TEMPLATE in reader.fields:  # what it renders, as /api/show's capabilities
        from .chat import template_features
        from .tokenizer import Tokenizer

        features = template_features(Tokenizer.from_gguf(reader, path))
        on = [name for name, has in (("tools", features.tools), ("thinking", features.thinking)) if has]
        tokenizer["chat_template"] = f"yes ({', '.join(on)})" if on else "yes"
    return Summary(
        path=Path(path), architecture=C.ARCH, name=field_value(reader, C.GENERAL_NAME),
        file_size=Path(path).stat().st_size, n_params=n_params, n_tensors=len(reader.tensors),
        by_type={k: (v[0], v[1]) for k, v in sorted(by_type.items())}, hparams=hparams, sampler=sampler,
        tokenizer=tokenizer,
    )


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def format_summary(s: Summary) -> str:
    def fmt(v: Any) -> str:
        if isinstance(v, (list, np.ndarray)):
            return ",".join(str(int(x)) for x in v) if len(set(map(int, v))) > 1 else f"{int(v[0])} (all layers)"
        return str(v)

    lines = [
        f"file          {s.path} ({_human(s.file_size)})",
        f"architecture  {s.architecture}" + (f"  name: {s.name}" if s.name else ""),
        f"parameters    {_count(s.n_params)} ({s.n_params:,}) in {s.n_tensors} tensors",
        "tensors by type:",
    ]
    lines += [f"  {k:<6} {n:>5} tensors  {_human(b):>12}" for k, (n, b) in s.by_type.items()]
    lines.append("model:")
    lines += [f"  {k:<16} {fmt(v)}" for k, v in s.hparams.items() if v is not None and v != ""]
    lines.append("diffusion sampler:")
    lines += [f"  {k:<22} {v}" for k, v in s.sampler.items()]
    lines.append("tokenizer:")
    lines += [f"  {k:<14} {v}" for k, v in s.tokenizer.items()]
    return "\n".join(lines)
