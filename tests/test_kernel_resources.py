"""bench/kernel_resources.py: ptxas's report parsed, and the occupancy arithmetic, on known numbers."""

from __future__ import annotations

import shutil

import kernel_resources as kr  # bench/ (pyproject's pythonpath)
import pytest

PTXAS = """ptxas info    : Compiling entry function '_ZN2dg7qmatmulILi12EEEvPKfiPKhPfiiii' for 'sm_90'
ptxas info    : Function properties for _ZN2dg7qmatmulILi12EEEvPKfiPKhPfiiii
    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 32896 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'quantize_q8' for 'sm_90'
ptxas info    : Function properties for quantize_q8
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 23 registers, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_ZN2dg14moe_qmatmul_q8ILi12ELi128EEEvPKaPKfPKiS6_S6_S6_iPKhlPfiiiS6_S4_i' for 'sm_90'
ptxas info    : Function properties for _ZN2dg14moe_qmatmul_q8ILi12ELi128EEEvPKaPKfPKiS6_S6_S6_iPKhlPfiiiS6_S4_i
    128 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 80 registers, used 1 barriers, 128 bytes cumulative stack size, 32896 bytes smem, 400 bytes cmem[0]
"""


def test_ptxas_report_is_parsed():
    assert kr.parse_archs(PTXAS) == [("sm_90", "_ZN2dg7qmatmulILi12EEEvPKfiPKhPfiiii", 40, 12, 32896, 0),
                                     ("sm_90", "quantize_q8", 23, 0, 0, 0),
                                     # its smem follows "cumulative stack size" (once read as 0)
                                     ("sm_90", "_ZN2dg14moe_qmatmul_q8ILi12ELi128EEEvPKaPKfPKiS6_S6_S6_iPKhlPfiiiS6_S4_i",
                                      80, 0, 32896, 128)]
    assert [r[0] for r in kr.parse_archs(PTXAS + PTXAS.replace("sm_90", "sm_75"))] == ["sm_90"] * 3 + ["sm_75"] * 3


@pytest.mark.parametrize("regs,smem,threads,arch,want", [
    (40, 32896, 256, "sm_90", (6, "registers")),       # 10240 registers a block; 6.9 blocks of shared memory
    (213, 11424, 256, "sm_90", (1, "registers")),      # the fused head: 27 granules a warp, 55296 a block
    (16, 0, 128, "sm_90", (16, "threads")),
    (32, 0, 32, "sm_90", (32, "blocks")),
    (16, 60000, 128, "sm_86", (1, "shared memory")),
])
def test_resident_blocks(regs, smem, threads, arch, want):
    assert kr.Kernel("k", regs, 0, smem, threads).resident_blocks(arch) == want


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_a_module_through_nvcc():
    (k,) = kr.kernels("sm_90", ["accept.cu"])
    assert k.name == "accept_renoise" and 0 < k.registers <= 255 and k.smem >= 1024 * 9 and k.threads == 256
