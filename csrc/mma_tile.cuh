// What the two tensor-core matmuls (qmatmul_mma.cu: f16, qmatmul_q8.cu: int8) share: a 32 x 32 output
// tile per thread block of 4 warps, each warp a 16 x 16 quarter made of two m16n8 MMA tiles, and the
// store of the f32 accumulators in the m16n8 layout: (row g, cols 2t, 2t+1) and (row g + 8, the same).
#pragma once
#include "quant/blocks.cuh"

namespace dg {

constexpr int MMA_THREADS = 128;  // 4 warps
constexpr int MMA_TM = 32, MMA_TN = 32;

struct MmaLane {
    int m0, n0;  // the block's tile
    int wm, wn;  // this warp's quarter within it
    int g, t;    // the fragment layout's group (lane / 4) and thread-in-group (lane % 4)
};

DG_HD MmaLane mma_lane(int block_x, int block_y, int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    return MmaLane{block_y * MMA_TM, block_x * MMA_TN, (warp >> 1) * 16, (warp & 1) * 16, lane >> 2, lane & 3};
}

// acc[h][i]: n8 tile h of the warp's quarter, accumulator i; rows/cols past M/N are dropped
DG_HD void mma_store(const float (&acc)[2][4], const MmaLane &p, float * y, int ldy, int M, int N) {
    for (int h = 0; h < 2; ++h) {
        for (int half = 0; half < 2; ++half) {
            const int m = p.m0 + p.wm + p.g + half * 8;
            for (int j = 0; j < 2; ++j) {
                const int n = p.n0 + p.wn + h * 8 + p.t * 2 + j;
                if (m < M && n < N) y[(long)m * ldy + n] = acc[h][half * 2 + j];
            }
        }
    }
}

}  // namespace dg
