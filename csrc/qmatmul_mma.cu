// Y[M, N] = X[M, K] @ W[N, K]^T on tensor cores: the f16 candidate of issue 5 (dequantize to f16, f16 MMA
// with f32 accumulation), beside the correctness-first float-FMA qmatmul.cu it is tested against.
// One thread block (4 warps) computes a 32 x TN tile of Y, TN 32 or 128 (csrc/mma_f16.cuh). Needs sm_75.
// Shapes: any M and N; K a multiple of 16 and of the type's block size; lda/ldy in elements; X in f16 with lda a
// multiple of 8 and x 16-aligned (its rows go to shared memory by 16-byte cp.async).
#include "mma_f16.cuh"

namespace dg {

template <int T, int TN>
__global__ void __launch_bounds__(MMA_THREADS) qmatmul_mma(const uint16_t * __restrict__ x, int lda,
                                                          const uint8_t * __restrict__ w, float * __restrict__ y,
                                                          int ldy, int M, int N, int K) {
    mma_f16_tile<T, TN>(x, lda, nullptr, blockIdx.y * MMA_TM, M, w, blockIdx.x * TN, N, K, y, ldy);
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every type and width; at run time NVRTC instantiates by name
#define DG_QMMA(T) template __global__ void dg::qmatmul_mma<dg::T, 32>(const uint16_t *, int, const uint8_t *, float *, int, int, int, int); \
    template __global__ void dg::qmatmul_mma<dg::T, 128>(const uint16_t *, int, const uint8_t *, float *, int, int, int, int);
DG_FOR_EACH_TYPE(DG_QMMA)
#endif
