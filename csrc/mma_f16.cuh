// One 32 x TN tile (TN 32 or 128, csrc/mma_tile.cuh's MmaShape) of Y = X W^T on f16 tensor cores, W rows in a
// GGML block format: the body of qmatmul_mma.cu (dense) and moe.cu's moe_qmatmul_mma (experts, rows gathered
// by expert).
//
// X comes in f16 (the wrappers round it once, x.half(): half the bytes every column tile reads). Per slice of
// K (256 wide for the narrow tile, 64 for the wide one: the same 16.9 / 18.4 KB of W in shared memory) the
// block copies 32 rows of X to shared memory (16-byte cp.async, in flight while it decodes W) and dequantizes
// TN rows of W (one 16-value group per thread at a time, through the integer form for the integer types) to
// f16 in shared memory, then each warp runs mma.sync.m16n8k16 (row.col, f32 accumulators) over its quarter,
// its fragments loaded by ldmatrix (one instruction per 16 x 16 of X, and per two n8 tiles of W, where 32-bit
// loads took 4). sm_80 and up; on sm_75 each MMA is two m16n8k8 and X is copied without cp.async
// (csrc/mma_tile.cuh); below, the tile traps (the loader refuses older GPUs). X values beyond
// f16's range (65504) overflow, so the engine uses it only on normalised inputs, never on the down
// projections' gelu(gate) * up (ops.usable). K is a multiple of 16 and of the type's block; X's rows start at
// multiples of 16 bytes (lda a multiple of 8, x 16-aligned).
#pragma once
#include "mma_tile.cuh"

namespace dg {

// Rows m0 .. m_end-1 (at most MMA_TM) of Y, columns n0 .. n0+TN-1 (those < N). Row m of X (f16 bits) is
// x[xrows[m] * lda] when xrows is given, else x[m * lda]; row m of Y goes where `ep` says
// (csrc/epilogue.cuh: y[m * ldy], or added into a token's row).
template <int T, int TN>
__device__ __forceinline__ void mma_f16_tile(const uint16_t * __restrict__ x, int lda, const int * __restrict__ xrows,
                                             int m0, int m_end, const uint8_t * __restrict__ w, int n0, int N, int K,
                                             float * __restrict__ y, int ldy, Epilogue ep = Epilogue{}) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750) || defined(DG_EMU)  // DG_EMU: the tests' CPU emulator
    using S = MmaShape<TN>;
    constexpr int QK = Traits<T>::QK;
    constexpr int SIZE = Traits<T>::SIZE;
    constexpr int UV = Unit<T>::VALUES;
    constexpr int TM = MMA_TM, TK = TN == 32 ? 256 : 64;
    constexpr int PAD = 8;  // halves of padding per shared row: fragment loads land in different banks
    __shared__ __align__(16) uint16_t xs[TM][TK + PAD];
    __shared__ __align__(16) uint16_t ws[TN][TK + PAD];
    __shared__ int x_row[TM];
    static_assert(sizeof(ws) >= TM * (TN + 1) * sizeof(float), "the gated epilogue meets in ws");

    const int tid = threadIdx.x;
    const MmaLane p = mma_lane<S>(tid);
    const int wm = p.wm, wn = p.wn;
    const long row_bytes = (long)(K / QK) * SIZE;
    float acc[S::MI][S::NI][4] = {};

    static_assert(S::NI % 2 == 0, "B fragments come two n8 tiles per ldmatrix");
    // the rows (and halves: 8 values) this lane names to ldmatrix, for X's 16 x 16 and two n8 tiles of W
    const int ar = ldm_a_row(p.lane), ac = ldm_a_half(p.lane) * 8, br = ldm_b_row(p.lane), bc = ldm_b_half(p.lane) * 8;

    if (tid < TM) x_row[tid] = m0 + tid < m_end ? (xrows ? xrows[m0 + tid] : m0 + tid) : -1;  // -1: past the tile
    __syncthreads();
    for (int k0 = 0; k0 < K; k0 += TK) {
        const int tk = K - k0 < TK ? K - k0 : TK;  // a multiple of 16 (the wrappers check K)
        copy_x_async(tid, xs, x, lda, k0, tk, x_row);  // in flight while this thread decodes its groups of W
        stage_w_rows<T, MMA_THREADS>(tid, ws, w, row_bytes, k0 / UV, tk / UV, n0, N, ep);
        cp_async_wait_all();
        __syncthreads();
        for (int kk = 0; kk < tk; kk += 16) {
            uint32_t a[S::MI][4];
#pragma unroll
            for (int mi = 0; mi < S::MI; ++mi) ldmatrix<4>(a[mi], &xs[wm + mi * 16 + ar][kk + ac]);
#pragma unroll
            for (int ni = 0; ni < S::NI; ni += 2) {
                uint32_t b[4];  // b0, b1 of n8 tile ni, then of ni + 1
                ldmatrix<4>(b, &ws[wn + ni * 8 + br][kk + bc]);
#pragma unroll
                for (int mi = 0; mi < S::MI; ++mi) {
                    mma_m16n8k16_f16(acc[mi][ni], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[0], b[1]);
                    mma_m16n8k16_f16(acc[mi][ni + 1], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b[2], b[3]);
                }
            }
        }
        __syncthreads();
    }
    mma_store<S>(acc, p, m0, m_end, n0, N, y, ldy, ep, &ws[0][0]);  // ws is free after the last barrier
#else
    (void)x; (void)lda; (void)xrows; (void)m0; (void)m_end; (void)w; (void)n0; (void)N; (void)K; (void)y; (void)ldy; (void)ep;
    __trap();  // the tensor-core tiles need sm_75; the loader refuses older GPUs
#endif
}

}  // namespace dg
