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

#ifndef DG_SM75_PATH
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32
inline void mma_m16n8k16_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                             uint32_t b1) {
    uint32_t *in = emu::cur->in;
    const uint32_t regs[6] = {a0, a1, a2, a3, b0, b1};
    memcpy(in, regs, sizeof regs);
    memcpy(&in[6], d, 16);
    emu::warp_op(emu::OP_MMA_F16, 0xffffffffu, 0);
    memcpy(d, emu::cur->out, 16);
}

#endif

// ldmatrix.sync.aligned.m8n8.xN.shared.b16 (csrc/mma_tile.cuh): `row`, this lane's row address, goes to the warp
template <int N> inline void ldmatrix(uint32_t (&r)[N], const void *row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix of 1, 2 or 4 matrices");
    memcpy(emu::cur->in, &row, sizeof row);
    emu::warp_op(emu::OP_LDMATRIX, 0xffffffffu, (uint32_t)N);
    memcpy(r, emu::cur->out, sizeof r);
}

#ifndef DG_SM75_PATH
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

// mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32
inline void mma_m16n8k16_s8(int (&d)[4], int a0, int a1, int b0) {
    uint32_t *in = emu::cur->in;
    memcpy(&in[0], &a0, 4);
    memcpy(&in[1], &a1, 4);
    memcpy(&in[2], &b0, 4);
    memcpy(&in[3], d, 16);
    emu::warp_op(emu::OP_MMA_S8, 0xffffffffu, 0);
    memcpy(d, emu::cur->out, 16);
}
#else
// mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 (sm_75)
inline void mma_m16n8k8_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    uint32_t *in = emu::cur->in;
    const uint32_t regs[3] = {a0, a1, b0};
    memcpy(in, regs, sizeof regs);
    memcpy(&in[3], d, 16);
    emu::warp_op(emu::OP_MMA_F16_K8, 0xffffffffu, 0);
    memcpy(d, emu::cur->out, 16);
}

// mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 (sm_75)
inline void mma_m8n8k16_s8(int &d0, int &d1, int a0, int b0) {
    uint32_t *in = emu::cur->in;
    memcpy(&in[0], &a0, 4);
    memcpy(&in[1], &b0, 4);
    memcpy(&in[2], &d0, 4);
    memcpy(&in[3], &d1, 4);
    emu::warp_op(emu::OP_MMA_S8_M8, 0xffffffffu, 0);
    memcpy(&d0, &emu::cur->out[0], 4);
    memcpy(&d1, &emu::cur->out[1], 4);
}
#endif

}  // namespace dg

#include "quant/base.cuh"  // dg::fp16_to_f32 (its host path) for the f16 MMA's inputs

namespace emu {

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
    } else if (op == OP_MMA_F16) {  // A 16x16 row-major, B 16x8 column-major, C/D 16x8 f32
        float A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 8; ++i) {  // a_i: register i/2, half i%2 (low first)
                const uint32_t h = (lane[l].in[i / 2] >> (16 * (i & 1))) & 0xFFFFu;
                const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
                const int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
                A[row][col] = dg::fp16_to_f32((uint16_t)h);
            }
            for (int i = 0; i < 4; ++i) {  // b_i: register 4 + i/2
                const uint32_t h = (lane[l].in[4 + i / 2] >> (16 * (i & 1))) & 0xFFFFu;
                B[t * 2 + (i & 1) + (i >= 2 ? 8 : 0)][g] = dg::fp16_to_f32((uint16_t)h);
            }
            for (int i = 0; i < 4; ++i) memcpy(&C[i < 2 ? g : g + 8][t * 2 + (i & 1)], &lane[l].in[6 + i], 4);
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 4; ++i) {
                const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
                double s = C[row][col];  // products of halves are exact; the sum rounded once
                for (int k = 0; k < 16; ++k) s += (double)A[row][k] * (double)B[k][col];
                const float f = (float)s;
                memcpy(&lane[l].out[i], &f, 4);
            }
        }
    } else if (op == OP_MMA_S8) {
        int A[16][16], B[16][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 8; ++i)  // a_i: register i/4, byte i%4 (low first)
                A[i < 4 ? g : g + 8][t * 4 + (i & 3)] = (int8_t)((lane[l].in[i / 4] >> (8 * (i & 3))) & 0xFFu);
            for (int i = 0; i < 4; ++i) B[t * 4 + i][g] = (int8_t)((lane[l].in[2] >> (8 * i)) & 0xFFu);
            for (int i = 0; i < 4; ++i) memcpy(&C[i < 2 ? g : g + 8][t * 2 + (i & 1)], &lane[l].in[3 + i], 4);
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 4; ++i) {
                const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
                int s = C[row][col];
                for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
                memcpy(&lane[l].out[i], &s, 4);
            }
        }
    } else if (op == OP_MMA_F16_K8) {  // A 16x8 row-major (a0 row g, a1 row g + 8), B 8x8 column-major, C/D 16x8
        float A[16][8], B[8][8], C[16][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 4; ++i)  // a_i: register i/2, half i%2
                A[i < 2 ? g : g + 8][t * 2 + (i & 1)] = dg::fp16_to_f32((uint16_t)(lane[l].in[i / 2] >> (16 * (i & 1))));
            for (int i = 0; i < 2; ++i) B[t * 2 + i][g] = dg::fp16_to_f32((uint16_t)(lane[l].in[2] >> (16 * i)));
            for (int i = 0; i < 4; ++i) memcpy(&C[i < 2 ? g : g + 8][t * 2 + (i & 1)], &lane[l].in[3 + i], 4);
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 4; ++i) {
                const int row = i < 2 ? g : g + 8, col = t * 2 + (i & 1);
                double s = C[row][col];  // as m16n8k16: exact products, the sum rounded once
                for (int k = 0; k < 8; ++k) s += (double)A[row][k] * (double)B[k][col];
                const float f = (float)s;
                memcpy(&lane[l].out[i], &f, 4);
            }
        }
    } else if (op == OP_MMA_S8_M8) {  // A 8x16 row-major (row g, k 4t..), B 16x8 column-major, C/D 8x8 s32
        int A[8][16], B[16][8], C[8][8];
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 4; ++i) {
                A[g][t * 4 + i] = (int8_t)((lane[l].in[0] >> (8 * i)) & 0xFFu);
                B[t * 4 + i][g] = (int8_t)((lane[l].in[1] >> (8 * i)) & 0xFFu);
            }
            for (int i = 0; i < 2; ++i) memcpy(&C[g][t * 2 + i], &lane[l].in[2 + i], 4);
        }
        for (int l = 0; l < 32; ++l) {
            const int g = l >> 2, t = l & 3;
            for (int i = 0; i < 2; ++i) {
                int s = C[g][t * 2 + i];
                for (int k = 0; k < 16; ++k) s += A[g][k] * B[k][t * 2 + i];
                memcpy(&lane[l].out[i], &s, 4);
            }
        }
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
