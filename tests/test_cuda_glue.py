"""The cuda backend's Python side on the CPU: plugin/cuda/weights.py's quantized weight objects and the
model code that calls them, with the csrc kernels replaced by their references (ops.*_reference, which
tests/test_cuda_kernels.py compares with the kernels on a GPU). This catches shape and wiring bugs in
the backend without a GPU; it says nothing about the kernels themselves."""

from __future__ import annotations

import pytest
import torch

from dgemma.plugin.cuda import ops
from dgemma.plugin.cuda.weights import QuantExperts, QuantLinear, load_cuda_weights
from dgemma.plugin.default_model import ensure_default_model
from dgemma.plugin.engine import Engine
from dgemma.plugin.inspect import open_gguf
from dgemma.plugin.model import DiffusionGemma, KVCache, grouped_experts


@pytest.fixture()
def kernels_as_references(monkeypatch):
    monkeypatch.setattr(ops, "qmatmul", ops.qmatmul_reference)
    monkeypatch.setattr(ops, "moe_qmatmul", ops.moe_qmatmul_reference)


@pytest.fixture(scope="module")
def default_gguf(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("models"))


def test_cuda_weights_give_the_torch_backends_logits(default_gguf, kernels_as_references):
    ref = Engine.load(default_gguf)
    cfg = ref.cfg
    weights = load_cuda_weights(open_gguf(default_gguf), cfg, default_gguf, device="cpu")
    assert isinstance(weights.layers[0].gate_up_exps, QuantExperts) and isinstance(weights.head, QuantLinear)
    gpu_like = DiffusionGemma(cfg, weights)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, cfg.vocab_size, (1, 11), generator=g)
    canvas = torch.randint(3, cfg.vocab_size, (1, cfg.canvas_length), generator=g)
    c1, c2 = KVCache(), KVCache()
    ref.model.encode(prompt, c1)
    gpu_like.encode(prompt, c2)
    a = ref.model.decode(canvas, c1)
    b = gpu_like.decode(canvas, c2)
    assert a.shape == b.shape and float((a - b).abs().max()) < 1e-3
    sc = torch.softmax(a / 0.8, dim=-1)
    assert float((ref.model.decode(canvas, c1, sc) - gpu_like.decode(canvas, c2, sc)).abs().max()) < 1e-3


def test_grouped_experts_through_quant_experts_match_float_experts(kernels_as_references):
    from gguf import GGMLQuantizationType as Q

    from dgemma import quant

    g = torch.Generator().manual_seed(1)
    E, Fe, D, N, K = 5, 32, 64, 9, 2
    gate_up = torch.randn(E, 2 * Fe, D, generator=g) * 0.1
    down = torch.randn(E, D, Fe, generator=g) * 0.1
    q = lambda w: torch.from_numpy(quant.quantize(w.reshape(-1, w.shape[-1]).numpy(), Q.Q8_0)).view(torch.uint8)  # noqa: E731
    deq = lambda w: torch.from_numpy(quant.dequantize(q(w).numpy(), Q.Q8_0)).view_as(w)  # noqa: E731
    qgu = QuantExperts(q(gate_up).view(E, 2 * Fe, -1), Q.Q8_0, 2 * Fe, D)
    qdown = QuantExperts(q(down).view(E, D, -1), Q.Q8_0, D, Fe)
    x = torch.randn(N, D, generator=g)
    top_w, top_i = torch.rand(N, K, generator=g), torch.stack([torch.tensor([0, 3])] * N)  # experts 1, 2, 4 get none
    scale = torch.rand(E, generator=g) + 0.5
    want = grouped_experts(x, top_w, top_i, scale, deq(gate_up), deq(down))
    got = grouped_experts(x, top_w, top_i, scale, qgu, qdown)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # --pad-experts: down rows zero-padded from Fe to 2Fe columns, the activations padded to match
    padded = QuantExperts(q(torch.nn.functional.pad(down, (0, Fe))).view(E, D, -1), Q.Q8_0, D, 2 * Fe, k_in=Fe)
    torch.testing.assert_close(grouped_experts(x, top_w, top_i, scale, qgu, padded), want, rtol=1e-4, atol=1e-5)


def test_cuda_weights_generate_the_torch_backends_tokens(default_gguf, kernels_as_references):
    from dgemma.plugin.engine import GenerateOptions

    ref = Engine.load(default_gguf)
    model = DiffusionGemma(ref.cfg, load_cuda_weights(open_gguf(default_gguf), ref.cfg, default_gguf, device="cpu"))
    gpu_like = Engine(default_gguf, ref.cfg, ref.tokenizer, model, 0, torch.device("cpu"))
    opts = GenerateOptions(seed=5, max_tokens=24)
    want = [e for e in ref.generate("Once upon a time", opts)]
    got = [e for e in gpu_like.generate("Once upon a time", opts)]
    assert [getattr(e, "text", None) for e in got] == [getattr(e, "text", None) for e in want]
    assert got[-1].eval_count == want[-1].eval_count > 0
