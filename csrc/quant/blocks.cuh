// GGML block formats: layouts (ggml-common.h) and per-block dequantization (ggml-quants.c
// dequantize_row_*), as __host__ __device__ code so that the same functions run in the kernels and
// in the host harness (csrc/tools/dequant_host.cu) that tests them on the CPU against gguf-py.
#pragma once
#ifdef __CUDACC_RTC__  // NVRTC (CuPy RawModule) has no C library headers
typedef unsigned char uint8_t;
typedef signed char int8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef unsigned long long uint64_t;
typedef long long int64_t;
#else
#include <stdint.h>
#endif

#ifdef __CUDACC__
#define DG_HD __host__ __device__ __forceinline__
#else
#define DG_HD inline
#endif

namespace dg {

// GGML type ids (gguf GGMLQuantizationType)
enum : int {
    T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
    T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_BF16 = 30,
};

// IEEE half -> float, exact, bit by bit (same on host and device, no intrinsics needed)
DG_HD float fp16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1Fu;
    uint32_t man = h & 0x3FFu;
    uint32_t bits;
    if (exp == 0x1Fu) {
        bits = sign | 0x7F800000u | (man << 13);  // inf / NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;  // +-0
    } else {  // subnormal: normalize
        exp = 113;
        while ((man & 0x400u) == 0) {
            man <<= 1;
            --exp;
        }
        bits = sign | (exp << 23) | ((man & 0x3FFu) << 13);
    }
    union { uint32_t u; float f; } v;
    v.u = bits;
    return v.f;
}

DG_HD float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

DG_HD uint16_t rd16(const uint8_t * p) { return (uint16_t)(p[0] | (p[1] << 8)); }
DG_HD uint32_t rd32(const uint8_t * p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24); }

// a * b rounded on its own: a following add is not fused into one FMA (NVRTC fuses by default, and the
// references, gguf-py and dgemma.quant, round the product and the sum separately: bit-exact both ways)
DG_HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

// values per block and bytes per block
template <int T> struct Traits;
template <> struct Traits<T_F32>  { static constexpr int QK = 1,   SIZE = 4;   };
template <> struct Traits<T_F16>  { static constexpr int QK = 1,   SIZE = 2;   };
template <> struct Traits<T_BF16> { static constexpr int QK = 1,   SIZE = 2;   };
template <> struct Traits<T_Q4_0> { static constexpr int QK = 32,  SIZE = 18;  };  // d, qs[16]
template <> struct Traits<T_Q5_0> { static constexpr int QK = 32,  SIZE = 22;  };  // d, qh[4], qs[16]
template <> struct Traits<T_Q5_1> { static constexpr int QK = 32,  SIZE = 24;  };  // d, m, qh[4], qs[16]
template <> struct Traits<T_Q8_0> { static constexpr int QK = 32,  SIZE = 34;  };  // d, qs[32]
template <> struct Traits<T_Q2_K> { static constexpr int QK = 256, SIZE = 84;  };  // scales[16], qs[64], d, dmin
template <> struct Traits<T_Q3_K> { static constexpr int QK = 256, SIZE = 110; };  // hmask[32], qs[64], scales[12], d
template <> struct Traits<T_Q4_K> { static constexpr int QK = 256, SIZE = 144; };  // d, dmin, scales[12], qs[128]
template <> struct Traits<T_Q5_K> { static constexpr int QK = 256, SIZE = 176; };  // d, dmin, scales[12], qh[32], qs[128]
template <> struct Traits<T_Q6_K> { static constexpr int QK = 256, SIZE = 210; };  // ql[128], qh[64], scales[16], d

