// Y[M, N] = X[M, K] @ W[N, K]^T with W stored in a GGML block format, dequantized on the fly.
// One thread block computes a 16 x 16 tile of Y (csrc/mm_tile.cuh).
// Shapes: any M and N; K a multiple of the type's block size (32 or 256); lda/ldy in elements.
#include "mm_tile.cuh"

namespace dg {

template <int T>
__global__ void __launch_bounds__(MM_THREADS) qmatmul(const float * __restrict__ x, int lda, const uint8_t * __restrict__ w,
                                                     float * __restrict__ y, int ldy, int M, int N, int K) {
    mm_tile<T>(x, lda, nullptr, blockIdx.y * MM_TM, M, w, blockIdx.x * MM_TN, N, K, y, ldy);
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every type; at run time NVRTC instantiates by name
#define DG_QMATMUL(T) template __global__ void dg::qmatmul<dg::T>(const float *, int, const uint8_t *, float *, int, int, int, int);
DG_FOR_EACH_TYPE(DG_QMATMUL)
#endif
