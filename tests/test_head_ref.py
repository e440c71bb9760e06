"""The fused vocabulary head's torch contract (plugin/cuda/head_ref.py): tile by tile equals the full logits."""

from __future__ import annotations

import pytest
import torch

from dgemma.plugin.cuda.head_ref import head_stats_reference, head_stats_tiled


@pytest.mark.parametrize(("L", "V", "D", "tile"), [(1, 37, 8, 5), (17, 1000, 64, 256), (8, 4096, 32, 4096), (5, 300, 16, 1)])
@pytest.mark.parametrize("softcap", [30.0, 0.0])
def test_tiles_merge_to_the_full_statistics(L, V, D, tile, softcap):
    g = torch.Generator().manual_seed(L * V + tile)
    h = torch.randn(L, D, generator=g, dtype=torch.float64) * 2
    embed = torch.randn(V, D, generator=g, dtype=torch.float64)
    for temperature in (0.4, 0.8):
        ref = head_stats_reference(h, embed, softcap, temperature)
        got = head_stats_tiled(h, embed, softcap, temperature, tile)
        assert torch.equal(got.argmax, ref.argmax)
        for name in ("max", "lse", "entropy", "sc"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-10, atol=1e-10, msg=name)


def test_float32_and_the_models_head():
    """In float32 at the trained default model's shapes (V 4096, D 256, canvas 8): within 1e-4."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(8, 256, generator=g)
    embed = torch.randn(4096, 256, generator=g) * 0.05
    ref = head_stats_reference(h, embed, 30.0, 0.4)
    got = head_stats_tiled(h, embed, 30.0, 0.4, tile=1000)
    assert torch.equal(got.argmax, ref.argmax)
    for name in ("max", "lse", "entropy", "sc"):
        torch.testing.assert_close(getattr(got, name), getattr(ref, name), rtol=1e-4, atol=1e-4, msg=name)


def test_ties_keep_the_lowest_index_across_tiles():
    embed = torch.zeros(10, 4, dtype=torch.float64)
    embed[3, 0] = embed[7, 0] = 1.0  # the same logit in two tiles
    h = torch.tensor([[2.0, 0, 0, 0]], dtype=torch.float64)
    assert head_stats_tiled(h, embed, 0.0, 1.0, tile=4).argmax.item() == 3 == head_stats_reference(h, embed, 0.0, 1.0).argmax.item()


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match=r"h must be \[L, D\]"):
        head_stats_tiled(torch.zeros(2, 3), torch.zeros(5, 4), 0.0, 1.0)
    with pytest.raises(ValueError, match="temperature > 0"):
        head_stats_tiled(torch.zeros(2, 4), torch.zeros(5, 4), 0.0, 0.0)
