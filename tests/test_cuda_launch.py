"""Every kernel launch in plugin/cuda/ops.py (and moe_ops.py, which launches through it) against the kernel's parameter list in csrc/, without a GPU.

A launch packs its arguments by their Python types (tensors as 8-byte device pointers, numpy scalars at their
own width), so one int64 where the kernel takes an int shifts every later argument, and an int64 tensor where
it reads int32 doubles every index: on a GPU that is garbage or an illegal address, never an error message.
Here each wrapper runs on CPU tensors that claim to be on a GPU, with the kernel lookup and the launch
replaced by recorders, and every recorded argument is checked against the C++ parameter it lands in: the
count, each scalar's numpy type, each pointer's tensor dtype (or a null pointer where no tensor is passed).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from cuda_util import KERNEL_SIGNATURE

from dgemma import quant
from dgemma.plugin.cuda import head_ops, ops
from dgemma.plugin.cuda.loader import csrc_dir

import kernel_resources as kr  # bench/ (pyproject's pythonpath)

POINTEE = {"float": torch.float32, "int": torch.int32, "uint8_t": torch.uint8, "int8_t": torch.int8,
           "uint16_t": torch.float16}  # f16 values travel as their bits
SCALAR = {"int": np.int32, "float": np.float32, "long": np.int64, "unsigned long long": np.uint64}


def kernel_parameters() -> dict[str, list[tuple[str, str, bool]]]:
    """Kernel name -> [(C type without qualifiers, parameter name, is a pointer)] from csrc/*.cu."""
    found: dict[str, list[tuple[str, str, bool]]] = {}
    for path in sorted(csrc_dir().glob("*.cu")):
        for name, params in KERNEL_SIGNATURE.findall(path.read_text()):
            out = []
            for p in params.split(","):
                words = p.replace("*", " * ").replace("__restrict__", " ").replace("const", " ").split()
                out.append((" ".join(w for w in words[:-1] if w != "*"), words[-1], "*" in words))
            assert name not in found, f"kernel {name} defined twice"
            found[name] = out
    return found


PARAMS = kernel_parameters()


@pytest.fixture
def launches(monkeypatch):
    """Run the wrappers on the CPU: tensors report is_cuda, the GPU queries answer as an H100 would, and
    kernel()/_launch() record (kernel name, arguments) instead of compiling and launching."""
    recorded: list[tuple[str, tuple]] = []
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type("P", (), {"multi_processor_count": 132}))
    for module in (ops, head_ops):
        monkeypatch.setattr(module, "kernel", lambda source, name, names=(): (source, name, names))
        monkeypatch.setattr(module, "_launch", lambda fn, grid, block, args, shared_mem=0: recorded.append((fn, tuple(args))))
    return recorded


def check(fn: tuple[str, str, tuple], args: tuple) -> str:
    """The kernel fn = (source, name, name expressions) takes args; returns the kernel's base name."""
    source, name, names = fn
    assert name in names or not name.startswith("dg::"), f"{name} is not among {source}'s name expressions"
    base = re.sub(r"^dg::|<.*>$", "", name)
    params = PARAMS[base]
    assert len(args) == len(params), f"{base}: {len(args)} arguments for {len(params)} parameters"
    for i, (arg, (ctype, pname, pointer)) in enumerate(zip(args, params)):
        where = f"{base}({pname}: {ctype}{' *' if pointer else ''})"
        if pointer:
            if isinstance(arg, torch.Tensor):
                assert arg.dtype == POINTEE[ctype], f"{where} gets a {arg.dtype} tensor"
                # a kernel walks its buffers densely, unless a leading dimension (lda, ldy) follows the pointer
                strided = i + 1 < len(params) and params[i + 1][1].startswith("ld") and arg.stride(-1) == 1
                assert arg.is_contiguous() or strided, f"{where} gets a non-contiguous tensor {tuple(arg.stride())}"
            else:
                assert arg is None or (type(arg) is np.uint64 and arg == 0), f"{where} gets {arg!r}"
        else:
            assert type(arg) is SCALAR[ctype], f"{where} gets {type(arg).__name__}"
    return base


def weights(qtype: Q, n: int, k: int, experts: int | None = None) -> torch.Tensor:
    w = np.random.default_rng(n + k).standard_normal(((experts or 1) * n, k)).astype(np.float32) * 0.05
    rows = torch.from_numpy(quant.quantize(w, qtype).reshape((experts or 1) * n, -1))
    return rows if experts is None else rows.view(experts, n, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q8_0, Q.F16])
def test_dense_launches_match_their_kernels(launches, qtype):
    x, w = torch.randn(5, 256), weights(qtype, 7, 256)
    ops.get_rows(torch.tensor([0, 6, 3]), w, qtype, 256)  # int64 ids: the wrapper must narrow them
    ops.get_rows_f16(torch.tensor([0, 6, 3], dtype=torch.int32), w, qtype, 256)
    ops.qmatmul(x, w, qtype, 256)
    ops.qmatmul_mma(torch.randn(5, 512)[:, :256], w, qtype, 256)  # strided rows: lda 512
    head_ops.head_stats(x, w, qtype, softcap=30.0, temperature=0.7, seed=2**63 + 5, step=3)
    head_ops.head_stats_chunked(x, w, qtype, 30.0, 0.7, 2**63 + 5, 3, "f16", chunk=3)  # chunks of 3, 3 and 1 rows
    ops.accept_renoise(torch.rand(2, 9), torch.randint(0, 7, (2, 9)), seed=1, step=0, vocab=7, bound=0.5)
    ops.qmatmul_mma_wide(x, w, qtype, 256)  # each width from its own module's name expressions
    if qtype in ops.INT_TYPES:
        ops.qmatmul_q8(x, w, qtype, 256)
        ops.qmatmul_q8_wide(x, w, qtype, 256)
        head_ops.head_stats_chunked(x, w, qtype, 30.0, 0.7, 2**63 + 5, 3, "int8", chunk=3)
    called = [check(fn, args) for fn, args in launches]
    want = {"get_rows", "get_rows_f16", "qmatmul", "qmatmul_mma", "head_partials", "head_merge", "head_chunk_stats", "head_merge_into",
            "accept_renoise"}
    chunked = 2 if qtype in ops.INT_TYPES else 1
    assert called.count("head_chunk_stats") == called.count("head_merge_into") == 3 * chunked
    assert called.count("get_rows_f16") == 1 + 3 * chunked and called.count("head_merge") == 1 + chunked
    if qtype in ops.INT_TYPES:  # the int8 head quantizes h once for its three chunks
        assert called.count("quantize_q8") == 3 and called.count("qmatmul_q8") == 5
    assert set(called) == want | ({"quantize_q8", "qmatmul_q8"} if qtype in ops.INT_TYPES else set())


def test_f16_cublas_decodes_w_once_above_one_row_tile(launches):
    """f16-cublas: more rows of X than one tensor-core tile -> one get_rows_f16 of every row of W (then cuBLAS,
    no kernel of ours); one tile's rows or fewer -> the f16 tile, which decodes W once then too."""
    w = weights(Q.Q4_K, 7, 256)
    ops.qmatmul_f16_cublas(torch.randn(ops.MMA_TILE + 1, 256), w, Q.Q4_K, 256)
    ops.qmatmul_f16_cublas(torch.randn(ops.MMA_TILE, 256), w, Q.Q4_K, 256)
    assert [check(fn, args) for fn, args in launches] == ["get_rows_f16", "qmatmul_mma"]
    assert launches[0][1][0] == np.uint64(0) and launches[0][1][3] == 7  # null rows: every row of W, in order


@pytest.mark.parametrize("variant", ["plain", "scatter", "gated"])
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_grouped_expert_launches_match_their_kernels(launches, qtype, variant):
    counts, k = [3, 0, 2], 256
    P = sum(counts)
    groups = ops.ExpertGroups(counts, "cpu")
    x = torch.randn(P + 1, k)
    rows = torch.tensor([0, 1, 3, 2, 0], dtype=torch.int32)
    scatter = (torch.tensor([0, 1, 3, 2, 0], dtype=torch.int32), torch.rand(P), 4) if variant == "scatter" else None
    w = weights(qtype, 8, k, experts=3)
    for op in filter(None, (grouped for _, grouped in ops.MATMULS.values())):  # every kind and width
        getattr(ops, op)(x, rows, groups, w, qtype, k, scatter=scatter, gated=variant == "gated")
        getattr(ops, op)(x[:P], None, groups, w, qtype, k, scatter=scatter, gated=variant == "gated")  # rows grouped
    called = [check(fn, args) for fn, args in launches]
    assert called.count("moe_qmatmul") == 2 and called.count("moe_qmatmul_mma") == called.count("moe_qmatmul_q8") == 4
    for (_, name, _), args in launches:  # every launch: the epilogue it asked for (out_rows, out_w, fe)
        if "moe_" in name:
            assert [isinstance(a, torch.Tensor) for a in args[-3:-1]] == [variant == "scatter"] * 2, name
            assert int(args[-1]) == (w.shape[1] // 2 if variant == "gated" else 0), name


def test_the_checker_finds_a_wrong_argument(launches):
    """The check fails on the mistakes it is for: a Python int, an int64 tensor, a missing argument, a strided
    buffer where the kernel takes no leading dimension (x has lda: strided rows are fine there)."""
    ops.qmatmul(torch.randn(2, 256), weights(Q.Q4_K, 3, 256), Q.Q4_K, 256)
    (fn, args), = launches
    check(fn, args)
    check(fn, (torch.randn(2, 512)[:, :256],) + args[1:])
    strided_y = torch.empty(2, 6)[:, :3]
    for bad in (args[:1] + (int(args[1]),) + args[2:], args[:2] + (args[2].long(),) + args[3:], args[:-1],
                args[:3] + (strided_y.t(),) + args[4:]):
        with pytest.raises(AssertionError):
            check(fn, bad)


def test_every_kernel_is_parsed():
    """The signature parser sees every kernel that ops.MODULES compiles, with known C types."""
    for _, names, plain in ops.MODULES:
        for name in (*names, *plain):
            params = PARAMS[re.sub(r"^dg::|<.*>$", "", name)]
            assert params and all((POINTEE if p else SCALAR).get(t) is not None for t, _, p in params), (name, params)


def test_kernel_resources_knows_each_launch_size(launches, monkeypatch):
    """bench/kernel_resources.py's threads_for and dynamic_smem (what the CI's launch-resource check in
    tests/test_csrc.py and the occupancy table assume) equal the block size and the dynamic shared memory
    every wrapper launches its kernel with."""
    seen: list[tuple[str, tuple, int]] = []
    for module in (ops, head_ops):
        monkeypatch.setattr(module, "_launch", lambda fn, grid, block, args, shared_mem=0: seen.append((fn[1], block, shared_mem)))
    qtype, k, canvas = Q.Q4_K, 256, 9
    x, w = torch.randn(5, k), weights(qtype, 7, k)
    ops.get_rows(torch.tensor([0, 6, 3]), w, qtype, k)
    groups, we = ops.ExpertGroups([3, 0, 2], "cpu"), weights(qtype, 8, k, experts=3)
    for dense, grouped in ops.MATMULS.values():  # every kind and width of tile (f16-cublas: dense only)
        getattr(ops, dense)(x, w, qtype, k)
        if grouped:
            getattr(ops, grouped)(x, torch.tensor([0, 1, 3, 2, 0], dtype=torch.int32), groups, we, qtype, k)
    head_ops.head_stats(x, w, qtype, softcap=30.0, temperature=0.7, seed=5, step=3)
    for matmul in ("f16", "int8-wide"):
        head_ops.head_stats_chunked(x, w, qtype, 30.0, 0.7, 5, 3, matmul, chunk=3)
    ops.accept_renoise(torch.rand(2, canvas), torch.randint(0, 7, (2, canvas)), seed=1, step=0, vocab=7, bound=0.5)
    names = {name for name, _, _ in seen}
    assert {"dg::get_rows<12>", "dg::head_partials<12>", "head_chunk_stats", "quantize_q8", "dg::moe_qmatmul_q8<12, 32>",
            "dg::moe_qmatmul_q8<12, 128>", "dg::qmatmul_mma<12, 128>", "accept_renoise"} <= names
    for name, block, shared_mem in seen:
        assert tuple(block) == (kr.threads_for(name, canvas),) and shared_mem == kr.dynamic_smem(name, k), name
