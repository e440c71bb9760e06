// Embedding lookup from GGML rows: Y[m, :] = dequant(W[rows[m], :]) for the canvas or prompt tokens, so
// the token embedding stays in its quantized form in VRAM (one copy, shared with the tied head) instead
// of a float32 [V, D] copy (2.95 GB for the 26B-A4B's 262144 x 2816).
// One thread block per output row; its threads take the row's 16-value groups in turn (csrc/quant/blocks.cuh).
// Shapes: rows [M] i32 in [0, V) (checked by the wrapper); W [V, row_bytes] u8; Y [M, K] f32 (f16: get_rows_f16).
#include "quant/blocks.cuh"

namespace dg {

// Row rows[blockIdx.x] of W, dequantized into row blockIdx.x of Y (float, or f16 bits rounded to nearest).
template <int T, class Out>
__device__ __forceinline__ void get_row(const int * __restrict__ rows, const uint8_t * __restrict__ w, Out * __restrict__ y,
                                        int K) {
    constexpr int QK = Traits<T>::QK;
    constexpr int SIZE = Traits<T>::SIZE;
    constexpr int UV = Unit<T>::VALUES;
    const long row_bytes = (long)(K / QK) * SIZE;
    const uint8_t * src = w + (long)rows[blockIdx.x] * row_bytes;
    Out * dst = y + (long)blockIdx.x * K;
    for (int u = threadIdx.x; u < K / UV; u += blockDim.x) dequant_unit<T>(src, u, dst + (long)u * UV);
}

template <int T>
__global__ void get_rows(const int * __restrict__ rows, const uint8_t * __restrict__ w, float * __restrict__ y, int K) {
    get_row<T>(rows, w, y, K);
}

// The same rows rounded to f16 (Y [M, K] as IEEE half bits): the vocabulary head's rows for its f16 GEMM
// (plugin/cuda/head_ops.head_stats_chunked), half the bytes of get_rows' float32.
template <int T>
__global__ void get_rows_f16(const int * __restrict__ rows, const uint8_t * __restrict__ w, uint16_t * __restrict__ y,
                             int K) {
    get_row<T>(rows, w, y, K);
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every type; at run time NVRTC instantiates by name
#define DG_GET_ROWS(T) template __global__ void dg::get_rows<dg::T>(const int *, const uint8_t *, float *, int); \
    template __global__ void dg::get_rows_f16<dg::T>(const int *, const uint8_t *, uint16_t *, int);
DG_FOR_EACH_TYPE(DG_GET_ROWS)
#endif
