"""GPU kernels at the real 26B-A4B shapes, against the torch backend's way (dequantize to f16 + cuBLAS).

Slice 1 of issue 5: the quantized matmul kernel (csrc/qmatmul.cu) for every weight class of one
denoising step of the Q4_K_M file (canvas 256; routed experts see 256 x 8 / 128 = 16 tokens each on
average), one layer's routed experts in one launch per matrix (csrc/moe.cu), the sampler's statistics
from the vocabulary head (csrc/head.cu), the decoder's attention at 8K context, and the accept/re-noise step (csrc/accept.cu). Weights are synthetic: random block bytes with sane fp16
scales, made on the GPU in seconds (timing does not depend on the values). Prints ms, achieved TB/s of
weight bytes and TFLOP/s for each matmul kernel (ops.MATMULS: float FMAs, f16 and int8 tensor cores in 32 x 32
and 32 x 128 tiles) and the torch way, and their ratio, measured in this run on this GPU.

    python bench/step_gpu.py [--repeat 20] [--kinds scalar,int8,...]

--kinds leaves matmul kinds out of every table and line (to rerun past a kernel that failed on this GPU: a
CUDA error such as an illegal address ends the process). scalar, every weight's fallback, stays in, and so does
each kind's family (f16 for f16-cublas and f16-wide, int8 for int8-wide): what the engine runs where a kind
cannot take a weight, which the step totals count.
"""

from __future__ import annotations

import argparse

import torch
from gguf import GGMLQuantizationType as Q
from synthetic import gpu_capability, synthetic_blocks
from synthetic import timed as timed_on

from dgemma.plugin.cuda import ops, tune
from dgemma.plugin.model import geglu, grouped_attention
from dgemma.plugin.sampler import accept, renoise

DEVICE = "cuda"  # (tests/test_bench_synthetic.py runs this file on the CPU, with the kernels' references)
# (name, N, K, GGML type, M rows of activations, count per step) for the Q4_K_M 26B-A4B, per layer class
SHAPES = [
    ("attn_q (sliding)", 4096, 2816, Q.Q4_K, 256, 25),
    ("attn_k+v (sliding)", 2048, 2816, Q.Q4_K, 256, 50),
    ("attn_output", 2816, 4096, Q.Q4_K, 256, 30),
    ("ffn gate/up (dense)", 2112, 2816, Q.Q4_K, 256, 60),
    ("ffn_down (dense, 2112 rows)", 2816, 2112, Q.Q5_0, 256, 30),
    ("expert gate_up (x128 experts)", 1408, 2816, Q.Q4_K, 16, 30 * 128),
    ("expert down (704 rows)", 2816, 704, Q.Q5_0, 16, 30 * 128),
    ("vocabulary head (Q6_K)", 262144, 2816, Q.Q6_K, 256, 1),
]


def synthetic(n: int, k: int, qtype: Q) -> torch.Tensor:
    return synthetic_blocks(n, k, qtype, DEVICE)


def timed(fn, repeat: int) -> float:
    return timed_on(fn, torch.device(DEVICE), repeat)


