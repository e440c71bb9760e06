// The routed experts' GEMMs, all experts in one launch: Y[m] = X[row(m)] @ W[e(m)]^T for the (token,
// expert) pairs grouped by expert. Pairs offsets[e] .. offsets[e+1]-1 belong to expert e (an expert
// with no pair has no tile); W holds the E experts' [N, K] matrices one after the other, each
// expert_bytes long, in a GGML block format.
//
// Grid: x = the N tiles, y = an upper bound of the M tiles of every expert back to back (pairs / MM_TM + E);
// each block finds its expert and first pair from the prefix sums offsets and tile_offsets, made on the
// GPU (csrc/moe_tiles.cuh), and the blocks past the last tile return. Row m of X is
// x[xrows[m]] (gate/up: the tokens, gathered) or x[m] when xrows is null (down: already grouped).
// Y comes out grouped (row m = pair m); the weighted scatter back to the tokens is left to the caller.
#include "mm_tile.cuh"
#include "moe_tiles.cuh"

namespace dg {

template <int T>
__global__ void __launch_bounds__(MM_THREADS) moe_qmatmul(const float * __restrict__ x, int lda,
                                                         const int * __restrict__ xrows,
                                                         const int * __restrict__ offsets,
                                                         const int * __restrict__ tile_offsets, int E,
                                                         const uint8_t * __restrict__ w, long expert_bytes,
                                                         float * __restrict__ y, int ldy, int N, int K) {
    int e, m0;
    if (!moe_tile(blockIdx.y, offsets, tile_offsets, E, MM_TM, e, m0)) return;  // the whole block: no barrier skipped
    const int m_end = min(offsets[e + 1], m0 + MM_TM);
    mm_tile<T>(x, lda, xrows, m0, m_end, w + e * expert_bytes, blockIdx.x * MM_TN, N, K, y, ldy);
}

}  // namespace dg

#ifndef __CUDACC_RTC__
#define DG_MOE(T) template __global__ void dg::moe_qmatmul<dg::T>(const float *, int, const int *, const int *, \
    const int *, int, const uint8_t *, long, float *, int, int, int);
DG_FOR_EACH_TYPE(DG_MOE)
#endif
