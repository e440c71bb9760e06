// Y[M, N] = X[M, K] @ W[N, K]^T on int8 tensor cores: the MMQ-style candidate of issue 5, beside the f16
// one (qmatmul_mma.cu) and the float-FMA reference (qmatmul.cu). Integer GGML types only.
//
// quantize_q8: X -> int8 q with one float scale per 32 values (d = max|x| / 127, q = rint(x / d)) and the
// sum of q per 16 values (for the weights' offsets), one warp per 32 values.
// qmatmul_q8<T, TN>: one thread block (4 warps) computes a 32 x TN tile of Y (TN 32 or 128) from the quantized X
// (csrc/mma_q8.cuh). Needs sm_75. Shapes: any M and N; K a multiple of the type's block.
#include "mma_q8.cuh"

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

template <int T, int TN>
__global__ void __launch_bounds__(MMA_THREADS) qmatmul_q8(const int8_t * __restrict__ xq, const float * __restrict__ xd,
                                                        const int * __restrict__ xs, const uint8_t * __restrict__ w,
                                                        float * __restrict__ y, int ldy, int M, int N, int K) {
    mma_q8_tile<T, TN>(xq, xd, xs, nullptr, blockIdx.y * MMA_TM, M, w, blockIdx.x * TN, N, K, y, ldy);
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every integer type and width; at run time NVRTC instantiates by name
#define DG_Q8(T) template __global__ void dg::qmatmul_q8<dg::T, 32>(const int8_t *, const float *, const int *, \
    const uint8_t *, float *, int, int, int, int);                                                       \
    template __global__ void dg::qmatmul_q8<dg::T, 128>(const int8_t *, const float *, const int *,       \
    const uint8_t *, float *, int, int, int, int);
DG_FOR_EACH_INT_TYPE(DG_Q8)
#endif
