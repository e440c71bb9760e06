"""The tensor-core tiles as a Turing GPU (compute capability 7.5: GeForce RTX 20xx, T4) runs them: each
m16n8k16 MMA as two of sm_75's own (m16n8k8 f16, m8n8k16 s8) and X copied by plain 16-byte loads where sm_80
has cp.async (csrc/mma_tile.cuh, DG_SM75_PATH). A subset of tests/test_cuda_kernels.py's tile cases, run by
its own test functions, twice: in the emulator compiled with DG_SM75_PATH at capability 7.5, and on a GPU
(marked gpu) with the kernels compiled with DG_SM75_PATH for the GPU at hand: sm_75's instructions run on every
later GPU, so any GPU session checks the Turing path's fragment layouts on hardware."""

from __future__ import annotations

import pytest
import test_cuda_kernels as K  # its test functions, called with this module's fixtures
from cuda_util import kernel_device
from gguf import GGMLQuantizationType as Q


@pytest.fixture(scope="module", params=[pytest.param("gpu", marks=pytest.mark.gpu), "emu"])
def dev(request):
    """"cuda" with every module compiled with DG_SM75_PATH, or "cpu" in the emulator as a 7.5 GPU."""
    with kernel_device(request.param, arch=75) as where:
        if where == "cpu":
            yield where
            return
        from dgemma.plugin.cuda import loader

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loader, "NVRTC_OPTIONS", (*loader.NVRTC_OPTIONS, "-DDG_SM75_PATH"))
            loader.kernel.cache_clear()  # compiled again with the option (CuPy's disk cache keys on the options)
            loader.module.cache_clear()
            try:
                yield where
            finally:
                loader.kernel.cache_clear()  # the tests after these compile for this GPU's own path again
                loader.module.cache_clear()


@pytest.fixture(scope="module")
def ops(dev):
    from dgemma.plugin.cuda import ops

    return ops


@pytest.mark.parametrize("qtype,k", [(Q.Q8_0, 288), (Q.Q4_K, 512)], ids=["Q8_0-K288", "Q4_K-K512"])
@pytest.mark.parametrize("kernel", ["qmatmul_mma", "qmatmul_q8", "qmatmul_mma_wide", "qmatmul_q8_wide"])
def test_tiles_at_their_edges(ops, dev, kernel, qtype, k):
    K.test_matmul_tiles_at_their_edges(ops, dev, kernel, qtype, k)


F16_CASES = [(Q.Q4_K, 17, 33, 768), (Q.Q6_K, 300, 17, 512), (Q.Q8_0, 17, 33, 704), (Q.F16, 300, 17, 96),
             (Q.Q5_K, 256, 300, 2816)]


@pytest.mark.parametrize("kernel", ["qmatmul_mma", "qmatmul_mma_wide"])
@pytest.mark.parametrize("qtype,m,n,k", F16_CASES, ids=lambda v: getattr(v, "name", str(v)))
def test_f16_tiles(ops, dev, qtype, m, n, k, kernel):
    K.test_qmatmul_mma_matches_f16_rounded_reference(ops, dev, qtype, m, n, k, kernel)


@pytest.mark.parametrize("kernel", ["qmatmul_q8", "qmatmul_q8_wide"])
@pytest.mark.parametrize("qtype,m,n,k", [c for c in F16_CASES if c[0] != Q.F16] + [(Q.Q2_K, 17, 33, 768),
                                                                                (Q.Q5_1, 300, 17, 96)],
                         ids=lambda v: getattr(v, "name", str(v)))
def test_int8_tiles(ops, dev, qtype, m, n, k, kernel):
    K.test_qmatmul_q8_matches_quantized_activation_reference(ops, dev, qtype, m, n, k, kernel)


@pytest.mark.parametrize("kernel", ["f16", "f16-wide", "int8", "int8-wide"])
@pytest.mark.parametrize("gathered", [True, False], ids=["gathered", "grouped"])  # the gated and scatter epilogues
@pytest.mark.parametrize("qtype,n,k", [(Q.Q4_K, 17, 512), (Q.Q6_K, 40, 768)], ids=["Q4_K", "Q6_K"])
def test_moe_tiles(ops, dev, qtype, n, k, gathered, kernel):
    K.test_moe_qmatmul_matches_expert_by_expert(ops, dev, qtype, n, k, K.MOE_COUNTS[1], gathered, kernel)


def test_chunked_head_on_the_int8_tile(ops, dev):  # (its f16 form multiplies by cuBLAS: no tile)
    K.test_head_stats_chunked_match_full_logits(ops, dev, "int8-wide", Q.Q6_K, 17, 3000, 1024)
