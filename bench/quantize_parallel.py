"""Quantizing throughput in one process (the baseline), in threads, and in the worker processes convert and
dgemma quantize use (quant/parallel.py), in this one run, on random values shaped as the 26B's expert rows.

Each type's chunks (the writer's CHUNK_ELEMENTS values) go through the plain loop, a thread pool and Pool(N); the
bytes must match. Prints million values per second, the ratios, and what that makes of the 26B-A4B's ~25.8
billion values at each type.

    python bench/quantize_parallel.py [--workers N] [--values 30_000_000] [--types Q4_K,Q6_K,Q8_0]
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGMLQuantizationType

from dgemma import quant
from dgemma.quant.parallel import Pool, cores, quantize_chunk

CHUNK_ELEMENTS = 1 << 22  # as convert/writer.py cuts tensors (not imported: that pulls in torch)
MODEL_VALUES = 25.8e9  # DiffusionGemma-26B-A4B's parameters (DESIGN.md)


def timed(fn) -> tuple[float, list[np.ndarray]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=cores())
    ap.add_argument("--values", type=int, default=30_000_000, help="values quantized per type")
    ap.add_argument("--types", default="Q4_K,Q6_K,Q8_0")
    args = ap.parse_args()
    width = 2816  # a row of the 26B's expert down projection (hidden size 2816)
    rows = max(1, CHUNK_ELEMENTS // width)
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((rows, width), dtype=np.float32) * 0.02
              for _ in range(max(2, args.values // (rows * width)))]
    n = sum(c.size for c in chunks)
    print(f"{n / 1e6:.0f} M values per type in {len(chunks)} chunks of {rows}x{width}; {args.workers} workers "
          f"(cores here: {cores()})")
    with Pool(args.workers) as pool, ThreadPoolExecutor(args.workers) as threads:
        list(pool.map(quantize_chunk, [(chunks[0], GGMLQuantizationType.Q8_0)] * 2, 2))  # (the workers started)
        for name in args.types.split(","):
            qtype = GGMLQuantizationType[name.strip().upper()]
            base, ref = timed(lambda: [quant.quantize(c, qtype) for c in chunks])
            thr, by_threads = timed(lambda: list(threads.map(lambda c: quant.quantize(c, qtype), chunks)))
            proc, by_workers = timed(lambda: list(pool.map(quantize_chunk, ((c, qtype) for c in chunks), len(chunks))))
            for out in (by_threads, by_workers):
                assert all(np.array_equal(a, b) for a, b in zip(ref, out)), f"{name}: the bytes differ"
            mvs = lambda t: n / t / 1e6  # noqa: E731
            print(f"{qtype.name:5s} one process {mvs(base):6.1f} M values/s | {args.workers} threads {mvs(thr):6.1f} "
                  f"(x{base / thr:.2f}) | {args.workers} workers {mvs(proc):6.1f} (x{base / proc:.2f}) | 26B all in "
                  f"this type: {MODEL_VALUES / (n / base) / 60:.0f} min -> {MODEL_VALUES / (n / proc) / 60:.0f} min")


if __name__ == "__main__":
    main()
