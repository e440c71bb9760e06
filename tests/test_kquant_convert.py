"""K presets end to end: convert a 256-wide model, read it back, run it, measure what it costs."""

from __future__ import annotations

from collections import Counter

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader

from dgemma import quant
from dgemma.convert import convert
from dgemma.convert.tiny import TinySpec
from dgemma.plugin.engine import Engine, GenerateOptions
from dgemma.plugin.quant_eval import evaluate
from test_convert import expected_gguf_name, hf_tensors

# rows of 256 so K-quants apply, and expert rows of 288 (like the 26B's 704: a multiple of 32, not of 256)
K256 = TinySpec(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
                num_global_key_value_heads=1, head_dim=64, global_head_dim=128, moe_intermediate_size=288,
                sliding_window=16, max_shard_size="2MB", seed=5)
PRESETS = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_K_S", "Q3_K_M", "Q2_K"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory, checkpoint_factory):
    ckpt = checkpoint_factory(K256)
    d = tmp_path_factory.mktemp("kq")
    for p in ["F32", *PRESETS]:
        convert(ckpt, d / f"{p}.gguf", p, quiet=True)
    return ckpt, d


@pytest.mark.parametrize("preset", PRESETS)
def test_bytes_are_our_quantizer_of_the_source(converted, preset):
    ckpt, d = converted
    reader = GGUFReader(d / f"{preset}.gguf")
    source = {expected_gguf_name(k, K256.num_hidden_layers): v for k, v in hf_tensors(ckpt).items()}
    kinds = Counter()
    for t in reader.tensors:
        if t.name not in source:
            continue
        kinds[t.tensor_type.name] += 1
        values = source[t.name].float().numpy()
        if t.tensor_type == Q.F32:
            continue
        ours = np.ascontiguousarray(t.data).view(np.uint8).reshape(-1)
        np.testing.assert_array_equal(ours, quant.quantize(values, t.tensor_type).reshape(-1), err_msg=t.name)
        back = gguf.quants.dequantize(np.ascontiguousarray(t.data).view(np.uint8), t.tensor_type)
        assert back.size == values.size
    k_types = {"Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    if preset != "Q8_0":
        assert k_types & set(kinds), kinds
    # expert down rows of 288 fall back to 32-block types, as llama.cpp does
    down = next(t for t in reader.tensors if t.name == "blk.0.ffn_down_exps.weight")
    assert down.tensor_type in (Q.Q8_0, Q.Q5_0, Q.Q5_1, Q.Q4_0)


def test_quantized_files_run_and_cost_more_as_bits_drop(converted):
    _, d = converted
    ref = Engine.load(d / "F32.gguf")
    results = evaluate(ref, [Engine.load(d / f"{p}.gguf") for p in ("Q8_0", "Q4_K_M", "Q2_K")], n_cases=2)
    klds = [r.mean_kld for r in results]
    assert 0 < klds[0] < klds[1] < klds[2]
    events = list(Engine.load(d / "Q2_K.gguf").generate([2, 105, 40], GenerateOptions(seed=1, max_tokens=16, steps=4)))
    assert events[-1].eval_count <= 16
