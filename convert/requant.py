"""DiffusionGemma GGUF -> GGUF of another type (llama.cpp's llama-quantize): `dgemma quantize IN OUT --type Q4_K_M`.

For a GGUF downloaded in F16/BF16/F32 (or one `dgemma convert` wrote), without its Hugging Face checkpoint. The
tensors get the types `dgemma convert --type` (or `--fit`) gives the same model: the same per-tensor rules
(dgemma.quant.presets), the same planner, the same F32 tensors (arch.force_quant), read from the file's own
metadata (plugin/config.py). Each tensor is dequantized to float32 a few rows at a time and quantized again, so a
file requantized from an F32/F16/BF16 one equals the file convert writes from the checkpoint. A source that is
already quantized loses more on the way and needs `allow_requantize`, as llama-quantize asks; a tensor already
in its target type is copied as it is. The metadata is the source's, but `general.file_type`. Written to a
temporary file and renamed when complete, as convert does.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from tqdm import tqdm

from dgemma import quant
from dgemma.quant.parallel import Pool, requantize_chunk
from dgemma.quant.presets import ModelFacts, preset_types

from . import constants as C
from .arch import force_quant
from .plan import DEFAULT_CTX
from .source import ConvertError
from .writer import CHUNK_ELEMENTS, ConvertResult, parse_type, workers, write_atomically, write_with_pool

FLOAT_TYPES = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)
# written by the writer itself, or set here
SKIP_KEYS = (C.GENERAL_ARCHITECTURE, C.GENERAL_FILE_TYPE, C.GENERAL_QUANTIZATION_VERSION, "general.alignment")


def _open(src: Path):
    from dgemma.plugin.config import ModelConfig
    from dgemma.plugin.inspect import InspectError, open_gguf

    try:
        reader = open_gguf(src)
        return reader, ModelConfig.from_gguf(reader, src)
    except InspectError as e:
        raise ConvertError(str(e)) from None


def plan_types(reader, cfg, out_type: str, fit_size: str | None = None,
               ctx: int = DEFAULT_CTX) -> dict[str, GGMLQuantizationType]:
    """Each tensor's new type: F32 where the converter keeps it, else the preset's rules or the --fit plan."""
    preset = parse_type(out_type)
    shapes = [(t.name, tuple(int(x) for x in reversed(t.shape))) for t in reader.tensors]  # PyTorch order
    facts = ModelFacts(n_layer=cfg.n_layer, n_gqa=cfg.n_head // cfg.n_head_kv[0], n_expert=cfg.n_expert)
    if fit_size is not None:
        from dgemma.quant.planner import fit, parse_size

        try:
            budget = parse_size(fit_size)
        except ValueError as e:
            raise ConvertError(f"--fit: {e}") from None
        plan = fit(shapes, facts, cfg.model_dims(), budget, ctx, start=preset if preset.quantized else None)
        if not plan.fits:
            raise ConvertError(f"--fit {fit_size}: no plan fits ({'; '.join(plan.notes) or 'even the lowest types'})")
        types = plan.types
    else:
        types = preset_types(shapes, preset, facts)
    return {n: force_quant(n, s) or types[n] for n, s in shapes}


def _check_metadata(src: Path, reader) -> None:
    """What gguf-py's writer cannot write as it was read: refused, rather than written otherwise or failing midway."""
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in SKIP_KEYS:
            continue
        try:
            f.contents()
        except UnicodeDecodeError:
            raise ConvertError(f"{src}: metadata '{key}' holds a string that is not UTF-8") from None
        if f.types[0] != GGUFValueType.ARRAY:
            continue
        if len(f.types) > 2:
            raise ConvertError(f"{src}: metadata '{key}' is an array of arrays, which dgemma quantize does not copy")
        if not f.contents():
            raise ConvertError(f"{src}: metadata '{key}' is an empty array, which gguf-py cannot write")


def _metadata(writer: GGUFWriter, reader, file_type: int) -> None:
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key in SKIP_KEYS:
            continue
        value = f.contents()
        if f.types[0] == GGUFValueType.ARRAY:
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=f.types[-1])
        else:
            writer.add_key_value(key, value, f.types[0])
    writer.add_uint32(C.GENERAL_FILE_TYPE, file_type)
    writer.add_uint32(C.GENERAL_QUANTIZATION_VERSION, C.GGML_QUANT_VERSION)