// Q4_K / Q5_K: 6-bit scale and min of sub-block j (get_scale_min_k4)
DG_HD void scale_min_k4(int j, const uint8_t * q, uint8_t & d, uint8_t & m) {
    if (j < 4) {
        d = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// dequantize one block of type T into y[0 .. QK)
template <int T> DG_HD void dequant_block(const uint8_t * b, float * y);

template <> DG_HD void dequant_block<T_F32>(const uint8_t * b, float * y) {
    union { uint32_t u; float f; } v;
    v.u = rd32(b);
    y[0] = v.f;
}
template <> DG_HD void dequant_block<T_F16>(const uint8_t * b, float * y) { y[0] = fp16_to_f32(rd16(b)); }
template <> DG_HD void dequant_block<T_BF16>(const uint8_t * b, float * y) { y[0] = bf16_to_f32(rd16(b)); }

template <> DG_HD void dequant_block<T_Q8_0>(const uint8_t * b, float * y) {
    const float d = fp16_to_f32(rd16(b));
    for (int j = 0; j < 32; ++j) y[j] = d * (float)(int8_t)b[2 + j];
}

template <> DG_HD void dequant_block<T_Q4_0>(const uint8_t * b, float * y) {
    const float d = fp16_to_f32(rd16(b));
    const uint8_t * qs = b + 2;
    for (int j = 0; j < 16; ++j) {
        y[j] = ((int)(qs[j] & 0xF) - 8) * d;
        y[j + 16] = ((int)(qs[j] >> 4) - 8) * d;
    }
}

template <> DG_HD void dequant_block<T_Q5_0>(const uint8_t * b, float * y) {
    const float d = fp16_to_f32(rd16(b));
    const uint32_t qh = rd32(b + 2);
    const uint8_t * qs = b + 6;
    for (int j = 0; j < 16; ++j) {
        const int h0 = ((qh >> j) << 4) & 0x10;
        const int h1 = (qh >> (j + 12)) & 0x10;
        y[j] = (((qs[j] & 0xF) | h0) - 16) * d;
        y[j + 16] = (((qs[j] >> 4) | h1) - 16) * d;
    }
}

template <> DG_HD void dequant_block<T_Q5_1>(const uint8_t * b, float * y) {
    const float d = fp16_to_f32(rd16(b));
    const float m = fp16_to_f32(rd16(b + 2));
    const uint32_t qh = rd32(b + 4);
    const uint8_t * qs = b + 8;
    for (int j = 0; j < 16; ++j) {
        const int h0 = ((qh >> j) << 4) & 0x10;
        const int h1 = (qh >> (j + 12)) & 0x10;
        y[j] = mul_rn((float)((qs[j] & 0xF) | h0), d) + m;
        y[j + 16] = mul_rn((float)((qs[j] >> 4) | h1), d) + m;
    }
}

template <> DG_HD void dequant_block<T_Q2_K>(const uint8_t * b, float * y) {
    const uint8_t * scales = b;
    const uint8_t * q = b + 16;
    const float d = fp16_to_f32(rd16(b + 80));
    const float dmin = fp16_to_f32(rd16(b + 82));
    int is = 0;
    for (int n = 0; n < 256; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; ++j) {
            uint8_t sc = scales[is++];
            float dl = d * (sc & 0xF), ml = dmin * (sc >> 4);
            for (int l = 0; l < 16; ++l) *y++ = mul_rn(dl, (float)((q[l] >> shift) & 3)) - ml;
            sc = scales[is++];
            dl = d * (sc & 0xF);
            ml = dmin * (sc >> 4);
            for (int l = 0; l < 16; ++l) *y++ = mul_rn(dl, (float)((q[l + 16] >> shift) & 3)) - ml;
            shift += 2;
        }
        q += 32;
    }
}

template <> DG_HD void dequant_block<T_Q3_K>(const uint8_t * b, float * y) {
    const uint8_t * hm = b;
    const uint8_t * q = b + 32;
    const uint8_t * sraw = b + 96;
    const float d_all = fp16_to_f32(rd16(b + 108));
    const uint32_t kmask1 = 0x03030303u, kmask2 = 0x0f0f0f0fu;
    uint32_t aux[4] = {rd32(sraw), rd32(sraw + 4), rd32(sraw + 8), 0};
    const uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    int8_t scales[16];
    for (int i = 0; i < 4; ++i)
        for (int k = 0; k < 4; ++k) scales[4 * i + k] = (int8_t)((aux[i] >> (8 * k)) & 0xFF);
    int is = 0;
    uint8_t m = 1;
    for (int n = 0; n < 256; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; ++j) {
            float dl = d_all * (scales[is++] - 32);
            for (int l = 0; l < 16; ++l) *y++ = dl * ((int)((q[l] >> shift) & 3) - ((hm[l] & m) ? 0 : 4));
            dl = d_all * (scales[is++] - 32);
            for (int l = 0; l < 16; ++l) *y++ = dl * ((int)((q[l + 16] >> shift) & 3) - ((hm[l + 16] & m) ? 0 : 4));
            shift += 2;
            m <<= 1;
        }
        q += 32;
    }
}

