// Y[M, N] = X[M, K] @ W[N, K]^T with W stored in a GGML block format, dequantized on the fly.
//
// One thread block computes a 16 x 16 tile of Y. For each 256-wide slice of K it dequantizes the 16
// weight rows of its tile into shared memory (one GGML block per thread), stages the 16 rows of X, and
// every thread accumulates one output. Correctness first: plain float FMAs, no tensor cores yet; the
// tensor-core (int8 MMA / f16) variants are measured against it on a GPU (issue 5).
// Shapes: any M and N; K a multiple of the type's block size (32 or 256); lda/ldy in elements.
#include "quant/blocks.cuh"

namespace dg {

constexpr int MM_TM = 16;      // rows of X (canvas positions) per tile
constexpr int MM_TN = 16;      // rows of W (output features) per tile
constexpr int MM_TK = 256;     // K per step: one K-quant super-block, eight 32-blocks
constexpr int MM_THREADS = MM_TM * MM_TN;

template <int T>
__global__ void __launch_bounds__(MM_THREADS) qmatmul(const float * __restrict__ x, int lda, const uint8_t * __restrict__ w,
                                                     float * __restrict__ y, int ldy, int M, int N, int K) {
    constexpr int QK = Traits<T>::QK;
    constexpr int SIZE = Traits<T>::SIZE;
    __shared__ float ws[MM_TN][MM_TK + 1];  // +1: rows land in different banks
    __shared__ float xs[MM_TM][MM_TK + 1];

    const int tid = threadIdx.x;
    const int n0 = blockIdx.x * MM_TN;
    const int m0 = blockIdx.y * MM_TM;
    const int tm = tid / MM_TN, tn = tid % MM_TN;
    const long row_bytes = (long)(K / QK) * SIZE;
    float acc = 0.0f;

    for (int k0 = 0; k0 < K; k0 += MM_TK) {
        const int tk = K - k0 < MM_TK ? K - k0 : MM_TK;  // a multiple of QK
        // dequantize the tile's weight rows: blocks of QK values, one block per thread per pass
        const int blocks_per_row = (tk + QK - 1) / QK;
        for (int i = tid; i < MM_TN * blocks_per_row; i += MM_THREADS) {
            const int r = i / blocks_per_row, bi = i % blocks_per_row;
            float * dst = &ws[r][bi * QK];
            if (n0 + r < N) {
                const uint8_t * src = w + (long)(n0 + r) * row_bytes + (long)(k0 / QK + bi) * SIZE;
                float tmp[QK];
                dequant_block<T>(src, tmp);
                for (int j = 0; j < QK; ++j) dst[j] = tmp[j];
            } else {
                for (int j = 0; j < QK; ++j) dst[j] = 0.0f;
            }
        }
        for (int i = tid; i < MM_TM * tk; i += MM_THREADS) {
            const int r = i / tk, c = i % tk;
            xs[r][c] = (m0 + r < M) ? x[(long)(m0 + r) * lda + k0 + c] : 0.0f;
        }
        __syncthreads();
        for (int k = 0; k < tk; ++k) acc = fmaf(xs[tm][k], ws[tn][k], acc);
        __syncthreads();
    }
    if (m0 + tm < M && n0 + tn < N) y[(long)(m0 + tm) * ldy + n0 + tn] = acc;
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every type; at run time NVRTC instantiates by name
template __global__ void dg::qmatmul<dg::T_F32>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_F16>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_BF16>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_Q4_0>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_Q5_0>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_Q5_1>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_Q8_0>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_Q2_K>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_Q3_K>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_Q4_K>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_Q5_K>(const float *, int, const uint8_t *, float *, int, int, int, int);
template __global__ void dg::qmatmul<dg::T_Q6_K>(const float *, int, const uint8_t *, float *, int, int, int, int);
#endif
