"""The CPU emulator that runs csrc's kernels in tests/test_cuda_kernels.py (tests/cuda_emu.py, cuda_emu.h):
each mistake of tests/data/emu_selftest.cu is reported as what a GPU would do with it, each correct twin
runs clean, and the tensor-core instructions compute a matrix product in the PTX ISA's fragment layouts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import cuda_emu

if cuda_emu.unavailable():
    pytest.skip(cuda_emu.unavailable(), allow_module_level=True)

KERNELS = ("shift_read", "neighbour", "two_barriers", "shuffle_after_exit", "half_warps", "dg::half_written<32>", "past_shared", "word_at", "big_shared", "traps",
           "scalar_sizes", "mma_f16_tile", "mma_s8_tile", "dg::ldmatrix_rows<1>", "dg::ldmatrix_rows<2>",
           "dg::ldmatrix_rows<4>", "copy_rows")


@pytest.fixture(scope="module")
def k():
    mod = cuda_emu.Module("emu_selftest.cu", KERNELS, Path(__file__).parent / "data")
    return mod.kernels


@pytest.fixture(scope="module")
def k75():
    """The self-test kernels built with DG_SM75_PATH: csrc/mma_tile.cuh's m16n8k16 made of sm_75's two MMAs."""
    mod = cuda_emu.Module("emu_selftest.cu", KERNELS, Path(__file__).parent / "data", arch=75)
    return mod.kernels


def test_a_read_past_a_buffer_names_kernel_thread_and_argument(k):
    x, y = torch.arange(40, dtype=torch.float32), torch.zeros(40)
    cuda_emu.launch(k["shift_read"], (2,), (32,), (x, y, np.int32(40), np.int32(0)))
    assert torch.equal(y, x)
    with pytest.raises(cuda_emu.EmulatorError, match=r"shift_read.*block \(1, 0, 0\) thread \(7, 0, 0\).*outside.*"
                                                     r"byte 160 of argument 0's 160-byte buffer"):
        cuda_emu.launch(k["shift_read"], (2,), (32,), (x, y, np.int32(40), np.int32(1)))


def test_reads_past_a_view_or_before_a_buffer_are_errors(k):
    x, y = torch.arange(40, dtype=torch.float32), torch.zeros(40)
    with pytest.raises(cuda_emu.EmulatorError, match=r"byte 80 of argument 0's 80-byte buffer"):  # inside the storage
        cuda_emu.launch(k["shift_read"], (1,), (32,), (x[:20], y, np.int32(20), np.int32(1)))
    with pytest.raises(cuda_emu.EmulatorError, match=r"byte -4 of argument 0's"):  # the reverse run's placement
        cuda_emu.launch(k["shift_read"], (1,), (32,), (x, y, np.int32(20), np.int32(-1)))
    with pytest.raises(cuda_emu.EmulatorError, match=r"byte -4 of argument 0's 80-byte"):  # x[0]: outside the view
        cuda_emu.launch(k["shift_read"], (1,), (32,), (x[1:21], y, np.int32(20), np.int32(-1)))
    cuda_emu.launch(k["shift_read"], (1,), (32,), (x[1:21], y, np.int32(20), np.int32(0)))
    assert torch.equal(y[:20], x[1:21])


def test_a_missing_barrier_is_a_race(k):
    x, y = torch.arange(64, dtype=torch.float32), torch.zeros(64)
    cuda_emu.launch(k["neighbour"], (1,), (64,), (x, y, np.int32(1)))
    assert torch.equal(y, x.roll(-1))
    with pytest.raises(cuda_emu.EmulatorError, match="opposite thread orders"):
        cuda_emu.launch(k["neighbour"], (1,), (64,), (x, y, np.int32(0)))


def test_barriers_at_different_places_are_an_error(k):
    with pytest.raises(cuda_emu.EmulatorError, match=r"different __syncthreads\(\) calls \(emu_selftest.cu:\d+"):
        cuda_emu.launch(k["two_barriers"], (1,), (32,), (torch.zeros(32),))


def test_a_shuffle_with_an_exited_lane_is_an_error(k):
    y = torch.zeros(32)
    cuda_emu.launch(k["shuffle_after_exit"], (1,), (32,), (y, np.int32(-1)))
    assert torch.equal(y, torch.arange(32).float().view(16, 2).flip(1).reshape(32))  # lane ^ 1
    with pytest.raises(cuda_emu.EmulatorError, match="lane 3 is exited"):
        cuda_emu.launch(k["shuffle_after_exit"], (1,), (32,), (y, np.int32(3)))


def test_half_warps_shuffle_among_themselves(k):
    y = torch.zeros(32)
    cuda_emu.launch(k["half_warps"], (1,), (32,), (y, np.int32(0)))
    assert y.tolist() == [float(sum(range(16)))] * 16 + [float(sum(range(16, 32)))] * 16
    with pytest.raises(cuda_emu.EmulatorError, match="lane 0 is exited while lane 16 waits for it"):
        cuda_emu.launch(k["half_warps"], (1,), (32,), (y, np.int32(1)))


def test_unwritten_shared_memory_reads_as_nan_in_every_block(k):
    y = torch.zeros(2, 32)
    cuda_emu.launch(k["dg::half_written<32>"], (2,), (32,), (y,), race_check=False)
    written = (torch.arange(32)[None, :] + torch.arange(2)[:, None]) % 2 == 0
    assert bool((y[written] == 1).all()) and bool(y[~written].isnan().all())
    with pytest.raises(cuda_emu.EmulatorError, match="shared memory no thread wrote"):  # the runs' fills differ
        cuda_emu.launch(k["dg::half_written<32>"], (2,), (32,), (y,))


def test_an_index_past_a_shared_array_traps(k):
    cuda_emu.launch(k["past_shared"], (1,), (32,), (torch.zeros(32), np.int32(31)))
    with pytest.raises(cuda_emu.EmulatorError, match="out of bounds"):
        cuda_emu.launch(k["past_shared"], (1,), (32,), (torch.zeros(32), np.int32(32)))


def test_a_misaligned_load_traps(k):
    """A GPU faults on a 4-byte load from an address that is not a multiple of 4 (x86 would read it)."""
    data, y = torch.arange(40, dtype=torch.uint8), torch.zeros(8, dtype=torch.int32)
    cuda_emu.launch(k["word_at"], (1,), (8,), (data, y, np.int32(4)))
    assert torch.equal(y, data[4:36].view(torch.int32))
    with pytest.raises(cuda_emu.EmulatorError, match="misaligned load"):
        cuda_emu.launch(k["word_at"], (1,), (8,), (data, y, np.int32(2)))


def test_more_than_48_kb_of_shared_memory_is_an_error(k):
    y = torch.zeros(32)
    cuda_emu.launch(k["big_shared"], (1,), (32,), (y, np.int32(0)))
    assert bool((y == 1).all())
    with pytest.raises(cuda_emu.EmulatorError, match="61440 bytes of shared memory"):
        cuda_emu.launch(k["big_shared"], (1,), (32,), (y, np.int32(1)))


def test_trap_is_an_error_and_the_next_launch_runs(k):
    with pytest.raises(cuda_emu.EmulatorError, match=r"__trap\(\)"):
        cuda_emu.launch(k["traps"], (2,), (64,), (np.int32(1),))
    cuda_emu.launch(k["traps"], (2,), (64,), (np.int32(0),))


def test_launches_at_cudas_limits_run(k):
    cuda_emu.launch(k["traps"], (1, 65535, 1), (1, 1, 64), (np.int32(0),), race_check=False)  # the largest y and z


@pytest.mark.parametrize("grid,block", [((1, 65536), (32,)), ((0,), (32,)), ((1,), (1025,)), ((1,), (1, 1, 65))])
def test_launches_outside_cudas_limits_are_errors(k, grid, block):
    with pytest.raises(cuda_emu.EmulatorError, match="launch limits"):
        cuda_emu.launch(k["traps"], grid, block, (np.int32(0),))


def test_arguments_are_packed_as_cupy_packs_them(k):
    y = torch.zeros(3)
    cuda_emu.launch(k["scalar_sizes"], (1,), (1,), (y, np.int32(3), np.int64(-4), np.float32(2.5)))
    assert y.tolist() == [3.0, -4.0, 2.5]
    for bad in ((y, 3, np.int64(1), np.float32(0)), (y, np.int32(3), np.int32(1), np.float32(0)),
                (y, np.int32(3), np.int64(1), 0.5), (y, np.int32(3))):
        with pytest.raises(cuda_emu.EmulatorError, match="bytes where|arguments for"):
            cuda_emu.launch(k["scalar_sizes"], (1,), (1,), bad)


@pytest.mark.parametrize("arch", ["k", "k75"])
def test_mma_f16_is_a_matrix_product_in_the_ptx_layout(request, arch):
    k = request.getfixturevalue(arch)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal(s).astype(np.float16) for s in ((16, 16), (8, 16)))
    d = torch.full((16, 8), float("nan"))
    cuda_emu.launch(k["mma_f16_tile"], (1,), (32,), (torch.from_numpy(a), torch.from_numpy(b), d))
    want = a.astype(np.float64) @ b.astype(np.float64).T
    np.testing.assert_allclose(d.numpy(), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("arch", ["k", "k75"])
def test_mma_s8_is_a_matrix_product_in_the_ptx_layout(request, arch):
    k = request.getfixturevalue(arch)
    rng = np.random.default_rng(1)
    a, b = (rng.integers(-128, 128, s).astype(np.int8) for s in ((16, 16), (8, 16)))
    d = torch.zeros(16, 8, dtype=torch.int32)
    cuda_emu.launch(k["mma_s8_tile"], (1,), (32,), (torch.from_numpy(a), torch.from_numpy(b), d))
    assert np.array_equal(d.numpy(), a.astype(np.int32) @ b.astype(np.int32).T)


@pytest.mark.parametrize("n", [1, 2, 4])
def test_ldmatrix_gives_each_lane_its_fragment_of_the_rows_lanes_name(k, n):
    """Lane l gets, of matrix j, the two halves at row l / 4, columns 2 (l % 4), + 1, where row r of matrix j is
    the 16 bytes at the address lane 8 j + r gave (here shared row 8 j + r + shift)."""
    a = np.arange(32 * 8, dtype=np.uint16).reshape(32, 8) * 7 + 3
    for shift in sorted({0, 32 - 8 * n}):  # the lanes past 8n give rows that are not read (with shift, past the array)
        d = torch.zeros(32, n, dtype=torch.int32)
        cuda_emu.launch(k[f"dg::ldmatrix_rows<{n}>"], (1,), (32,), (torch.from_numpy(a.view(np.int16)), d, np.int32(shift), np.int32(0)))
        got = d.numpy().view(np.uint32)
        for lane in range(32):
            for j in range(n):
                row = a[8 * j + lane // 4 + shift]
                assert got[lane, j] == int(row[2 * (lane % 4)]) | int(row[2 * (lane % 4) + 1]) << 16, (shift, lane, j)


def test_ldmatrix_rows_must_be_16_aligned_and_in_shared_memory(k):
    a = torch.zeros(32 * 8, dtype=torch.int16)
    d = torch.zeros(32, 4, dtype=torch.int32)
    with pytest.raises(cuda_emu.EmulatorError, match="lane 0 gives ldmatrix a row at .*, not 16-aligned"):
        cuda_emu.launch(k["dg::ldmatrix_rows<4>"], (1,), (32,), (a, d, np.int32(0), np.int32(4)))
    with pytest.raises(cuda_emu.EmulatorError, match="lane 31 gives ldmatrix a row at .*, not inside a __shared__ array"):
        cuda_emu.launch(k["dg::ldmatrix_rows<4>"], (1,), (32,), (a, d, np.int32(1), np.int32(0)))


def test_cp_async_lands_at_the_wait_and_zero_fills(k):
    a = torch.arange(32 * 16 + 16, dtype=torch.uint8)  # 16 bytes spare: room for a skewed read
    d = torch.zeros(32 * 16, dtype=torch.uint8)
    cuda_emu.launch(k["copy_rows"], (1,), (32,), (a, d, np.int32(0), np.int32(1)))
    want = a[: 32 * 16].reshape(32, 16).clone()
    want[3::4] = 0  # the copies with valid false write zeros
    assert torch.equal(d.reshape(32, 16), want.roll(-1, 0))


def test_cp_async_read_before_its_wait_or_never_waited_for_is_an_error(k):
    a, d = torch.arange(32 * 16 + 16, dtype=torch.uint8), torch.zeros(32 * 16, dtype=torch.uint8)
    with pytest.raises(cuda_emu.EmulatorError, match="cp.async copies never waited for"):
        cuda_emu.launch(k["copy_rows"], (1,), (32,), (a, d, np.int32(0), np.int32(0)))
    with pytest.raises(cuda_emu.EmulatorError, match="opposite thread orders"):  # the neighbour's row not yet there
        cuda_emu.launch(k["copy_rows"], (1,), (32,), (a, d, np.int32(0), np.int32(2)))
    with pytest.raises(cuda_emu.EmulatorError, match="opposite thread orders"):  # neither the old bytes nor the new
        cuda_emu.launch(k["copy_rows"], (1,), (32,), (a, d, np.int32(0), np.int32(3)))
    with pytest.raises(cuda_emu.EmulatorError, match="both must be 16-aligned"):
        cuda_emu.launch(k["copy_rows"], (1,), (32,), (a, d, np.int32(8), np.int32(1)))


def test_every_op_module_makes_its_outputs_unwritten_under_the_emulator():
    """The wrappers' torch.empty outputs start as NaN bytes in each module that makes them (ops, head_ops and
    moe_ops, whose grouped-expert outputs a kernel might leave partly unwritten)."""
    from dgemma.plugin.cuda import head_ops, moe_ops, ops

    with cuda_emu.emulated():
        for mod in (ops, head_ops, moe_ops):
            assert bool(mod.torch.empty(4).isnan().all()), mod.__name__
    assert moe_ops.torch is torch and ops.torch is torch  # restored after the block