def moe_layer(repeat: int, kinds: list[str], experts: int = 128, top_k: int = 8, tokens: int = 256, d: int = 2816,
              fe: int = 704) -> None:
    """One layer's routed experts (csrc/moe.cu, one launch per matrix) against one qmatmul launch per expert."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    top_i = torch.rand(tokens, experts, device=DEVICE, generator=g).topk(top_k, dim=-1).indices  # [256, 8]
    order = torch.argsort(top_i.flatten(), stable=True)
    rows = (order // top_k).to(torch.int32)
    counts_gpu = torch.bincount(top_i.flatten(), minlength=experts)  # [E], as model.grouped_experts makes it
    counts = counts_gpu.tolist()  # the per-expert launches need them on the host
    gate_up, down = synthetic(experts * 2 * fe, d, Q.Q4_K), synthetic(experts * d, fe, Q.Q5_0)
    gate_up, down = gate_up.view(experts, 2 * fe, -1), down.view(experts, d, -1)
    x = torch.randn(tokens, d, device=DEVICE)
    act = torch.randn(len(rows), fe, device=DEVICE)
    weights = torch.rand(len(rows), device=DEVICE)

    def grouped(kernel: str = "scalar"):  # as QuantExperts.grouped: the groups once per layer (on the GPU), 2 launches
        op = getattr(ops, ops.MATMULS[kernel][1])
        groups = ops.ExpertGroups(counts_gpu, DEVICE, pairs=len(rows))
        op(x, rows, groups, gate_up, Q.Q4_K, d, gated=True)  # the GELU gate in the epilogue
        op(act, None, groups, down, Q.Q5_0, fe, (rows, weights, tokens))  # the weighted scatter in the epilogue

    starts = [sum(counts[:e]) for e in range(experts)]

    def per_expert():  # the torch backend's loop (model.grouped_experts), with the quantized matmul
        out = torch.zeros(tokens, d, device=DEVICE)
        for e, (s0, c) in enumerate(zip(starts, counts)):
            if c:
                r = rows[s0:s0 + c].long()
                a = geglu(ops.qmatmul(x[r], gate_up[e], Q.Q4_K, d))
                out.index_add_(0, r, ops.qmatmul(a, down[e], Q.Q5_0, fe) * weights[s0:s0 + c, None])

    a, b = timed(grouped, repeat), timed(per_expert, repeat)
    wbytes = gate_up.numel() + down.numel()
    print(f"routed experts, one layer ({tokens} tokens x top-{top_k} of {experts}): grouped {a:.3f} ms "
          f"({wbytes / a / 1e9:.2f} TB/s), one launch per expert {b:.3f} ms ({b / a:.2f}x); x30 layers: {30 * a:.1f} ms")
    for kernel in (m for m in kinds if ops.MATMULS[m][1] and m != "scalar"):  # f16 on the down projection too
        t = timed(lambda: grouped(kernel), repeat)
        print(f"  grouped on {kernel} tensor cores: {t:.3f} ms ({wbytes / t / 1e9:.2f} TB/s, {a / t:.2f}x the float "
              f"FMAs); x30 layers: {30 * t:.1f} ms")


def head_pass(repeat: int, kinds: list[str], vocab: int = 262144, d: int = 2816, rows: int = 256,
              softcap: float = 30.0) -> None:
    """The sampler's per-pass statistics from the Q6_K vocabulary head (max, argmax, entropy, Gumbel-max
    sample, softmax @ E; no [L, V] logits): the fused float kernel (csrc/head.cu) and the chunked head on
    tensor cores (head_ops.head_stats_chunked: f16 and int8 logits per 8192-row chunk, P @ E by cuBLAS; and
    f16 over the whole head kept decoded, which the engine does not do: the decode's share of the pass),
    against the torch way (f16 logits by cuBLAS, softcap, softmax, entropy, argmax, multinomial, probs @ E).
    FLOPs per pass: 2 x rows x vocab x d for the logits, as many for softmax @ E."""
    from dgemma.plugin.cuda import head_ops

    w = synthetic(vocab, d, Q.Q6_K)
    h = torch.randn(rows, d, device=DEVICE)
    flop = 4 * rows * vocab * d

    def measured(fn) -> tuple[float, float]:  # (ms, MiB of working memory)
        ms = timed(fn, repeat)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return ms, (torch.cuda.max_memory_allocated() - base) / 2**20

    fused, fused_mem = measured(lambda: head_ops.head_stats(h, w, Q.Q6_K, softcap, 0.8, seed=1, step=0))
    line, best = f"fused float {fused:.3f} ms ({flop / fused / 1e9:.1f} TFLOP/s, {fused_mem:.0f} MiB)", fused
    wf = ops.get_rows_f16(torch.arange(vocab, dtype=torch.int32, device=DEVICE), w, Q.Q6_K, d)  # decoded on the GPU
    for kernel in (m for m in ("f16", "int8", "int8-wide") if m in kinds):  # f16-wide, f16-cublas: f16's path
        t, mem = measured(lambda: head_ops.head_stats_chunked(h, w, Q.Q6_K, softcap, 0.8, 1, 0, kernel))
        line += f", chunked {kernel} {t:.3f} ms ({flop / t / 1e9:.1f} TFLOP/s, {mem:.0f} MiB, {fused / t:.2f}x fused)"
        best = min(best, t)
    if "f16" in kinds:
        # the head kept decoded in f16 (what a VRAM budget with 1.5 GB to spare could afford): no decode per pass
        t, mem = measured(lambda: head_ops.head_stats_chunked(h, w, Q.Q6_K, softcap, 0.8, 1, 0, "f16", decoded=wf))
        line += (f", chunked f16 over the head kept decoded {t:.3f} ms ({mem:.0f} MiB + {wf.numel() * 2 / 2**20:.0f} MiB "
                 f"kept, {fused / t:.2f}x fused)")

    def torch_way():
        z = torch.tanh((h.half() @ wf.T).float() / softcap) * softcap / 0.8  # [L, V]
        probs = torch.softmax(z, dim=-1)
        entropy = -(probs * torch.log_softmax(z, dim=-1)).sum(-1)
        return z.argmax(-1), entropy, torch.multinomial(probs, 1), probs.half() @ wf

    theirs, theirs_mem = measured(torch_way)
    print(f"sampler statistics from the head ({rows} x {d} x {vocab} Q6_K): {line}; torch way {theirs:.3f} ms "
          f"({theirs_mem:.0f} MiB) -> the best of ours {theirs / best:.2f}x faster")
    if "f16" in kinds:  # the chunk's f16 rows against the L2 cache
        sizes = sorted({2048, 4096, head_ops.HEAD_CHUNK, 16384})
        times = [measured(lambda: head_ops.head_stats_chunked(h, w, Q.Q6_K, softcap, 0.8, 1, 0, "f16", chunk=c))
                 for c in sizes]
        print("  chunked f16 by chunk rows (f16 rows per chunk: rows x D x 2 bytes): " + ", ".join(
            f"{c}{' (default)' if c == head_ops.HEAD_CHUNK else ''} {t:.3f} ms ({c * d * 2 / 2**20:.0f} MiB rows, "
            f"{mem:.0f} MiB in all)" for c, (t, mem) in zip(sizes, times)))
    w = wf = None
    torch.cuda.empty_cache()


def attention(repeat: int, canvas: int = 256, context: int = 8192) -> None:
    """The decoder's attention at the 26B's heads (16 query heads; 25 sliding layers of 8 KV heads x 256 over
    the window, 5 global of 2 x 512 over the context) with the f16 KV cache, through kv_cache.KVCache as the
    decoder reads it: the engine's way (the canvas's keys written into the positions reserved after the
    cache, SDPA in f16 over the cache as it is), the same concatenated to a copy (no reserve), the way before
    session 9 (`attend` float32: the cache cast to float32 and concatenated every pass, SDPA in float32),
    and SDPA with enable_gqa in float32 (before session 7: the math kernel). ms per step, summed over the
    layers, with ratios against the float32 way."""
    import torch.nn.functional as F

    from dgemma.plugin.kv_cache import KVCache

    g = torch.Generator(device=DEVICE).manual_seed(0)
    caches = {"f16 in place (engine)": KVCache(dtype=torch.float16, reserve=canvas),
              "f16 concatenated": KVCache(dtype=torch.float16),
              "float32 cast+concatenated": KVCache(dtype=torch.float16, attend=torch.float32)}
    totals = dict.fromkeys([*caches, "float32 enable_gqa"], 0.0)
    for kv, hd, cached, layers in ((8, 256, 1023, 25), (2, 512, context, 5)):
        q = torch.randn(1, 16, canvas, hd, device=DEVICE, generator=g) * 0.1
        k, v = (torch.randn(1, kv, canvas, hd, device=DEVICE, generator=g) * 0.1 for _ in range(2))
        past_k, past_v = (torch.randn(1, kv, cached, hd, device=DEVICE, generator=g) for _ in range(2))
        for name, cache in caches.items():
            cache.store(0, past_k, past_v, None)

            def way(cache=cache):  # model.DiffusionGemma.attention's decoder branch
                keys, values = cache.with_canvas(0, k, v)
                return grouped_attention(q.to(keys.dtype), keys, values, None).float()

            totals[name] += timed(way, repeat) * layers
        f16 = caches["f16 concatenated"]
        totals["float32 enable_gqa"] += timed(lambda: F.scaled_dot_product_attention(
            q, torch.cat([f16.keys[0].float(), k], 2), torch.cat([f16.values[0].float(), v], 2), scale=1.0,
            enable_gqa=True), repeat) * layers
    base = totals["float32 cast+concatenated"]
    print(f"decoder attention per step (canvas {canvas}, context {context}, f16 cache): "
          + ", ".join(f"{k} {t:.2f} ms ({base / t:.2f}x float32)" for k, t in totals.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--kinds", default=",".join(ops.MATMULS),
                    help=f"matmul kinds to time, comma-separated (default: {','.join(ops.MATMULS)}; scalar and "
                         "each kind's family always)")
    args = ap.parse_args()
    asked = args.kinds.split(",")
    if unknown := [m for m in asked if m not in ops.MATMULS]:
        ap.error(f"--kinds: no matmul kind {', '.join(unknown)}; expected some of {', '.join(ops.MATMULS)}")
    cap = gpu_capability("bench/step_gpu.py")
    print(f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}")
    # those asked for, their families and scalar (the fallbacks the totals count) that this GPU runs
    wanted = {"scalar", *asked, *(ops.matmul_family(m) for m in asked)}
    kinds = [m for m in ops.MATMULS if m in wanted and ops.usable(m, Q.Q4_K, 256, cap)]
    print(f"{'weights':<32} " + " | ".join(f"{kind + ' ms':>14} {'TFLOP/s':>7}" for kind in kinds)
          + f" | {'torch ms':>9} {'TB/s':>6} | best, speedup over torch")
    totals = dict.fromkeys([*kinds, "best", "torch"], 0.0)
    for name, n, k, qtype, m, count in SHAPES:
        w = synthetic(n, k, qtype)
        x = torch.randn(m, k, device=DEVICE)
        bounded = "down" not in name  # f16 never takes the down projections' gelu(gate) * up (ops.usable)
        experts = name.startswith("expert")  # timed one expert at a time: only the kinds with a grouped form
        times = {kind: timed(lambda: getattr(ops, ops.MATMULS[kind][0])(x, w, qtype, k), args.repeat)
                 if ops.usable(kind, qtype, k, cap, bounded, experts) else float("nan") for kind in kinds}  # NaN: not run

        wf = None

        def torch_way():  # what the torch backend does per layer: dequantize (here: once, cached) + cuBLAS f16
            nonlocal wf
            if wf is None:
                wf = ops.get_rows(torch.arange(n, device=DEVICE), w, qtype, k).half()  # csrc/get_rows.cu
            return (x.half() @ wf.T).float()

        theirs = timed(torch_way, args.repeat)
        flop = 2 * m * n * k
        best = min((kind for kind in kinds if times[kind] == times[kind]), key=times.get)
        print(f"{name:<32} " + " | ".join(f"{times[kind]:14.3f} {flop / times[kind] / 1e9:7.1f}" for kind in kinds)
              + f" | {theirs:9.3f} {wf.numel() * 2 / theirs / 1e9:6.2f} | {best}, {theirs / times[best]:.2f}x"
              + f" ({w.numel() / times[best] / 1e9:.2f} TB/s of weights)")
        usable = [kind for kind in kinds if times[kind] == times[kind]]
        for kind in kinds:  # a kernel that cannot take this weight counts as what the engine runs instead
            totals[kind] += times[tune.fallback(kind, usable)] * count
        totals["best"] += times[best] * count
        totals["torch"] += theirs * count
        w = wf = None  # freed before the next shape
        torch.cuda.empty_cache()
    print("matmuls of one denoising step (sum over layers): " + ", ".join(f"{k} {totals[k]:.1f} ms" for k in kinds)
          + f", the best per shape {totals['best']:.1f} ms; dequant+cuBLAS {totals['torch']:.1f} ms (torch keeps f16 "
          f"weights: {totals['torch'] / max(totals['best'], 1e-9):.2f}x the best per shape)")
    moe_layer(args.repeat, kinds)
    head_pass(args.repeat, kinds)
    attention(args.repeat)
    ent = torch.rand(1, 256, device=DEVICE)
    tok = torch.randint(0, 262144, (1, 256), device=DEVICE)
    a = timed(lambda: ops.accept_renoise(ent, tok, 1, 0, 262144, 0.1), args.repeat)
    canvas, gen = torch.zeros(1, 256, dtype=torch.long), torch.Generator().manual_seed(0)
    # the torch backend's way: the sampler on the CPU (plugin/sampler.py), the pass's tensors copied there
    b = timed(lambda: renoise(*accept(canvas, tok.cpu(), ent.cpu(), 0.1), 262144, gen), args.repeat)
    print(f"accept/re-noise (1 x 256): csrc/accept.cu {a * 1e3:.1f} us, the torch backend's (copy to the CPU, "
          f"sampler.accept + renoise) {b * 1e3:.1f} us -> {b / a:.2f}x")


if __name__ == "__main__":
    main()
