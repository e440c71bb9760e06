"""HF checkpoint folder -> one GGUF file, streamed a tensor (and a chunk of rows) at a time.

`convert(src, out, out_type)` checks everything it can before writing (config, shards, names,
shapes, dtypes), plans each tensor's GGUF name, shape and type on meta tensors, then writes to a
temporary file next to `out` and renames it only once it is complete and synced. Any failure,
including Ctrl-C and a full disk, removes the temporary file and leaves `out` untouched.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from tqdm import tqdm

from dgemma import quant
from dgemma.quant.parallel import Pool, WorkerError, check_workers, quantize_chunk
from dgemma.quant.presets import PRESETS, Preset, preset_types

from . import constants as C
from .arch import KV, ModelConverter, converter_for
from .source import Checkpoint, ConvertError
from .vocab import load_vocab

OUTPUT_TYPES = PRESETS  # --type NAME -> preset (default GGML type, general.file_type, per-tensor rules)
CHUNK_ELEMENTS = 1 << 22  # values converted per write: bounds the float32 working set to 16 MiB


@dataclass
class PlannedTensor:
    name: str  # GGUF name
    source: str | None  # HF name, or None for generated tensors
    shape: tuple[int, ...]  # PyTorch order
    qtype: GGMLQuantizationType
    load: Callable[[], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return quant.nbytes(self.shape, self.qtype)


def parse_type(name: str) -> Preset:
    for key, preset in PRESETS.items():
        if key.upper() == name.upper():
            return preset
    raise ConvertError(f"--type '{name}' is not supported (choose {', '.join(PRESETS)})")


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def plan_tensors(ckpt: Checkpoint, conv: ModelConverter, preset: Preset,
                 overrides: dict[str, GGMLQuantizationType] | None = None) -> list[PlannedTensor]:
    """Names, shapes and types of every output tensor, checked against the config; no data read.
    Types: the architecture's forced types (F32 vectors, norms, router), then `overrides` (a --fit plan),
    then the preset's rules (dgemma.quant.presets)."""
    found: dict[str, tuple[str | None, tuple[int, ...], Callable[[], torch.Tensor]]] = {}

    def add(name: str, source: str | None, meta: torch.Tensor, load: Callable[[], torch.Tensor]) -> None:
        shape = tuple(conv.modify_tensors(name, meta).shape)
        expected = conv.expected_shape(name)
        if expected is not None and shape != tuple(expected):
            where = f"{ckpt.info(source).shard}: tensor '{source}'" if source else f"generated tensor '{name}'"
            raise ConvertError(f"{where} has shape {list(shape)}, but config.json implies {list(expected)}")
        if name in found:
            raise ConvertError(f"{ckpt.root}: tensors '{found[name][0]}' and '{source}' both map to '{name}'")
        found[name] = (source, shape, load)

    for name, data in conv.generate_extra_tensors():
        add(name, None, data.to("meta"), lambda data=data: data)
    for hf_name in ckpt.tensors:
        name = conv.map_name(hf_name)
        if name is not None:
            add(name, hf_name, ckpt.meta(hf_name), lambda hf_name=hf_name: ckpt.load(hf_name))
    missing = [n for n in conv.required_names() if n not in found]
    if missing:
        raise ConvertError(f"{ckpt.root}: checkpoint has no tensor for '{missing[0]}' ({len(missing)} missing in all)")
    order = sorted(found, key=_natural_key)
    types = preset_types([(n, found[n][1]) for n in order], preset, conv.model_facts())
    plan = []
    for name in order:
        source, shape, load = found[name]
        qtype = conv.tensor_force_quant(name, shape) or (overrides or {}).get(name) or types[name]
        plan.append(PlannedTensor(name, source, shape, qtype, load))
    return plan


def build_metadata(ckpt: Checkpoint, conv: ModelConverter, file_type: LlamaFileType) -> KV:
    kv = KV()
    kv.add(C.GENERAL_TYPE, "model", "string")
    kv.add(C.GENERAL_NAME, ckpt.root.resolve().name, "string")
    conv.set_gguf_parameters(kv)
    kv.add(C.GENERAL_FILE_TYPE, int(file_type), "uint32")
    kv.add(C.GENERAL_QUANTIZATION_VERSION, C.GGML_QUANT_VERSION, "uint32")
    load_vocab(ckpt.root, ckpt.config, conv.n_vocab).write_kv(kv)
    return kv


