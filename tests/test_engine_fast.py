"""The torch engine's CPU shortcuts against their plain forms: fused Q/K/V and gate/up GEMMs, the dense
MoE path for tiny shapes, the sign-folded RoPE. (The engine as a whole is checked against transformers
in tests/test_engine.py; these pin each shortcut to the readable form it replaces.)"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import SPECS
from dgemma.convert import convert
from dgemma.plugin import model as M
from dgemma.plugin.config import ModelConfig
from dgemma.plugin.inspect import open_gguf
from dgemma.plugin.kv_cache import KVCache
from dgemma.plugin.weights import load_weights


@pytest.fixture(scope="module")
def gguf(tmp_path_factory, checkpoint_factory):
    path = tmp_path_factory.mktemp("fast") / "m.gguf"
    convert(checkpoint_factory(SPECS["base"]), path, "F32", quiet=True)
    return path


def load(path):
    reader = open_gguf(path)
    cfg = ModelConfig.from_gguf(reader, path)
    return cfg, load_weights(reader, cfg, path)


def unfused(w: M.Weights) -> M.Weights:
    """The same weights with Q/K/V and gate/up behind callables: fuse_projections() leaves them separate."""
    for lw in w.layers:
        for name in ("wq", "wk", "wv", "ffn_gate", "ffn_up"):
            t = getattr(lw, name)
            if t is not None:
                setattr(lw, name, functools.partial(F.linear, weight=t))
    return w


def test_fused_projections_match_separate_ones(gguf):
    cfg, w = load(gguf)
    fast = M.DiffusionGemma(cfg, w)
    slow = M.DiffusionGemma(cfg, unfused(load(gguf)[1]))
    assert all(lw.wqkv is not None and lw.ffn_gate_up is not None for lw in fast.w.layers)
    assert all(lw.wqkv is None and lw.ffn_gate_up is None for lw in slow.w.layers)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, cfg.vocab_size, (1, 11), generator=g)
    canvas = torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    sc = torch.softmax(torch.randn(1, cfg.canvas_length, cfg.vocab_size, generator=g), -1)
    caches = KVCache(), KVCache()
    for m, c in zip((fast, slow), caches):
        m.encode(prompt, c)
    for a, b in zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast.decode(canvas, caches[0], sc), slow.decode(canvas, caches[1], sc), atol=1e-5, rtol=1e-5)


def test_fusion_happens_once_and_shares_memory(gguf):
    cfg, w = load(gguf)
    M.DiffusionGemma(cfg, w)
    fused = [(lw.wqkv, lw.ffn_gate_up) for lw in w.layers]
    M.DiffusionGemma(cfg, w)  # a second model on the same weights does not fuse again
    for lw, (qkv, gu) in zip(w.layers, fused):
        assert lw.wqkv is qkv and lw.ffn_gate_up is gu
        base = qkv.untyped_storage().data_ptr()
        assert lw.wq.untyped_storage().data_ptr() == base and lw.wk.untyped_storage().data_ptr() == base
        assert lw.ffn_up.untyped_storage().data_ptr() == gu.untyped_storage().data_ptr()
        n_kv = lw.wk.shape[0]
        if lw.wv is None:  # global layer: the K rows twice (V = K)
            torch.testing.assert_close(qkv[-n_kv:], lw.wk, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 3, 17, 64])
def test_dense_moe_matches_grouped_experts(gguf, monkeypatch, n):
    cfg, w = load(gguf)
    m = M.DiffusionGemma(cfg, w)
    h = torch.randn(1, n, cfg.n_embd, generator=torch.Generator().manual_seed(n)) * 3
    monkeypatch.setattr(M, "DENSE_MOE_MAX_FLOP", float("inf"))
    dense = m.moe(0, h)
    monkeypatch.setattr(M, "DENSE_MOE_MAX_FLOP", 0.0)
    grouped = m.moe(0, h)
    torch.testing.assert_close(dense, grouped, atol=1e-5, rtol=1e-5)
    assert dense.abs().max() > 0


def test_sign_folded_rope_is_bit_identical():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 7, 3, 16, generator=g)
    ang = torch.randn(7, 8, generator=g) * 50
    emb = torch.cat((ang, ang), -1)
    cos, sin = emb.cos(), emb.sin()
    rotate_half = torch.cat((-x[..., 8:], x[..., :8]), -1)
    ref = x * cos[:, None] + rotate_half * sin[:, None]
    sin_signed = torch.cat((-sin[:, :8], sin[:, 8:]), -1)
    assert torch.equal(M.apply_rope(x, cos, sin_signed), ref)
