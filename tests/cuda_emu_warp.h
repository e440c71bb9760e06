// The device instructions the CPU emulator models (tests/cuda_emu.h includes this in the middle, inside its
// own definitions): f32 -> f16 rounding, the tensor-core MMAs, ldmatrix and cp.async as csrc/mma_tile.cuh
// declares them for the GPU, and what a warp instruction gives each lane once every lane has arrived
// (resolve_warp). Fragments follow the PTX ISA ("Matrix Fragments for mma.m16n8k16", ldmatrix's layout).
// With DG_SM75_PATH it has sm_75's instructions instead (m16n8k8 f16, m8n8k16 s8; no cp.async), from which
// csrc/mma_tile.cuh composes the tiles' m16n8k16 and copies X as it does on a Turing GPU.
#pragma once

namespace dg {

// cvt.rn.f16.f32: float -> IEEE half bits, round to nearest even (with -ftz, a denormal float in is 0)
inline uint16_t f32_to_f16_bits(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t exp = (u >> 23) & 0xFFu;
    uint32_t man = u & 0x7FFFFFu;
    if (exp == 0xFFu) return (uint16_t)(sign | 0x7C00u | (man ? 0x200u : 0u));  // inf, NaN
    if (exp == 0) return (uint16_t)sign;                                           // zero, flushed denormal
    const int e = (int)exp - 127 + 15;
    if (e >= 31) return (uint16_t)(sign | 0x7C00u);  // overflow: inf
    if (e <= 0) {                                    // a half denormal (or zero)
        if (e < -10) return (uint16_t)sign;
        man |= 0x800000u;
        const int shift = 14 - e;
        uint32_t h = man >> shift;
        const uint32_t rest = man & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rest > half || (rest == half && (h & 1u))) ++h;
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((uint32_t)e << 10) | (man >> 13);
    const uint32_t rest = man & 0x1FFFu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent: still right
    return (uint16_t)(sign | h);
}

// ldmatrix.sync.aligned.m8n8.xN.shared.b16 (csrc/mma_tile.cuh): `row`, this lane's row address, goes to the warp
template <int N> inline void ldmatrix(uint32_t (&r)[N], const void *row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix of 1, 2 or 4 matrices");
    memcpy(emu::cur->in, &row, sizeof row);
    emu::warp_op(emu::OP_LDMATRIX, 0xffffffffu, (uint32_t)N);
    memcpy(r, emu::cur->out, sizeof r);
}

// An MMA's registers to the warp (A's, B's, then the accumulators: resolve_warp's mma_f16 / mma_s8 read them in
// that order) and its accumulators back
template <class Acc, int NA, int NB, int NC>
inline void warp_mma(emu::Op op, Acc (&d)[NC], const uint32_t (&ab)[NA + NB]) {
    uint32_t *in = emu::cur->in;
    memcpy(in, ab, sizeof ab);
    memcpy(&in[NA + NB], d, sizeof d);
    emu::warp_op(op, 0xffffffffu, 0);
    memcpy(d, emu::cur->out, sizeof d);
}

#ifndef DG_SM75_PATH
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
inline void mma_m16n8k16_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1) {
    warp_mma<float, 4, 2>(emu::OP_MMA_F16, d, {a0, a1, a2, a3, b0, b1});
}

// mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32
inline void mma_m16n8k16_s8(int (&d)[4], int a0, int a1, int b0) {
    warp_mma<int, 2, 1>(emu::OP_MMA_S8, d, {(uint32_t)a0, (uint32_t)a1, (uint32_t)b0});
}

// cp.async.cg.shared.global, 16 bytes (csrc/mma_tile.cuh): the source is read now; the destination holds
// unwritten-shared-memory bytes from now until this thread's cp_async_wait_all writes the copy, so a read of it
// in between (the old contents or the new: a GPU may give either) sees neither
inline void cp_async16(void *dst, const void *src, bool valid) {
    if ((uintptr_t)dst % 16 || (uintptr_t)src % 16)
        emu::fail("cp.async of 16 bytes from %p to %p: both must be 16-aligned", src, dst);
    if (!emu::in_shared((const char *)dst, 16)) emu::fail("cp.async to %p: not inside a __shared__ array", dst);
    if (emu::in_shared((const char *)src, 1)) emu::fail("cp.async from %p: a shared address, not global memory", src);
    emu::Thread::Copy c{dst, {}};
    if (valid) memcpy(c.bytes, src, 16);
    memset(dst, emu::poison, 16);
    emu::cur->copies.push_back(c);
}
inline void cp_async_wait_all() {
    for (const auto &c : emu::cur->copies) memcpy(c.dst, c.bytes, 16);
    emu::cur->copies.clear();
}
#else
// mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 (sm_75)
inline void mma_m16n8k8_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    warp_mma<float, 2, 1>(emu::OP_MMA_F16_K8, d, {a0, a1, b0});
}

// mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 (sm_75)
inline void mma_m8n8k16_s8(int &d0, int &d1, int a0, int b0) {
    int d[2] = {d0, d1};
    warp_mma<int, 1, 1>(emu::OP_MMA_S8_M8, d, {(uint32_t)a0, (uint32_t)b0});
    d0 = d[0];
    d1 = d[1];
}
#endif

}  // namespace dg

#include "quant/base.cuh"  // dg::fp16_to_f32 (its host path) for the f16 MMA's inputs

