"""dgemma.quant's Q4_0, Q5_0, Q5_1 and K-quants against the real libggml (llama-cpp-python's bundled copy).

Our bytes must equal `ggml_quantize_chunk(type, src, dst, 0, nrows, n_per_row, imatrix=NULL)`,
which runs the `quantize_row_*_ref` reference quantizers for these types. Equality is exact: the
bundled libggml-base is compiled without FMA (x86-64 baseline flags; `objdump -d` shows no vfmadd),
so the C never fuses a*b+c and plain float32 numpy reproduces it. (A build that does contract,
e.g. -march=native -ffp-contract=fast, or aarch64 with GCC's default, is a different reference:
measured against such a build 65-99.7% of K-quant blocks are identical; see quant/kquants.py.)
The share of identical blocks per type is printed at the end of the run.
"""

from __future__ import annotations

import ctypes
import importlib.util
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dgemma import quant
from dgemma.quant import kquants

LEGACY = [Q.Q4_0, Q.Q5_0, Q.Q5_1]
KQUANTS = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
TYPES = LEGACY + KQUANTS
KINDS = ["normal", "heavy_tailed", "zeros", "constant", "tiny", "huge", "mixed"]

_identical: dict[str, list[int]] = {}  # type name -> [identical blocks, blocks]


def _load_ggml():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    libdir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll", "libggml.so"):
        try:
            lib = ctypes.CDLL(str(libdir / name))
            fn = lib.ggml_quantize_chunk
        except (OSError, AttributeError):
            continue
        # size_t ggml_quantize_chunk(enum ggml_type, const float * src, void * dst,
        #                            int64_t start, int64_t nrows, int64_t n_per_row, const float * imatrix)
        fn.restype = ctypes.c_size_t
        fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_int64, ctypes.c_void_p]
        return fn
    return None


_GGML = _load_ggml()


@pytest.fixture(scope="module")
def ggml_quantize():
    if _GGML is None:
        pytest.skip("libggml (llama-cpp-python) cannot be loaded")

    def run(x: np.ndarray, qtype: Q) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        nrows, n_per_row = x.shape
        out = np.zeros(quant.byte_shape(x.shape, qtype), np.uint8)
        written = _GGML(int(qtype), x.ctypes.data, out.ctypes.data, 0, nrows, n_per_row, None)
        assert written == out.nbytes
        return out

    return run


@pytest.fixture(scope="module", autouse=True)
def identical_share_report(request):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if reporter is None or capture is None or not _identical:
        return
    with capture.global_and_fixture_disabled():  # shown with -q too, outside the captured output
        reporter.write_line("")
        reporter.write_line("bit-identical blocks vs libggml ggml_quantize_chunk:")
        for name, (same, total) in _identical.items():
            reporter.write_line(f"  {name:5s} {same}/{total} = {same / total:.4%}")


