// Y[M, N] = X[M, K] @ W[N, K]^T on tensor cores: the f16 candidate of issue 5 (dequantize to f16, f16 MMA
// with f32 accumulation), beside the correctness-first float-FMA qmatmul.cu it is tested against.
//
// One thread block (4 warps) computes a 32 x 32 tile of Y. Per 256-wide slice of K it converts 32 rows of X
// to f16 and dequantizes 32 rows of W (one GGML block per thread, csrc/quant/blocks.cuh) to f16 in shared
// memory, then each warp runs mma.sync.m16n8k16 (row.col, f32 accumulators) over its 16 x 16 quarter.
// Needs sm_80 (the wrapper uses qmatmul.cu below that). X values beyond f16's range (65504) overflow:
// the wrapper documents it; activations entering the model's matmuls are normalised.
// Shapes: any M and N; K a multiple of the type's block size (32 or 256); lda/ldy in elements.
#include "mma_tile.cuh"

namespace dg {

DG_HD uint16_t f32_to_f16_bits(float x) {
#ifdef __CUDA_ARCH__
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
#else
    (void)x;
    return 0;  // device-only: the host pass of nvcc never runs this
#endif
}

template <int T>
__global__ void __launch_bounds__(MMA_THREADS) qmatmul_mma(const float * __restrict__ x, int lda,
                                                          const uint8_t * __restrict__ w, float * __restrict__ y,
                                                          int ldy, int M, int N, int K) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    constexpr int QK = Traits<T>::QK;
    constexpr int SIZE = Traits<T>::SIZE;
    constexpr int MMA_TK = 256;
    constexpr int MMA_PAD = 8;  // halves of padding per shared row: fragment loads land in different banks
    __shared__ __align__(16) uint16_t xs[MMA_TM][MMA_TK + MMA_PAD];
    __shared__ __align__(16) uint16_t ws[MMA_TN][MMA_TK + MMA_PAD];

    const int tid = threadIdx.x;
    const MmaLane p = mma_lane(blockIdx.x, blockIdx.y, tid);
    const int m0 = p.m0, n0 = p.n0, wm = p.wm, wn = p.wn, g = p.g, t = p.t;
    const long row_bytes = (long)(K / QK) * SIZE;
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};  // two m16n8 tiles

    for (int k0 = 0; k0 < K; k0 += MMA_TK) {
        const int tk = K - k0 < MMA_TK ? K - k0 : MMA_TK;  // a multiple of 16 (the wrapper checks K)
        const int blocks_per_row = tk / QK;
        for (int i = tid; i < MMA_TN * blocks_per_row; i += MMA_THREADS) {
            const int r = i / blocks_per_row, bi = i % blocks_per_row;
            uint16_t * dst = &ws[r][bi * QK];
            if (n0 + r < N) {
                float tmp[QK];
                dequant_block<T>(w + (long)(n0 + r) * row_bytes + (long)(k0 / QK + bi) * SIZE, tmp);
                for (int j = 0; j < QK; ++j) dst[j] = f32_to_f16_bits(tmp[j]);
            } else {
                for (int j = 0; j < QK; ++j) dst[j] = 0;
            }
        }
        for (int i = tid; i < MMA_TM * tk; i += MMA_THREADS) {
            const int r = i / tk, c = i % tk, m = m0 + r;
            xs[r][c] = m < M ? f32_to_f16_bits(x[(long)m * lda + k0 + c]) : (uint16_t)0;
        }
        __syncthreads();
        for (int kk = 0; kk < tk; kk += 16) {
            const int c = kk + t * 2;
            const uint32_t a0 = *reinterpret_cast<const uint32_t *>(&xs[wm + g][c]);
            const uint32_t a1 = *reinterpret_cast<const uint32_t *>(&xs[wm + g + 8][c]);
            const uint32_t a2 = *reinterpret_cast<const uint32_t *>(&xs[wm + g][c + 8]);
            const uint32_t a3 = *reinterpret_cast<const uint32_t *>(&xs[wm + g + 8][c + 8]);
            for (int h = 0; h < 2; ++h) {
                const int n = wn + h * 8 + g;
                const uint32_t b0 = *reinterpret_cast<const uint32_t *>(&ws[n][c]);
                const uint32_t b1 = *reinterpret_cast<const uint32_t *>(&ws[n][c + 8]);
                asm volatile(
                    "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                    "{%0,%1,%2,%3};\n"
                    : "+f"(acc[h][0]), "+f"(acc[h][1]), "+f"(acc[h][2]), "+f"(acc[h][3])
                    : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
            }
        }
        __syncthreads();
    }
    mma_store(acc, p, y, ldy, M, N);
#else
    (void)x; (void)lda; (void)w; (void)y; (void)ldy; (void)M; (void)N; (void)K;
    __trap();  // tensor-core f16 MMA m16n8k16 needs sm_80; ops.qmatmul_mma refuses older GPUs
#endif
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every type; at run time NVRTC instantiates by name
#define DG_QMMA(T) template __global__ void dg::qmatmul_mma<dg::T>(const float *, int, const uint8_t *, float *, int, int, int, int);
DG_FOR_EACH_TYPE(DG_QMMA)
#endif
