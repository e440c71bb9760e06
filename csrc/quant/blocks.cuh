// GGML block formats: per-block dequantization (ggml-quants.c dequantize_row_*) as __host__ __device__
// code, so that the same functions run in the kernels and in the host harness (csrc/tools/dequant_host.cu)
// that tests them on the CPU against gguf-py, bit for bit. The integer formats are read once, in
// decompose.cuh (w = s * q + m per 16 values); the float formats here.
#pragma once
#include "decompose.cuh"

namespace dg {

// dequantize one block of type T into y[0 .. QK): the integer types through their integer form (the
// product rounded on its own, as the references compute it), the float types below
template <int T> DG_HD void dequant_block(const uint8_t * b, float * y) {
    constexpr int QK = Traits<T>::QK;
    int8_t q[QK];
    float s[QK / DG_GROUP], m[QK / DG_GROUP];
    decompose_block<T>(b, q, s, m);
    for (int i = 0; i < QK; ++i) y[i] = decomposed_value(q, s, m, i);
}

template <> DG_HD void dequant_block<T_F32>(const uint8_t * b, float * y) {
    union { uint32_t u; float f; } v;
    v.u = rd32(b);
    y[0] = v.f;
}
template <> DG_HD void dequant_block<T_F16>(const uint8_t * b, float * y) { y[0] = fp16_to_f32(rd16(b)); }
template <> DG_HD void dequant_block<T_BF16>(const uint8_t * b, float * y) { y[0] = bf16_to_f32(rd16(b)); }

// values and bytes per block of a runtime type id (host harnesses); false for an unknown type
DG_HD bool block_shape(int type, int &qk, int &size) {
#define DG_CASE(T) case T: qk = Traits<T>::QK; size = Traits<T>::SIZE; return true;
    switch (type) {
        DG_FOR_EACH_TYPE(DG_CASE)
        default: return false;
    }
#undef DG_CASE
}

// dispatch on a runtime type id (host harness)
DG_HD bool dequant_row(int type, const uint8_t * row, float * y, int k) {
#define DG_CASE(T)                                                                          \
    case T:                                                                                 \
        for (int i = 0; i < k / Traits<T>::QK; ++i)                                         \
            dequant_block<T>(row + (long)i * Traits<T>::SIZE, y + (long)i * Traits<T>::QK); \
        return true;
    switch (type) {
        DG_FOR_EACH_TYPE(DG_CASE)
        default: return false;
    }
#undef DG_CASE
}

}  // namespace dg
