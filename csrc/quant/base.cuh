// GGML block formats, the common part: type ids, block sizes (ggml-common.h), half/bfloat conversions and
// byte readers, as __host__ __device__ code. decompose.cuh reads the integer formats, blocks.cuh
// dequantizes every format.
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

#if defined(__CUDACC__) && !defined(DG_EMU)  // the tests' CPU emulator (tests/cuda_emu.h) has its own
// float -> IEEE half bits, rounded to nearest even: one cvt instruction (device code only)
__device__ __forceinline__ uint16_t f32_to_f16_bits(float x) {
    uint16_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(x));
    return h;
}
#endif

#ifdef __CUDACC__
// two floats to f16 bits, nearest even, packed (lo in the low half): one conversion for the pair on sm_80+, where
// the conversions run at a quarter or an eighth of the rate of float arithmetic (the f16 tile's decode is
// made of them); two before sm_80 and in the tests' emulator
__device__ __forceinline__ uint32_t f32x2_to_f16x2_bits(float lo, float hi) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    uint32_t r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // the first source lands in the high half
    return r;
#else
    return (uint32_t)f32_to_f16_bits(lo) | ((uint32_t)f32_to_f16_bits(hi) << 16);
#endif
}
#endif

// Small integers to float exactly, without a conversion instruction (I2F: 16 per clock per SM on sm_80..sm_90,
// against 64-128 float adds): the integer in the low mantissa bits of a power of two, then the power taken off.
// Byte k of w as an int8 q: q + 128 under 2^23's exponent, minus 2^23 + 128.
DG_HD float s8_to_f32(uint32_t w, int k) {
    union { uint32_t u; float f; } v;
    v.u = 0x4B000000u | (((w >> (8 * k)) & 0xFFu) ^ 0x80u);
    return v.f - 8388736.0f;
}

// n with |n| <= 2^22 (the int8 tile's dot products of 32 terms are at most 32 x 128 x 128 = 524288): 1.5 x 2^23
// + n, minus 1.5 x 2^23
DG_HD float small_i32_to_f32(int n) {
    union { uint32_t u; float f; } v;
    v.u = 0x4B400000u + (uint32_t)n;
    return v.f - 12582912.0f;
}

// IEEE half -> float, exact: one cvt instruction on the device, bit by bit on the host (the harnesses)
DG_HD float fp16_to_f32(uint16_t h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
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
#endif
}

DG_HD float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

// Little-endian words of a block, read as wide as their alignment allows: a block of type T starts at a
// multiple of Align<T> (the wrappers check the tensor's address, plugin/cuda/ops.py; blocks follow each other
// every SIZE bytes), and the readers below take offsets that keep it. One load per word instead of one per
// byte: a warp's byte loads moved 32 bytes per load instruction, so a group's 16 values took 16 of them.
template <int T> struct Traits;
template <int T> constexpr int Align = (Traits<T>::SIZE & 15) == 0 ? 16 : (Traits<T>::SIZE & 7) == 0 ? 8
                                     : (Traits<T>::SIZE & 3) == 0 ? 4 : 2;  // gcd(SIZE, 16): SIZE is even

// W from the weights at p, aligned for W: a read-only load (ld.global.nc: the kernels never write the
// weights; nvcc infers it only where it can follow the pointer, which the funnel below defeats)
template <class W> DG_HD W ld_ro(const uint8_t * p) {
#ifdef __CUDA_ARCH__
    return __ldg(reinterpret_cast<const W *>(p));
#else
    return *reinterpret_cast<const W *>(p);
#endif
}

DG_HD uint8_t ld8(const uint8_t * p) { return ld_ro<uint8_t>(p); }
DG_HD uint16_t ld16(const uint8_t * p) { return ld_ro<uint16_t>(p); }  // p: 2-aligned

template <int A> DG_HD uint32_t ld32(const uint8_t * p) {  // p: a multiple of A (2, 4, 8 or 16)
    if constexpr (A >= 4) {
        return ld_ro<uint32_t>(p);
    } else {
        return (uint32_t)ld16(p) | ((uint32_t)ld16(p + 2) << 16);
    }
}