def _requantized(t, qtype: GGMLQuantizationType, pool: Pool) -> Iterator[np.ndarray]:
    """The tensor's bytes in `qtype`, a few rows at a time (in the pool's workers, in order; as they are where it
    already has that type)."""
    rows = np.asarray(t.data).reshape(-1, t.data.shape[-1]) if t.data.ndim else np.asarray(t.data).reshape(1, 1)
    if t.tensor_type == qtype:  # (in slices of about CHUNK_ELEMENTS bytes: never the whole tensor in RAM)
        step = max(1, CHUNK_ELEMENTS // max(1, rows[:1].view(np.uint8).shape[-1]))
        for start in range(0, rows.shape[0], step):
            yield rows[start:start + step].view(np.uint8)
        return
    width = int(t.shape[0])  # values per row (ggml's ne0)
    step = max(1, CHUNK_ELEMENTS // max(1, width))

    starts = range(0, rows.shape[0], step)
    jobs = ((np.ascontiguousarray(rows[start:start + step]).view(np.uint8), t.tensor_type, qtype) for start in starts)
    yield from pool.map(requantize_chunk, jobs, len(starts))


def requantize(src: str | Path, out: str | Path, out_type: str = "Q4_K_M", *, fit_size: str | None = None,
               ctx: int = DEFAULT_CTX, allow_requantize: bool = False, force: bool = False,
               quiet: bool = False, threads: int | None = None) -> ConvertResult:
    """`threads`: quantizing processes (None: one, quant/parallel.py); the file is the same for any."""
    src, out = Path(src), Path(out)
    preset = parse_type(out_type)
    threads = workers(threads)
    if out.exists() and not force:
        raise ConvertError(f"{out}: already exists (use --force to overwrite)")
    if not out.parent.is_dir():
        raise ConvertError(f"{out}: directory {out.parent} does not exist")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise ConvertError(f"{out}: is the source file; write the new one elsewhere")
    reader, cfg = _open(src)
    if reader.byte_order != "I":
        raise ConvertError(f"{src}: a GGUF in the other byte order (big-endian); dgemma quantize reads this machine's")
    _check_metadata(src, reader)
    quantized = sorted({t.tensor_type.name for t in reader.tensors if t.tensor_type not in FLOAT_TYPES})
    if quantized and not allow_requantize:
        raise ConvertError(f"{src}: already quantized ({', '.join(quantized)}): quantizing it again loses more than "
                           "quantizing an F16/BF16/F32 file (dgemma quantize --allow-requantize does it anyway)")
    types = plan_types(reader, cfg, out_type, fit_size, ctx)
    for t in reader.tensors:
        if t.tensor_type != types[t.name] and t.tensor_type not in quant.QTYPES:
            raise ConvertError(f"{src}: tensor '{t.name}' is {t.tensor_type.name}, which dgemma cannot read "
                               f"(have: {', '.join(q.name for q in quant.QTYPES)})")
        if not quant.can_quantize((int(t.shape[0]),), types[t.name]):
            raise ConvertError(f"{src}: tensor '{t.name}' has rows of {int(t.shape[0])} values, not a multiple of "
                               f"the block of {types[t.name].name}")
    write_atomically(out, lambda tmp: write_with_pool(
        tmp, threads, lambda writer, pool: _write_to(writer, reader, types, int(preset.ftype), quiet, pool)))
    return ConvertResult(out, len(reader.tensors), out.stat().st_size)


def _write_to(writer: GGUFWriter, reader, types: dict[str, GGMLQuantizationType], file_type: int,
              quiet: bool, pool: Pool) -> None:
    _metadata(writer, reader, file_type)
    sizes = {}
    for t in reader.tensors:
        shape = tuple(int(x) for x in reversed(t.shape))
        sizes[t.name] = quant.nbytes(shape, types[t.name])
        writer.add_tensor_info(t.name, shape, np.dtype(np.float32), sizes[t.name], raw_dtype=types[t.name])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fout = writer.fout[0]
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, desc="quantizing", disable=quiet,
              leave=False) as bar:
        for t in reader.tensors:
            bar.set_postfix_str(t.name, refresh=False)
            writer.write_padding(fout, fout.tell())
            written = 0
            for chunk in _requantized(t, types[t.name], pool):
                fout.write(chunk.tobytes())
                written += chunk.nbytes
                bar.update(chunk.nbytes)
            if written != sizes[t.name]:
                raise ConvertError(f"internal error: wrote {written} bytes for '{t.name}', planned {sizes[t.name]}")
            writer.write_padding(fout, sizes[t.name])
    fout.flush()
    os.fsync(fout.fileno())
