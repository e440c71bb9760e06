"""gguf-py's GGUFReader with the metadata arrays read at once.

GGUFReader keeps a numpy view per array element (a string: two): about 40 us each, so the tokenizer of a
262,144-token vocabulary (tokens, token types, and its merges) took tens of seconds to open, at every model load,
`dgemma list`, /api/tags and /api/show. FastReader reads an array of strings in one pass over the file's bytes
and an array of numbers as one numpy view, and hands back the same values (`contents()`, `types`) through a
ReaderField whose contents are those values (its `parts` hold the array's header and the whole payload, not a
part per element; `data` is empty). Everything else (scalars, tensors, alignment) is gguf-py's own. Files in the
other byte order, arrays of arrays and string arrays that are not UTF-8 are read by gguf-py as before. It relies
on two of GGUFReader's private methods; where a gguf-py builds its fields another way it raises TypeError and
plugin/inspect.py open_gguf reads the file with GGUFReader.
"""

from __future__ import annotations

import struct
import sys
from typing import Any

import numpy as np
from gguf import GGUFReader, GGUFValueType, ReaderField

_U64 = struct.Struct("<Q")


class ArrayField(ReaderField):
    """A metadata array whose values were read at once (`values`); contents() as ReaderField.contents()."""

    values: list[Any]

    def contents(self, index_or_slice: int | slice = slice(None)) -> Any:
        return self.values[index_or_slice]


class FastReader(GGUFReader):
    _nested = False  # inside an array of arrays, which gguf-py reads element by element
    _read = _made = 0  # arrays read at once, and fields made of them (equal unless gguf-py's internals changed)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._read != self._made:  # (a gguf-py that builds its fields another way: open_gguf reads it with its own)
            raise TypeError(f"gguf {getattr(sys.modules['gguf'], '__version__', '?')}: FastReader does not know "
                            "how this version builds its fields")

    def _get_field_parts(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        # (called for each value of a field, and by gguf-py's loop for each element of an array it reads itself)
        if raw_type != GGUFValueType.ARRAY or self.byte_order != "I" or sys.byteorder != "little" or self._nested:
            return super()._get_field_parts(orig_offs, raw_type)
        raw_itype = self._get(orig_offs, np.uint32)
        count = self._get(orig_offs + 4, np.uint64)
        itype, n, offs = GGUFValueType(int(raw_itype[0])), int(count[0]), orig_offs + 12
        if itype == GGUFValueType.STRING:
            try:
                values, end = _strings(self.data, offs, n)
            except UnicodeDecodeError:  # (gguf-py's way: the file opens, reading that field fails, as GGUFReader)
                return self._as_gguf_py(orig_offs, raw_type)
        elif itype in self.gguf_scalar_to_np:
            dtype = np.dtype(self.gguf_scalar_to_np[itype])
            end = offs + dtype.itemsize * n
            if end > len(self.data):
                raise ValueError(f"array of {n} {itype.name} at offset {offs} runs past the end of the file")
            values = self.data[offs:end].view(dtype).tolist()
        else:  # (arrays of arrays: gguf-py's way)
            return self._as_gguf_py(orig_offs, raw_type)
        self._values = values  # (taken by _push_field for the field being built)
        self._read += 1
        return end - orig_offs, [raw_itype, count, self.data[offs:end]], [], [GGUFValueType.ARRAY, itype]

    def _as_gguf_py(self, orig_offs: int, raw_type: int) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        self._nested = True
        try:
            return super()._get_field_parts(orig_offs, raw_type)
        finally:
            self._nested = False

    def _push_field(self, field: ReaderField, skip_sum: bool = False) -> int:
        values = self.__dict__.pop("_values", None)
        if values is not None and field.types[:1] == [GGUFValueType.ARRAY]:
            field = ArrayField(*field)
            field.values = values
            self._made += 1
        return super()._push_field(field, skip_sum)


def _strings(data: np.ndarray, offs: int, n: int) -> tuple[list[str], int]:
    """n GGUF strings (u64 length, UTF-8 bytes) from offs; and the offset after them."""
    buf = memoryview(data)
    size, out = len(buf), []
    if n > (size - offs) // 8:  # (each string takes at least its 8-byte length: a damaged count fails at once)
        raise ValueError(f"array of {n} strings at offset {offs} runs past the end of the file")
    for _ in range(n):
        if offs + 8 > size:
            raise ValueError(f"string array runs past the end of the file at offset {offs}")
        (length,) = _U64.unpack_from(buf, offs)
        offs += 8
        if offs + length > size:
            raise ValueError(f"string of {length} bytes at offset {offs} runs past the end of the file")
        out.append(str(buf[offs:offs + length], "utf-8"))
        offs += length
    return out, offs
