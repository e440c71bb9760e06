// What the tensor-core matmul tiles (mma_f16.cuh, mma_q8.cuh) share: a 32 x 32 output tile per thread block
// of 4 warps, each warp a 16 x 16 quarter made of two m16n8 MMA tiles, and the store of the f32
// accumulators in the m16n8 layout: (row g, cols 2t, 2t+1) and (row g + 8, the same).
#pragma once
#include "epilogue.cuh"
#include "quant/blocks.cuh"

namespace dg {

constexpr int MMA_THREADS = 128;  // 4 warps
constexpr int MMA_TM = 32, MMA_TN = 32;
constexpr int MMA_TK = 256;       // K per shared-memory stage: one K-quant super-block

struct MmaLane {
    int wm, wn;  // this warp's quarter within the block's tile
    int g, t;    // the fragment layout's group (lane / 4) and thread-in-group (lane % 4)
};

DG_HD MmaLane mma_lane(int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    return MmaLane{(warp >> 1) * 16, (warp & 1) * 16, lane >> 2, lane & 3};
}

// The two tensor-core instructions, the only inline PTX of the tiles: D += A B for one m16n8k16 tile, A row-major
// and B column-major fragments in the layouts of the PTX ISA ("Matrix Fragments for mma.m16n8k16"). The CPU
// emulator of the tests (tests/cuda_emu.h, which defines DG_EMU) supplies its own.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
// f16 inputs (two per 32-bit register), f32 accumulators
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// s8 inputs (four per 32-bit register), s32 accumulators
__device__ __forceinline__ void mma_m16n8k16_s8(int (&d)[4], int a0, int a1, int b0) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0));
}
#endif

// acc[h][i]: n8 tile h of the warp's quarter, accumulator i, for the tile at (m0, n0); rows at or past
// m_end and columns at or past N are dropped; the others go where `ep` says (csrc/epilogue.cuh). Every
// thread of the block calls it: a gated tile meets in `scratch` (at least MMA_TM x (MMA_TN + 1) floats of
// shared memory the tile no longer reads) behind a barrier.
__device__ __forceinline__ void mma_store(const float (&acc)[2][4], const MmaLane &p, int m0, int m_end, int n0, int N,
                                          float * y, int ldy, const Epilogue &ep, void * scratch) {
    if (ep.fe > 0) {
        float (*ex)[MMA_TN + 1] = reinterpret_cast<float (*)[MMA_TN + 1]>(scratch);
        for (int h = 0; h < 2; ++h)
            for (int half = 0; half < 2; ++half)
                for (int j = 0; j < 2; ++j) ex[p.wm + p.g + half * 8][p.wn + h * 8 + p.t * 2 + j] = acc[h][half * 2 + j];
        __syncthreads();
        store_gated<MMA_TM, MMA_TN, MMA_THREADS>(ex, m0, m_end, n0, y, ldy, ep.fe);
        return;
    }
    for (int h = 0; h < 2; ++h) {
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + p.wm + p.g + half * 8;
            for (int j = 0; j < 2; ++j) {
                const int n = n0 + p.wn + h * 8 + p.t * 2 + j;
                if (m < m_end && n < N) store_out(y, ldy, m, n, acc[h][half * 2 + j], ep);
            }
        }
    }
}

}  // namespace dg
