"""The cuda backend's Python side on the CPU: plugin/cuda/weights.py's quantized weight objects and the
model code that calls them, with the csrc kernels replaced by their references (ops.*_reference, which
tests/test_cuda_kernels.py compares with the kernels), and, where a test takes the `kernels` fixture
(tests/conftest.py), also with the kernels themselves run by the CPU emulator (tests/cuda_emu.py): the
whole backend, kernels included, against the torch backend without a GPU."""

from __future__ import annotations

import pytest
import torch

from cuda_util import cpu_cuda_weights, decode_both, held_bytes

from dgemma.plugin.cuda import ops
from dgemma.plugin.cuda.weights import QuantEmbedding, QuantExperts, QuantLinear
from dgemma.plugin.engine import Engine
from dgemma.plugin.kv_cache import KVCache
from dgemma.plugin.model import DiffusionGemma, grouped_experts


def test_cuda_weights_give_the_torch_backends_logits(default_gguf, kernels):
    ref = Engine.load(default_gguf)
    weights, cfg = cpu_cuda_weights(default_gguf)
    assert isinstance(weights.layers[0].gate_up_exps, QuantExperts) and isinstance(weights.head, QuantLinear)
    assert isinstance(weights.embed, QuantEmbedding) and weights.embed.data is weights.head.data  # one copy
    gpu_like = DiffusionGemma(cfg, weights)
    a, b, canvas, c1, c2 = decode_both(ref.model, gpu_like, 11)
    assert a.shape == b.shape and float((a - b).abs().max()) < 1e-3
    sc = torch.softmax(a / 0.8, dim=-1)
    assert float((ref.model.decode(canvas, c1, sc) - gpu_like.decode(canvas, c2, sc)).abs().max()) < 1e-3


@pytest.mark.parametrize("model", ["default", "canvas16"])
def test_vram_estimate_counts_what_the_cuda_weights_hold(request, model):
    """vram_estimate's figure for the weights (vram_plan's load check) is what cuda_weights loads: every GGML matrix as it is in the file,
    every vector as float32, the tied head once; beside them the KV cache it leaves room for, no CUDA context."""
    from dgemma.plugin.config import ModelConfig
    from dgemma.plugin.cuda.weights import vram_estimate
    from dgemma.plugin.inspect import open_gguf

    path = request.getfixturevalue(f"{model}_gguf")
    weights, cfg = cpu_cuda_weights(path)
    est = vram_estimate(open_gguf(path), ModelConfig.from_gguf(open_gguf(path), path))
    assert est.weights == held_bytes(weights)
    assert est.activations > 0 and est.kv_cache > 0 and est.cuda_context == 0
    assert est.total == est.weights + est.kv_cache + est.activations + est.workspace


def test_grouped_experts_through_quant_experts_match_float_experts(kernels):
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


def test_cuda_weights_generate_the_torch_backends_tokens(default_gguf, kernels):
    from dgemma.plugin.engine import GenerateOptions

    ref = Engine.load(default_gguf)
    model = DiffusionGemma(ref.cfg, cpu_cuda_weights(default_gguf)[0])
    gpu_like = Engine(default_gguf, ref.cfg, ref.tokenizer, model, 0, torch.device("cpu"))
    opts = GenerateOptions(seed=5, max_tokens=24)
    want = [e for e in ref.generate("Once upon a time", opts)]
    got = [e for e in gpu_like.generate("Once upon a time", opts)]
    assert [getattr(e, "text", None) for e in got] == [getattr(e, "text", None) for e in want]
    assert got[-1].eval_count == want[-1].eval_count > 0