def _add_kv(writer: GGUFWriter, key: str, value, kind: str) -> None:
    if kind.endswith("_array"):
        writer.add_array(key, value)
    else:
        getattr(writer, f"add_{kind}")(key, value)


def _chunks(data: torch.Tensor, qtype: GGMLQuantizationType, pool: Pool) -> Iterator[np.ndarray]:
    """Quantized bytes of `data`, a few rows at a time (in the pool's workers, in order)."""
    rows = data.reshape(-1, data.shape[-1]) if data.ndim else data.reshape(1, 1)  # [R, K]
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))

    starts = range(0, rows.shape[0], step)
    jobs = ((rows[start : start + step].to(torch.float32).numpy(), qtype) for start in starts)  # [r, K]
    return pool.map(quantize_chunk, jobs, len(starts))


def workers(threads: int | None) -> int:
    """--threads as a worker count (quant/parallel.py), a ConvertError where it is not one."""
    try:
        return check_workers(threads)
    except ValueError as e:
        raise ConvertError(str(e)) from None


def write_with_pool(path: Path, threads: int, fill: Callable[[GGUFWriter, Pool], None]) -> None:
    """fill(writer, pool): a GGUF at `path` written with `threads` quantizing workers; the writer closed also on
    an error (write_atomically then removes the file), a worker's death a ConvertError. convert and quantize."""
    writer = GGUFWriter(path, C.ARCH)
    try:
        with Pool(threads) as pool:
            fill(writer, pool)
    except WorkerError as e:
        raise ConvertError(str(e)) from None
    finally:
        writer.close()


def write_gguf(path: Path, kv: KV, plan: list[PlannedTensor], conv: ModelConverter, quiet: bool,
               threads: int = 1) -> None:
    write_with_pool(path, threads, lambda writer, pool: _write_to(writer, kv, plan, conv, quiet, pool))


def _write_to(writer: GGUFWriter, kv: KV, plan: list[PlannedTensor], conv: ModelConverter, quiet: bool,
              pool: Pool) -> None:
    for key, (value, kind) in kv.items.items():
        _add_kv(writer, key, value, kind)
    for t in plan:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    total = sum(t.nbytes for t in plan)
    with tqdm(total=total, unit="B", unit_scale=True, desc="converting", disable=quiet, leave=False) as bar:
        for t in plan:
            bar.set_postfix_str(t.name, refresh=False)
            writer.write_padding(fout, fout.tell())
            data = conv.modify_tensors(t.name, t.load())
            written = 0
            for chunk in _chunks(data, t.qtype, pool):
                fout.write(chunk.tobytes())
                written += chunk.nbytes
                bar.update(chunk.nbytes)
            del data
            if written != t.nbytes:
                raise ConvertError(f"internal error: wrote {written} bytes for '{t.name}', planned {t.nbytes}")
            writer.write_padding(fout, t.nbytes)
    fout.flush()
    os.fsync(fout.fileno())


@dataclass
class ConvertResult:
    path: Path
    n_tensors: int
    nbytes: int


def convert(src: str | Path, out: str | Path, out_type: str = "BF16", *, force: bool = False,
            quiet: bool = False, overrides: dict[str, GGMLQuantizationType] | None = None,
            pad_experts: bool = False, threads: int | None = None) -> ConvertResult:
    """`threads`: quantizing processes (None: one, quant/parallel.py); the file is the same for any."""
    out = Path(out)
    preset = parse_type(out_type)
    threads = workers(threads)
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise ConvertError(f"{out}: directory {out.parent} does not exist")
    ckpt = Checkpoint.open(src)
    conv = converter_for(ckpt, pad_experts=pad_experts)
    plan = plan_tensors(ckpt, conv, preset, overrides)
    kv = build_metadata(ckpt, conv, preset.ftype)
    write_atomically(out, lambda tmp: write_gguf(tmp, kv, plan, conv, quiet, threads))
    return ConvertResult(out, len(plan), out.stat().st_size)


def write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) to a temporary file beside `out`, renamed to `out` once complete; any failure (a full disk,
    Ctrl-C) removes it and leaves `out` as it was."""
    # named before anything is created, so that an interrupt at any point below can remove it (with
    # mkstemp, a Ctrl-C between the file's creation and the `try` left it behind)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(4)}.partial"
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConvertError(f"{out}: write failed: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
