// One 16 x 16 tile of Y = X W^T with W rows in a GGML block format, dequantized on the fly: the body of
// qmatmul.cu (dense) and moe.cu (experts, rows gathered by expert).
//
// For each 256-wide slice of K the block dequantizes the tile's 16 weight rows into shared memory (one
// 16-value group per thread at a time), stages 16 rows of X, and every thread accumulates one output. Correctness
// first: plain float FMAs, no tensor cores yet; the tensor-core (int8 MMA / f16) variants are measured
// against it on a GPU (issue 5). K is a multiple of the type's block size (32 or 256).
#pragma once
#include "epilogue.cuh"
#include "quant/blocks.cuh"

namespace dg {

constexpr int MM_TM = 16;      // rows of X (canvas positions) per tile
constexpr int MM_TN = 16;      // rows of W (output features) per tile
constexpr int MM_TK = 256;     // K per step: one K-quant super-block, eight 32-blocks
constexpr int MM_THREADS = MM_TM * MM_TN;

// Rows m0 .. m_end-1 (at most MM_TM of them) of Y, columns n0 .. n0+MM_TN-1 (those < N).
// Row m of X is x[xrows[m] * lda] when xrows is given, else x[m * lda]; row m of Y goes where `ep` says
// (csrc/epilogue.cuh: y[m * ldy], added into a token's row, or gated: columns n0 .. n0+MM_TN/2-1 of
// gelu_tanh(gate) * up).
template <int T>
__device__ __forceinline__ void mm_tile(const float * __restrict__ x, int lda, const int * __restrict__ xrows,
                                        int m0, int m_end, const uint8_t * __restrict__ w, int n0, int N, int K,
                                        float * __restrict__ y, int ldy, Epilogue ep = Epilogue{}) {
    constexpr int QK = Traits<T>::QK;
    constexpr int SIZE = Traits<T>::SIZE;
    __shared__ float ws[MM_TN][MM_TK + 1];  // +1: rows land in different banks
    __shared__ float xs[MM_TM][MM_TK + 1];

    const int tid = threadIdx.x;
    const int tm = tid / MM_TN, tn = tid % MM_TN;
    const long row_bytes = (long)(K / QK) * SIZE;
    float acc = 0.0f;

    for (int k0 = 0; k0 < K; k0 += MM_TK) {
        const int tk = K - k0 < MM_TK ? K - k0 : MM_TK;  // a multiple of QK
        // dequantize the tile's weight rows: one unit (16-value group, or a float value) per thread per pass
        stage_w_rows<T, MM_THREADS>(tid, ws, w, row_bytes, k0 / Unit<T>::VALUES, tk / Unit<T>::VALUES, n0, N, ep);
        for (int i = tid; i < MM_TM * tk; i += MM_THREADS) {
            const int r = i / tk, c = i % tk, m = m0 + r;
            xs[r][c] = m < m_end ? x[(long)(xrows ? xrows[m] : m) * lda + k0 + c] : 0.0f;
        }
        __syncthreads();
        for (int k = 0; k < tk; ++k) acc = fmaf(xs[tm][k], ws[tn][k], acc);
        __syncthreads();
    }
    if (ep.fe > 0) {  // gated: gate and up meet in ws, free since the loop's last barrier
        float (*ex)[MM_TN + 1] = reinterpret_cast<float (*)[MM_TN + 1]>(&ws[0][0]);
        ex[tm][tn] = acc;
        __syncthreads();
        store_gated<MM_TM, MM_TN, MM_THREADS>(ex, m0, m_end, n0, y, ldy, ep.fe);
    } else if (m0 + tm < m_end && n0 + tn < N) {
        store_out(y, ldy, m0 + tm, n0 + tn, acc, ep);
    }
}

}  // namespace dg
