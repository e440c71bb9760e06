// GGML integer block formats (ggml-quants.c dequantize_row_*, read term by term) as w = s[g] * q + m[g]:
// int8 values q and, per group g of 16 values, a float scale and offset. This is the one place each integer
// layout is read: blocks.cuh's dequant_block computes mul_rn(s, q) + m from it (equal to gguf-py bit for
// bit, tests/test_csrc.py), and the int8 tensor-core matmul (csrc/qmatmul_q8.cu) multiplies q by quantized
// activations and applies s and m per group. F32/F16/BF16 have no integer form.
#pragma once
#include "base.cuh"

namespace dg {

constexpr int DG_GROUP = 16;  // values per (scale, offset) group

// X(T) for every type with an integer form
#define DG_FOR_EACH_INT_TYPE(X) X(T_Q4_0) X(T_Q5_0) X(T_Q5_1) X(T_Q8_0) X(T_Q2_K) X(T_Q3_K) X(T_Q4_K) X(T_Q5_K) X(T_Q6_K)

// one block of type T -> q[QK], s[QK / 16], m[QK / 16]
template <int T> DG_HD void decompose_block(const uint8_t * b, int8_t * q, float * s, float * m);

template <> DG_HD void decompose_block<T_Q8_0>(const uint8_t * b, int8_t * q, float * s, float * m) {
    const float d = fp16_to_f32(rd16(b));
    for (int j = 0; j < 32; ++j) q[j] = (int8_t)b[2 + j];
    s[0] = s[1] = d;
    m[0] = m[1] = 0.0f;
}

template <> DG_HD void decompose_block<T_Q4_0>(const uint8_t * b, int8_t * q, float * s, float * m) {
    const float d = fp16_to_f32(rd16(b));
    const uint8_t * qs = b + 2;
    for (int j = 0; j < 16; ++j) {
        q[j] = (int8_t)((int)(qs[j] & 0xF) - 8);
        q[j + 16] = (int8_t)((int)(qs[j] >> 4) - 8);
    }
    s[0] = s[1] = d;
    m[0] = m[1] = 0.0f;
}

template <> DG_HD void decompose_block<T_Q5_0>(const uint8_t * b, int8_t * q, float * s, float * m) {
    const float d = fp16_to_f32(rd16(b));
    const uint32_t qh = rd32(b + 2);
    const uint8_t * qs = b + 6;
    for (int j = 0; j < 16; ++j) {
        const int h0 = ((qh >> j) << 4) & 0x10;
        const int h1 = (qh >> (j + 12)) & 0x10;
        q[j] = (int8_t)(((qs[j] & 0xF) | h0) - 16);
        q[j + 16] = (int8_t)(((qs[j] >> 4) | h1) - 16);
    }
    s[0] = s[1] = d;
    m[0] = m[1] = 0.0f;
}

template <> DG_HD void decompose_block<T_Q5_1>(const uint8_t * b, int8_t * q, float * s, float * m) {
    const float d = fp16_to_f32(rd16(b));
    const float mn = fp16_to_f32(rd16(b + 2));
    const uint32_t qh = rd32(b + 4);
    const uint8_t * qs = b + 8;
    for (int j = 0; j < 16; ++j) {
        const int h0 = ((qh >> j) << 4) & 0x10;
        const int h1 = (qh >> (j + 12)) & 0x10;
        q[j] = (int8_t)((qs[j] & 0xF) | h0);
        q[j + 16] = (int8_t)((qs[j] >> 4) | h1);
    }
    s[0] = s[1] = d;
    m[0] = m[1] = mn;
}

template <> DG_HD void decompose_block<T_Q2_K>(const uint8_t * b, int8_t * q, float * s, float * m) {
    const uint8_t * scales = b;
    const uint8_t * qs = b + 16;
    const float d = fp16_to_f32(rd16(b + 80));
    const float dmin = fp16_to_f32(rd16(b + 82));
    int is = 0, o = 0;
    for (int n = 0; n < 256; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; ++j) {
            for (int half = 0; half < 2; ++half) {
                const uint8_t sc = scales[is];
                s[is] = d * (sc & 0xF);
                m[is] = -(dmin * (sc >> 4));
                ++is;
                for (int l = 0; l < 16; ++l) q[o++] = (int8_t)((qs[l + 16 * half] >> shift) & 3);
            }
            shift += 2;
        }
        qs += 32;
    }
}