template <> DG_HD void dequant_block<T_Q4_K>(const uint8_t * b, float * y) {
    const float d = fp16_to_f32(rd16(b));
    const float dmin = fp16_to_f32(rd16(b + 2));
    const uint8_t * scales = b + 4;
    const uint8_t * q = b + 16;
    int is = 0;
    for (int j = 0; j < 256; j += 64) {
        uint8_t sc, m;
        scale_min_k4(is, scales, sc, m);
        const float d1 = d * sc, m1 = dmin * m;
        scale_min_k4(is + 1, scales, sc, m);
        const float d2 = d * sc, m2 = dmin * m;
        for (int l = 0; l < 32; ++l) *y++ = mul_rn(d1, (float)(q[l] & 0xF)) - m1;
        for (int l = 0; l < 32; ++l) *y++ = mul_rn(d2, (float)(q[l] >> 4)) - m2;
        q += 32;
        is += 2;
    }
}

template <> DG_HD void dequant_block<T_Q5_K>(const uint8_t * b, float * y) {
    const float d = fp16_to_f32(rd16(b));
    const float dmin = fp16_to_f32(rd16(b + 2));
    const uint8_t * scales = b + 4;
    const uint8_t * qh = b + 16;
    const uint8_t * ql = b + 48;
    int is = 0;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < 256; j += 64) {
        uint8_t sc, m;
        scale_min_k4(is, scales, sc, m);
        const float d1 = d * sc, m1 = dmin * m;
        scale_min_k4(is + 1, scales, sc, m);
        const float d2 = d * sc, m2 = dmin * m;
        for (int l = 0; l < 32; ++l) *y++ = mul_rn(d1, (float)((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0))) - m1;
        for (int l = 0; l < 32; ++l) *y++ = mul_rn(d2, (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0))) - m2;
        ql += 32;
        is += 2;
        u1 <<= 2;
        u2 <<= 2;
    }
}

template <> DG_HD void dequant_block<T_Q6_K>(const uint8_t * b, float * y) {
    const uint8_t * ql = b;
    const uint8_t * qh = b + 128;
    const int8_t * sc = (const int8_t *)(b + 192);
    const float d = fp16_to_f32(rd16(b + 208));
    for (int n = 0; n < 256; n += 128) {
        for (int l = 0; l < 32; ++l) {
            const int is = l / 16;
            const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
            const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            y[l] = d * sc[is + 0] * q1;
            y[l + 32] = d * sc[is + 2] * q2;
            y[l + 64] = d * sc[is + 4] * q3;
            y[l + 96] = d * sc[is + 6] * q4;
        }
        y += 128;
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

// X(T) for every supported type: the kernels' instantiations and the runtime dispatch below
#define DG_FOR_EACH_TYPE(X) \
    X(T_F32) X(T_F16) X(T_BF16) X(T_Q4_0) X(T_Q5_0) X(T_Q5_1) X(T_Q8_0) X(T_Q2_K) X(T_Q3_K) X(T_Q4_K) X(T_Q5_K) X(T_Q6_K)

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
