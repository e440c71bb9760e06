// Embedding lookup from GGML rows: Y[m, :] = dequant(W[rows[m], :]) for the canvas or prompt tokens, so
// the token embedding stays in its quantized form in VRAM (one copy, shared with the tied head) instead
// of a float32 [V, D] copy (2.95 GB for the 26B-A4B's 262144 x 2816).
// One thread per unit of Y (a 16-value group, or a float type's value: csrc/quant/blocks.cuh), units counted
// along Y's rows, so every thread of a block has one whatever K is (a block per row left 80 of 128 threads idle
// in a row's second pass at K = 2816, and 84 of 128 in its only pass at the experts' 704).
// Shapes: rows [M] i32 in [0, V) (checked by the wrapper), or null for W's rows in order (M = V); W [V, row_bytes]
// u8; Y [M, K] f32 (f16: get_rows_f16).
#include "quant/blocks.cuh"

namespace dg {

// Unit i (this thread's) of Y [M, K]: unit i % (K / VALUES) of row i / (K / VALUES), from row rows[that] of W
// (float, or f16 bits rounded to nearest; rows null: row m of W). M x K / VALUES < 2^31 (the wrapper checks):
// 32-bit divisions.
template <int T, class Out>
__device__ __forceinline__ void get_unit(const int * __restrict__ rows, const uint8_t * __restrict__ w, Out * __restrict__ y,
                                         int M, int K) {
    constexpr int QK = Traits<T>::QK;
    constexpr int SIZE = Traits<T>::SIZE;
    constexpr int UV = Unit<T>::VALUES;
    const int units = K / UV;
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= M * units) return;
    const int m = i / units, u = i % units;
    const long row_bytes = (long)(K / QK) * SIZE;
    dequant_unit<T>(w + (long)(rows ? rows[m] : m) * row_bytes, u, y + (long)m * K + (long)u * UV);
}

template <int T>
__global__ void get_rows(const int * __restrict__ rows, const uint8_t * __restrict__ w, float * __restrict__ y, int M,
                         int K) {
    get_unit<T>(rows, w, y, M, K);
}

// The same rows rounded to f16 (Y [M, K] as IEEE half bits): the vocabulary head's rows for its f16 GEMM
// (plugin/cuda/head_ops.head_stats_chunked), half the bytes of get_rows' float32.
template <int T>
__global__ void get_rows_f16(const int * __restrict__ rows, const uint8_t * __restrict__ w, uint16_t * __restrict__ y,
                             int M, int K) {
    get_unit<T>(rows, w, y, M, K);
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every type; at run time NVRTC instantiates by name
#define DG_GET_ROWS(T) template __global__ void dg::get_rows<dg::T>(const int *, const uint8_t *, float *, int, int); \
    template __global__ void dg::get_rows_f16<dg::T>(const int *, const uint8_t *, uint16_t *, int, int);
DG_FOR_EACH_TYPE(DG_GET_ROWS)
#endif
