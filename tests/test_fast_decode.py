"""plugin/fast_decode.py (the engine's CPU decoder step for small models) against model.py's reference
decode: same logits within 1e-5 on the dense-expert and the grouped-expert paths, with and without
self-conditioning, after one or two encoded chunks; used only where it applies."""

from __future__ import annotations

import pytest
import torch
from conftest import SPECS, WIDE_SPEC
from dgemma.convert import convert
from dgemma.plugin import fast_decode
from dgemma.plugin.engine import Engine
from dgemma.plugin.fast_decode import FastDecoder
from dgemma.plugin.kv_cache import KVCache

FAST_SPECS = {
    "base": SPECS["base"],  # every expert on every token (one GEMM pair for all)
    "odd": SPECS["odd"],  # global layers in the middle, 3 experts top-1
    "grouped": WIDE_SPEC,  # expert shapes past DENSE_MOE_MAX_FLOP: one GEMM pair per used expert
}


@pytest.fixture(scope="module")
def engines(tmp_path_factory, checkpoint_factory):
    out = tmp_path_factory.mktemp("fast_decode")
    built: dict[str, Engine] = {}

    def get(name: str) -> Engine:
        if name not in built:
            path = out / f"{name}.gguf"
            convert(checkpoint_factory(FAST_SPECS[name]), path, "F32", quiet=True)
            built[name] = Engine.load(path)
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(FAST_SPECS))
@pytest.mark.parametrize("chunks", [(5,), (23, 11)])  # one prompt; a prompt then a finished canvas
def test_fast_decode_matches_reference(engines, name, chunks):
    engine = engines(name)
    cfg, model = engine.cfg, engine.model
    fast = engine.decode_step.__self__
    assert isinstance(fast, FastDecoder)
    assert {lw.dense_experts for lw in fast.layers} == {name != "grouped"}
    g = torch.Generator().manual_seed(sum(chunks))
    cache = KVCache()
    for n in chunks:
        model.encode(torch.randint(0, cfg.vocab_size, (1, n), generator=g), cache)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    sc = torch.softmax(torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=g) * 3, dim=-1)
    for probs in (None, sc):
        want = model.decode(canvas, cache, probs)
        got = fast.decode(canvas, cache, probs)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert cache.length == sum(chunks)  # the decoder reads the cache, never extends it


def test_fast_decode_only_where_it_applies(engines, monkeypatch):
    engine = engines("base")
    assert FastDecoder.supports(engine.model)
    step = engine.cfg.decode_flops_per_token * engine.cfg.canvas_length
    monkeypatch.setattr(fast_decode, "FAST_DECODE_MAX_FLOP", step - 1)
    assert not FastDecoder.supports(engine.model)  # large steps: the GEMMs dominate, no weight copies
    reloaded = Engine.load(engine.path)
    assert reloaded.decode_step == reloaded.model.decode
