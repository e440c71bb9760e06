"""A Hugging Face checkpoint folder, read lazily and checked before anything is written.

Every problem is a `ConvertError` whose message is one line naming the file (and the field
or tensor) and what was expected. Tensors are read one at a time from memory-mapped
safetensors shards, so converting never holds more than one source tensor in memory.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import numpy as np

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"

# safetensors dtype string -> (numpy storage dtype, torch dtype) for the dtypes weights may come in
SUPPORTED_DTYPES = {
    "F32": (np.float32, torch.float32),
    "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16),  # numpy has no bfloat16: map the bits, view them in torch
}
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}


class ConvertError(Exception):
    """A one-line, user-facing conversion error."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    shard: Path
    offset: int  # absolute byte offset of the data in the shard

    @property
    def nbytes(self) -> int:
        n = _DTYPE_SIZES.get(self.dtype, 1)
        for d in self.shape:
            n *= d
        return n


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ConvertError(f"{path}: missing ({what})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one shard's header: the file must hold every byte its header promises."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ConvertError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ConvertError(f"{path}: truncated safetensors file (header of {n} bytes, file has {size})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConvertError(f"{path}: corrupt safetensors header ({e})") from None
    infos: dict[str, TensorInfo] = {}
    data_size = size - 8 - n
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = meta["dtype"], tuple(meta["shape"]), meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ConvertError(f"{path}: corrupt safetensors header entry for tensor '{name}'") from None
        if end > data_size:
            raise ConvertError(
                f"{path}: truncated safetensors file (tensor '{name}' ends at byte {end} of the data, "
                f"file holds {data_size})"
            )
        infos[name] = TensorInfo(name, dtype, shape, path, 8 + n + start)
    return infos


@dataclass
class Checkpoint:
    """config + generation config + the index of every tensor in every shard."""

    root: Path
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, root: str | Path, *, weights: bool = True) -> "Checkpoint":
        """Read and check a checkpoint folder; with weights=False only its configs (for planning)."""
        root = Path(root)
        if not root.exists():
            raise ConvertError(f"{root}: no such directory (expected a Hugging Face checkpoint folder)")
        if not root.is_dir():
            raise ConvertError(f"{root}: not a directory (expected a Hugging Face checkpoint folder)")
        config = read_json(root / CONFIG_FILE, "expected the model's Hugging Face config")
        gen_path = root / GENERATION_CONFIG_FILE
        generation_config = read_json(gen_path, "generation config") if gen_path.exists() else {}
        tensors: dict[str, TensorInfo] = {}
        for shard in cls._shards(root) if weights else []:
            for name, info in read_safetensors_header(shard).items():
                if name in tensors:
                    raise ConvertError(f"{shard}: tensor '{name}' also stored in {tensors[name].shard.name}")
                tensors[name] = info
        return cls(root, config, generation_config, tensors)

    @staticmethod
    def _shards(root: Path) -> list[Path]:
        index_path = root / INDEX_FILE
        if index_path.exists():
            index = read_json(index_path, "safetensors index")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise ConvertError(f"{index_path}: field 'weight_map' missing or empty")
            shards = sorted(set(weight_map.values()))
            for name in shards:
                if not (root / name).is_file():
                    raise ConvertError(f"{index_path}: names shard '{name}', which does not exist in {root}")
            return [root / name for name in shards]
        if (root / SINGLE_FILE).is_file():
            return [root / SINGLE_FILE]
        found = sorted(root.glob("*.safetensors"))
        if not found:
            raise ConvertError(f"{root}: no safetensors weights (expected {SINGLE_FILE} or {INDEX_FILE} with its shards)")
        return found

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise ConvertError(f"{self.root}: tensor '{name}' missing from the checkpoint") from None

    def check_dtype(self, name: str) -> None:
        info = self.info(name)
        if info.dtype not in SUPPORTED_DTYPES:
            raise ConvertError(
                f"{info.shard}: tensor '{name}' has dtype {info.dtype}; expected one of {', '.join(SUPPORTED_DTYPES)}"
            )

    def load(self, name: str) -> torch.Tensor:
        """One tensor, memory-mapped from its shard (copy-on-write): pages are read as they are used
        and released with the tensor, so converting holds one tensor's pages at a time."""
        self.check_dtype(name)
        info = self.info(name)
        np_dtype, torch_dtype = SUPPORTED_DTYPES[info.dtype]
        count = int(np.prod(info.shape, dtype=np.int64))
        if count == 0:
            return torch.zeros(info.shape, dtype=torch_dtype)
        array = np.memmap(info.shard, dtype=np_dtype, mode="c", offset=info.offset, shape=(count,))
        return torch.from_numpy(array).view(torch_dtype).reshape(info.shape)

    def meta(self, name: str) -> torch.Tensor:
        """A data-less stand-in with the tensor's shape and dtype, for planning."""
        self.check_dtype(name)
        info = self.info(name)
        return torch.empty(info.shape, dtype=SUPPORTED_DTYPES[info.dtype][1], device="meta")
