// The routed experts' GEMMs, all experts in one launch: Y[m] = X[row(m)] @ W[e(m)]^T for the (token,
// expert) pairs grouped by expert. Pairs offsets[e] .. offsets[e+1]-1 belong to expert e (an expert
// with no pair has no tile); W holds the E experts' [N, K] matrices one after the other, each
// expert_bytes long, in a GGML block format. Three tiles, as for the dense matmul: float FMAs
// (moe_qmatmul, 16 x 16, csrc/mm_tile.cuh), f16 tensor cores (moe_qmatmul_mma, 32 x TN, mma_f16.cuh) and
// int8 tensor cores on quantize_q8's activations (moe_qmatmul_q8, 32 x TN, mma_q8.cuh), TN 32 or 128 (sm_75's
// instructions on Turing, csrc/mma_tile.cuh).
//
// Grid: x = the N tiles, y = an upper bound of the M tiles of every expert back to back (pairs / tile + E);
// each block finds its expert and first pair from the prefix sums offsets and tile_offsets (of the
// kernel's tile height), made on the GPU (csrc/moe_tiles.cuh), and the blocks past the last tile return.
// Row m of X is row xrows[m] (gate/up: the tokens, gathered) or row m when xrows is null (down: already
// grouped). Y comes out grouped (row m = pair m) when out_rows is null; else (down) the epilogue adds
// out_w[m] * row m into y's row out_rows[m] (the token), the routed experts' weighted scatter-add
// (csrc/epilogue.cuh): y must hold zeros (or what the adds go onto) before the launch. fe > 0 (gate_up,
// W [2 fe, K] per expert): a tile covers half as many output columns, takes gate and up rows for them and
// stores gelu_tanh(gate) * up into y [pairs, fe]; grid x is then the fe / (tile / 2) column tiles.
#include "mm_tile.cuh"
#include "mma_f16.cuh"
#include "mma_q8.cuh"
#include "moe_tiles.cuh"

namespace dg {

template <int T>
__global__ void __launch_bounds__(MM_THREADS) moe_qmatmul(const float * __restrict__ x, int lda,
                                                         const int * __restrict__ xrows,
                                                         const int * __restrict__ offsets,
                                                         const int * __restrict__ tile_offsets, int E,
                                                         const uint8_t * __restrict__ w, long expert_bytes,
                                                         float * __restrict__ y, int ldy, int N, int K,
                                                         const int * __restrict__ out_rows,
                                                         const float * __restrict__ out_w, int fe) {
    int e, m0, m_end;
    if (!moe_tile(blockIdx.y, offsets, tile_offsets, E, MM_TM, e, m0, m_end)) return;  // the whole block: no barrier skipped
    const Epilogue ep{out_rows, out_w, fe};
    mm_tile<T>(x, lda, xrows, m0, m_end, w + e * expert_bytes, blockIdx.x * ep.cols(MM_TN), N, K, y, ldy, ep);
}

template <int T, int TN>
__global__ void __launch_bounds__(MMA_THREADS) moe_qmatmul_mma(const uint16_t * __restrict__ x, int lda,
                                                              const int * __restrict__ xrows,
                                                              const int * __restrict__ offsets,
                                                              const int * __restrict__ tile_offsets, int E,
                                                              const uint8_t * __restrict__ w, long expert_bytes,
                                                              float * __restrict__ y, int ldy, int N, int K,
                                                              const int * __restrict__ out_rows,
                                                              const float * __restrict__ out_w, int fe) {
    int e, m0, m_end;
    if (!moe_tile(blockIdx.y, offsets, tile_offsets, E, MMA_TM, e, m0, m_end)) return;
    const Epilogue ep{out_rows, out_w, fe};
    mma_f16_tile<T, TN>(x, lda, xrows, m0, m_end, w + e * expert_bytes, blockIdx.x * ep.cols(TN), N, K, y, ldy, ep);
}

template <int T, int TN>
__global__ void __launch_bounds__(MMA_THREADS) moe_qmatmul_q8(const int8_t * __restrict__ xq, const float * __restrict__ xd,
                                                             const int * __restrict__ xs, const int * __restrict__ xrows,
                                                             const int * __restrict__ offsets,
                                                             const int * __restrict__ tile_offsets, int E,
                                                             const uint8_t * __restrict__ w, long expert_bytes,
                                                             float * __restrict__ y, int ldy, int N, int K,
                                                             const int * __restrict__ out_rows,
                                                             const float * __restrict__ out_w, int fe) {
    int e, m0, m_end;
    if (!moe_tile(blockIdx.y, offsets, tile_offsets, E, MMA_TM, e, m0, m_end)) return;
    const Epilogue ep{out_rows, out_w, fe};
    mma_q8_tile<T, TN>(xq, xd, xs, xrows, m0, m_end, w + e * expert_bytes, blockIdx.x * ep.cols(TN), N, K, y, ldy, ep);
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every type; at run time NVRTC instantiates by name
#define DG_MOE(T) template __global__ void dg::moe_qmatmul<dg::T>(const float *, int, const int *, const int *, \
    const int *, int, const uint8_t *, long, float *, int, int, int, const int *, const float *, int);            \
    template __global__ void dg::moe_qmatmul_mma<dg::T, 32>(const uint16_t *, int, const int *, const int *,    \
    const int *, int, const uint8_t *, long, float *, int, int, int, const int *, const float *, int);            \
    template __global__ void dg::moe_qmatmul_mma<dg::T, 128>(const uint16_t *, int, const int *, const int *,   \
    const int *, int, const uint8_t *, long, float *, int, int, int, const int *, const float *, int);
DG_FOR_EACH_TYPE(DG_MOE)
#define DG_MOE_Q8(T) template __global__ void dg::moe_qmatmul_q8<dg::T, 32>(const int8_t *, const float *, const int *, \
    const int *, const int *, const int *, int, const uint8_t *, long, float *, int, int, int, const int *, const float *, int); \
    template __global__ void dg::moe_qmatmul_q8<dg::T, 128>(const int8_t *, const float *, const int *,                 \
    const int *, const int *, const int *, int, const uint8_t *, long, float *, int, int, int, const int *, const float *, int);
DG_FOR_EACH_INT_TYPE(DG_MOE_Q8)
#endif
