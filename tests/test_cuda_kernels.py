"""csrc kernels against their torch references on odd shapes, twice: on an NVIDIA GPU with CuPy (marked gpu,
skipped without one) and on the CPU through the emulator of tests/cuda_emu.py (the same kernels compiled by
g++, with out-of-bounds, uninitialised-shared-memory and thread-order checks). The model-level tests at the
end need the GPU itself."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cuda_util import kernel_device
from gguf import GGMLQuantizationType as Q

from dgemma import quant
from dgemma.plugin.cuda.ops import MATMULS


@pytest.fixture(scope="module", params=[pytest.param("gpu", marks=pytest.mark.gpu), "emu"])
def dev(request):
    """The device the kernels' tensors live on: "cuda" (a GPU), or "cpu" with the kernels emulated."""
    with kernel_device(request.param) as where:
        yield where


@pytest.fixture(scope="module")
def ops(dev):
    from dgemma.plugin.cuda import ops

    return ops


def needs_gpu(dev: str) -> None:
    if dev != "cuda":
        pytest.skip("runs the cuda backend or torch on a GPU, not only csrc kernels")


TYPES_32 = [Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0]
TYPES_K = [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
FLOAT = [Q.F32, Q.F16, Q.BF16]


def cases():
    for t in TYPES_32 + FLOAT:
        for m, n, k in [(1, 1, 32), (17, 33, 704), (256, 300, 2112), (300, 17, 96)]:
            yield t, m, n, k
    for t in TYPES_K:
        for m, n, k in [(1, 1, 256), (17, 33, 768), (256, 300, 2816), (300, 17, 512)]:
            yield t, m, n, k


@pytest.mark.parametrize("qtype,m,n,k", list(cases()), ids=lambda v: getattr(v, "name", str(v)))
def test_qmatmul_matches_dequant_reference(ops, dev, qtype, m, n, k):
    rng = np.random.default_rng(m * 7 + n * 13 + k)
    w = (rng.standard_normal((n, k)) * 0.05).astype(np.float32)
    wq = torch.from_numpy(quant.quantize(w, qtype).reshape(n, -1)).to(dev)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32)).to(dev)
    y = ops.qmatmul(x, wq, qtype, k)
    ref = ops.qmatmul_reference(x, wq, qtype, k)
    scale = (x.abs().double().cpu() @ torch.from_numpy(np.abs(quant.dequantize(wq.cpu().numpy(), qtype).reshape(n, k))).double().T)
    err = (y.cpu().double() - ref.double()).abs() / (scale + 1e-6)
    assert y.shape == (m, n) and float(err.max()) < 1e-5  # float32 accumulation over K terms


MOE_COUNTS = [[5], [0, 17, 0, 1, 16, 33], [0, 0, 0], [300, 0, 1]]


@pytest.mark.parametrize("qtype,k", [(Q.Q8_0, 288), (Q.Q4_K, 512)], ids=["Q8_0-K288", "Q4_K-K512"])
@pytest.mark.parametrize("kernel", ["qmatmul", "qmatmul_mma", "qmatmul_q8", "qmatmul_mma_wide", "qmatmul_q8_wide"])
def test_matmul_tiles_at_their_edges(ops, dev, kernel, qtype, k):
    """Every (M, N) around the 16- and 32-row tiles' edges (and N around the wide tiles' 128 columns), K in
    two slices for the 256-wide ones (the second partial for Q8_0; the wide tiles' 64 and 128 slice Q4_K's
    super-blocks), against each kernel's reference within 1e-5 of sum |x||w| (x as the kernel rounds it, up
    to 1 %)."""
    rng = np.random.default_rng(k)
    w = rng.standard_normal((129, k)).astype(np.float32)
    data = torch.from_numpy(quant.quantize(w, qtype).reshape(129, -1).view(np.uint8))
    wabs = ops._dequantized(data, qtype, k).abs()
    x = torch.from_numpy(rng.standard_normal((65, k)).astype(np.float32))
    op = getattr(ops, kernel)
    want = getattr(ops, f"{kernel}_reference")(x, data, qtype, k).double()  # row by row: sliced for each (M, N)
    bound = 1.01e-5 * (x.double().abs() @ wabs.T) + 1e-6  # [65, 129]
    wide = kernel.endswith("_wide")
    for m in (1, 15, 16, 17, 31, 32, 33, 64, 65):
        for n in (1, 15, 16, 17, 31, 32, 33, 64, 65) + ((127, 128, 129) if wide else ()):
            got = op(x[:m].contiguous().to(dev), data[:n].contiguous().to(dev), qtype, k).cpu().double()
            assert got.shape == (m, n) and bool(((got - want[:m, :n]).abs() <= bound[:m, :n]).all()), (m, n)


@pytest.mark.parametrize("kernel", ["qmatmul_mma", "qmatmul_mma_wide", "qmatmul_f16_cublas"])
@pytest.mark.parametrize("qtype,m,n,k", list(cases()), ids=lambda v: getattr(v, "name", str(v)))
def test_qmatmul_mma_matches_f16_rounded_reference(ops, dev, qtype, m, n, k, kernel):
    """Tensor cores: the kernel rounds X and W to f16 exactly as the reference does (f16-cublas: W by get_rows_f16,
    then cuBLAS; float32 products of the same values on the CPU), so the only difference is the f32 accumulation
    order: within 1e-5 of sum |x||w| per output, plus 1e-6."""
    rng = np.random.default_rng(m * 7 + n + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    data = torch.from_numpy((w if qtype == Q.F32 else quant.quantize(w, qtype)).reshape(n, -1).view(np.uint8)).to(dev)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32) * 3)
    got = getattr(ops, kernel)(x.to(dev), data, qtype, k).cpu()
    want = ops.qmatmul_mma_reference(x, data, qtype, k)
    bound = 1e-5 * (x.half().double().abs() @ ops._dequantized(data, qtype, k).half().double().abs().T) + 1e-6
    assert bool(((got.double() - want.double()).abs() <= bound).all())  # at small K, unrounded X would fail
    if qtype == Q.F32 and m == 1:  # float rows may have any K; the MMA needs multiples of 16
        with pytest.raises(ValueError, match="multiple of 16"):
            getattr(ops, kernel)(torch.zeros(1, 100, device=dev), torch.zeros(1, 400, dtype=torch.uint8, device=dev),
                                 Q.F32, 100)


