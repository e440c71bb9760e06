// GGML block formats: per-block dequantization (ggml-quants.c dequantize_row_*) as __host__ __device__
// code, so that the same functions run in the kernels and in the host harness (csrc/tools/dequant_host.cu)
// that tests them on the CPU against gguf-py, bit for bit. The integer formats are read once, in
// decompose.cuh (w = s * q + m per 16 values); the float formats here.
#pragma once
#include "decompose.cuh"

namespace dg {

// the integer form of 16-value group gi of the row starting at `row` (integer types): as decompose_group,
// gi counted along the row (csrc/mma_q8.cuh stages a tile's groups this way, and dequant_unit below)
template <int T> DG_HD void decompose_unit(const uint8_t * row, int gi, Words4 & q, float & s, float & m) {
    constexpr int PER_BLOCK = Traits<T>::QK / DG_GROUP;
    decompose_group<T>(row + (long)(gi / PER_BLOCK) * Traits<T>::SIZE, gi % PER_BLOCK, q, s, m);
}

// A row split into units a thread decodes each: 16-value groups for the integer types, single values for
// the float ones (VALUES at a time)
template <int T> struct Unit {
    static constexpr int VALUES = Traits<T>::QK == 1 ? 1 : DG_GROUP;
};

template <int T> DG_HD void dequant_float(const uint8_t * b, float * y);  // the float types' one value
template <> DG_HD void dequant_float<T_F32>(const uint8_t * b, float * y) {
    union { uint32_t u; float f; } v;
    v.u = ld32<Align<T_F32>>(b);
    y[0] = v.f;
}
template <> DG_HD void dequant_float<T_F16>(const uint8_t * b, float * y) { y[0] = fp16_to_f32(ld16(b)); }
template <> DG_HD void dequant_float<T_BF16>(const uint8_t * b, float * y) { y[0] = bf16_to_f32(ld16(b)); }

// unit u of the row starting at `row` -> y[0 .. VALUES): integer types through their integer form,
// mul_rn(s, q) + m (the product rounded on its own, as the references compute it)
template <int T> DG_HD void dequant_unit(const uint8_t * row, int u, float * y) {
    if constexpr (Traits<T>::QK == 1) {
        dequant_float<T>(row + (long)u * Traits<T>::SIZE, y);
    } else {
        Words4 q;
        float s, m;
        decompose_unit<T>(row, u, q, s, m);
        for (int i = 0; i < DG_GROUP; ++i) {
            const float v = mul_rn(s, s8_to_f32(q.w[i / 4], i % 4));
            y[i] = HasOffset<T> ? v + m : v;  // the same values: m is 0 in the others (a zero's sign aside)
        }
    }
}

#ifdef __CUDACC__
// the same unit rounded to f16 (IEEE half bits, nearest even): what the f16 tensor-core tile stages and
// get_rows_f16 writes (device code only). A 16-value group goes out as two 128-bit stores of packed pairs: y
// is 16-aligned there (the tile's shared rows and get_rows_f16's rows hold whole groups)
template <int T> __device__ __forceinline__ void dequant_unit(const uint8_t * row, int u, uint16_t * y) {
    float v[Unit<T>::VALUES];
    dequant_unit<T>(row, u, v);
    if constexpr (Unit<T>::VALUES == DG_GROUP) {
        Words4 h[2];
#pragma unroll
        for (int i = 0; i < DG_GROUP / 2; ++i) h[i / 4].w[i % 4] = f32x2_to_f16x2_bits(v[2 * i], v[2 * i + 1]);
        reinterpret_cast<Words4 *>(y)[0] = h[0];
        reinterpret_cast<Words4 *>(y)[1] = h[1];
    } else {
        for (int i = 0; i < Unit<T>::VALUES; ++i) y[i] = f32_to_f16_bits(v[i]);
    }
}
#endif

// values and bytes per block of a runtime type id (host harnesses); false for an unknown type
DG_HD bool block_shape(int type, int &qk, int &size) {
#define DG_CASE(T) case T: qk = Traits<T>::QK; size = Traits<T>::SIZE; return true;
    switch (type) {
        DG_FOR_EACH_TYPE(DG_CASE)
        default: return false;
    }
#undef DG_CASE
}

// a row of k values of a runtime type id, unit after unit along the row as the tiles, the head and
// get_rows decode it (host harnesses)
DG_HD bool dequant_row(int type, const uint8_t * row, float * y, int k) {
#define DG_CASE(T)                                                                                    \
    case T:                                                                                           \
        for (int u = 0; u < k / Unit<T>::VALUES; ++u) dequant_unit<T>(row, u, y + u * Unit<T>::VALUES); \
        return true;
    switch (type) {
        DG_FOR_EACH_TYPE(DG_CASE)
        default: return false;
    }
#undef DG_CASE
}

}  // namespace dg
