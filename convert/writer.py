"""HF checkpoint folder -> one GGUF file, streamed a tensor (and a chunk of rows) at a time.

`convert(src, out, out_type)` checks everything it can before writing (config, shards, names,
shapes, dtypes), plans each tensor's GGUF name, shape and type on meta tensors, then writes to a
temporary file next to `out` and renames it only once it is complete and synced. Any failure,
including Ctrl-C and a full disk, removes the temporary file and leaves `out` untouched.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType
from tqdm import tqdm

from dgemma import quant

from . import constants as C
from .arch import KV, ModelConverter, converter_for
from .source import Checkpoint, ConvertError
from .vocab import load_vocab

# --type NAME -> (GGML type of the weight matrices, general.file_type)
OUTPUT_TYPES: dict[str, tuple[GGMLQuantizationType, LlamaFileType]] = {
    "F32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "F16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "BF16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "Q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}
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


def parse_type(name: str) -> tuple[GGMLQuantizationType, LlamaFileType]:
    try:
        return OUTPUT_TYPES[name.upper()]
    except KeyError:
        raise ConvertError(f"--type '{name}' is not supported (choose {', '.join(OUTPUT_TYPES)})") from None


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def choose_type(conv: ModelConverter, name: str, shape: tuple[int, ...], wanted: GGMLQuantizationType) -> GGMLQuantizationType:
    forced = conv.tensor_force_quant(name, shape)
    if forced is not None:
        return forced
    if not quant.can_quantize(shape, wanted):
        return GGMLQuantizationType.F16  # llama.cpp's fallback when rows do not fill whole blocks
    return wanted


def plan_tensors(ckpt: Checkpoint, conv: ModelConverter, wanted: GGMLQuantizationType) -> list[PlannedTensor]:
    """Names, shapes and types of every output tensor, checked against the config; no data read."""
    plan: dict[str, PlannedTensor] = {}

    def add(name: str, source: str | None, meta: torch.Tensor, load: Callable[[], torch.Tensor]) -> None:
        shape = tuple(conv.modify_tensors(name, meta).shape)
        expected = conv.expected_shape(name)
        if expected is not None and shape != tuple(expected):
            where = f"{ckpt.info(source).shard}: tensor '{source}'" if source else f"generated tensor '{name}'"
            raise ConvertError(f"{where} has shape {list(shape)}, but config.json implies {list(expected)}")
        if name in plan:
            raise ConvertError(f"{ckpt.root}: tensors '{plan[name].source}' and '{source}' both map to '{name}'")
        plan[name] = PlannedTensor(name, source, shape, choose_type(conv, name, shape, wanted), load)

    for name, data in conv.generate_extra_tensors():
        add(name, None, data.to("meta"), lambda data=data: data)
    for hf_name in ckpt.tensors:
        name = conv.map_name(hf_name)
        if name is not None:
            add(name, hf_name, ckpt.meta(hf_name), lambda hf_name=hf_name: ckpt.load(hf_name))
    missing = [n for n in conv.required_names() if n not in plan]
    if missing:
        raise ConvertError(f"{ckpt.root}: checkpoint has no tensor for '{missing[0]}' ({len(missing)} missing in all)")
    return [plan[n] for n in sorted(plan, key=_natural_key)]


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


def _chunks(data: torch.Tensor, qtype: GGMLQuantizationType) -> Iterator[np.ndarray]:
    """Quantized bytes of `data`, a few rows at a time."""
    rows = data.reshape(-1, data.shape[-1]) if data.ndim else data.reshape(1, 1)  # [R, K]
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        block = rows[start : start + step].to(torch.float32).numpy()  # [r, K]
        yield quant.quantize(block, qtype)


def write_gguf(path: Path, kv: KV, plan: list[PlannedTensor], conv: ModelConverter, quiet: bool) -> None:
    writer = GGUFWriter(path, C.ARCH)
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
            for chunk in _chunks(data, t.qtype):
                fout.write(chunk.tobytes())
                written += chunk.nbytes
                bar.update(chunk.nbytes)
            del data
            if written != t.nbytes:
                raise ConvertError(f"internal error: wrote {written} bytes for '{t.name}', planned {t.nbytes}")
            writer.write_padding(fout, t.nbytes)
    fout.flush()
    os.fsync(fout.fileno())
    writer.close()


@dataclass
class ConvertResult:
    path: Path
    n_tensors: int
    nbytes: int


def convert(src: str | Path, out: str | Path, out_type: str = "BF16", *, force: bool = False,
            quiet: bool = False) -> ConvertResult:
    out = Path(out)
    wanted, file_type = parse_type(out_type)
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise ConvertError(f"{out}: directory {out.parent} does not exist")
    ckpt = Checkpoint.open(src)
    conv = converter_for(ckpt)
    plan = plan_tensors(ckpt, conv, wanted)
    kv = build_metadata(ckpt, conv, file_type)

    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write_gguf(tmp, kv, plan, conv, quiet)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise ConvertError(f"{out}: write failed: {e.strerror or e}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return ConvertResult(out, len(plan), out.stat().st_size)