@pytest.mark.parametrize("kernel", ["qmatmul_q8", "qmatmul_q8_wide"])
@pytest.mark.parametrize("qtype,m,n,k", [c for c in cases() if c[0] not in FLOAT], ids=lambda v: getattr(v, "name", str(v)))
def test_qmatmul_q8_matches_quantized_activation_reference(ops, dev, qtype, m, n, k, kernel):
    """int8 tensor cores: X quantized per 32 values exactly as the reference does (checked bit for bit),
    W in its integer form; the products differ from the float64 reference only by the f32 sums: within
    1e-5 of sum |x_hat||w| per output, plus 1e-6."""
    rng = np.random.default_rng(m * 5 + n + k)
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[: n // 3] = np.abs(w[: n // 3])  # positive rows: the K-quants' offsets at work
    data = torch.from_numpy(quant.quantize(w, qtype).reshape(n, -1).view(np.uint8)).to(dev)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32) * 3)
    x[0, :32] = 0.0  # a block of zeros: scale 0
    if k >= 64:
        x[0, 32:64] = torch.tensor([1e-44, -3e-45] * 16)  # a scale that rounds to 0 (subnormal inputs)
    if kernel == "qmatmul_q8":  # the quantization is the widths' common input: checked once per case
        for got, want in zip(ops.quantize_q8(x.to(dev)), ops.quantize_q8_reference(x)):
            assert torch.equal(got.cpu(), want)
    got = getattr(ops, kernel)(x.to(dev), data, qtype, k).cpu()
    want = ops.qmatmul_q8_reference(x, data, qtype, k)
    xq, xd, _ = ops.quantize_q8_reference(x)
    xhat = xq.double() * xd.double().repeat_interleave(32, dim=1)
    bound = 1e-5 * (xhat.abs() @ ops._dequantized(data, qtype, k).abs().T) + 1e-6
    assert bool(((got.double() - want.double()).abs() <= bound).all())
    with pytest.raises(ValueError, match="no integer form"):
        getattr(ops, kernel)(x.to(dev), torch.zeros(n, 2 * k, dtype=torch.uint8, device=dev), Q.F16, k)


@pytest.mark.parametrize("qtype,n,k", [(Q.Q8_0, 33, 96), (Q.Q4_K, 17, 512), (Q.Q6_K, 40, 768), (Q.Q2_K, 16, 256),
                                       (Q.Q3_K, 31, 256), (Q.Q5_K, 7, 512), (Q.F16, 9, 64),
                                       (Q.Q5_0, 290, 64)],  # 3 column tiles of the wide kind (gated: 64 columns each)
                         ids=lambda v: getattr(v, "name", str(v)))
