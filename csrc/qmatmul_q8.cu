// Y[M, N] = X[M, K] @ W[N, K]^T on int8 tensor cores: the MMQ-style candidate of issue 5, beside the f16
// one (qmatmul_mma.cu) and the float-FMA reference (qmatmul.cu). Integer GGML types only.
//
// quantize_q8: X -> int8 q with one float scale per 32 values (d = max|x| / 127, q = rint(x / d)) and the
// sum of q per 16 values (for the weights' offsets), one warp per 32 values.
// qmatmul_q8<T>: one thread block (4 warps) computes a 32 x 32 tile of Y. Per 256-wide slice of K it
// stages 32 rows of int8 X with their scales and sums, and 32 rows of W in their integer form (int8 q,
// per-16 scale s and offset m: csrc/quant/decompose.cuh); each warp runs mma.sync.m16n8k16 s8 over its
// 16 x 16 quarter one 16-value group at a time and adds dx * (s * (q_x . q_w) + m * sum q_x) in f32.
// Needs sm_80 (the wrapper refuses older GPUs). Shapes: any M and N; K a multiple of the type's block.
#include "mma_tile.cuh"

namespace dg {

extern "C" __global__ void quantize_q8(const float * __restrict__ x, int lda, int M, int K, int8_t * __restrict__ xq,
                                       float * __restrict__ xd, int * __restrict__ xs) {
    const int per_row = K / 32;
    const long block = (long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;  // one warp per 32 values
    if (block >= (long)M * per_row) return;                                   // the whole warp together
    const int lane = threadIdx.x & 31;
    const int r = (int)(block / per_row), b = (int)(block % per_row);
    const float v = x[(long)r * lda + b * 32 + lane];
    float amax = fabsf(v);
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    const float d = amax / 127.0f;
    const int q = d > 0.0f ? __float2int_rn(v / d) : 0;  // d, not amax: a tiny amax can give d = 0
    xq[(long)r * K + b * 32 + lane] = (int8_t)q;
    int sum = q;
    for (int o = 8; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);  // within each 16 lanes
    if (lane == 0) xd[(long)r * per_row + b] = d;
    if ((lane & 15) == 0) xs[(long)r * (K / 16) + b * 2 + (lane >> 4)] = sum;
}

template <int T>
__global__ void __launch_bounds__(MMA_THREADS) qmatmul_q8(const int8_t * __restrict__ xq, const float * __restrict__ xd,
                                                        const int * __restrict__ xs, const uint8_t * __restrict__ w,
                                                        float * __restrict__ y, int ldy, int M, int N, int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int QK = Traits<T>::QK;
    constexpr int SIZE = Traits<T>::SIZE;
    constexpr int TM = MMA_TM, TN = MMA_TN, TK = 256, PAD = 16;  // PAD bytes: fragment loads land in different banks
    __shared__ __align__(16) int8_t xs_q[TM][TK + PAD];
    __shared__ __align__(16) int8_t ws_q[TN][TK + PAD];
    __shared__ float ws_s[TN][TK / DG_GROUP], ws_m[TN][TK / DG_GROUP];
    __shared__ float x_d[TM][TK / 32];
    __shared__ int x_s[TM][TK / DG_GROUP];

    const int tid = threadIdx.x;
    const MmaLane p = mma_lane(blockIdx.x, blockIdx.y, tid);
    const int m0 = p.m0, n0 = p.n0, wm = p.wm, wn = p.wn, g = p.g, t = p.t;
    const long row_bytes = (long)(K / QK) * SIZE;
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};

    for (int k0 = 0; k0 < K; k0 += TK) {
        const int tk = K - k0 < TK ? K - k0 : TK;  // a multiple of QK (>= 32)
        const int blocks_per_row = tk / QK;
        for (int i = tid; i < TN * blocks_per_row; i += MMA_THREADS) {
            const int r = i / blocks_per_row, bi = i % blocks_per_row;
            int8_t * q = &ws_q[r][bi * QK];
            float * s = &ws_s[r][bi * QK / DG_GROUP];
            float * m = &ws_m[r][bi * QK / DG_GROUP];
            if (n0 + r < N) {
                decompose_block<T>(w + (long)(n0 + r) * row_bytes + (long)(k0 / QK + bi) * SIZE, q, s, m);
            } else {
                for (int j = 0; j < QK; ++j) q[j] = 0;
                for (int j = 0; j < QK / DG_GROUP; ++j) s[j] = m[j] = 0.0f;
            }
        }
        for (int i = tid; i < TM * (tk / 4); i += MMA_THREADS) {  // 4 int8 at a time
            const int r = i / (tk / 4), c = (i % (tk / 4)) * 4, m = m0 + r;
            *reinterpret_cast<int *>(&xs_q[r][c]) = m < M ? *reinterpret_cast<const int *>(&xq[(long)m * K + k0 + c]) : 0;
        }
        for (int i = tid; i < TM * (tk / DG_GROUP); i += MMA_THREADS) {
            const int r = i / (tk / DG_GROUP), gq = i % (tk / DG_GROUP), m = m0 + r;
            x_s[r][gq] = m < M ? xs[(long)m * (K / DG_GROUP) + k0 / DG_GROUP + gq] : 0;
            if ((gq & 1) == 0) x_d[r][gq / 2] = m < M ? xd[(long)m * (K / 32) + k0 / 32 + gq / 2] : 0.0f;
        }
        __syncthreads();
        for (int gq = 0; gq < tk / DG_GROUP; ++gq) {
            const int c = gq * DG_GROUP + t * 4;
            const int a0 = *reinterpret_cast<const int *>(&xs_q[wm + g][c]);
            const int a1 = *reinterpret_cast<const int *>(&xs_q[wm + g + 8][c]);
            const float dx0 = x_d[wm + g][gq / 2], dx1 = x_d[wm + g + 8][gq / 2];
            const float sx0 = (float)x_s[wm + g][gq], sx1 = (float)x_s[wm + g + 8][gq];
            for (int h = 0; h < 2; ++h) {
                const int b0 = *reinterpret_cast<const int *>(&ws_q[wn + h * 8 + g][c]);
                int c0 = 0, c1 = 0, c2 = 0, c3 = 0;
                asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, "
                             "{%0,%1,%2,%3};\n"
                             : "+r"(c0), "+r"(c1), "+r"(c2), "+r"(c3)
                             : "r"(a0), "r"(a1), "r"(b0));
                // accumulator layout: (row g, cols 2t, 2t+1) and (row g + 8, the same cols)
                const int n = wn + h * 8 + t * 2;
                const float s0 = ws_s[n][gq], s1 = ws_s[n + 1][gq], o0 = ws_m[n][gq], o1 = ws_m[n + 1][gq];
                acc[h][0] += dx0 * (s0 * (float)c0 + o0 * sx0);
                acc[h][1] += dx0 * (s1 * (float)c1 + o1 * sx0);
                acc[h][2] += dx1 * (s0 * (float)c2 + o0 * sx1);
                acc[h][3] += dx1 * (s1 * (float)c3 + o1 * sx1);
            }
        }
        __syncthreads();
    }
    mma_store(acc, p, y, ldy, M, N);
#else
    (void)xq; (void)xd; (void)xs; (void)w; (void)y; (void)ldy; (void)M; (void)N; (void)K;
    __trap();  // int8 MMA m16n8k16 needs sm_80; ops.qmatmul_q8 refuses older GPUs
#endif
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every integer type; at run time NVRTC instantiates by name
#define DG_Q8(T) template __global__ void dg::qmatmul_q8<dg::T>(const int8_t *, const float *, const int *, \
    const uint8_t *, float *, int, int, int, int);
DG_FOR_EACH_INT_TYPE(DG_Q8)
#endif
