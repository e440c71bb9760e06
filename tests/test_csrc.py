"""CUDA sources without a GPU: every .cu compiles with nvcc for each target architecture (warnings as
errors), and the kernels' block decoding (csrc/quant/blocks.cuh), run on the CPU through a host harness,
equals gguf-py's dequantizers bit for bit."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from dgemma import quant
from dgemma.plugin.cuda.head_ops import HEAD_MAX_D
from dgemma.plugin.cuda.ops import ACCEPT_MAX_CANVAS, MM_TILE, MMA_TILE, MODULES

import kernel_resources as kr  # bench/ (pyproject's pythonpath)

CSRC = Path(__file__).resolve().parents[1] / "csrc"
ARCHS = ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90", "sm_120"]
KERNELS = sorted(p.name for p in CSRC.glob("*.cu"))
nvcc = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(nvcc is None, reason="nvcc is not installed")


def supported_archs() -> list[str]:
    listed = subprocess.run([nvcc, "--list-gpu-arch"], capture_output=True, text=True).stdout.split()
    return [a for a in ARCHS if a.replace("sm_", "compute_") in listed]


@pytest.mark.parametrize("source", KERNELS)
def test_kernel_compiles_for_every_architecture(source, tmp_path):
    """Every .cu for every target, warnings as errors; and every kernel can be launched as the wrappers
    launch it on each (ptxas's report, bench/kernel_resources.py): its registers times the largest block
    size fit the register file (else "too many resources requested for launch", a GPU-only failure), and
    its static plus dynamic shared memory fits the 48 KB a launch gets without opting in."""
    archs = supported_archs()
    assert {"sm_75", "sm_80", "sm_86", "sm_89", "sm_90"} <= set(archs)
    gencode = [f"-gencode=arch={a.replace('sm_', 'compute_')},code={a}" for a in archs]
    proc = subprocess.run([nvcc, "-std=c++17", "-Werror", "all-warnings", f"-I{CSRC}", *gencode, "-Xptxas", "-v", "-c",
                           str(CSRC / source), "-o", str(tmp_path / "k.o")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    rows = kr.parse_archs(proc.stderr + proc.stdout)
    names = kr.demangle([r[1] for r in rows])
    plain = {name for module in MODULES for name in module[2]}  # the extern "C" kernels
    assert {r[0] for r in rows} == set(archs) and all(n.startswith("dg::") or n in plain for n in names), names
    for (arch, _, regs, spill, smem, stack), name in zip(rows, names):
        threads = kr.threads_for(name, canvas=ACCEPT_MAX_CANVAS)  # the largest block
        dynamic = kr.dynamic_smem(name, HEAD_MAX_D)
        blocks, limit = kr.Kernel(name, regs, spill, smem, threads).resident_blocks(arch, dynamic)
        assert blocks >= 1 and smem + dynamic <= 48 << 10, (f"{name} on {arch}: {regs} registers x {threads} threads, "
                                                            f"{smem} + {dynamic} bytes of shared memory ({limit})")
        if "qmatmul" in name:  # the matmul tiles keep their accumulators in registers
            assert stack == 0 and spill == 0, f"{name} on {arch}: {stack} bytes of stack frame, {spill} of spills"


def build_host_tool(name: str, out_dir: Path) -> Path:
    """Compile csrc/tools/NAME.cu for the CPU (nvcc, warnings as errors)."""
    exe = out_dir / name
    proc = subprocess.run([nvcc, "-std=c++17", "-O2", "-Werror", "all-warnings", "-o", str(exe),
                           str(CSRC / "tools" / f"{name}.cu")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return exe


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return build_host_tool("dequant_host", tmp_path_factory.mktemp("harness"))


TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_kernel_block_decoding_equals_gguf_py(harness, qtype):
    """The kernels' decoding, bit for bit against gguf-py: unit by unit along the row as the tiles, the head
    and get_rows decode it (16-value groups counted along the row through the int8 tile's decompose_unit, or
    float values); rows of 768 values (3 K-quant blocks, 24 32-value blocks)."""
    rng = np.random.default_rng(int(qtype))
    x = rng.standard_normal((7, 768)) * rng.uniform(1e-3, 1e3, (7, 1))
    x[0, :300] = 0.0
    x[1] = np.abs(x[1])
    data = quant.quantize(x.astype(np.float32), qtype)
    proc = subprocess.run([str(harness), str(int(qtype)), "768"], input=data.tobytes(), capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    ours = np.frombuffer(proc.stdout, np.float32).reshape(7, 768)
    ref = x.astype(np.float32) if qtype == Q.F32 else gguf.quants.dequantize(data, qtype).reshape(7, 768)
    np.testing.assert_array_equal(ours, ref)


def test_int_to_float_without_conversions_is_exact(harness):
    """csrc/quant/base.cuh's s8_to_f32 equals the int8 cast for every byte (any byte beside it), and
    small_i32_to_f32 is exact exactly on [-2^22, 2^22]: the range the int8 tile's dot products (two groups
    of 16 where they share scales: at most 32 x 128 x 128) and the q8 sums stay in."""
    proc = subprocess.run([str(harness), "ints"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(-(1 << 22)), str(1 << 22)]  # the dots' bound: mma_q8.cuh's static_assert


def test_harness_refuses_bad_input(harness):
    proc = subprocess.run([str(harness), str(int(Q.Q4_K)), "100"], input=b"", capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"not a multiple" in proc.stderr


@pytest.fixture(scope="module")
def head_harness(tmp_path_factory):
    return build_host_tool("head_host", tmp_path_factory.mktemp("head"))


@pytest.mark.parametrize("qtype,L,D,V,splits,softcap,temp", [
    (Q.F32, 1, 32, 1, 1, 0.0, 1.0),
    (Q.Q8_0, 3, 96, 1000, 7, 30.0, 0.6),  # V not a multiple of the splits
    (Q.Q6_K, 5, 256, 777, 13, 30.0, 0.8),
    (Q.Q4_K, 2, 512, 300, 300, 0.0, 0.4),  # one row per split
], ids=lambda v: getattr(v, "name", str(v)))
def test_head_split_merge_equals_head_reference(head_harness, qtype, L, D, V, splits, softcap, temp):
    """csrc/head.cuh's online update and merge, run in the kernels' split order on the CPU, give the
    statistics of plugin/cuda/head_ref.py's plain computation on the full logits (float64)."""
    import torch

    from dgemma.plugin.cuda.head_ref import head_stats_reference

    rng = np.random.default_rng(L * 1000 + V)
    h = (rng.standard_normal((L, D)) * 2).astype(np.float32)
    e = (rng.standard_normal((V, D)) * 0.1).astype(np.float32)
    if V > 10:
        e[V // 2] = e[3]  # a tie between two rows in different splits: argmax keeps the lower index
        h[0] = e[3] * 50
    data = e if qtype == Q.F32 else quant.quantize(e, qtype)
    seed, step = 2**33 + V, L + 3
    proc = subprocess.run([str(head_harness), str(int(qtype)), str(L), str(D), str(V), str(splits), str(softcap), str(temp),
                           str(seed), str(step)], input=h.tobytes() + data.tobytes(), capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = np.frombuffer(proc.stdout, np.uint8)
    mx, arg, lse, ent, sample = (np.frombuffer(out[i * 4 * L:(i + 1) * 4 * L].tobytes(),
                                               np.int32 if i in (1, 4) else np.float32) for i in range(5))
    sc = np.frombuffer(out[20 * L:].tobytes(), np.float32).reshape(L, D)
    ef = e if qtype == Q.F32 else quant.dequantize(data, qtype).reshape(V, D)
    ref = head_stats_reference(torch.from_numpy(h).double(), torch.from_numpy(ef).double(), softcap, temp, seed, step)
    np.testing.assert_array_equal(arg, ref.argmax.numpy())
    np.testing.assert_array_equal(sample, ref.sample.numpy())  # the same draws, whatever the split
    if V > 10:
        assert arg[0] == 3
    for ours, want in ((mx, ref.max), (lse, ref.lse), (ent, ref.entropy)):
        np.testing.assert_allclose(ours, want.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sc, ref.sc.numpy(), rtol=1e-4, atol=1e-5)


def test_head_harness_refuses_bad_input(head_harness):
    proc = subprocess.run([str(head_harness), str(int(Q.Q4_K)), "1", "100", "4", "1", "0", "1", "0", "0"], input=b"",
                          capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"multiple of 256" in proc.stderr


def test_expert_tiles_cover_every_pair_once():
    from dgemma.plugin.cuda.ops import MM_TILE, expert_tiles

    counts = [0, 17, 0, 1, 16, 33, 0]
    offsets, tile_expert, tile_m0 = expert_tiles(counts)
    assert offsets == [0, 0, 17, 17, 18, 34, 67, 67]
    assert tile_expert == [1, 1, 3, 4, 5, 5, 5] and tile_m0 == [0, 16, 17, 18, 34, 50, 66]
    covered = [m for e, m0 in zip(tile_expert, tile_m0) for m in range(m0, min(m0 + MM_TILE, offsets[e + 1]))]
    assert covered == list(range(sum(counts)))
    assert expert_tiles([0, 0]) == ([0, 0, 0], [], [])
    with pytest.raises(ValueError, match="expert 1 has a negative count"):
        expert_tiles([3, -1])


@pytest.fixture(scope="module")
def moe_tiles_harness(tmp_path_factory):
    return build_host_tool("moe_tiles_host", tmp_path_factory.mktemp("moe"))


@pytest.mark.parametrize("counts", [[0, 17, 0, 1, 16, 33, 0], [0, 0], [300], [1] * 40, [0] * 7 + [5], [16, 0, 0, 16],
                                    [32, 0, 31, 64, 65]], ids=lambda c: "-".join(map(str, c))[:24])
@pytest.mark.parametrize("tile", [MM_TILE, MMA_TILE], ids=["float-tiles", "mma-tiles"])
def test_device_tile_search_finds_the_expert_tiles(moe_tiles_harness, counts, tile):
    """csrc/moe_tiles.cuh's search over the prefix sums (the GPU's, with no host sync) gives exactly the
    tiles of ops.expert_tiles, then nothing up to the launch's bound pairs / tile + E, for the float
    kernel's 16-row tiles and the tensor-core kernels' 32; ops.ExpertGroups.tiles makes the same prefix sums
    and bound."""
    from dgemma.plugin.cuda.ops import ExpertGroups, expert_tiles

    # the wrappers' tile heights are the kernels' (csrc/mm_tile.cuh MM_TM, csrc/mma_tile.cuh MMA_TM)
    assert f"MM_TM = {MM_TILE};" in (CSRC / "mm_tile.cuh").read_text()
    assert f"MMA_TM = {MMA_TILE};" in (CSRC / "mma_tile.cuh").read_text()
    proc = subprocess.run([str(moe_tiles_harness), str(tile), *map(str, counts)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = np.frombuffer(proc.stdout, np.int32).reshape(-1, 3)
    offsets, tile_expert, tile_m0 = expert_tiles(counts, tile)
    tile_offsets, bound = ExpertGroups(counts, "cpu").tiles(tile)
    assert len(got) == bound == sum(counts) // tile + len(counts) >= len(tile_expert)
    assert tile_offsets.tolist() == [0, *np.cumsum([(c + tile - 1) // tile for c in counts]).tolist()]
    assert tile_offsets[-1] == len(tile_expert)
    want = [[e, m0, min(offsets[e + 1], m0 + tile)] for e, m0 in zip(tile_expert, tile_m0)]  # the tile's pairs
    assert got[: len(tile_expert)].tolist() == want
    assert (got[len(tile_expert):] == -1).all()


@pytest.fixture(scope="module")
def rng_harness(tmp_path_factory):
    return build_host_tool("rng_host", tmp_path_factory.mktemp("rng"))


# Random123's known-answer vectors for philox4x32-10 (counter, key -> output)
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers_in_cuda_header_and_numpy(rng_harness, counter, key, want):
    from dgemma.plugin import rng

    proc = subprocess.run([str(rng_harness), "kat", *(f"{x:x}" for x in counter + key)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert tuple(int(x) for x in np.frombuffer(proc.stdout, np.uint32)) == want
    assert tuple(int(w) for w in rng.philox4x32_10(*counter, *key)) == want


def test_uniforms_are_never_0_or_1_in_cuda_header_and_numpy(rng_harness):
    """The extreme words: 0xFFFFFFFF gave exactly 1.0 with 24 bits (1 - 2^-25 rounds to even), whose Gumbel
    noise is +inf: that vocabulary row won the sample whatever its logit."""
    from dgemma.plugin import rng

    words = np.array([0, 1, 0x1FF, 0x200, 0x7FFFFFFF, 0xFFFFFDFF, 0xFFFFFE00, 0xFFFFFFFF], np.uint32)
    proc = subprocess.run([str(rng_harness), "uniform", *(f"{w:x}" for w in words)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    u = np.frombuffer(proc.stdout, np.float32)
    np.testing.assert_array_equal(u, rng.uniform(words))
    want = ((words >> 9).astype(np.float64) * 2 + 1) / 2.0**24  # (2k + 1) / 2^24, exact in float32
    np.testing.assert_array_equal(u.astype(np.float64), want)
    assert u.min() == 2.0**-24 and u.max() == 1 - 2.0**-24 and len(set(u.tolist())) == 5


@pytest.mark.parametrize("seed,step,pos,v0,n", [(1, 12, 0, 0, 1000), (2**40 + 7, 1, 255, 262_000, 144), (0, 0, 3, 5, 0),
                                                (3, 7, 9, 5, 2), (3, 7, 9, 1, 11), (5, 2, 1, 262_141, 3)])
def test_sampler_uniforms_equal_numpy_bit_for_bit(rng_harness, seed, step, pos, v0, n):
    from dgemma.plugin import rng

    proc = subprocess.run([str(rng_harness), str(seed), str(step), str(pos), str(v0), str(n)], capture_output=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = np.frombuffer(proc.stdout, np.uint8)
    words, u = out[: 4 * n].view(np.uint32), out[4 * n:].view(np.float32)
    ref = rng.sampler_uniforms(seed, step, pos, v0 + n)[0, v0:]
    # row v's word: word v % 4 of Philox(counter (v // 4, pos, step, 0)), one row at a time
    ref_words = np.array([rng.philox4x32_10(v // 4, pos, step, 0, seed & 0xFFFFFFFF, seed >> 32)[v % 4]
                          for v in range(v0, v0 + n)], np.uint32)
    np.testing.assert_array_equal(words, ref_words)
    np.testing.assert_array_equal(u, ref)
    np.testing.assert_array_equal(rng.sampler_uniforms(seed, step, pos, v0 + n, start=v0)[0], ref)  # any start
    assert rng.sampler_uniforms(seed, step, np.arange(0), v0 + n, start=v0).shape == (0, n)  # no positions
    if n >= 100:  # (a mean of a few draws says nothing)
        assert 0.0 < u.min() and u.max() < 1.0 and abs(float(u.mean()) - 0.5) < 0.1


@pytest.mark.parametrize("seed,step,kind,vocab,pos0,n", [(1, 0, 0, 262_144, 0, 2000), (2**40 + 7, 47, 1, 4096, 250, 300),
                                                       (9, 3, 0, 1, 0, 10), (5, 2**31 - 1, 1, 2**31 - 1, 7, 100)])
def test_sampler_tokens_equal_numpy(rng_harness, seed, step, kind, vocab, pos0, n):
    from dgemma.plugin import rng

    proc = subprocess.run([str(rng_harness), "tokens", str(seed), str(step), str(kind), str(vocab), str(pos0), str(n)],
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    got = np.frombuffer(proc.stdout, np.int32)
    want = rng.sampler_tokens(seed, step, np.arange(pos0, pos0 + n), vocab, kind)
    np.testing.assert_array_equal(got, want)
    assert got.min() >= 0 and got.max() < vocab
    if vocab > n:
        assert len(set(got.tolist())) > n * 0.8  # draws, not a constant
