"""`dgemma quantize`: a GGUF requantized from its F32/BF16 conversion equals the file convert writes from the
checkpoint (the reference), field for field and byte for byte."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import SPECS
from gguf import GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter

from dgemma.convert import ConvertError, convert
from dgemma.convert.plan import make_plan
from dgemma.convert import requant
from dgemma.convert.requant import requantize
from dgemma.plugin.inspect import field_value, open_gguf


def same_file(a: Path, b: Path) -> None:
    ra, rb = GGUFReader(a), GGUFReader(b)
    keys = {k for k in ra.fields if not k.startswith("GGUF.")}
    assert keys == {k for k in rb.fields if not k.startswith("GGUF.")}
    for k in keys:
        assert field_value(ra, k) == field_value(rb, k), k
    assert [t.name for t in ra.tensors] == [t.name for t in rb.tensors]
    for ta, tb in zip(ra.tensors, rb.tensors):
        assert ta.tensor_type == tb.tensor_type and list(ta.shape) == list(tb.shape), ta.name
        assert np.asarray(ta.data).tobytes() == np.asarray(tb.data).tobytes(), ta.name


@pytest.fixture(scope="module")
def floats(checkpoint_factory, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per test model: its checkpoint and its conversion in F32 (bf16_wide: BF16, its checkpoint's dtype)."""
    out = {}
    d = tmp_path_factory.mktemp("floats")
    for key, spec in SPECS.items():
        ckpt = checkpoint_factory(spec)
        kind = "BF16" if spec.dtype == "bfloat16" else "F32"
        out[key] = ckpt, convert(ckpt, d / f"{key}-{kind}.gguf", kind, quiet=True).path
    return out


@pytest.mark.parametrize("key", sorted(SPECS))
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K_M", "Q2_K", "F16"])
def test_requantized_equals_converted(floats, tmp_path, key, kind):
    ckpt, source = floats[key]
    direct = convert(ckpt, tmp_path / "direct.gguf", kind, quiet=True).path
    made = requantize(source, tmp_path / "made.gguf", kind, quiet=True).path
    same_file(made, direct)
    assert not list(tmp_path.glob("*.partial"))


def test_fit_plans_as_convert_does(floats, tmp_path):
    from dgemma.quant.planner import GiB

    ckpt, source = floats["base"]
    floor = make_plan(ckpt, "Q4_K_M", "0.001GB").fit.breakdown.total  # (the lowest types' estimate)
    budget = f"{(floor + 4096) / GiB:.15f}GiB"
    plan = make_plan(ckpt, "Q4_K_M", budget)
    assert plan.fit.fits and plan.overrides() != make_plan(ckpt, "Q4_K_M").overrides()
    direct = convert(ckpt, tmp_path / "direct.gguf", "Q4_K_M", quiet=True, overrides=plan.overrides()).path
    same_file(requantize(source, tmp_path / "made.gguf", "Q4_K_M", fit_size=budget, quiet=True).path, direct)
    with pytest.raises(ConvertError, match="--fit 1KB: no plan fits"):
        requantize(source, tmp_path / "none.gguf", "Q4_K_M", fit_size="1KB", quiet=True)


def test_a_quantized_source_needs_the_flag(floats, tmp_path):
    ckpt, source = floats["base"]
    q8 = requantize(source, tmp_path / "q8.gguf", "Q8_0", quiet=True).path
    with pytest.raises(ConvertError, match="already quantized \\(Q8_0\\).*--allow-requantize"):
        requantize(q8, tmp_path / "q4.gguf", "Q4_K_M", quiet=True)
    again = requantize(q8, tmp_path / "q8b.gguf", "Q8_0", allow_requantize=True, quiet=True).path
    same_file(again, q8)  # (tensors already in their type are copied as they are)
    # Q8_0 -> Q4_K_M goes through the Q8_0 values: as Q8_0 -> F32 -> Q4_K_M
    q4 = requantize(q8, tmp_path / "q4.gguf", "Q4_K_M", allow_requantize=True, quiet=True).path
    f32 = requantize(q8, tmp_path / "f32.gguf", "F32", allow_requantize=True, quiet=True).path
    same_file(q4, requantize(f32, tmp_path / "q4b.gguf", "Q4_K_M", quiet=True).path)
    assert {t.tensor_type for t in GGUFReader(q4).tensors} != {t.tensor_type for t in GGUFReader(q8).tensors}


