"""dgemma.quant against gguf-py's reference quantizers (themselves bit-exact with ggml's *_ref)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dgemma import quant

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0]


def rows(kind: str, shape: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(abs(hash(kind)) % 2**32)
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
        return (rng.standard_normal(shape) * 6e4).astype(np.float32)
    if kind == "halves":  # values landing exactly on .5 after scaling: roundf ties away from zero
        x = np.tile(np.arange(-16, 16, dtype=np.float32) + 0.5, (shape[0], shape[1] // 32))
        x[:, 0] = 127.0
        return x
    raise ValueError(kind)


KINDS = ["normal", "heavy_tailed", "zeros", "constant", "tiny", "huge", "halves"]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 32), (7, 96), (3, 704)])
def test_bytes_equal_gguf_py(qtype, kind, shape):
    x = rows(kind, shape)
    ours = quant.quantize(x, qtype)
    ref = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
    assert ours.shape == quant.byte_shape(shape, qtype) == ref.shape
    np.testing.assert_array_equal(ours, ref)
    back = quant.dequantize(ours, qtype)
    assert back.shape == shape
    np.testing.assert_array_equal(back, gguf.quants.dequantize(ref, qtype).reshape(shape))


def test_nan_and_inf_survive_float_types():
    x = np.array([[np.nan, np.inf, -np.inf, 1.0, -0.0, 65504.0, 1e-8, 3.0e38]], np.float32)
    for qtype in (Q.F16, Q.BF16):
        ref = np.ascontiguousarray(gguf.quants.quantize(x, qtype)).view(np.uint8)
        np.testing.assert_array_equal(quant.quantize(x, qtype), ref)


def test_q8_0_error_is_bounded_by_half_a_step():
    x = rows("normal", (64, 256))
    back = quant.dequantize(quant.quantize(x, Q.Q8_0), Q.Q8_0)
    step = np.abs(x.reshape(-1, 32)).max(axis=1, keepdims=True) / 127  # [blocks, 1]
    err = np.abs(back - x).reshape(-1, 32)
    # half a step from rounding, plus up to 127 times the f16 rounding of the scale (2^-11 relative)
    assert (err <= step * (0.5 + 127 * 2.0**-11) + 1e-7).all()


def test_rows_not_multiple_of_block_are_refused():
    assert not quant.can_quantize((4, 48), Q.Q8_0)
    with pytest.raises(quant.QuantError, match="not a multiple of 32"):
        quant.quantize(np.zeros((4, 48), np.float32), Q.Q8_0)
    with pytest.raises(quant.QuantError, match="not implemented"):
        quant.qtype_class(Q.IQ2_XXS)
