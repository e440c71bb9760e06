// One 32 x TN tile (TN 32 or 128, csrc/mma_tile.cuh's MmaShape) of Y = X W^T on int8 tensor cores (llama.cpp's
// MMQ idea), W rows in an integer GGML format: the body of qmatmul_q8.cu (dense) and moe.cu's moe_qmatmul_q8
// (experts, rows gathered by expert).
//
// X comes quantized by quantize_q8 (qmatmul_q8.cu): int8 q [rows, K], a float scale per 32 values
// xd [rows, K/32] and the sum of q per 16 values xs [rows, K/16]. Per slice of K (256 wide for the narrow tile,
// 128 for the wide one) the block stages 32 rows of it and TN rows of W in their integer form (int8 q, per-16
// scale s and offset m: csrc/quant/decompose.cuh); each warp runs mma.sync.m16n8k16 s8 over its quarter, one
// 16-value group at a time into an int32 dot (two groups where they share their scales), and adds
// dx * (s * (q_x . q_w) + m * sum q_x) in f32. sm_80 and up; on sm_75 each MMA is two m8n8k16 (the same
// integer sums) and X is copied without cp.async (csrc/mma_tile.cuh); below, the tile traps (the loader refuses
// older GPUs). K is a multiple of the type's block (>= 32).
#pragma once
#include "mma_tile.cuh"

