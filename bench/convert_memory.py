"""Peak RSS of `dgemma convert` on a synthetic DiffusionGemma checkpoint of >= 2 GB.

Builds (or reuses, with --dir) a random bf16 checkpoint with transformers whose largest tensor is the
262,144-row embedding, then converts it in a child process per output type and reads the child's peak
RSS from the kernel (ru_maxrss). Baseline, measured the same way in the same run: a child that only
imports the converter (Python + torch + gguf). Target: peak <= 2 x largest tensor + 300 MB.

    python bench/convert_memory.py [--dir /tmp/dg-2gb] [--types BF16,Q8_0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MB = 1 << 20


def child_peak_rss(cmd: list[str]) -> tuple[int, float]:
    """Run `cmd`; return (its peak RSS in bytes, wall seconds). Uses a fresh grandchild per call."""
    wrapper = (
        "import resource, subprocess, sys, time, json;"
        "t = time.perf_counter(); rc = subprocess.call(sys.argv[1:]);"
        "print(json.dumps([rc, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,"
        " time.perf_counter() - t]))"
    )
    out = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, check=True)
    rc, rss, secs = json.loads(out.stdout.strip().splitlines()[-1])
    if rc != 0:
        raise SystemExit(f"command failed ({rc}): {' '.join(cmd)}\n{out.stderr}")
    return rss, secs


def build(dir_: Path) -> Path:
    from dgemma.convert.tiny import TinySpec, build_checkpoint

    spec = TinySpec(
        vocab_size=262144, hidden_size=2048, intermediate_size=2048, num_hidden_layers=4,
        layer_types=("sliding_attention",) * 3 + ("full_attention",), num_attention_heads=8,
        num_key_value_heads=4, num_global_key_value_heads=2, head_dim=128, global_head_dim=256,
        num_experts=16, top_k_experts=4, moe_intermediate_size=1024, dtype="bfloat16",
        max_shard_size="1GB", with_vision=False,
    )
    if not (dir_ / "config.json").exists():
        t = time.perf_counter()
        build_checkpoint(spec, dir_)
        print(f"built checkpoint in {time.perf_counter() - t:.0f} s: {dir_}")
    return dir_


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, help="where to build/reuse the synthetic checkpoint (default: a temp dir)")
    ap.add_argument("--types", default="BF16,Q8_0")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory() if args.dir is None else None
    ckpt = build(args.dir or Path(tmp.name) / "ckpt")
    from dgemma.convert.source import Checkpoint

    tensors = Checkpoint.open(ckpt).tensors.values()
    total = sum(t.nbytes for t in tensors)
    largest = max(tensors, key=lambda t: t.nbytes)
    bound = 2 * largest.nbytes + 300 * MB

    base_rss, _ = child_peak_rss([sys.executable, "-c", "import dgemma.convert, dgemma.plugin.cli"])
    print(f"checkpoint      {total / MB:8.0f} MB in {len(tensors)} tensors; largest {largest.name} "
          f"{largest.nbytes / MB:.0f} MB")
    print(f"baseline        {base_rss / MB:8.0f} MB peak RSS (python + imports, no conversion)")
    print(f"bound           {bound / MB:8.0f} MB (2 x largest tensor + 300 MB)")
    ok = True
    with tempfile.TemporaryDirectory(dir=ckpt.parent) as out_dir:
        for type_name in args.types.split(","):
            out = Path(out_dir) / f"m-{type_name}.gguf"
            rss, secs = child_peak_rss([sys.executable, "-m", "dgemma.plugin.cli", "convert", str(ckpt), "-o",
                                        str(out), "--type", type_name, "--quiet"])
            ok &= rss <= bound
            print(f"convert {type_name:<6}  {rss / MB:8.0f} MB peak RSS = {rss / base_rss:4.2f} x baseline, "
                  f"{rss / bound:4.2f} x bound; {secs:5.1f} s, {total / MB / secs:5.0f} MB/s read; "
                  f"{'OK' if rss <= bound else 'OVER'}")
            out.unlink()
    if tmp is not None:
        tmp.cleanup()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