def rows(kind: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng([seed, KINDS.index(kind), *shape])
    if kind == "normal":
        return rng.standard_normal(shape).astype(np.float32)
    if kind == "heavy_tailed":
        return (rng.standard_cauchy(shape) * 3).astype(np.float32)
    if kind == "zeros":
        return np.zeros(shape, np.float32)
    if kind == "constant":
        return np.full(shape, -0.75, np.float32)
    if kind == "tiny":
        return (rng.standard_normal(shape) * 1e-30).astype(np.float32)
    if kind == "huge":
        return (rng.standard_normal(shape) * 1e4).astype(np.float32)
    if kind == "mixed":
        # every 16 values a different regime: magnitudes 1e-40..1e6, big offsets, all-zero, sparse,
        # one-signed, values on quarter steps, Cauchy, signs only; and scattered -0.0
        n, m = shape[0], shape[1] // 16
        g = rng.standard_normal((n, m, 16))
        scale = 10.0 ** rng.uniform(-40, 6, (n, m, 1))
        off = rng.choice([0, 0, 1, -1, 100, -1e4], (n, m, 1)) * scale * rng.uniform(0, 50, (n, m, 1))
        regime = rng.integers(0, 8, (n, m, 1))
        g = np.where(regime == 0, 0.0, g)
        g = np.where(regime == 1, np.round(g * 4) / 4, g)
        g = np.where(regime == 2, np.abs(g), g)
        g = np.where(regime == 3, -np.abs(g), g)
        g = np.where(regime == 4, (rng.random(g.shape) < 0.1) * g, g)
        g = np.where(regime == 5, rng.standard_cauchy(g.shape), g)
        g = np.where(regime == 6, np.sign(g), g)
        x = (g * scale + off).reshape(shape)
        return np.where(rng.random(shape) < 0.01, -0.0, x).astype(np.float32)
    raise ValueError(kind)


def widths(qtype: Q) -> list[int]:
    return [32, 704, 2112] if qtype in LEGACY else [256, 768, 2048]


def assert_matches_ggml(ours: np.ndarray, ref: np.ndarray, qtype: Q) -> None:
    assert ours.shape == ref.shape and ours.dtype == np.uint8
    ts = quant.qtype_class(qtype).type_size
    same = (ours.reshape(-1, ts) == ref.reshape(-1, ts)).all(axis=1)
    tally = _identical.setdefault(qtype.name, [0, 0])
    tally[0] += int(same.sum())
    tally[1] += same.size
    assert same.all(), (
        f"{qtype.name}: {(~same).sum()} of {same.size} blocks differ from libggml "
        f"(identical share {same.mean():.4%}), first at {np.flatnonzero(~same)[:5]}"
    )


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", KINDS)
def test_bytes_equal_libggml(ggml_quantize, qtype, kind):
    nrows = 48 if kind in ("normal", "heavy_tailed", "mixed") else 4
    for width in widths(qtype):
        x = rows(kind, (nrows, width))
        ours = quant.quantize(x, qtype)
        assert_matches_ggml(ours, ggml_quantize(x, qtype), qtype)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", ["normal", "heavy_tailed", "mixed"])
def test_dequantize_equals_gguf_py(ggml_quantize, qtype, kind):
    x = rows(kind, (3, widths(qtype)[-1]), seed=1)
    for data in (quant.quantize(x, qtype), ggml_quantize(x, qtype)):
        with np.errstate(over="ignore", invalid="ignore"):  # "mixed" overflows some fp16 scales to inf
            back, ref = quant.dequantize(data, qtype), gguf.quants.dequantize(data, qtype)
        assert back.shape == x.shape and back.dtype == np.float32
        np.testing.assert_array_equal(back, ref.reshape(x.shape))


def test_dequantize_random_bytes_equals_gguf_py():
    """Every bit pattern decodes as gguf-py decodes it (scales with all bits set, NaN/inf fp16 scales)."""
    rng = np.random.default_rng(7)
    for qtype in TYPES:
        data = rng.integers(0, 256, (4, 8 * quant.qtype_class(qtype).type_size), dtype=np.uint8)
        with np.errstate(over="ignore", invalid="ignore"):
            ours, ref = quant.dequantize(data, qtype), gguf.quants.dequantize(data, qtype)
        np.testing.assert_array_equal(ours, ref.reshape(ours.shape))


def test_types_are_registered():
    for qtype in TYPES:
        cls = quant.qtype_class(qtype)
        assert (cls.block_size, cls.type_size) == gguf.GGML_QUANT_SIZES[qtype]
        assert quant.can_quantize((2, cls.block_size * 3), qtype)
        assert not quant.can_quantize((2, cls.block_size + 16), qtype)


def test_chunked_and_threaded_paths_give_the_same_bytes(ggml_quantize, monkeypatch):
    """Arrays over the chunk size are split, and over the parallel threshold run on two threads."""
    x = rows("normal", (80, 16384), seed=2)  # 1.3M values: above the threading threshold
    ref = ggml_quantize(x, Q.Q4_K)
    monkeypatch.setattr(kquants, "_THREADS", 2)
    assert x.size > kquants._PARALLEL_MIN and x.size > kquants.CHUNK_VALUES
    threaded = quant.quantize(x, Q.Q4_K)
    monkeypatch.setattr(kquants, "_THREADS", 1)
    monkeypatch.setattr(kquants, "CHUNK_VALUES", 1 << 14)
    serial = quant.quantize(x, Q.Q4_K)
    np.testing.assert_array_equal(threaded, serial)
    assert_matches_ggml(threaded, ref, Q.Q4_K)


def test_nearest_int_is_ggmls_magic_number_trick():
    v = np.array([0.5, 1.5, 2.5, -0.5, -1.5, 3.49999, -7.5, 4194303.0, 1e7, -1e9, np.inf, np.nan], np.float32)
    # in range: round half to even; out of range: the low mantissa bits of x + 1.5 * 2**23, as in ggml
    expected = [0, 2, 2, 0, -2, 3, -8, 4194303, -1291456, 2845480, -4194304, 0]
    np.testing.assert_array_equal(kquants.nearest_int(v), expected)