namespace emu {

// mma.m16n8kK f16 (K 16, or 8 on sm_75), f32 accumulators. Lane l = 4 g + t holds A's (K / 4 registers of two
// halves, low first) register r: row g + 8 (r % 2), k 2t + 8 (r / 2) and + 1; B's (K / 8) register r: k 2t + 8r
// and + 1, column g; C/D's 4: row g + 8 (i / 2), column 2t + i % 2 (PTX ISA, "Matrix Fragments for mma.m16n8k16"
// and "for mma.m16n8k8")
inline void mma_f16(Thread *lane, int K) {
    const int na = K / 4, nb = K / 8;
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int r = 0; r < na; ++r)
            for (int h = 0; h < 2; ++h)
                A[g + 8 * (r % 2)][2 * t + 8 * (r / 2) + h] = dg::fp16_to_f32((uint16_t)(lane[l].in[r] >> (16 * h)));
        for (int r = 0; r < nb; ++r)
            for (int h = 0; h < 2; ++h) B[2 * t + 8 * r + h][g] = dg::fp16_to_f32((uint16_t)(lane[l].in[na + r] >> (16 * h)));
        for (int i = 0; i < 4; ++i) memcpy(&C[g + 8 * (i / 2)][2 * t + i % 2], &lane[l].in[na + nb + i], 4);
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
            double s = C[row][col];  // products of halves are exact; the sum rounded once
            for (int k = 0; k < K; ++k) s += (double)A[row][k] * (double)B[k][col];
            const float f = (float)s;
            memcpy(&lane[l].out[i], &f, 4);
        }
    }
}

// mma.mMn8k16 s8 (M 16, or 8 on sm_75), s32 accumulators. Lane l = 4 g + t holds A's (M / 8 registers of four
// bytes, low first) register r: row g + 8r, k 4t .. 4t + 3; B's one register: k 4t .. 4t + 3, column g; C/D's
// M / 4: row g + 8 (i / 2), column 2t + i % 2 (PTX ISA, "for mma.m16n8k16" and "for mma.m8n8k16")
inline void mma_s8(Thread *lane, int M) {
    const int na = M / 8;
    int A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < 4; ++i) {
            for (int r = 0; r < na; ++r) A[g + 8 * r][4 * t + i] = (int8_t)((lane[l].in[r] >> (8 * i)) & 0xFFu);
            B[4 * t + i][g] = (int8_t)((lane[l].in[na] >> (8 * i)) & 0xFFu);
        }
        for (int i = 0; i < M / 4; ++i) memcpy(&C[g + 8 * (i / 2)][2 * t + i % 2], &lane[l].in[na + 1 + i], 4);
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t = l & 3;
        for (int i = 0; i < M / 4; ++i) {
            const int row = g + 8 * (i / 2), col = 2 * t + i % 2;
            int s = C[row][col];
            for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
            memcpy(&lane[l].out[i], &s, 4);
        }
    }
}

// Every lane named by `mask` waits at one warp instruction: compute their results.
inline void resolve_warp(Thread *lane, uint32_t mask) {
    int first = 0;
    while (!(mask >> first & 1u)) ++first;
    const int op = lane[first].op;
    const uint32_t arg = lane[first].arg;  // the same for every lane but a shuffle's (ldmatrix's matrices)
    for (int l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && (lane[l].op != op || lane[l].mask != mask || (op != OP_SHFL_XOR && lane[l].arg != arg)))
            fail("warp %d: lanes wait at different warp instructions (lane %d at %d with mask %08x and %u, lane %d at %d "
                 "with mask %08x and %u)", lane[first].linear / 32, first, op, mask, arg, l, lane[l].op, lane[l].mask,
                 lane[l].arg);
    if (op != OP_SHFL_XOR && mask != 0xffffffffu)
        fail("warp %d: an mma.sync or ldmatrix with mask %08x", lane[first].linear / 32, mask);
    if (op == OP_SHFL_XOR) {
        for (int l = 0; l < 32; ++l) {
            if (!(mask >> l & 1u)) continue;
            const uint32_t src = (uint32_t)l ^ lane[l].arg;  // shfl.sync.bfly: past lane 31, a lane keeps its own
            if (src > 31) {
                lane[l].out[0] = lane[l].in[0];
                continue;
            }
            if (!(mask >> src & 1u)) fail("warp %d: lane %d reads lane %u, outside mask %08x", lane[l].linear / 32, l, src, mask);
            lane[l].out[0] = lane[src].in[0];
        }
    } else if (op == OP_MMA_F16 || op == OP_MMA_F16_K8) {
        mma_f16(lane, op == OP_MMA_F16 ? 16 : 8);
    } else if (op == OP_MMA_S8 || op == OP_MMA_S8_M8) {
        mma_s8(lane, op == OP_MMA_S8 ? 16 : 8);
    } else if (op == OP_LDMATRIX) {  // lane l: row l / 4, bytes 4 (l % 4) of each matrix j, from lane 8 j + l / 4's row
        const int n = (int)arg;
        const char *rows[32];
        for (int l = 0; l < 32; ++l) {
            if (l >= 8 * n) continue;
            memcpy(&rows[l], lane[l].in, sizeof rows[l]);
            if ((uintptr_t)rows[l] % 16) fail("warp %d: lane %d gives ldmatrix a row at %p, not 16-aligned", lane[l].linear / 32, l, (const void *)rows[l]);
            if (!in_shared(rows[l], 16)) fail("warp %d: lane %d gives ldmatrix a row at %p, not inside a __shared__ array", lane[l].linear / 32, l, (const void *)rows[l]);
        }
        for (int l = 0; l < 32; ++l)
            for (int j = 0; j < n; ++j) memcpy(&lane[l].out[j], rows[8 * j + l / 4] + 4 * (l % 4), 4);
    } else {
        fail("unknown warp instruction %d", op);
    }
    for (int l = 0; l < 32; ++l)
        if (mask >> l & 1u) lane[l].state = RUN;
}

}  // namespace emu