def test_fused_sampler_path_generates_the_counter_tokens_without_logits(canvas16_gguf, kernels,
                                                                        monkeypatch):
    """rng counter with the cuda weights: model.decode_stats through QuantLinear.stats (head_ops.head_stats) and
    ops.accept_renoise on the canvas, as on a GPU, against the torch backend's logits-based counter
    sampler (plugin/sampler.logits_stats): the same canvases and step counts, and no matmul against the
    [V, D] head (no logits) on the fused path."""
    from dgemma.plugin.engine import DoneEvent, GenerateOptions

    ref = Engine.load(canvas16_gguf, rng="counter")
    V = ref.cfg.vocab_size
    assert ref.cfg.canvas_length == 16
    model = DiffusionGemma(ref.cfg, cpu_cuda_weights(canvas16_gguf)[0])
    fused = Engine(canvas16_gguf, ref.cfg, ref.tokenizer, model, 0, torch.device("cpu"), rng="counter")

    qmatmul = ops.qmatmul  # the reference, or the emulated kernel

    def no_logits(x, w, qtype, k):
        assert w.shape[0] != V, "the fused path multiplied by the vocabulary head"
        return qmatmul(x, w, qtype, k)

    monkeypatch.setattr(ops, "qmatmul", no_logits)
    renoised: list[int] = []
    # emulated, the fused head's 24 synchronisations per vocabulary row make a pass take 0.4 s: one canvas
    seeds, max_tokens = ((1, 2), 40) if kernels is None else ((1,), 16)
    for seed in seeds:
        opts = GenerateOptions(seed=seed, max_tokens=max_tokens, raw=True, eos_ids=set())
        want = list(ref.generate("abc", opts))[-1]
        opts.on_step = lambda info: renoised.append(int((~info.accepted).sum()))
        got = list(fused.generate("abc", opts))[-1]
        assert isinstance(got, DoneEvent) and got.canvases == want.canvases
        assert got.steps_per_canvas == want.steps_per_canvas and len(got.canvases) == -(-max_tokens // 16)
    assert sum(renoised) > 16  # positions were re-noised, and the next passes compared


def test_decode_stats_of_plain_weights_equal_the_logits_sampler(canvas16_gguf):
    """model.decode_stats (the fused head's contract) on the torch backend gives what the logits-based
    counter sampler computes: argmax, entropy, the Gumbel-max sample and sc = softmax @ E."""
    from dgemma.plugin.sampler import logits_stats

    engine = Engine.load(canvas16_gguf)
    m, cfg = engine.model, engine.cfg
    cache = KVCache()
    m.encode(torch.tensor([[5, 6, 7, 8]]), cache)
    canvas = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(4))
    t = torch.tensor(0.7)
    want = logits_stats(lambda c, sc: m.decode(c, cache, sc))(canvas, None, t, 123, 5)
    got = m.decode_stats(canvas, cache, None, float(t), 123, 5)
    assert torch.equal(got.argmax, want.argmax[0]) and torch.equal(got.sample, want.sample[0])
    torch.testing.assert_close(got.entropy, want.entropy[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sc, m.soft_embedding(want.sc)[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(got.sample, got.argmax)  # the draw is not the argmax: the comparison can fail
    # the next pass from the soft embedding equals the one from the probabilities
    again = m.decode_stats(canvas, cache, got.sc[None], float(t), 123, 6)
    want2 = logits_stats(lambda c, sc: m.decode(c, cache, sc))(canvas, want.sc, t, 123, 6)
    assert torch.equal(again.argmax, want2.argmax[0]) and torch.equal(again.sample, want2.sample[0])


def test_quant_embedding_rows_and_weighted_sum(kernels, monkeypatch):
    """QuantEmbedding's lookup and probs @ E (in row chunks, one chunk boundary inside V) against the
    dequantized table."""
    from gguf import GGMLQuantizationType as Q

    from dgemma import quant

    g = torch.Generator().manual_seed(2)
    V, D = 37, 64
    table = torch.randn(V, D, generator=g)
    data = torch.from_numpy(quant.quantize(table.numpy(), Q.Q8_0)).view(torch.uint8)
    deq = torch.from_numpy(quant.dequantize(data.numpy(), Q.Q8_0)).view(V, D)
    emb = QuantEmbedding(data, Q.Q8_0, V, D)
    monkeypatch.setattr(QuantEmbedding, "CHUNK", 16)
    tokens = torch.tensor([[0, 36, 5], [5, 1, 2]])
    torch.testing.assert_close(emb[tokens], deq[tokens], rtol=0, atol=1e-6)
    probs = torch.softmax(torch.randn(2, 3, V, generator=g), -1)
    torch.testing.assert_close(emb.weighted_sum(probs), probs @ deq, rtol=1e-5, atol=1e-6)


class StandInGraphs:
    """torch.cuda's graph API on the CPU for GraphedDecoder's bookkeeping: a capture runs its block (the
    eager pass) on the decoder's stream, and replay() recomputes the output from the decoder's buffers.
    It says nothing about CUDA graphs themselves: tests/test_cuda_kernels.py runs the real ones."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail, self.decoder, self.on = fail, None, "current"
        self.streams_used: list[str] = []
        api = self

        class Stream:
            def __init__(self, name: str = "own") -> None:
                self.name = name

            def wait_stream(self, other) -> None:
                pass

        class Graph:
            def capture_begin(self, capture_error_mode: str = "global") -> None:
                assert capture_error_mode == "thread_local"  # other threads' CUDA work may go on meanwhile
                assert api.on == "own"  # on the decoder's stream, where it warmed up
                if api.fail == "out of memory":
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB")
                if api.fail:
                    raise RuntimeError(api.fail + "\nmore detail")

            def capture_end(self) -> None:
                pass

            def replay(self) -> None:
                d = api.decoder
                d.out.copy_(d.model.decode_hidden(d.canvas_in, d.cache, d.soft_in))

        self.Stream, self.CUDAGraph, self._current = Stream, Graph, Stream("current")

    def synchronize(self) -> None:
        pass

    def current_stream(self):
        return self._current

    def stream(self, s):
        from contextlib import contextmanager

        @contextmanager
        def on():
            before, self.on = self.on, s.name
            self.streams_used.append(s.name)
            try:
                yield
            finally:
                self.on = before

        return on()


def test_graphed_decoder_does_not_give_up_graphs_for_a_moment_short_of_memory(canvas16_gguf, kernels_as_references):
    """Out of memory during the capture is not a pass that cannot be captured: the error goes to the caller (the
    engine's one-line error) and the next capture is tried, not eager passes for good."""
    from dgemma.plugin.cuda.graph import GraphedDecoder

    w, cfg = cpu_cuda_weights(canvas16_gguf)
    model = DiffusionGemma(cfg, w)
    cache = KVCache(reserve=cfg.canvas_length)
    model.encode(torch.randint(3, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(0)), cache)
    api = StandInGraphs("out of memory")
    dec = api.decoder = GraphedDecoder(model, cache, api=api)
    canvas, soft = torch.randint(3, cfg.vocab_size, (1, cfg.canvas_length)), torch.randn(1, cfg.canvas_length, cfg.n_embd)
    dec(canvas, soft)  # warm-up
    with pytest.raises(torch.cuda.OutOfMemoryError):
        dec(canvas, soft)
    api.fail = None
    torch.testing.assert_close(dec(canvas, soft), model.decode_hidden(canvas, cache, soft))
    assert (dec.captures, dec.replays, dec.fallback) == (1, 1, None)


@pytest.mark.parametrize("fail", [None, "operation not permitted when stream is capturing"])
def test_graphed_decoder_warms_up_captures_replays_and_falls_back(canvas16_gguf, kernels_as_references, fail):
    from dgemma.plugin.cuda.graph import GraphedDecoder

    w, cfg = cpu_cuda_weights(canvas16_gguf)
    model = DiffusionGemma(cfg, w)
    cache = KVCache(reserve=cfg.canvas_length)  # the engine's: the canvas written into the cache's buffers
    g = torch.Generator().manual_seed(0)
    model.encode(torch.randint(3, cfg.vocab_size, (1, 7), generator=g), cache)
    api = StandInGraphs(fail)
    dec = api.decoder = GraphedDecoder(model, cache, api=api)
    assert dec.stream.name == "own"
    C, D = cfg.canvas_length, cfg.n_embd
    for call in range(4):
        canvas, soft = torch.randint(3, cfg.vocab_size, (1, C), generator=g), torch.randn(1, C, D, generator=g)
        if fail and call == 1:
            with pytest.warns(RuntimeWarning, match="capture of the decoder failed, running it eagerly: operation"):
                got = dec(canvas, soft)
        else:
            got = dec(canvas, soft)
        torch.testing.assert_close(got, model.decode_hidden(canvas, cache, soft))
        assert (dec(canvas, None) - model.decode_hidden(canvas, cache, None)).abs().max() == 0  # no soft: eager
    assert (dec.captures, dec.replays, dec.fallback) == ((0, 0, fail) if fail else (1, 3, None))
    assert api.streams_used[:2] == ["own", "own"]  # the warm-up and the capture on the decoder's stream
    if not fail:  # a grown cache: warm-up again, then a new capture
        model.encode(canvas, cache)
        for _ in range(2):
            canvas, soft = torch.randint(3, cfg.vocab_size, (1, C), generator=g), torch.randn(1, C, D, generator=g)
            torch.testing.assert_close(dec(canvas, soft), model.decode_hidden(canvas, cache, soft))
        assert (dec.captures, dec.replays) == (2, 4)
        # new buffers at the same length (a graph would write into the freed ones): warm-up, a new capture
        cache.store(0, cache.keys[0].clone(), cache.values[0].clone(), None)
        for _ in range(2):
            canvas, soft = torch.randint(3, cfg.vocab_size, (1, C), generator=g), torch.randn(1, C, D, generator=g)
            torch.testing.assert_close(dec(canvas, soft), model.decode_hidden(canvas, cache, soft))
        assert (dec.captures, dec.replays) == (3, 5)
        dec.release()
        assert dec.graph is None and dec.out is None and dec.cache is None and dec.captures == 3


@pytest.mark.parametrize("matmul,tol", [("f16", 5e-3), ("int8", 0.05), ("int8-wide", 0.05)])
def test_chunked_head_keeps_the_fused_heads_contract(kernels, monkeypatch, matmul, tol):
    """head_ops.head_stats_chunked (the head on tensor cores: per vocabulary chunk the logits by a matmul
    kernel, head_chunk_stats, P @ the chunk's f16 rows, then head_merge), through the kernels' references,
    against the full-logits statistics in float64: 50 rows in chunks of 7 (the last one row), within the
    rounding of h and E to f16 (int8: h quantized per 32); rows 3 and 30 (chunks 0 and 4) tie at position
    0's maximum, and the lower one wins, as argmax does. QuantLinear.stats takes this path for every tensor-core
    kind."""
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from dgemma import quant
    from dgemma.plugin.cuda import head_ops

    g = torch.Generator().manual_seed(3)
    L, D, V = 5, 64, 50
    h = torch.randn(L, D, generator=g) * 2
    e = torch.randn(V, D, generator=g) * 0.1
    e[3] = e[30] = h[0] / h[0].norm() * 2  # position 0's clear maximum, twice
    data = torch.from_numpy(quant.quantize(e.numpy(), Q.Q8_0).reshape(V, -1).view(np.uint8))
    args = (h, data, Q.Q8_0, 30.0, 0.7)
    want = head_ops.head_stats_reference(*args, seed=77, step=4)
    # f16: the logits come from the chunk's decoded rows (one decode per chunk), not from the tile's own decode
    monkeypatch.setattr(ops, "qmatmul_mma", lambda *a: pytest.fail("the head decoded its rows twice"))
    checked: list[int] = []  # the per-chunk argument checks run on the first and the last chunk only (hot path)
    check_chunk = head_ops._check_chunk
    monkeypatch.setattr(head_ops, "_check_chunk", lambda z, out: (checked.append(z.shape[1]), check_chunk(z, out)))
    got = head_ops.head_stats_chunked(*args, 77, 4, matmul, chunk=7)
    assert checked == [7, 1]  # 8 chunks of 50 rows: 7 ... 7, 1
    assert got.argmax[0] == 3 and torch.equal(got.argmax, want.argmax)
    if matmul == "f16":  # the Gumbel-max draw, on logits rounded by 1e-3 at most
        assert torch.equal(got.sample, want.sample)
    for a, b in ((got.max, want.max), (got.lse, want.lse), (got.entropy, want.entropy)):
        torch.testing.assert_close(a.double(), b, rtol=0, atol=tol)
    torch.testing.assert_close(got.sc.double(), want.sc, rtol=0, atol=tol / 5)
    head = QuantLinear(data, Q.Q8_0, V, D)
    head.matmul = matmul
    via = head.stats(h, 30.0, 0.7, 77, 4)
    assert torch.equal(via.sc, head_ops.head_stats_chunked(*args, 77, 4, matmul).sc)
    # the head kept decoded (decoded=): its chunks are read, not decoded again, and nothing else changes
    decoded = ops.get_rows_f16(torch.arange(V, dtype=torch.int32), data, Q.Q8_0, D)
    monkeypatch.setattr(ops, "get_rows_f16", lambda *a: pytest.fail("a kept head decoded again"))
    kept = head_ops.head_stats_chunked(*args, 77, 4, matmul, chunk=7, decoded=decoded)
    assert all(torch.equal(getattr(kept, f), getattr(got, f)) for f in ("max", "argmax", "lse", "entropy", "sc", "sample"))
    with pytest.raises(ValueError, match=r"decoded must be the head in float16 \[50, 64\]"):
        head_ops.head_stats_chunked(*args, 77, 4, matmul, decoded=decoded[:-1])