def test_bad_input_is_one_line_and_writes_nothing(floats, tmp_path):
    _, source = floats["base"]
    junk = tmp_path / "junk.gguf"
    junk.write_text("nope")
    cases = [((junk, tmp_path / "o.gguf"), "not a GGUF"),
             ((source, source), "already exists"),
             ((source, tmp_path / "no" / "o.gguf"), "does not exist"),
             ((source, tmp_path / "o.gguf", "Q9_X"), "--type 'Q9_X' is not supported")]
    for args, message in cases:
        with pytest.raises(ConvertError, match=message) as e:
            requantize(*args, quiet=True)
        assert "\n" not in str(e.value)
    with pytest.raises(ConvertError, match="is the source file"):
        requantize(source, source, "Q8_0", force=True, quiet=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.gguf"]


def test_cli(floats, tmp_path):
    ckpt, source = floats["odd"]
    env = {**os.environ}
    run = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "quantize", str(source), str(tmp_path / "q.gguf"),
                          "--type", "q4_k_m"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "wrote" in run.stdout and "Q4_K_M" in run.stdout
    same_file(tmp_path / "q.gguf", convert(ckpt, tmp_path / "d.gguf", "Q4_K_M", quiet=True).path)
    again = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "quantize", str(tmp_path / "q.gguf"),
                            str(tmp_path / "r.gguf")], capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 1 and "--allow-requantize" in again.stderr and again.stderr.count("\n") == 1


