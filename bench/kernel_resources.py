"""What ptxas reports for every kernel the wrappers launch, and the occupancy that allows, without a GPU.

For each csrc module in plugin/cuda/ops.MODULES: `nvcc -cubin -Xptxas -v` for one architecture, then per
kernel its registers per thread, spills, static shared memory, the block size the wrappers launch it with,
and the resident blocks and warps per SM those allow (the register file, the thread and block limits and
the shared memory per SM of that architecture). Occupancy is not speed: a memory-bound kernel may run
well at 25 %; it says where a kernel cannot hide latency by more warps, beside bench/step_gpu.py's
measured times.

    python bench/kernel_resources.py [--arch sm_90] [--filter head]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from dgemma.plugin.cuda import head_ops, ops
from dgemma.plugin.cuda.loader import csrc_dir

# per SM: 32-bit registers, resident threads, resident blocks, shared memory (bytes) usable by blocks
LIMITS = {"sm_75": (65536, 1024, 16, 64 << 10), "sm_80": (65536, 2048, 32, 164 << 10),
          "sm_86": (65536, 1536, 16, 100 << 10), "sm_89": (65536, 1536, 24, 100 << 10),
          "sm_90": (65536, 2048, 32, 228 << 10), "sm_120": (65536, 1536, 32, 100 << 10)}
REG_GRANULE, SMEM_RESERVED = 256, 1024  # registers are allocated per warp in 256s; 1 KB per block is the system's

INFO = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+)'.*?"
                  r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads.*?"
                  r"Used (\d+) registers(?:, used \d+ barriers)?(?:, \d+ bytes cumulative stack size)?"
                  r"(?:, (\d+) bytes smem)?", re.S)


@dataclass
class Kernel:
    name: str       # demangled, without the parameter list
    registers: int
    spill_bytes: int
    smem: int
    threads: int    # per block, as the wrappers launch it
    stack: int = 0  # stack frame bytes (local memory)

    def resident_blocks(self, arch: str, dynamic_smem: int = 0) -> tuple[int, str]:
        """Blocks per SM and the limit that sets it."""
        regs, threads, blocks, smem = LIMITS[arch]
        warps = -(-self.threads // 32)
        per_warp = -(-self.registers * 32 // REG_GRANULE) * REG_GRANULE
        by = {"registers": regs // (per_warp * warps) if self.registers else blocks,
              "threads": threads // (warps * 32), "blocks": blocks,
              "shared memory": smem // (self.smem + dynamic_smem + SMEM_RESERVED)}
        limit = min(by, key=by.get)
        return by[limit], limit


def threads_for(name: str, canvas: int = 256) -> int:
    """The block size the wrappers launch kernel `name` with (plugin/cuda/ops.py, head_ops.py), for a canvas
    of `canvas` positions (the 26B's 256; only accept_renoise's depends on it)."""
    base = re.sub(r"^dg::|<.*$", "", name)
    if base in ("qmatmul", "moe_qmatmul"):
        return ops.MM_THREADS
    if base.startswith("get_rows"):
        return ops.GET_ROWS_THREADS
    if base.startswith("head_"):
        return head_ops.HEAD_THREADS
    if base == "accept_renoise":
        return min(ops.ACCEPT_MAX_CANVAS, max(32, canvas))  # ops.accept_renoise's
    return ops.MMA_THREADS  # the tensor-core tiles and quantize_q8


def dynamic_smem(name: str, d: int = 2816) -> int:
    """The dynamic shared memory the wrappers launch kernel `name` with at hidden size d (the 26B's 2816):
    head_partials' e_row [D] floats, none elsewhere."""
    return 4 * d if name.startswith("dg::head_partials") else 0


def parse_archs(ptxas_output: str) -> list[tuple[str, str, int, int, int, int]]:
    """(arch, mangled name, registers, spill bytes, static shared bytes, stack frame bytes) per entry function in
    `-Xptxas -v` output, for one architecture or several (`-gencode` for each). A stack frame is local memory:
    an array the compiler could not keep in registers (indexed by a loop it did not unroll) or spills."""
    return [(m[1], m[0], int(m[5]), int(m[3]) + int(m[4]), int(m[6] or 0), int(m[2]))
            for m in INFO.findall(ptxas_output)]


def demangle(names: list[str]) -> list[str]:
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not tool or not names:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout.split("\n")
    return [re.sub(r"^void |\(.*$", "", o) or n for o, n in zip(out, names)]  # "void dg::f<1>(...)" -> dg::f<1>


def kernels(arch: str, sources: list[str] | None = None) -> list[Kernel]:
    """Every kernel of `sources` (default: every module the wrappers compile), as ptxas builds it for arch."""
    found: list[Kernel] = []
    with tempfile.TemporaryDirectory() as tmp:
        for source in sources or sorted({m[0] for m in ops.MODULES}):
            proc = subprocess.run(["nvcc", "-std=c++17", f"-arch={arch}", f"-I{csrc_dir()}", "-cubin", "-Xptxas", "-v",
                                   str(csrc_dir() / source), "-o", str(Path(tmp) / "k.cubin")],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"nvcc failed on {source}:\n{proc.stderr[-2000:]}")
            rows = parse_archs(proc.stderr + proc.stdout)
            for (_, _, regs, spill, smem, stack), name in zip(rows, demangle([r[1] for r in rows])):
                found.append(Kernel(name, regs, spill, smem, threads_for(name), stack))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90", choices=sorted(LIMITS))
    ap.add_argument("--filter", default="", help="only kernels whose name contains this")
    args = ap.parse_args()
    if shutil.which("nvcc") is None:
        sys.exit("kernel_resources needs nvcc (the CUDA toolkit)")
    _, max_threads, _, _ = LIMITS[args.arch]
    print(f"{'kernel':36} {'regs':>5} {'spill':>6} {'stack':>6} {'smem':>7} {'threads':>7} {'blocks/SM':>9} "
          f"{'occupancy':>9}  limit")
    for k in kernels(args.arch):
        if args.filter not in k.name:
            continue
        dyn = dynamic_smem(k.name)
        blocks, limit = k.resident_blocks(args.arch, dyn)
        occupancy = blocks * k.threads / max_threads
        print(f"{k.name:36} {k.registers:5d} {k.spill_bytes:6d} {k.stack:6d} {k.smem + dyn:7d} {k.threads:7d} {blocks:9d} "
              f"{occupancy:8.0%}  {limit}")


if __name__ == "__main__":
    main()