// 16 bytes as 4 words (byte l of the 16 is byte l % 4 of w[l / 4]): one 128-bit load or store where 16-aligned
struct alignas(16) Words4 {
    uint32_t w[4];
};

template <int A> DG_HD Words4 ld128(const uint8_t * p) {  // p: a multiple of A
    if constexpr (A >= 16) {
#ifdef __CUDA_ARCH__
        const uint4 u = __ldg(reinterpret_cast<const uint4 *>(p));
        return Words4{{u.x, u.y, u.z, u.w}};
#else
        return *reinterpret_cast<const Words4 *>(p);  // the emulator's -fsanitize=alignment checks the 16
#endif
    } else {
        Words4 v;
        for (int i = 0; i < 4; ++i) v.w[i] = ld32<A>(p + 4 * i);
        return v;
    }
}

// 16 bytes at a 2-aligned p, where at least 2 more bytes of the block follow: 4 or 5 aligned 32-bit loads
// (the fifth where p is not 4-aligned, then funnel-shifted), against 8 16-bit ones. The aligned words may
// take 2 bytes before p (within p's own aligned word: the same allocation) and 2 after p + 16 (the block's).
DG_HD Words4 ld128_2(const uint8_t * p) {
    const unsigned sh = (unsigned)((unsigned long long)p & 2u) * 8u;  // 0 or 16
    const uint8_t * a = p - sh / 8u;  // 4-aligned
    uint32_t w[5];
    for (int i = 0; i < 4; ++i) w[i] = ld32<4>(a + 4 * i);
    w[4] = sh ? ld32<4>(a + 16) : 0u;
    Words4 v;
    for (int i = 0; i < 4; ++i) v.w[i] = (uint32_t)((((unsigned long long)w[i + 1] << 32) | w[i]) >> sh);
    return v;
}

// bytewise x - y (mod 256 in each byte, no borrow between bytes)
DG_HD uint32_t sub_bytes(uint32_t x, uint32_t y) {
    return ((x | 0x80808080u) - (y & 0x7F7F7F7Fu)) ^ ((x ^ ~y) & 0x80808080u);
}

// bits 0..3 of b to bit 4 of bytes 0..3 (a 5th bit per value)
DG_HD uint32_t spread_bit4(uint32_t b) {
    return ((b & 1u) << 4) | ((b & 2u) << 11) | ((b & 4u) << 18) | ((b & 8u) << 25);
}

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

// Q4_K / Q5_K: 6-bit scale and min of sub-block j (get_scale_min_k4) from the block's first 16 bytes (d, dmin,
// scales[12]) as 4 words: scales[i] is byte i % 4 of h.w[1 + i / 4]. Sub-block j < 4 takes the low 6 bits of
// scales[j] and scales[j + 4]; j >= 4 the nibbles of scales[j + 4] and the top 2 bits of scales[j - 4] and
// scales[j], which are bytes j % 4 of words 1, 2 and 3 either way: no index into h by a run-time value.
DG_HD void scale_min_k4(int j, const Words4 & h, uint8_t & d, uint8_t & m) {
    const int sh = 8 * (j & 3);
    const uint32_t b1 = (h.w[1] >> sh) & 0xFFu, b2 = (h.w[2] >> sh) & 0xFFu, b3 = (h.w[3] >> sh) & 0xFFu;
    if (j < 4) {
        d = (uint8_t)(b1 & 63);
        m = (uint8_t)(b2 & 63);
    } else {
        d = (uint8_t)((b3 & 0xF) | ((b1 >> 6) << 4));
        m = (uint8_t)((b3 >> 4) | ((b2 >> 6) << 4));
    }
}

// X(T) for every supported type: the kernels' instantiations and the runtime dispatch below
#define DG_FOR_EACH_TYPE(X) \
    X(T_F32) X(T_F16) X(T_BF16) X(T_Q4_0) X(T_Q5_0) X(T_Q5_1) X(T_Q8_0) X(T_Q2_K) X(T_Q3_K) X(T_Q4_K) X(T_Q5_K) X(T_Q6_K)

}  // namespace dg
