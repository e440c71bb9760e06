"""The training objective (train/objective.py): the merged decoder (one row per window, block mask) is
the same function of the same draws as the plain one (one decoder row per canvas)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # train/ is a folder of the repository, not a package

pytest.importorskip("transformers")
from train import objective as O  # noqa: E402

SPEC = O.ModelSpec(vocab_size=300, hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                   num_global_key_value_heads=1, head_dim=16, global_head_dim=32, num_experts=4, top_k_experts=2,
                   moe_intermediate_size=32, sliding_window=7, canvas_length=3,
                   layer_types=("sliding_attention", "full_attention", "sliding_attention"))


@pytest.fixture(scope="module")
def model():
    m = O.make_model(SPEC, seed=3, qk_norm_init=True)
    m.config.text_config._experts_implementation = "eager"
    return m


def _batch(B: int = 3, n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    offsets = torch.tensor([1, 5, 2][:B])
    T = int(offsets.max()) + n * SPEC.canvas_length + 2
    return torch.randint(3, SPEC.vocab_size, (B, T), generator=g), offsets


def _run(model, merged: bool, sc, t=None, seed: int = 7):
    x, offsets = _batch()
    router = O.Router(model)
    try:
        out = O.forward(model, x, offsets, 4, torch.Generator().manual_seed(seed), t=t, sc=sc, sc_prob=0.5,
                        encoder_ar_weight=1.0, balance_weight=0.01, router=router, merged=merged)
    finally:
        for h in router.hooks:
            h.remove()
    model.zero_grad(set_to_none=True)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("sc", ["none", "all", "some", "drawn"])
def test_merged_decoder_equals_one_row_per_canvas(model, sc):
    R = 3 * 4
    choice = {"none": torch.zeros(R, dtype=torch.bool), "all": torch.ones(R, dtype=torch.bool),
              "some": torch.arange(R) % 3 == 1, "drawn": None}[sc]
    t = torch.linspace(0.05, 0.95, R) if sc == "some" else None
    plain, g_plain = _run(model, False, choice, t)
    fast, g_fast = _run(model, True, choice, t)
    torch.testing.assert_close(fast.per_canvas, plain.per_canvas, rtol=0, atol=2e-5)
    for name in ("loss", "raw", "encoder_ar", "balance"):
        torch.testing.assert_close(getattr(fast, name), getattr(plain, name), rtol=0, atol=2e-5)
    assert g_fast.keys() == g_plain.keys() and len(g_fast) > 20
    for name, g in g_plain.items():
        torch.testing.assert_close(g_fast[name], g, rtol=1e-3, atol=1e-5, msg=name)


def test_merged_masks_hide_other_canvases_and_old_cache():
    starts = torch.tensor([[4, 6, 8]])  # one window, C = 2, sliding window 3 (sees the last 2 cached)
    m = O.merged_decoder_masks(starts, T=10, C=2, window=3)
    full, sliding = m["full_attention"][0, 0], m["sliding_attention"][0, 0]  # [6, 16]
    assert full.shape == (6, 16)
    # the second canvas (queries 2, 3, start 6) sees cache 0..5 and its own keys 12, 13 only
    assert full[2].nonzero().squeeze(1).tolist() == [0, 1, 2, 3, 4, 5, 12, 13]
    assert sliding[3].nonzero().squeeze(1).tolist() == [4, 5, 12, 13]
    # agrees with the one-row-per-canvas mask, canvas by canvas
    plain = O.decoder_masks(starts[0], T=10, C=2, window=3)
    for b in range(3):
        for name in ("full_attention", "sliding_attention"):
            row = m[name][0, 0, 2 * b: 2 * b + 2]
            assert torch.equal(row[:, :10], plain[name][b, 0, :, :10])
            assert torch.equal(row[:, 10 + 2 * b: 12 + 2 * b], plain[name][b, 0, :, 10:])
            assert not row[:, 10:].sum(1).gt(2).any()
