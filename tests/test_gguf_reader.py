"""FastReader reads every GGUF field as gguf-py's GGUFReader does (the reference), arrays at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter

from dgemma.plugin.default_model import ensure_default_model
from dgemma.plugin.gguf_reader import ArrayField, FastReader
from dgemma.plugin.inspect import InspectError, open_gguf

ARRAYS = {
    "a.u8": ([0, 7, 255], GGUFValueType.UINT8), "a.i8": ([-128, 0, 127], GGUFValueType.INT8),
    "a.u16": ([1, 65535], GGUFValueType.UINT16), "a.i16": ([-3, 3], GGUFValueType.INT16),
    "a.u32": ([1, 2, 4294967295], GGUFValueType.UINT32), "a.i32": ([-1, 5], GGUFValueType.INT32),
    "a.u64": ([2**64 - 1], GGUFValueType.UINT64), "a.i64": ([-(2**63)], GGUFValueType.INT64),
    "a.f32": ([0.1, -2.5, 1e30], GGUFValueType.FLOAT32), "a.f64": ([0.1, 1e300], GGUFValueType.FLOAT64),
    "a.bool": ([True, False, True], GGUFValueType.BOOL),
    "a.str": (["", "▁the", "日本語", "<0x0A>", "a b\nc", "x" * 300], GGUFValueType.STRING),
}


def write(path: Path, endian: GGUFEndian = GGUFEndian.LITTLE, nested: bool = True) -> Path:
    w = GGUFWriter(str(path), "diffusion-gemma", endianess=endian)
    w.add_uint32("s.u32", 7)
    w.add_string("s.str", "hello")
    w.add_float32("s.f32", 0.25)
    w.add_bool("s.bool", True)
    for key, (values, vtype) in ARRAYS.items():
        if vtype == GGUFValueType.STRING:
            w.add_array(key, values)
        else:
            w.add_key_value(key, values, GGUFValueType.ARRAY, sub_type=vtype)
    if nested:
        w.add_array("a.nested", [[1, 2], [3]])
    w.add_array("a.tokens", [f"tok{i}" for i in range(5000)])
    w.add_tensor("t.a", np.arange(12, dtype=np.float32).reshape(3, 4))
    w.add_tensor("t.b", np.ones(5, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def same(fast: GGUFReader, ref: GGUFReader) -> None:
    assert list(fast.fields) == list(ref.fields)
    for key, f in fast.fields.items():
        r = ref.fields[key]
        assert f.types == r.types and f.offset == r.offset, key
        assert f.contents() == r.contents(), key
        if f.types[0] == GGUFValueType.ARRAY and r.contents():
            assert f.contents(0) == r.contents(0) and f.contents(slice(1, None)) == r.contents(slice(1, None)), key
    assert fast.data_offset == ref.data_offset
    assert [(t.name, t.tensor_type, t.data_offset, t.n_bytes, list(t.shape)) for t in fast.tensors] == \
        [(t.name, t.tensor_type, t.data_offset, t.n_bytes, list(t.shape)) for t in ref.tensors]
    for a, b in zip(fast.tensors, ref.tensors):
        assert np.array_equal(a.data, b.data)


def test_every_value_type_reads_as_gguf_py_reads_it(tmp_path):
    path = write(tmp_path / "all.gguf")
    fast, ref = FastReader(path), GGUFReader(path)
    same(fast, ref)
    # the flat arrays were read at once, the array of arrays by gguf-py
    assert all(isinstance(fast.fields[k], ArrayField) for k in ARRAYS) and isinstance(fast.fields["a.tokens"], ArrayField)
    assert not isinstance(fast.fields["a.nested"], ArrayField)
    assert fast.fields["a.str"].contents() == ARRAYS["a.str"][0]
    # what comes after a fast array is read from the right offset (the tensors, the alignment)
    assert fast.tensors[1].data.tolist() == [1.0] * 5


def test_the_other_byte_order_is_read_by_gguf_py(tmp_path):
    path = write(tmp_path / "big.gguf", GGUFEndian.BIG, nested=False)
    fast, ref = FastReader(path), GGUFReader(path)
    assert fast.byte_order == "S"
    same(fast, ref)
    assert not any(isinstance(f, ArrayField) for f in fast.fields.values())


def test_the_bundled_model(tmp_path):
    path = ensure_default_model(tmp_path)
    same(open_gguf(path), GGUFReader(path))


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_a_cut_file_is_a_one_line_error(tmp_path, cut):
    path = write(tmp_path / "all.gguf", nested=False)
    data = path.read_bytes()
    start = data.index(b"a.tokens")  # (cut inside the long string array)
    end = data.index(b"tok4999") + 7
    (tmp_path / "cut.gguf").write_bytes(data[: start + int((end - start) * cut)])
    with pytest.raises((ValueError, IndexError)):
        FastReader(tmp_path / "cut.gguf")
    with pytest.raises(InspectError, match="unreadable GGUF") as e:
        open_gguf(tmp_path / "cut.gguf", require_arch=False)
    assert "\n" not in str(e.value)


def test_a_gguf_py_with_other_internals_is_read_its_own_way(tmp_path, monkeypatch):
    path = ensure_default_model(tmp_path)

    def changed(self, *args):
        raise AttributeError("'FastReader' object has no attribute '_something'")

    monkeypatch.setattr(FastReader, "_get_field_parts", changed)
    reader = open_gguf(path)
    assert type(reader) is GGUFReader
    same(reader, GGUFReader(path))


def test_a_string_array_that_is_not_utf8_opens_as_gguf_py_opens_it(tmp_path):
    """The file opens (dgemma list, /api/tags still list it); reading that field fails, as with GGUFReader."""
    w = GGUFWriter(str(tmp_path / "bad.gguf"), "diffusion-gemma")
    w.add_key_value("a.bad", [b"ok", b"\xff\xfe"], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    w.add_array("a.good", ["x", "y"])
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    fast, ref = FastReader(tmp_path / "bad.gguf"), GGUFReader(tmp_path / "bad.gguf")
    assert not isinstance(fast.fields["a.bad"], ArrayField) and isinstance(fast.fields["a.good"], ArrayField)
    for reader in (fast, ref):
        with pytest.raises(UnicodeDecodeError):
            reader.fields["a.bad"].contents()
    assert fast.fields["a.good"].contents() == ["x", "y"] and fast.fields["a.bad"].contents(0) == "ok"


def test_a_gguf_py_that_builds_fields_without_push_field_is_caught(tmp_path, monkeypatch):
    """Were the arrays read at once never made into fields (their contents would read as empty), FastReader
    refuses, and open_gguf reads the file with GGUFReader."""
    path = write(tmp_path / "all.gguf", nested=False)
    monkeypatch.setattr(FastReader, "_push_field", GGUFReader._push_field)
    with pytest.raises(TypeError, match="does not know"):
        FastReader(path)
    reader = open_gguf(path, require_arch=False)
    assert type(reader) is GGUFReader and reader.fields["a.str"].contents() == ARRAYS["a.str"][0]


def test_a_damaged_string_count_fails_at_once(tmp_path):
    path = write(tmp_path / "all.gguf", nested=False)
    data = bytearray(path.read_bytes())
    at = data.index(b"a.tokens") + len(b"a.tokens") + 4 + 4  # key, value type ARRAY, element type STRING
    data[at:at + 8] = (2**62).to_bytes(8, "little")
    (tmp_path / "damaged.gguf").write_bytes(data)
    with pytest.raises(ValueError, match="runs past the end"):
        FastReader(tmp_path / "damaged.gguf")