@pytest.mark.parametrize("counts", MOE_COUNTS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "grouped"])
@pytest.mark.parametrize("kernel", [m for m, (_, grouped) in MATMULS.items() if grouped])
def test_moe_qmatmul_matches_expert_by_expert(ops, dev, qtype, n, k, counts, gathered, kernel):
    """The grouped kernels (16-row float tiles, 32-row f16 and int8 tensor-core tiles of both widths) against their
    references, expert by expert: within 1e-5 of sum |x||w| (X and W as each kernel rounds them) plus 1e-6,
    with experts of 0, 1, 16, 17, 33 and 300 pairs."""
    op = getattr(ops, ops.MATMULS[kernel][1])
    rng = np.random.default_rng(len(counts) * 31 + n + k)
    E, P = len(counts), sum(counts)
    w = (rng.standard_normal((E * n, k)) * 0.05).astype(np.float32)
    w[: n // 3] = np.abs(w[: n // 3])  # positive rows: the K-quants' offsets at work
    wq = torch.from_numpy(quant.quantize(w, qtype).reshape(E, n, -1)).to(dev)
    tokens = max(1, P // 2)
    x = torch.from_numpy(rng.standard_normal((tokens if gathered else P, k)).astype(np.float32)).to(dev)
    rows = torch.from_numpy(rng.integers(0, tokens, P).astype(np.int32)).to(dev) if gathered else None
    groups = ops.ExpertGroups(counts, dev)
    family = ops.matmul_family(kernel)  # the width changes no number
    if family == "int8" and qtype not in ops.INT_TYPES:
        with pytest.raises(ValueError, match="no integer form"):
            op(x, rows, groups, wq, qtype, k)
        return
    y = op(x, rows, groups, wq, qtype, k)
    ref = getattr(ops, f"{ops.MATMULS[kernel][1]}_reference")(x, rows, groups, wq, qtype, k)
    assert y.shape == (P, n)
    xs = {"scalar": x.double().cpu(), "f16": x.cpu().half().double(), "int8": ops._q8_values(x)}[family]
    xs = xs[rows.long().cpu()] if gathered else xs
    round_w = (lambda v: v.half().double().abs()) if family == "f16" else (lambda v: v.abs())
    bound = 1e-5 * ops._expert_by_expert(xs.abs(), groups, wq, qtype, k, round_w).double() + 1e-6
    assert bool(((y.cpu().double() - ref.double()).abs() <= bound).all())
    if gathered and P:  # gate_up: gelu_tanh(gate) * up in the epilogue, W's first half of rows the gate
        ng = n - n % 2
        wg, fe = wq[:, :ng].contiguous(), ng // 2
        ref_op = getattr(ops, f"{ops.MATMULS[kernel][1]}_reference")
        got = op(x, rows, groups, wg, qtype, k, gated=True).cpu().double()
        want = ref_op(x, rows, groups, wg, qtype, k, gated=True).double()
        full = ref_op(x, rows, groups, wg, qtype, k).double()  # [P, ng] before the gate
        g, u, eg, eu = full[:, :fe], full[:, fe:], bound[:, :fe], bound[:, fe:ng]
        tol = 1.2 * eg * u.abs() + (g.abs() + eg) * eu + 1e-6 * g.abs() * u.abs() + 1e-6  # |gelu'| < 1.2
        assert got.shape == (P, fe) and bool(((got - want).abs() <= tol).all())
    if not gathered:  # the down projection: each pair's row times its weight added into its token's row
        T = max(1, P // 3)
        to = torch.from_numpy(rng.integers(0, T, P).astype(np.int32))
        wt = torch.from_numpy(rng.random(P).astype(np.float32))
        scatter = (to.to(dev), wt.to(dev), T)
        got = op(x, rows, groups, wq, qtype, k, scatter).cpu().double()
        want = getattr(ops, f"{ops.MATMULS[kernel][1]}_reference")(x, rows, groups, wq, qtype, k, (to, wt, T)).double()
        terms = ops._scattered(ref.abs(), (to, wt, T)).double()  # sum of |weight * row| per token
        bound = ops._scattered(bound.float(), (to, wt, T)).double() + 1e-6 * terms + 1e-6  # + the float atomics
        assert got.shape == (T, n) and bool(((got - want).abs() <= bound).all())


def test_moe_qmatmul_rejects_bad_input(ops, dev):
    w = torch.zeros(3, 4, 34, dtype=torch.uint8, device=dev)  # Q8_0 rows of 32
    x = torch.zeros(5, 32, device=dev)
    groups = lambda counts: ops.ExpertGroups(counts, dev)  # noqa: E731
    with pytest.raises(ValueError, match="3 experts"):
        ops.moe_qmatmul(x, None, groups([5]), w, Q.Q8_0, 32)
    with pytest.raises(ValueError, match="rows must be int32"):
        ops.moe_qmatmul(x, torch.zeros(5, dtype=torch.int64, device=dev), groups([1, 2, 2]), w, Q.Q8_0, 32)
    with pytest.raises(ValueError, match="x has 5 rows for 4"):
        ops.moe_qmatmul(x, None, groups([1, 2, 1]), w, Q.Q8_0, 32)
    with pytest.raises(ValueError, match="gated needs"):
        ops.moe_qmatmul(x, None, groups([5, 0, 0]), w[:, :3].contiguous(), Q.Q8_0, 32, gated=True)
    with pytest.raises(ValueError, match="scatter must be"):
        bad = (torch.zeros(5, dtype=torch.int64, device=dev), torch.ones(5, device=dev), 3)
        ops.moe_qmatmul(x, None, groups([5, 0, 0]), w, Q.Q8_0, 32, bad)


def test_qmatmul_rejects_bad_shapes(ops, dev):
    x = torch.zeros(4, 100, device=dev)
    with pytest.raises(ValueError, match="not a multiple"):
        ops.qmatmul(x, torch.zeros(3, 10, dtype=torch.uint8, device=dev), Q.Q4_K, 100)


def test_weights_start_at_their_blocks_alignment(ops, dev):
    """The kernels read a block's bytes as wide as its alignment allows (csrc/quant/base.cuh Align<T>, the gcd of
    the block's bytes and 16): weights starting off it are refused with a readable error; 2-aligned formats
    (Q6_K, Q3_K: funnel-shifted 32-bit loads; Q8_0) read the same rows from a tensor 2 bytes into its storage,
    where every block sits at the other parity of a 4-byte word. (On a GPU; the emulator copies a tensor to
    a guarded buffer of its own, placed against a page for its bounds checks, so the 2 bytes are lost there:
    its odd blocks, at the other parity in any placement, are what check the funnel.)"""
    k, n = 512, 9
    e = np.random.default_rng(5).standard_normal((n, k)).astype(np.float32)
    rows = torch.tensor([0, n - 1, 3], dtype=torch.int32, device=dev)
    for qtype, shift, ok in ((Q.Q4_K, 8, False), (Q.Q5_K, 4, False), (Q.Q2_K, 2, False), (Q.Q6_K, 2, True),
                             (Q.Q3_K, 2, True), (Q.Q8_0, 2, True)):
        data = torch.from_numpy(quant.quantize(e, qtype).reshape(n, -1).view(np.uint8))
        buf = torch.zeros(data.numel() + shift, dtype=torch.uint8, device=dev)
        w = buf[shift:].view(n, -1)
        w.copy_(data.to(dev))
        if ok:
            assert torch.equal(ops.get_rows(rows, w, qtype, k).cpu(), ops.get_rows_reference(rows, data, qtype, k))
        else:
            with pytest.raises(ValueError, match=f"w must start at a multiple of {ops.block_align(qtype)} bytes"):
                ops.get_rows(rows, w, qtype, k)


@pytest.mark.parametrize("qtype,k", [(Q.F32, 64), (Q.Q8_0, 96), (Q.Q4_K, 2816), (Q.Q6_K, 512), (Q.Q5_0, 704)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_get_rows_matches_dequant_reference(ops, dev, qtype, k):
    rng = np.random.default_rng(k)
    V = 1001
    e = rng.standard_normal((V, k)).astype(np.float32)
    data = torch.from_numpy((e if qtype == Q.F32 else quant.quantize(e, qtype)).reshape(V, -1).view(np.uint8)).to(dev)
    rows = torch.tensor([0, V - 1, 17, 17, 500], device=dev)
    got = ops.get_rows(rows, data, qtype, k)
    assert torch.equal(got.cpu(), ops.get_rows_reference(rows, data, qtype, k))  # the same float32 values
    assert ops.get_rows(rows[:0], data, qtype, k).shape == (0, k)
    with pytest.raises(ValueError, match="outside"):
        ops.get_rows(torch.tensor([V], device=dev), data, qtype, k)


@pytest.mark.parametrize("b,c", [(1, 1), (1, 17), (3, 256), (2, 300)])
@pytest.mark.parametrize("bound", [0.0, 0.1, 2.0])
def test_accept_renoise_matches_sampler(ops, dev, b, c, bound):
    g = torch.Generator().manual_seed(b * 1000 + c)
    entropy = torch.rand(b, c, generator=g) * 3
    entropy[:, : c // 4] *= 1e-3  # a confident prefix, as late denoising steps have
    denoised = torch.randint(0, 1000, (b, c), generator=g)
    seed, step, vocab = 2**33 + c, b + 7, 262_144
    nxt, acc = ops.accept_renoise(entropy.to(dev), denoised.to(dev), seed, step, vocab, bound)
    ref_next, ref_mask = ops.accept_renoise_reference(entropy, denoised, seed, step, vocab, bound)
    assert torch.equal(acc.cpu(), ref_mask) and torch.equal(nxt.cpu().long(), ref_next)
    assert c == 1 or bool((~ref_mask).any())  # something was re-noised: the fresh draws were compared
    # bounds exactly at running sums: the kernel must add up as torch.cumsum on the CPU does (double, rounded)
    srt = entropy[0].sort().values
    for j in range(0, c, max(1, c // 5)):
        edge = float((torch.cumsum(srt, 0) - srt)[j])
        nxt, acc = ops.accept_renoise(entropy.to(dev), denoised.to(dev), seed, step, vocab, edge)
        assert torch.equal(acc.cpu(), ops.accept_renoise_reference(entropy, denoised, seed, step, vocab, edge)[1])


@pytest.mark.parametrize("qtype,L,D,V,splits", [
    (Q.F32, 1, 32, 1, None), (Q.Q8_0, 17, 96, 1000, 7), (Q.Q6_K, 256, 256, 4099, None), (Q.Q4_K, 300, 512, 300, 300),
    (Q.Q6_K, 3, 2816, 2048, None),  # DiffusionGemma's width
], ids=lambda v: getattr(v, "name", str(v)))
def test_head_stats_match_full_logits(ops, dev, qtype, L, D, V, splits):
    from dgemma.plugin.cuda import head_ops

    if dev == "cpu" and L * V > 100_000:
        pytest.skip("about 4 minutes in the emulator: GPU only")

    rng = np.random.default_rng(L + V)
    h = (rng.standard_normal((L, D)) * 2).astype(np.float32)
    e = (rng.standard_normal((V, D)) * 0.1).astype(np.float32)
    data = torch.from_numpy((e if qtype == Q.F32 else quant.quantize(e, qtype)).reshape(V, -1).view(np.uint8)).to(dev)
    for softcap, temp in ((30.0, 0.8), (0.0, 0.4)):
        seed, step = 2**40 + L, V % 48
        got = head_ops.head_stats(torch.from_numpy(h).to(dev), data, qtype, softcap, temp, splits, seed, step)
        ref = head_ops.head_stats_reference(torch.from_numpy(h), data, qtype, softcap, temp, seed=seed, step=step)
        assert torch.equal(got.argmax.cpu(), ref.argmax)
        assert torch.equal(got.sample.cpu(), ref.sample)  # the Gumbel-max draw, the same whatever the split
        for a, b in ((got.max, ref.max), (got.lse, ref.lse), (got.entropy, ref.entropy)):
            torch.testing.assert_close(a.cpu().double(), b, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got.sc.cpu().double(), ref.sc, rtol=1e-4, atol=1e-5)


def test_head_stats_rejects_bad_input(ops, dev):
    from dgemma.plugin.cuda import head_ops

    h = torch.zeros(2, 100, device=dev)
    for op in (head_ops.head_stats, head_ops.head_stats_chunked):
        with pytest.raises(ValueError, match="Q4_K rows of 100|not a multiple"):
            op(h, torch.zeros(3, 10, dtype=torch.uint8, device=dev), Q.Q4_K, 30.0, 0.8)


@pytest.mark.parametrize("qtype", [Q.Q6_K, Q.Q4_0, Q.F16, Q.BF16])
def test_get_rows_f16_is_get_rows_rounded(ops, dev, qtype):
    k = 512
    w = torch.from_numpy(quant.quantize((np.random.default_rng(1).standard_normal((37, k)) * 0.1).astype(np.float32), qtype)
                         .reshape(37, -1).view(np.uint8)).to(dev)
    rows = torch.tensor([36, 0, 5, 5, 17], dtype=torch.int32, device=dev)
    assert torch.equal(ops.get_rows_f16(rows, w, qtype, k), ops.get_rows(rows, w, qtype, k).half())
    every = torch.arange(37, dtype=torch.int32, device=dev)  # rows None: every row in order
    assert torch.equal(ops.get_rows_f16(None, w, qtype, k), ops.get_rows(every, w, qtype, k).half())


def test_f16_cublas_decodes_a_tall_weight_a_chunk_at_a_time(ops, dev, monkeypatch):
    """F16_ROWS rows of W in f16 at a time (8192: the vocabulary head in 32 chunks; here 16, for 50 rows: 3 whole
    chunks and a partial one), the same products as the f16 tiles' reference, within its bound."""
    monkeypatch.setattr(ops, "F16_ROWS", 16)
    decoded, get_rows_f16 = [], ops.get_rows_f16
    monkeypatch.setattr(ops, "get_rows_f16", lambda rows, w, *a: decoded.append(w.shape[0]) or get_rows_f16(rows, w, *a))
    rng = np.random.default_rng(3)
    data = torch.from_numpy(quant.quantize(rng.standard_normal((50, 64)).astype(np.float32), Q.Q8_0).reshape(50, -1))
    x = torch.from_numpy(rng.standard_normal((40, 64)).astype(np.float32))
    got = ops.qmatmul_f16_cublas(x.to(dev), data.to(dev), Q.Q8_0, 64).cpu().double()
    want = ops.qmatmul_mma_reference(x, data, Q.Q8_0, 64).double()
    bound = 1e-5 * (x.half().double().abs() @ ops._dequantized(data, Q.Q8_0, 64).half().double().abs().T) + 1e-6
    assert got.shape == (40, 50) and bool(((got - want).abs() <= bound).all())
    assert decoded == [16, 16, 16, 2]  # W's rows decoded a chunk at a time, each once


@pytest.mark.parametrize("L,n,v0", [(1, 1, 0), (3, 300, 7001), (2, 6, 3), (17, 8192, 262144 - 8192)])
def test_head_chunk_stats_match_reference(ops, dev, L, n, v0):
    """One chunk's partial statistics and weights P against float64 on the CPU; a row repeated at the maximum
    (ties go to the lower row) where the chunk has two rows. The kernel draws the Gumbel uniforms of four
    rows at a time: v0 not a multiple of 4 cuts the fours at the chunk's ends."""
    from dgemma.plugin.cuda import head_ops

    g = torch.Generator().manual_seed(n)
    z = torch.randn(L, n, generator=g) * 4
    if n > 1:  # ties at the maximum: across warps (0, n-1), within a warp (0, 31), within a thread (0, 1; 0, 1024)
        z[:, [0, 1, n - 1, min(31, n - 1), min(1024, n - 1)]] = z.max() + 1
    for softcap, temp in ((30.0, 0.8), (0.0, 0.4)):
        outs = []
        for where, op in ((dev, head_ops.head_chunk_stats), ("cpu", head_ops.head_chunk_stats_reference)):
            out = (torch.full((L, 3), float("nan"), device=where), torch.full((L,), -1, dtype=torch.int32, device=where),
                   torch.full((L,), float("nan"), device=where), torch.full((L,), -1, dtype=torch.int32, device=where),
                   torch.full((L, n), float("nan"), dtype=torch.float16, device=where))  # written by the op
            op(z.to(where), v0, softcap, temp, 2**33 + 1, 9, out)
            outs.append([t.cpu() for t in out])
        (mst, arg, gm, sample, p), (rmst, rarg, rg, rsample, rp) = outs
        assert torch.equal(arg, rarg) and torch.equal(sample, rsample) and (n == 1 or int(arg[0]) == v0)
        torch.testing.assert_close(mst.double(), rmst.double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gm.double(), rg.double(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(p.float(), rp.float(), rtol=2e-3, atol=1e-6)  # the f16 rounding of each weight


def test_head_merge_into_matches_reference(ops, dev):
    """A chunk's partial merged into a running one, position by position: a run with no rows yet, a chunk
    with none, ties of the max and of the Gumbel value (the run keeps its lower rows), and plain merges."""
    from dgemma.plugin.cuda import head_ops

    g = torch.Generator().manual_seed(11)
    L, D = 7, 33

    def partial(first_row: int):
        m = torch.randn(L, generator=g)
        mst = torch.stack([m, torch.rand(L, generator=g) * 5 + 1, torch.randn(L, generator=g)], dim=1)
        rows = torch.randint(0, 100, (L,), generator=g, dtype=torch.int32) + first_row
        return [mst, rows, torch.randn(L, generator=g), rows + 1]

    run, part = partial(0), partial(1000)
    run[1][0] = -1  # position 0: nothing merged yet
    part[1][1] = -1  # position 1: the chunk has no rows
    part[0][2, 0], part[2][2] = run[0][2, 0], run[2][2]  # position 2: both ties
    run_acc, acc = torch.randn(L, D, generator=g), torch.randn(L, D, generator=g)
    outs = []
    for where, op in ((dev, head_ops.head_merge_into), ("cpu", head_ops.head_merge_into_reference)):
        r = tuple(t.clone().to(where) for t in (*run, run_acc))
        op(r, tuple(t.to(where) for t in part), acc.to(where))
        outs.append([t.cpu() for t in r])
    (mst, arg, gm, sample, racc), (rmst, rarg, rg, rsample, rracc) = outs
    assert torch.equal(arg, rarg) and torch.equal(sample, rsample) and int(arg[2]) == int(run[1][2]) and int(arg[0]) >= 1000
    torch.testing.assert_close(mst, rmst, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm, rg)
    torch.testing.assert_close(racc, rracc, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("matmul", ["f16", "int8", "int8-wide"])
@pytest.mark.parametrize("qtype,L,V,chunk", [(Q.Q6_K, 17, 3000, 1024), (Q.Q8_0, 256, 9000, 8192), (Q.Q4_K, 2, 300, 64)])
def test_head_stats_chunked_match_full_logits(ops, dev, matmul, qtype, L, V, chunk):
    """The head on tensor cores against the full-logits statistics in float64, within the rounding of h and
    the head to f16 (int8: h quantized per 32), of P and the rows to f16; the argmax equal wherever the two
    best logits differ by more than that rounding. Even positions get a clear maximum (the argmax check),
    odd ones none, so their lse, entropy and sc depend on every chunk's sums (a merge that dropped a chunk's
    fails there; with a clear maximum everywhere they would only repeat the max)."""
    from dgemma.plugin.cuda import head_ops

    D, tol = 512, (1e-2 if matmul == "f16" else 0.15)
    rng = np.random.default_rng(L + V)
    h = (rng.standard_normal((L, D)) * 2).astype(np.float32)
    e = (rng.standard_normal((V, D)) * 0.1).astype(np.float32)
    for l in range(0, min(L, V), 2):  # a clear maximum at row 13 l + 5 (mod V)
        e[(13 * l + 5) % V] = h[l] / np.linalg.norm(h[l]) * 1.5
    h = torch.from_numpy(h)
    data = torch.from_numpy(quant.quantize(e, qtype).reshape(V, -1).view(np.uint8))
    got = head_ops.head_stats_chunked(h.to(dev), data.to(dev), qtype, 30.0, 0.7, 5, 3, matmul, chunk)
    ref = head_ops.head_stats_reference(h, data, qtype, 30.0, 0.7, seed=5, step=3)
    z = torch.from_numpy(quant.dequantize(data.numpy(), qtype).reshape(V, D)).double()
    z = torch.tanh(h.double() @ z.T / 30.0) * 30.0 / 0.7
    top2 = z.topk(2, dim=1).values
    clear = (top2[:, 0] - top2[:, 1]) > 20 * tol
    assert clear.any() and torch.equal(got.argmax.cpu()[clear], ref.argmax[clear])
    for a, b in ((got.max, ref.max), (got.lse, ref.lse), (got.entropy, ref.entropy)):
        torch.testing.assert_close(a.cpu().double(), b, rtol=0, atol=tol)
    torch.testing.assert_close(got.sc.cpu().double(), ref.sc, rtol=0, atol=tol / 5)


@pytest.mark.parametrize("matmul,tol,kv", [("scalar", 1e-3, "f32"), ("f16", 0.01, "f32"), ("int8", 0.2, "f32"),
                                           ("scalar", 0.01, "f16")])
def test_cuda_backend_logits_match_the_torch_backend(ops, dev, request, matmul, tol, kv):
    """Each matmul kernel through the whole model: scalar within float rounding; f16 and int8 within what
    their rounding moved the logits by on the CPU references (0.005 and 0.15 of max |logit| 12,
    tests/test_cuda_tune.py), with some room for the GPU's summation order; the same argmax, as there.
    The f16 KV cache (the cuda backend's default) on both backends: attention in f16 on each, whose
    kernels round differently (flash attention rounds P to f16; the CPU's SDPA does not), within 0.01
    (f16 attention moved the default model's logits by 0.003-0.006 from the float32 cache)."""
    needs_gpu(dev)
    default_gguf = request.getfixturevalue("default_gguf")  # not built under the emulator's patches
    from dgemma.plugin.engine import Engine
    from dgemma.plugin.kv_cache import KVCache

    ref = Engine.load(default_gguf)
    gpu = Engine.load(default_gguf, backend="cuda", matmul=matmul, kv_cache=kv)
    assert set(gpu.matmul.values()) == {matmul}
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, ref.cfg.vocab_size, (1, 40), generator=g)
    canvas = torch.randint(0, ref.cfg.vocab_size, (1, ref.cfg.canvas_length), generator=g)
    dtype = gpu.kv_dtype  # as Engine.generate makes them
    c1, c2 = (KVCache(dtype=dtype, reserve=ref.cfg.canvas_length) for _ in range(2))
    ref.model.encode(prompt, c1)
    gpu.model.encode(prompt.to(dev), c2)
    a = ref.model.decode(canvas, c1)
    b = gpu.model.decode(canvas.to(dev), c2).cpu()
    assert (a - b).abs().max().item() < tol and torch.equal(a.argmax(-1), b.argmax(-1))
    sc = torch.softmax(a / 0.8, dim=-1)
    assert (ref.model.decode(canvas, c1, sc) - gpu.model.decode(canvas.to(dev), c2, sc.to(dev)).cpu()).abs().max() < tol


def test_cuda_backend_tunes_its_matmuls_once(ops, dev, request, tmp_path, monkeypatch):
    """matmul "auto" (the default): every weight shape gets a kernel usable here, timed on this GPU, and a
    second load reads the choice from the cache instead of timing again."""
    needs_gpu(dev)
    default_gguf = request.getfixturevalue("default_gguf")  # not built under the emulator's patches
    from dgemma.plugin.cuda import tune
    from dgemma.plugin.engine import DoneEvent, Engine, GenerateOptions

    monkeypatch.setenv(tune.CACHE_ENV, str(tmp_path))
    engine = Engine.load(default_gguf, backend="cuda")
    assert engine.matmul and set(engine.matmul.values()) <= set(ops.MATMULS)
    assert (tmp_path / "matmul.json").exists()
    monkeypatch.setattr(tune, "cuda_timer", lambda fn: pytest.fail("timed again"))
    assert Engine.load(default_gguf, backend="cuda").matmul == engine.matmul
    done = list(engine.generate("Once upon a time", GenerateOptions(seed=1, max_tokens=8)))[-1]
    assert isinstance(done, DoneEvent) and done.canvases and done.steps_per_canvas[0] >= 1


@pytest.mark.parametrize("model", ["default", "canvas16"])
@pytest.mark.parametrize("rng,kv", [("torch", "f32"), ("counter", "f32")])
def test_cuda_backend_generates_the_torch_backends_tokens(ops, dev, request, model, rng, kv, monkeypatch):
    """rng torch: the cuda backend's logits sampled on the CPU; rng counter (the cuda backend's default):
    the fused head's statistics and csrc/accept.cu on the GPU, with no [C, V] logits formed; both backends
    with the float32 KV cache and the float-FMA matmuls (the others round X, so tokens may differ where the
    draw is close; so does the f16 cache, whose attention runs in f16 and rounds differently in each
    backend's kernels: a CPU stand-in for the GPU's rounding changed 1 of 12 generations. The f16 cache is
    compared on logits, test_cuda_backend_logits_match_the_torch_backend, and generates in
    test_cuda_backend_tunes_its_matmuls_once with the cuda backend's defaults)."""
    needs_gpu(dev)
    from dgemma.plugin.engine import DoneEvent, Engine, GenerateOptions

    path = request.getfixturevalue(f"{model}_gguf")
    outs = []
    for backend in ("torch", "cuda"):
        engine = Engine.load(path, backend=backend, rng=rng, kv_cache=kv,
                             **({"matmul": "scalar"} if backend == "cuda" else {}))
        if backend == "cuda" and rng == "counter":
            V, qmatmul = engine.cfg.vocab_size, ops.qmatmul
            monkeypatch.setattr(ops, "qmatmul", lambda x, w, *a: qmatmul(x, w, *a) if w.shape[0] != V else pytest.fail("logits formed"))
        for seed in (3, 4):
            opts = GenerateOptions(seed=seed, max_tokens=64, raw=model != "default")
            done = list(engine.generate("Once upon a time", opts))[-1]
            assert isinstance(done, DoneEvent)
            outs.append((done.canvases, done.steps_per_canvas))
            if backend == "cuda" and rng == "counter":  # the decoder pass was replayed from a CUDA graph
                assert engine.graphed.fallback is None
                assert engine.graphed.replays > 0 or (model == "default" and max(done.steps_per_canvas) < 3)
    assert outs[:2] == outs[2:]


def test_cuda_backend_logprobs_are_the_torch_backends(ops, dev, canvas16_gguf, monkeypatch):
    """Logprobs (plugin/logprobs.py) on the cuda backend (rng counter, CUDA graphs: the last pass's output copied
    out of the graph's buffer, the head multiplying LOGPROB_ROWS positions at a time) equal the torch backend's
    with the same draws, within the float-FMA matmuls' rounding; the same tokens. JSON mode's read-out there too."""
    needs_gpu(dev)
    from dgemma.plugin.engine import Engine, GenerateOptions
    from dgemma.plugin.logprobs import LOGPROB_ROWS

    done = []
    for backend in ("torch", "cuda"):
        engine = Engine.load(canvas16_gguf, backend=backend, rng="counter", kv_cache="f32",
                             **({"matmul": "scalar"} if backend == "cuda" else {}))
        if backend == "cuda":
            V, qmatmul = engine.cfg.vocab_size, ops.qmatmul
            monkeypatch.setattr(ops, "qmatmul", lambda x, w, *a: qmatmul(x, w, *a) if w.shape[0] != V or
                                x.shape[0] <= LOGPROB_ROWS else pytest.fail("logits of a whole canvas formed"))
        opts = GenerateOptions(seed=5, max_tokens=40, raw=True, eos_ids=set(), logprobs=3)
        done.append(list(engine.generate("Once upon a time", opts))[-1])
    want, got = done
    assert got.canvases == want.canvases and len(got.logprobs) == 40
    assert max(abs(a.logprob - b.logprob) for a, b in zip(got.logprobs, want.logprobs)) < 1e-3
    # (the alternatives' values: two nearly tied ones may swap places)
    assert max(abs(x - y) for a, b in zip(got.logprobs, want.logprobs) for (_, x), (_, y) in zip(a.top, b.top)) < 1e-3
    # JSON mode reads its canvases out from the same rows of logits (plugin/json_format.py): a reply that parses
    import json

    *events, _ = engine.generate("Once upon a time", GenerateOptions(seed=5, max_tokens=40, format="json"))
    assert isinstance(json.loads("".join(e.text for e in events)), dict)


def test_cuda_backend_reuses_the_kept_kv_cache(ops, dev, canvas16_gguf):
    """plugin/kv_cache.py on the GPU: a generation of three canvases (two encoded after its 29-token prompt, past
    the sliding window of 8), then a prompt that shares all but the last two of those 29 tokens: the cache goes
    back to them from the checkpoint (host memory, copied back to the GPU), encodes the rest, replays its graphs,
    and generates what the same engine does from scratch; the same prompt again takes all of it, also after another
    conversation has put its cache aside in host memory (copied back to the GPU, in buffers with the canvas's room)."""
    needs_gpu(dev)
    from dgemma.plugin.engine import DoneEvent, Engine, GenerateOptions

    engine = Engine.load(canvas16_gguf, backend="cuda", kv_cache="f32", matmul="scalar")
    first = [2] + list(range(40, 68))
    nxt = first[:-2] + list(range(90, 97))

    def run(ids, seed, max_tokens, cache=True):
        done = list(engine.generate(ids, GenerateOptions(seed=seed, max_tokens=max_tokens, eos_ids=set(),
                                                         cache_prompt=cache)))[-1]
        assert isinstance(done, DoneEvent)
        return done

    run(first, 1, 48)
    assert engine.prompt_cache.point is not None and engine.prompt_cache.point.end == 29
    reused = run(nxt, 2, 32)
    assert reused.prompt_cached_count == 27 and engine.prompt_cache.cache.keys[0].is_cuda
    assert engine.graphed.fallback is None and engine.graphed.replays > 0
    again = run(nxt, 2, 32)
    assert again.prompt_cached_count == len(nxt)
    other = run([2] + list(range(120, 150)), 3, 16)  # another conversation: nxt's cache is put aside, in host memory
    assert other.prompt_cached_count <= 1 and engine.prompt_cache.saved[-1].cache.keys[0].device.type == "cpu"
    back = run(nxt, 2, 32)  # from that copy, back on the GPU
    assert back.prompt_cached_count == len(nxt) and engine.prompt_cache.cache.keys[0].is_cuda
    assert engine.graphed.fallback is None and engine.graphed.replays > 0
    scratch = run(nxt, 2, 32, cache=False)
    assert reused.canvases == again.canvases == back.canvases == scratch.canvases


@pytest.mark.parametrize("model", ["default", "canvas16"])
def test_graphed_decoder_equals_the_eager_pass(ops, dev, request, model):
    """plugin/cuda/graph.py: the first pass with soft and a new cache runs eagerly, the next captures and
    replays, later ones replay; every result equals model.decode_hidden on the same inputs (up to the float
    atomics of the experts' scatter-add), including new inputs copied into the graph's buffers, and a grown
    cache makes a new graph."""
    needs_gpu(dev)
    from dgemma.plugin.cuda.graph import GraphedDecoder
    from dgemma.plugin.engine import Engine
    from dgemma.plugin.kv_cache import KVCache

    engine = Engine.load(request.getfixturevalue(f"{model}_gguf"), backend="cuda", matmul="scalar")
    model_, cfg = engine.model, engine.cfg
    g = torch.Generator(device="cuda").manual_seed(0)
    cache = KVCache(dtype=torch.float16, reserve=cfg.canvas_length)  # the engine's: the canvas written in place
    model_.encode(torch.randint(0, cfg.vocab_size, (1, 23), device=dev, generator=g), cache)
    graphed = GraphedDecoder(model_, cache)

    def inputs():
        return (torch.randint(0, cfg.vocab_size, (1, cfg.canvas_length), device=dev, generator=g),
                torch.randn(1, cfg.canvas_length, cfg.n_embd, device=dev, generator=g) * 0.05)

    for call in range(5):
        canvas, soft = inputs()
        got = graphed(canvas, soft).clone()
        want = model_.decode_hidden(canvas, cache, soft)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (graphed.captures, graphed.replays, graphed.fallback) == (1, 4, None)
    canvas, _ = inputs()
    torch.testing.assert_close(graphed(canvas, None), model_.decode_hidden(canvas, cache, None), rtol=1e-4,
                               atol=1e-4)  # eager (two eager passes differ by the scatter-add's float atomics)
    model_.encode(canvas, cache)  # the next canvas: the cache grew
    for call in range(3):
        canvas, soft = inputs()
        torch.testing.assert_close(graphed(canvas, soft).clone(), model_.decode_hidden(canvas, cache, soft),
                                   rtol=1e-4, atol=1e-4)
    assert (graphed.captures, graphed.replays) == (2, 6)


def test_expert_stage_copies_on_its_stream_and_never_under_a_reader(ops, dev):
    """plugin/cuda/offload.py on a GPU: host experts page-locked by the stage and copied on its stream, ordered
    by events. Each acquired slot is read on the compute stream (a sum of its bytes, queued, not waited for):
    in the first half behind a sleep on the compute stream, in the second with each copy behind one on the copy
    stream. In the model's order and then in any order, every sum is its own layer's."""
    needs_gpu(dev)
    import random

    from dgemma.plugin.cuda.offload import ExpertStage
    from dgemma.plugin.cuda.weights import QuantExperts

    rng = random.Random(1)
    host = {}
    for layer in (0, 3, 4, 8):
        pair = []
        for n, k in ((2 * 704, 2816), (2816, 704)):  # a 26B layer's expert shapes, 8 experts of Q8_0
            data = torch.randint(0, 256, (8, n, k // 32 * 34), dtype=torch.uint8)  # page-locked by the stage
            pair.append(QuantExperts(data, Q.Q8_0, n, k))
        host[layer] = tuple(pair)
    want = {layer: sum(int(e.data.sum(dtype=torch.int64)) for e in pair) for layer, pair in host.items()}
    stage = ExpertStage(host, dev)
    assert all(e.data.is_pinned() for pair in host.values() for e in pair)
    order = [0, 3, 4, 8] * 3 + [rng.choice([0, 3, 4, 8]) for _ in range(30)]
    sums = []
    half = len(order) // 2
    for i, layer in enumerate(order):
        if i >= half:  # the copy stream lags (~10 ms): a read not waiting for its copy would see earlier bytes
            with torch.cuda.stream(stage.stream):
                torch.cuda._sleep(20_000_000)
        gate_up, down = stage.acquire(layer, *host[layer])
        if i < half:  # the compute stream lags: a copy not waiting for the slot's last read would overwrite it
            torch.cuda._sleep(20_000_000)
        sums.append(gate_up.data.sum(dtype=torch.int64) + down.data.sum(dtype=torch.int64))  # [] on the GPU
        stage.release(layer)
        if i + 1 == half:
            torch.cuda.synchronize()
    assert [int(x) for x in sums] == [want[layer] for layer in order]


def _generate(engine, model: str) -> tuple[list[list[int]], list[int]]:
    from dgemma.plugin.engine import DoneEvent, GenerateOptions

    done = list(engine.generate("Once upon a time", GenerateOptions(seed=3, max_tokens=64, raw=model != "default")))[-1]
    assert isinstance(done, DoneEvent)
    return done.canvases, done.steps_per_canvas


@pytest.mark.parametrize("model", ["default", "canvas16"])
def test_streamed_experts_give_the_whole_models_logits_and_tokens(ops, dev, request, model):
    """Every layer's experts in page-locked host RAM (host_experts = n_layer: the most copies), copied to the GPU as
    each pass reaches them: the logits of the model loaded whole (up to the experts' float atomics) and the same
    tokens."""
    needs_gpu(dev)
    from dgemma.plugin.cuda.offload import HostExperts
    from dgemma.plugin.engine import Engine
    from dgemma.plugin.kv_cache import KVCache

    path = request.getfixturevalue(f"{model}_gguf")
    whole = Engine.load(path, backend="cuda", matmul="scalar", kv_cache="f32", graphs=False)
    n = whole.cfg.n_layer
    streamed = Engine.load(path, backend="cuda", matmul="scalar", kv_cache="f32", host_experts=n)
    assert streamed.host_layers == list(range(n)) and not streamed.graphs
    lw = streamed.model.w.layers[0]
    assert isinstance(lw.gate_up_exps, HostExperts) and lw.gate_up_exps.data.is_pinned() and lw.down_exps.data.is_pinned()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, whole.cfg.vocab_size, (1, 40), generator=g).to(dev)
    canvas = torch.randint(0, whole.cfg.vocab_size, (1, whole.cfg.canvas_length), generator=g).to(dev)
    c1, c2 = KVCache(reserve=whole.cfg.canvas_length), KVCache(reserve=whole.cfg.canvas_length)
    whole.model.encode(prompt, c1)
    streamed.model.encode(prompt, c2)
    a, b = whole.model.decode(canvas, c1), streamed.model.decode(canvas, c2)
    assert (a - b).abs().max().item() < 1e-4 and torch.equal(a.argmax(-1), b.argmax(-1))
    outs = [_generate(engine, model) for engine in (whole, streamed)]
    assert outs[0] == outs[1] and lw.gate_up_exps.stage.copies > n
    from dgemma.plugin.cuda import tune

    stage, scratched = lw.gate_up_exps.stage, []
    scratch = stage.scratch
    stage.scratch = lambda experts: scratched.append(scratch(experts)) or scratched[-1]
    plan = tune.choose(streamed.model.w, "auto", rows=whole.cfg.canvas_length, device=dev, cache=False)
    assert lw.gate_up_exps.matmul == plan[tune.shape_class(lw.gate_up_exps)] and scratched  # timed in slot 0:
    assert all(t.data.data_ptr() == stage.buffers[0].data_ptr() for t in scratched)  # not from host memory (UVA)
    tune.choose(streamed.model.w, "scalar", device=dev)  # the kernels compared above
    assert outs[1] == _generate(streamed, model)  # slot 0, which the tuner used, is copied into again


@pytest.mark.parametrize("hd,KV,L,P,masked,dtype", [
    (256, 8, 256, 1023, False, torch.float32), (512, 2, 256, 8192, False, torch.float32),
    (256, 8, 512, 1023, True, torch.float32), (512, 2, 512, 4096, True, torch.float32),
    (256, 8, 256, 1023, False, torch.float16), (512, 2, 256, 8192, False, torch.float16),
    (256, 8, 512, 1023, True, torch.float16), (512, 2, 512, 4096, True, torch.float16)])
def test_attention_runs_on_fused_kernels_at_the_26b_shapes(ops, dev, hd, KV, L, P, masked, dtype):
    """model.grouped_attention at the 26B-A4B's heads (16 query heads; sliding layers 8 KV heads of 256,
    global ones 2 of 512): the canvas over the cache (no mask) and an encoder chunk (causal mask over P
    cached positions), in float32 (the torch backend's cache) and in float16 (the f16 cache's: the
    decoder's K and V being views of the cache's buffers with room for the canvas, KVCache.reserve). With the math kernel
    disabled it must still run (SDPA raises when no fused kernel takes the call), and equal float64
    attention on the CPU over the same (rounded) inputs: within 1e-3 of max |out| in float32, 4e-3 in
    float16 (P and the output rounded to f16)."""
    needs_gpu(dev)
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dgemma.plugin.model import grouped_attention

    g = torch.Generator(device="cuda").manual_seed(hd + L)
    q = (torch.randn(1, 16, L, hd, device=dev, generator=g) * 0.1).to(dtype)
    room = 256 if dtype == torch.float16 and not masked else 0
    k, v = ((torch.randn(1, KV, P + L + room, hd, device=dev, generator=g) * 0.1).to(dtype)[:, :, : P + L] for _ in range(2))
    mask = (torch.arange(P + L, device=dev)[None, :] <= torch.arange(P, P + L, device=dev)[:, None]) if masked else None
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        got = grouped_attention(q, k, v, mask)
    want = F.scaled_dot_product_attention(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                          attn_mask=None if mask is None else mask.cpu(), scale=1.0, enable_gqa=True)
    tol = 1e-3 if dtype == torch.float32 else 4e-3
    assert got.dtype == dtype and got.shape == want.shape
    assert float((got.double().cpu() - want).abs().max()) < tol * float(want.abs().max())