template <> DG_HD void decompose_block<T_Q3_K>(const uint8_t * b, int8_t * q, float * s, float * m) {
    const uint8_t * hm = b;
    const uint8_t * qs = b + 32;
    const uint8_t * sraw = b + 96;
    const float d_all = fp16_to_f32(rd16(b + 108));
    const uint32_t kmask1 = 0x03030303u, kmask2 = 0x0f0f0f0fu;
    uint32_t aux[4] = {rd32(sraw), rd32(sraw + 4), rd32(sraw + 8), 0};
    const uint32_t tmp = aux[2];
    aux[2] = ((aux[0] >> 4) & kmask2) | (((tmp >> 4) & kmask1) << 4);
    aux[3] = ((aux[1] >> 4) & kmask2) | (((tmp >> 6) & kmask1) << 4);
    aux[0] = (aux[0] & kmask2) | (((tmp >> 0) & kmask1) << 4);
    aux[1] = (aux[1] & kmask2) | (((tmp >> 2) & kmask1) << 4);
    int is = 0, o = 0;
    uint8_t bit = 1;
    for (int n = 0; n < 256; n += 128) {
        int shift = 0;
        for (int j = 0; j < 4; ++j) {
            for (int half = 0; half < 2; ++half) {
                const int sc = (int8_t)((aux[is / 4] >> (8 * (is % 4))) & 0xFF);
                s[is] = d_all * (sc - 32);
                m[is] = 0.0f;
                ++is;
                for (int l = 0; l < 16; ++l) {
                    const int k = l + 16 * half;
                    q[o++] = (int8_t)((int)((qs[k] >> shift) & 3) - ((hm[k] & bit) ? 0 : 4));
                }
            }
            shift += 2;
            bit <<= 1;
        }
        qs += 32;
    }
}

// Q4_K / Q5_K: scale and offset of 32-value sub-block j (its two 16-value groups), get_scale_min_k4's
DG_HD void k4_groups(int j, const uint8_t * scales, float d, float dmin, float * s, float * m) {
    uint8_t sc, mn;
    scale_min_k4(j, scales, sc, mn);
    s[2 * j] = s[2 * j + 1] = d * sc;
    m[2 * j] = m[2 * j + 1] = -(dmin * mn);
}

// Q4_K: sub-blocks 2i and 2i+1 are the low and high nibbles of bytes 32i .. 32i+31
template <> DG_HD void decompose_block<T_Q4_K>(const uint8_t * b, int8_t * q, float * s, float * m) {
    const float d = fp16_to_f32(rd16(b)), dmin = fp16_to_f32(rd16(b + 2));
    for (int j = 0; j < 8; ++j) {
        k4_groups(j, b + 4, d, dmin, s, m);
        const uint8_t * qs = b + 16 + (j / 2) * 32;
        for (int l = 0; l < 32; ++l) q[32 * j + l] = (int8_t)((j & 1) ? qs[l] >> 4 : qs[l] & 0xF);
    }
}

// Q5_K: as Q4_K, plus bit j of qh[l] as the fifth bit of sub-block j's value l
template <> DG_HD void decompose_block<T_Q5_K>(const uint8_t * b, int8_t * q, float * s, float * m) {
    const float d = fp16_to_f32(rd16(b)), dmin = fp16_to_f32(rd16(b + 2));
    const uint8_t * qh = b + 16;
    for (int j = 0; j < 8; ++j) {
        k4_groups(j, b + 4, d, dmin, s, m);
        const uint8_t * ql = b + 48 + (j / 2) * 32;
        for (int l = 0; l < 32; ++l)
            q[32 * j + l] = (int8_t)(((j & 1) ? ql[l] >> 4 : ql[l] & 0xF) + (((qh[l] >> j) & 1) ? 16 : 0));
    }
}

template <> DG_HD void decompose_block<T_Q6_K>(const uint8_t * b, int8_t * q, float * s, float * m) {
    const uint8_t * ql = b;
    const uint8_t * qh = b + 128;
    const int8_t * sc = (const int8_t *)(b + 192);
    const float d = fp16_to_f32(rd16(b + 208));
    for (int n = 0; n < 256; n += 128) {
        for (int l = 0; l < 32; ++l) {
            q[n + l] = (int8_t)((int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
            q[n + l + 32] = (int8_t)((int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
            q[n + l + 64] = (int8_t)((int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            q[n + l + 96] = (int8_t)((int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
        for (int g = 0; g < 8; ++g) {  // group g of this half: values n + 16 g .. ; scale sc[g] (is = l / 16 + 2 k)
            s[n / 16 + g] = d * sc[g];
            m[n / 16 + g] = 0.0f;
        }
        ql += 64;
        qh += 32;
        sc += 8;
    }
}

// the value mul_rn(s, q) + m of position i (a product rounded on its own, as dequant_block's)
DG_HD float decomposed_value(const int8_t * q, const float * s, const float * m, int i) {
    return mul_rn(s[i / DG_GROUP], (float)q[i]) + m[i / DG_GROUP];
}

}  // namespace dg