def test_create_quantize_cli(floats, tmp_path):
    """`dgemma create NAME -q TYPE`: the model's own file is FROM's quantized, as `dgemma quantize` writes it."""
    _, source = floats["odd"]
    (tmp_path / "Modelfile").write_text(f"FROM {source}\nSYSTEM Small.\n")
    models = tmp_path / "models"
    env = {**os.environ, "DGEMMA_MODELS": str(models)}
    run = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "create", "small", "-q", "q8_0", "-f",
                          str(tmp_path / "Modelfile")], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    same_file(models / "small.gguf", requantize(source, tmp_path / "q8.gguf", "Q8_0", quiet=True).path)
    # a quantized FROM is refused, and nothing is left behind
    (tmp_path / "Modelfile").write_text("FROM small\n")
    bad = subprocess.run([sys.executable, "-m", "dgemma.plugin.cli", "create", "small2", "-q", "q4_K_M", "-f",
                          str(tmp_path / "Modelfile")], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 1 and "already quantized (Q8_0)" in bad.stderr and bad.stderr.count("\n") == 1
    assert sorted(p.name for p in models.iterdir() if not p.name.startswith(".")) == ["registry.json", "small.gguf"]
    assert not list(models.glob(".*.partial"))


def rewrite(source: Path, out: Path, *, endian: GGUFEndian = GGUFEndian.LITTLE,
            embd: GGMLQuantizationType | None = None) -> Path:
    """An F32 model written again: in another byte order, or with token_embd in another (gguf-py's) type."""
    import gguf

    r = open_gguf(source)
    w = GGUFWriter(out, "diffusion-gemma", endianess=endian)
    requant._metadata(w, r, 0)
    for t in r.tensors:
        values = np.array(t.data)
        if embd is not None and t.name == "token_embd.weight":
            w.add_tensor(t.name, gguf.quants.quantize(values, embd), raw_dtype=embd)
        else:
            w.add_tensor(t.name, values)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return out


def test_what_cannot_be_copied_faithfully_is_refused(floats, tmp_path):
    """A big-endian file, a tensor type dgemma does not read, an empty metadata array (gguf-py cannot write
    one): one-line errors before anything is written."""
    _, source = floats["base"]
    def with_kv(name: str, kv: bytes) -> Path:  # (64 bytes after the header: the tensor data stays aligned)
        assert len(kv) == 64
        data = bytearray(source.read_bytes())
        data[16:24] = (int.from_bytes(data[16:24], "little") + 1).to_bytes(8, "little")  # kv count
        data[24:24] = kv
        (tmp_path / name).write_bytes(data)
        return tmp_path / name

    key = b"x" * 40
    head = len(key).to_bytes(8, "little") + key
    empty = with_kv("empty.gguf", head + int(GGUFValueType.ARRAY).to_bytes(4, "little") +  # an empty INT32 array
                    int(GGUFValueType.INT32).to_bytes(4, "little") + (0).to_bytes(8, "little"))
    latin = with_kv("latin.gguf", head + int(GGUFValueType.STRING).to_bytes(4, "little") +  # a string, not UTF-8
                    (4).to_bytes(8, "little") + "café".encode("latin-1"))
    cases = [(rewrite(source, tmp_path / "big.gguf", endian=GGUFEndian.BIG), "other byte order"),
             (rewrite(source, tmp_path / "q41.gguf", embd=GGMLQuantizationType.Q4_1), "token_embd.weight' is Q4_1"),
             (empty, f"metadata '{key.decode()}' is an empty array"),
             (latin, f"metadata '{key.decode()}' holds a string that is not UTF-8")]
    for src, message in cases:
        with pytest.raises(ConvertError, match=message) as e:
            requantize(src, tmp_path / "out.gguf", "Q8_0", allow_requantize=True, quiet=True)
        assert "\n" not in str(e.value)
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob("*.partial"))
    same_file(rewrite(source, tmp_path / "little.gguf"), source)  # (the rewrite itself changes nothing)


def test_tensors_are_copied_and_quantized_a_slice_at_a_time(floats, tmp_path, monkeypatch):
    """Never a whole tensor in RAM (a 26B model's expert tensors are GBs): with small slices the files are the same."""
    _, source = floats["base"]
    whole = [requantize(source, tmp_path / f"{k}.gguf", k, quiet=True).path for k in ("F32", "Q8_0")]
    sizes = []
    real = requant._requantized

    def sliced(t, qtype, pool):
        for chunk in real(t, qtype, pool):
            sizes.append(chunk.nbytes)
            yield chunk

    monkeypatch.setattr(requant, "CHUNK_ELEMENTS", 256)
    monkeypatch.setattr(requant, "_requantized", sliced)
    for kind, ref in zip(("F32", "Q8_0"), whole):
        same_file(requantize(ref, tmp_path / f"{kind}-sliced.gguf", kind, allow_requantize=True, quiet=True).path, ref)
    biggest = max(t.n_bytes for t in GGUFReader(whole[0]).tensors)
    assert max(sizes) < biggest // 4


def test_a_model_quantized_from_another_names_it_as_its_parent(floats, tmp_path):
    from dgemma.plugin.modelfile import ModelSettings
    from dgemma.plugin.registry import Registry

    _, source = floats["odd"]
    reg = Registry(tmp_path / "models")
    reg.import_file(source, "floaty")
    reg.create("floaty", "floaty", ModelSettings(system="Base."))  # (its settings, which the quantized one keeps)
    entry = reg.create("small", "floaty", ModelSettings(parameters={"temperature": 0.5}), quantize="q8_0")
    assert entry.base == "floaty:latest" and entry.path != reg.resolve("floaty").path
    assert entry.settings.system == "Base." and entry.settings.parameters == {"temperature": 0.5}
    assert {t.tensor_type.name for t in GGUFReader(entry.path).tensors} >= {"Q8_0"}
