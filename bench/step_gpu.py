"""GPU kernels at the real 26B-A4B shapes, against the torch backend's way (dequantize to f16 + cuBLAS).

Slice 1 of issue 5: the quantized matmul kernel (csrc/qmatmul.cu) for every weight class of one
denoising step of the Q4_K_M file (canvas 256; routed experts see 256 x 8 / 128 = 16 tokens each on
average), one layer's routed experts in one launch per matrix (csrc/moe.cu), plus the accept/re-noise step. Weights are synthetic: random block bytes with sane fp16
scales, made on the GPU in seconds (timing does not depend on the values). Prints ms, achieved TB/s of
weight bytes and TFLOP/s for both, and their ratio, measured in this run on this GPU.

    python bench/step_gpu.py [--repeat 20]
"""

from __future__ import annotations

import argparse

import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from dgemma.plugin.cuda import check_cuda
from dgemma.plugin.cuda import ops

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
SCALE_FIELDS = {  # byte ranges of the fp16 scales inside a block
    Q.Q8_0: [(0, 2)], Q.Q4_0: [(0, 2)], Q.Q5_0: [(0, 2)], Q.Q5_1: [(0, 2), (2, 4)], Q.Q2_K: [(80, 82), (82, 84)],
    Q.Q3_K: [(108, 110)], Q.Q4_K: [(0, 2), (2, 4)], Q.Q5_K: [(0, 2), (2, 4)], Q.Q6_K: [(208, 210)],
}


def synthetic(n: int, k: int, qtype: Q) -> torch.Tensor:
    bs, ts = GGML_QUANT_SIZES[qtype]
    w = torch.randint(0, 256, (n, k // bs, ts), dtype=torch.uint8, device="cuda")
    half = torch.tensor([0.01], dtype=torch.float16).view(torch.uint8).cuda()  # [2] bytes of fp16(0.01)
    for a, b in SCALE_FIELDS[qtype]:
        w[:, :, a:b] = half
    return w.view(n, -1)


def timed(fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat  # ms


def moe_layer(repeat: int, experts: int = 128, top_k: int = 8, tokens: int = 256, d: int = 2816, fe: int = 704) -> None:
    """One layer's routed experts (csrc/moe.cu, one launch per matrix) against one qmatmul launch per expert."""
    g = torch.Generator(device="cuda").manual_seed(0)
    top_i = torch.rand(tokens, experts, device="cuda", generator=g).topk(top_k, dim=-1).indices  # [256, 8]
    order = torch.argsort(top_i.flatten(), stable=True)
    rows = (order // top_k).to(torch.int32)
    counts = torch.bincount(top_i.flatten(), minlength=experts).tolist()
    gate_up, down = synthetic(experts * 2 * fe, d, Q.Q4_K), synthetic(experts * d, fe, Q.Q5_0)
    gate_up, down = gate_up.view(experts, 2 * fe, -1), down.view(experts, d, -1)
    x = torch.randn(tokens, d, device="cuda")
    act = torch.randn(len(rows), fe, device="cuda")

    def grouped():  # as QuantExperts.grouped: the groups once per layer, then the two launches
        groups = ops.ExpertGroups(counts, "cuda")
        ops.moe_qmatmul(x, rows, groups, gate_up, Q.Q4_K, d)
        ops.moe_qmatmul(act, None, groups, down, Q.Q5_0, fe)

    starts = [sum(counts[:e]) for e in range(experts)]

    def per_expert():
        for e, (s0, c) in enumerate(zip(starts, counts)):
            if c:
                ops.qmatmul(x[rows[s0:s0 + c].long()], gate_up[e], Q.Q4_K, d)
                ops.qmatmul(act[s0:s0 + c], down[e], Q.Q5_0, fe)

    a, b = timed(grouped, repeat), timed(per_expert, repeat)
    wbytes = gate_up.numel() + down.numel()
    print(f"routed experts, one layer ({tokens} tokens x top-{top_k} of {experts}): grouped {a:.3f} ms "
          f"({wbytes / a / 1e9:.2f} TB/s), one launch per expert {b:.3f} ms ({b / a:.2f}x); x30 layers: {30 * a:.1f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    cap = check_cuda()
    print(f"{torch.cuda.get_device_name()} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}")
    print(f"{'weights':<32} {'ours ms':>9} {'TB/s':>6} {'TFLOP/s':>8} | {'torch ms':>9} {'TB/s':>6} | {'speedup':>7}")
    total_ours = total_torch = 0.0
    for name, n, k, qtype, m, count in SHAPES:
        w = synthetic(n, k, qtype)
        x = torch.randn(m, k, device="cuda")
        ours = timed(lambda: ops.qmatmul(x, w, qtype, k), args.repeat)
        from dgemma import quant

        wf = None

        def torch_way():  # what the torch backend does per layer: dequantize (here: once, cached) + cuBLAS f16
            nonlocal wf
            if wf is None:
                wf = torch.from_numpy(quant.dequantize(w.cpu().numpy(), qtype).reshape(n, k)).half().cuda()
            return (x.half() @ wf.T).float()

        theirs = timed(torch_way, args.repeat)
        wbytes, flop = w.numel(), 2 * m * n * k
        print(f"{name:<32} {ours:9.3f} {wbytes / ours / 1e9:6.2f} {flop / ours / 1e9:8.2f} | {theirs:9.3f} "
              f"{wf.numel() * 2 / theirs / 1e9:6.2f} | {theirs / ours:6.2f}x")
        total_ours += ours * count
        total_torch += theirs * count
        del w, wf
        torch.cuda.empty_cache()
    print(f"matmuls of one denoising step (sum over layers): ours {total_ours:.1f} ms, dequant+cuBLAS {total_torch:.1f} ms "
          f"(torch keeps f16 weights: {total_torch / max(total_ours, 1e-9):.2f}x)")
    moe_layer(args.repeat)
    ent = torch.rand(1, 256, device="cuda")
    tok = torch.randint(0, 262144, (1, 256), device="cuda")
    a = timed(lambda: ops.accept_renoise(ent, tok, tok, 0.1), args.repeat)
    print(f"accept/re-noise (1 x 256): {a * 1e3:.1f} us")
    print(f"peak VRAM {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
