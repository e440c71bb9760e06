// GGML integer block formats (ggml-quants.c dequantize_row_*) as w = s[g] * q + m[g]:
// int8 values q and, per group g of 16 values, a float scale and offset. This is the one place each integer
// layout is read, a group at a time: blocks.cuh's dequant_unit computes mul_rn(s, q) + m from it (equal to
// gguf-py bit for bit, tests/test_csrc.py), and the int8 tensor-core tile (csrc/mma_q8.cuh) multiplies q by
// quantized activations and applies s and m per group. F32/F16/BF16 have no integer form.
#pragma once
#include "base.cuh"

namespace dg {

constexpr int DG_GROUP = 16;  // values per (scale, offset) group

// X(T) for every type with an integer form
#define DG_FOR_EACH_INT_TYPE(X) X(T_Q4_0) X(T_Q5_0) X(T_Q5_1) X(T_Q8_0) X(T_Q2_K) X(T_Q3_K) X(T_Q4_K) X(T_Q5_K) X(T_Q6_K)

// values that share one (s, m) of decompose_group: groups 2p and 2p + 1 share theirs where the format scales
// per 32 values (the 32-value blocks; Q4_K and Q5_K's sub-blocks), not in Q2_K, Q3_K and Q6_K (a scale per 16)
template <int T> constexpr int ScaleSpan = (T == T_Q2_K || T == T_Q3_K || T == T_Q6_K) ? 16 : 32;

// whether decompose_group's offset m can be nonzero (the formats with a min: Q5_1, Q2_K, Q4_K, Q5_K; the others
// set m = 0): the kernels skip adding it, and the int8 tile its m * sum q_x, where it cannot be
template <int T> constexpr bool HasOffset = T == T_Q5_1 || T == T_Q2_K || T == T_Q4_K || T == T_Q5_K;

// group g (values 16 g .. 16 g + 15) of one block of type T -> q (value l in byte l % 4 of q.w[l / 4], int8)
// and its scale s and offset m. Groups are independent, so a kernel's threads can decode one each (32 rows x
// 16 groups of a K-quant slice keep 128 threads busy, where whole blocks kept 32). The 16 bytes a group's
// values come from are read as words (ld128: one 128-bit load for Q4_K and Q5_K, whose blocks are 16-aligned;
// 32-bit loads for the 4-aligned ones and, funnel-shifted, Q3_K's and Q6_K's 2-aligned blocks; 16-bit loads
// for the 32-value formats, whose last 16 bytes end their block) and decoded 4 values at a time.
template <int T> DG_HD void decompose_group(const uint8_t * b, int g, Words4 & q, float & s, float & m);

template <> DG_HD void decompose_group<T_Q8_0>(const uint8_t * b, int g, Words4 & q, float & s, float & m) {
    q = ld128<Align<T_Q8_0>>(b + 2 + 16 * g);
    s = fp16_to_f32(ld16(b));
    m = 0.0f;
}

// Q4_0: value j is the low nibble of qs[j], value j + 16 the high one
template <> DG_HD void decompose_group<T_Q4_0>(const uint8_t * b, int g, Words4 & q, float & s, float & m) {
    const Words4 qs = ld128<Align<T_Q4_0>>(b + 2);
    for (int i = 0; i < 4; ++i) q.w[i] = sub_bytes((qs.w[i] >> (4 * g)) & 0x0F0F0F0Fu, 0x08080808u);
    s = fp16_to_f32(ld16(b));
    m = 0.0f;
}

// Q5_0 / Q5_1: as Q4_0, with bit j of qh as value j's fifth bit
DG_HD void q5_words(const Words4 & qs, uint32_t qh, int g, Words4 & q) {
    for (int i = 0; i < 4; ++i) q.w[i] = ((qs.w[i] >> (4 * g)) & 0x0F0F0F0Fu) | spread_bit4(qh >> (16 * g + 4 * i));
}

template <> DG_HD void decompose_group<T_Q5_0>(const uint8_t * b, int g, Words4 & q, float & s, float & m) {
    q5_words(ld128<Align<T_Q5_0>>(b + 6), ld32<Align<T_Q5_0>>(b + 2), g, q);
    for (int i = 0; i < 4; ++i) q.w[i] = sub_bytes(q.w[i], 0x10101010u);
    s = fp16_to_f32(ld16(b));
    m = 0.0f;
}

template <> DG_HD void decompose_group<T_Q5_1>(const uint8_t * b, int g, Words4 & q, float & s, float & m) {
    q5_words(ld128<Align<T_Q5_1>>(b + 8), ld32<Align<T_Q5_1>>(b + 4), g, q);
    s = fp16_to_f32(ld16(b));
    m = fp16_to_f32(ld16(b + 2));
}

// Q2_K / Q3_K: group g = 8 h + 2 j + k (h: which 128 values, j: the 2-bit plane, k: which 16 bytes of the
// 32 that hold the plane), values q[16 g + l] from byte 32 h + 16 k + l, bits 2 j and 2 j + 1
template <> DG_HD void decompose_group<T_Q2_K>(const uint8_t * b, int g, Words4 & q, float & s, float & m) {
    const Words4 qs = ld128<Align<T_Q2_K>>(b + 16 + 32 * (g / 8) + 16 * (g % 2));
    const int shift = 2 * ((g % 8) / 2);
    for (int i = 0; i < 4; ++i) q.w[i] = (qs.w[i] >> shift) & 0x03030303u;
    const uint8_t sc = ld8(b + g);
    s = fp16_to_f32(ld16(b + 80)) * small_i32_to_f32(sc & 0xF);  // the 4-bit scale and min as floats, no I2F
    m = -(fp16_to_f32(ld16(b + 82)) * small_i32_to_f32(sc >> 4));
}

// Q3_K: as Q2_K, minus 4 where bit 4 h + j of hmask[16 k + l] is clear; 6-bit scales packed in 12 bytes
template <> DG_HD void decompose_group<T_Q3_K>(const uint8_t * b, int g, Words4 & q, float & s, float & m) {
    const int h = g / 8, j = (g % 8) / 2, k = g % 2;
    const Words4 hm = ld128_2(b + 16 * k);  // ld128_2: followed by qs, scales, d
    const Words4 qs = ld128_2(b + 32 + 32 * h + 16 * k);
    for (int i = 0; i < 4; ++i)  // (2 bits) + 4 (hmask bit set) - 4, in 0..7 before the subtraction
        q.w[i] = sub_bytes(((qs.w[i] >> (2 * j)) & 0x03030303u) | (((hm.w[i] >> (4 * h + j)) & 0x01010101u) << 2),
                           0x04040404u);
    const uint8_t * sraw = b + 96;  // scale g: low 4 bits from byte g % 8 (nibble g / 8), high 2 from byte 8 + g % 4
    const int lo = (ld8(sraw + g % 8) >> (4 * (g / 8))) & 0xF;
    const int hi = (ld8(sraw + 8 + g % 4) >> (2 * (g / 4))) & 3;
    s = fp16_to_f32(ld16(b + 108)) * small_i32_to_f32((int)(int8_t)(lo | (hi << 4)) - 32);
    m = 0.0f;
}

// Q4_K / Q5_K: 32-value sub-block j = g / 2 with 6-bit scale and min (get_scale_min_k4); sub-blocks 2i and
// 2i+1 are the low and high nibbles of bytes 32i .. 32i+31, group g the half g % 2 of them
DG_HD void k4_scale(const uint8_t * b, int g, float & s, float & m) {
    const Words4 h = ld128<16>(b);  // d, dmin, scales[12]: one 128-bit load (the blocks are 16-aligned)
    uint8_t sc, mn;
    scale_min_k4(g / 2, h, sc, mn);
    s = fp16_to_f32((uint16_t)h.w[0]) * small_i32_to_f32(sc);
    m = -(fp16_to_f32((uint16_t)(h.w[0] >> 16)) * small_i32_to_f32(mn));
}

template <> DG_HD void decompose_group<T_Q4_K>(const uint8_t * b, int g, Words4 & q, float & s, float & m) {
    const int j = g / 2;
    const Words4 qs = ld128<Align<T_Q4_K>>(b + 16 + (j / 2) * 32 + 16 * (g % 2));
    for (int i = 0; i < 4; ++i) q.w[i] = (qs.w[i] >> (4 * (j & 1))) & 0x0F0F0F0Fu;
    k4_scale(b, g, s, m);
}

// Q5_K: as Q4_K, plus bit j of qh[l'] (l' the value's index in its sub-block) as the fifth bit
template <> DG_HD void decompose_group<T_Q5_K>(const uint8_t * b, int g, Words4 & q, float & s, float & m) {
    const int j = g / 2, o = 16 * (g % 2);
    const Words4 qh = ld128<Align<T_Q5_K>>(b + 16 + o);
    const Words4 ql = ld128<Align<T_Q5_K>>(b + 48 + (j / 2) * 32 + o);
    for (int i = 0; i < 4; ++i)
        q.w[i] = ((ql.w[i] >> (4 * (j & 1))) & 0x0F0F0F0Fu) | (((qh.w[i] >> j) & 0x01010101u) << 4);
    k4_scale(b, g, s, m);
}

// Q6_K: 128-value half h = g / 8; within it, quarter t = (g % 8) / 2 takes the low (t < 2) or high nibbles of
// ql[32 (t % 2) + i] and bits 2t, 2t+1 of qh[i], i = 16 (g % 2) + l; int8 scale per group
template <> DG_HD void decompose_group<T_Q6_K>(const uint8_t * b, int g, Words4 & q, float & s, float & m) {
    const int h = g / 8, t = (g % 8) / 2, o = 16 * (g % 2);
    const Words4 ql = ld128_2(b + 64 * h + 32 * (t % 2) + o);  // ld128_2: followed by qh, scales, d
    const Words4 qh = ld128_2(b + 128 + 32 * h + o);
    for (int i = 0; i < 4; ++i)
        q.w[i] = sub_bytes(((ql.w[i] >> (4 * (t / 2))) & 0x0F0F0F0Fu) | (((qh.w[i] >> (2 * t)) & 0x03030303u) << 4),
                           0x20202020u);
    s = fp16_to_f32(ld16(b + 208)) * small_i32_to_f32((int8_t)ld8(b + 192 + g));
    m = 0.0f;
}

}  // namespace dg