namespace dg {

// One accumulator's share of a group (or pair of groups): dx * (s * dot + m * sum q_x), the offset term only
// where the format has one (HasOffset); the int32 dot made a float without I2F (exact: below 2^22)
template <int T> __device__ __forceinline__ float q8_term(float dx, float s, int dot, float m, float sx) {
    if constexpr (HasOffset<T>) return dx * (s * small_i32_to_f32(dot) + m * sx);
    return dx * (s * small_i32_to_f32(dot));
}

// Rows m0 .. m_end-1 (at most MMA_TM) of Y, columns n0 .. n0+TN-1 (those < N). Row m of X is row
// xrows[m] of (xq, xd, xs) when xrows is given, else row m; row m of Y goes where `ep` says
// (csrc/epilogue.cuh: y[m * ldy], or added into a token's row).
template <int T, int TN>
__device__ __forceinline__ void mma_q8_tile(const int8_t * __restrict__ xq, const float * __restrict__ xd,
                                            const int * __restrict__ xs, const int * __restrict__ xrows, int m0,
                                            int m_end, const uint8_t * __restrict__ w, int n0, int N, int K,
                                            float * __restrict__ y, int ldy, Epilogue ep = Epilogue{}) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750) || defined(DG_EMU)  // DG_EMU: the tests' CPU emulator
    using S = MmaShape<TN>;
    constexpr int QK = Traits<T>::QK;
    constexpr int SIZE = Traits<T>::SIZE;
    constexpr int TM = MMA_TM, TK = TN == 32 ? 256 : 128, PAD = 16;  // PAD bytes: fragment loads land in different banks
    constexpr int GROUPS = TK / DG_GROUP;
    __shared__ __align__(16) int8_t xs_q[TM][TK + PAD];
    __shared__ __align__(16) int8_t ws_q[TN][TK + PAD];
    __shared__ float ws_s[TN][GROUPS], ws_m[TN][GROUPS];
    __shared__ float x_d[TM][TK / 32];
    __shared__ float x_s[TM][GROUPS];  // the sums of q, as floats (exact: at most 16 x 127)
    __shared__ int x_row[TM];
    static_assert(sizeof(ws_q) >= TM * (TN + 1) * sizeof(float), "the gated epilogue meets in ws_q");

    const int tid = threadIdx.x;
    const MmaLane p = mma_lane<S>(tid);
    const int wm = p.wm, wn = p.wn, g = p.g, t = p.t;
    const long row_bytes = (long)(K / QK) * SIZE;
    float acc[S::MI][S::NI][4] = {};

    // fragments by ldmatrix: X's a0, a1 of a pair's groups for 16 rows in one (x4; x2 for one group), W's b of
    // an n8 tile for the pair's groups in one (x2; x1); this lane's rows (lane & 15 for W: the lanes x2 and x1
    // ignore name rows inside ws_q too)
    const int8_t *xa = &xs_q[wm + ldm_a_row(p.lane)][ldm_a_half(p.lane) * DG_GROUP];
    const int8_t *wb = &ws_q[wn + ldm_b_row(p.lane & 15)][ldm_b_half(p.lane & 15) * DG_GROUP];

    if (tid < TM) x_row[tid] = m0 + tid < m_end ? (xrows ? xrows[m0 + tid] : m0 + tid) : -1;  // -1: past the tile
    __syncthreads();
    for (int k0 = 0; k0 < K; k0 += TK) {
        const int tk = K - k0 < TK ? K - k0 : TK;  // a multiple of 32 (of QK)
        const int groups = tk / DG_GROUP;  // one 16-value group per thread at a time
        copy_x_async(tid, xs_q, xq, K, k0, tk, x_row);  // X's q, in flight while this thread decodes W
        for (int i = tid; i < TN * groups; i += MMA_THREADS) {
            const int r = i / groups, gi = i % groups;
            Words4 q{};
            float s = 0.0f, m = 0.0f;
            const int wr = tile_w_row(r, n0, N, TN, ep);
            if (wr >= 0) decompose_unit<T>(w + (long)wr * row_bytes, k0 / DG_GROUP + gi, q, s, m);
            *reinterpret_cast<Words4 *>(&ws_q[r][gi * DG_GROUP]) = q;  // 16-aligned: one 128-bit store
            ws_s[r][gi] = s;
            ws_m[r][gi] = m;
        }
        for (int i = tid; i < TM * groups; i += MMA_THREADS) {
            const int r = i / groups, gq = i % groups, row = x_row[r];
            x_s[r][gq] = row >= 0 ? small_i32_to_f32(xs[(long)row * (K / DG_GROUP) + k0 / DG_GROUP + gq]) : 0.0f;
            if ((gq & 1) == 0) x_d[r][gq / 2] = row >= 0 ? xd[(long)row * (K / 32) + k0 / 32 + gq / 2] : 0.0f;
        }
        cp_async_wait_all();
        __syncthreads();
        // groups that share the weights' (s, m) and the activations' dx (the formats scaled per 32 values,
        // ScaleSpan) go through one int32 accumulator: the scale arithmetic, most of this loop's instructions,
        // once per 32 values instead of 16 (|dot| <= 32 x 128 x 128 < 2^22 still)
        constexpr int PAIR = ScaleSpan<T> / DG_GROUP;  // 2, or 1 for Q2_K, Q3_K, Q6_K
        static_assert(ScaleSpan<T> * 128 * 128 <= (1 << 22), "an int32 dot made a float exactly (small_i32_to_f32)");
        for (int gq = 0; gq < groups; gq += PAIR) {
            uint32_t a[S::MI][2 * PAIR];  // [h * 2 + k]: group gq + h, rows g (k 0) and g + 8 (k 1)
            float dx[S::MI][2], sx[S::MI][2];
#pragma unroll
            for (int mi = 0; mi < S::MI; ++mi) {
                const int r = wm + mi * 16 + g;
                ldmatrix<2 * PAIR>(a[mi], xa + (mi * 16) * (TK + PAD) + gq * DG_GROUP);
                dx[mi][0] = x_d[r][gq / 2], dx[mi][1] = x_d[r + 8][gq / 2];
                sx[mi][0] = x_s[r][gq], sx[mi][1] = x_s[r + 8][gq];
                if constexpr (PAIR == 2) {  // the pair's sums of q: integers, added exactly
                    sx[mi][0] += x_s[r][gq + 1];
                    sx[mi][1] += x_s[r + 8][gq + 1];
                }
            }
#pragma unroll
            for (int ni = 0; ni < S::NI; ++ni) {
                uint32_t b[PAIR];  // [h]: group gq + h (lanes 0-7 give the first group's rows, 8-15 the second's)
                ldmatrix<PAIR>(b, wb + (ni * 8) * (TK + PAD) + gq * DG_GROUP);
                // accumulator layout: (row g, cols 2t, 2t+1) and (row g + 8, the same cols)
                const int n = wn + ni * 8 + t * 2;
                const float s0 = ws_s[n][gq], s1 = ws_s[n + 1][gq], o0 = ws_m[n][gq], o1 = ws_m[n + 1][gq];
#pragma unroll
                for (int mi = 0; mi < S::MI; ++mi) {
                    int dot[4] = {0, 0, 0, 0};
#pragma unroll
                    for (int h = 0; h < PAIR; ++h)
                        mma_m16n8k16_s8(dot, (int)a[mi][h * 2], (int)a[mi][h * 2 + 1], (int)b[h]);
                    float (&c4)[4] = acc[mi][ni];
                    c4[0] += q8_term<T>(dx[mi][0], s0, dot[0], o0, sx[mi][0]);
                    c4[1] += q8_term<T>(dx[mi][0], s1, dot[1], o1, sx[mi][0]);
                    c4[2] += q8_term<T>(dx[mi][1], s0, dot[2], o0, sx[mi][1]);
                    c4[3] += q8_term<T>(dx[mi][1], s1, dot[3], o1, sx[mi][1]);
                }
            }
        }
        __syncthreads();
    }
    mma_store<S>(acc, p, m0, m_end, n0, N, y, ldy, ep, &ws_q[0][0]);  // ws_q is free after the last barrier
#else
    (void)xq; (void)xd; (void)xs; (void)xrows; (void)m0; (void)m_end; (void)w; (void)n0; (void)N; (void)K; (void)y;
    (void)ldy; (void)ep;
    __trap();  // the tensor-core tiles need sm_75; the loader refuses older GPUs
#endif
}

}  // namespace dg
