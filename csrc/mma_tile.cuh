// What the tensor-core matmul tiles (mma_f16.cuh, mma_q8.cuh) share: a 32-row output tile per thread block of
// 4 warps, in one of two widths (MmaShape): narrow, 32 x 32, each warp a 16 x 16 quarter (two m16n8 MMA
// tiles); wide, 32 x 128, each warp a 32 x 32 quarter (2 x 4 m16n8 tiles), which reads the tile's rows of X
// once per 128 columns of W instead of once per 32 and loads 2 fragments from shared memory per MMA instead
// of 3. And the store of the f32 accumulators in the m16n8 layout: (row g, cols 2t, 2t+1) and (row g + 8, the same).
#pragma once
#include "epilogue.cuh"
#include "quant/blocks.cuh"

namespace dg {

constexpr int MMA_THREADS = 128;  // 4 warps
constexpr int MMA_TM = 32;        // rows of X (canvas positions, or an expert's pairs) per tile

// A tile TN columns wide (32 or 128): the warps' layout over it and the m16n8 MMA tiles per warp
template <int TN_> struct MmaShape {
    static_assert(TN_ == 32 || TN_ == 128, "the tensor-core tiles are 32 or 128 columns wide");
    static constexpr int TN = TN_;
    static constexpr int WM = TN == 32 ? 16 : 32, WN = TN == 32 ? 16 : 32;  // a warp's rows and columns
    static constexpr int MI = WM / 16, NI = WN / 8;                         // its m16 row tiles and n8 column tiles
    static constexpr int WARPS_N = TN / WN;                                 // warps side by side (2 or 4)
    static_assert((MMA_TM / WM) * WARPS_N * 32 == MMA_THREADS, "4 warps cover the tile");
};

struct MmaLane {
    int wm, wn;  // this warp's quarter within the block's tile: first row, first column
    int g, t;    // the fragment layout's group (lane / 4) and thread-in-group (lane % 4)
    int lane;
};

template <class S> DG_HD MmaLane mma_lane(int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    return MmaLane{(warp / S::WARPS_N) * S::WM, (warp % S::WARPS_N) * S::WN, lane >> 2, lane & 3, lane};
}

// The tiles' inline PTX: the two tensor-core instructions (D += A B for one m16n8k16 tile, A row-major and B
// column-major fragments in the layouts of the PTX ISA, "Matrix Fragments for mma.m16n8k16"), ldmatrix, and
// cp.async with its wait. sm_75 (Turing) has ldmatrix but neither m16n8k16 form nor cp.async: with
// DG_SM75_PATH (set for sm_75; the tests set it to run this path on a newer GPU, or in the emulator) each
// m16n8k16 is two of sm_75's MMAs and X is copied by plain 16-byte loads (below). The CPU emulator of the tests
// (tests/cuda_emu.h, which defines DG_EMU) supplies its own instructions (tests/cuda_emu_warp.h).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750 && __CUDA_ARCH__ < 800 && !defined(DG_SM75_PATH)
#define DG_SM75_PATH 1
#endif

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750
// ldmatrix.sync.aligned.m8n8.xN.shared.b16: N (1, 2 or 4) 8 x 8 matrices of 16-bit values, each 8 rows of 16
// bytes in shared memory, in one instruction where 32-bit loads took one per matrix and lane. Lane l gives the
// address of row l % 8 of matrix l / 8 (16-aligned; lanes past 8N give none that is read) and gets in r[j]
// the 32 bits at row l / 4, bytes 4 (l % 4) .. + 3 of matrix j: exactly an m16n8k16 fragment register when
// the matrix is 8 rows of an A (row-major) or B (column-major) tile and 8 halves, or 16 int8, of K.
template <int N> __device__ __forceinline__ void ldmatrix(uint32_t (&r)[N], const void *row) {
    static_assert(N == 1 || N == 2 || N == 4, "ldmatrix of 1, 2 or 4 matrices");
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
    if constexpr (N == 4)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(a));
    else if constexpr (N == 2)
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(r[0]), "=r"(r[1]) : "r"(a));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(a));
}

#ifndef DG_SM75_PATH
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

// cp.async.cg.shared.global: 16 bytes from global to shared memory without passing through registers, in
// flight until cp_async_wait_all (the thread's own copies; a barrier after it shows them to the block). With
// valid false it writes 16 zero bytes and reads nothing (src is then any global address).
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n"
                 :
                 : "r"(d), "l"(__cvta_generic_to_global(src)), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" : : : "memory"); }
#else
// sm_75's tensor-core instructions (PTX ISA "Matrix Fragments for mma.m16n8k8" and "for mma.m8n8k16"):
// f16 m16n8k8, A a0 (row g, k 2t, 2t+1) and a1 (row g + 8), B b0 (k 2t, 2t+1; column g), D as m16n8k16's
__device__ __forceinline__ void mma_m16n8k8_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t b0) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(b0));
}
// s8 m8n8k16: A a0 (row g, k 4t .. 4t + 3), B b0 (k 4t .. 4t + 3; column g), D d0, d1 (row g, columns 2t, 2t + 1)
__device__ __forceinline__ void mma_m8n8k16_s8(int &d0, int &d1, int a0, int b0) {
    asm volatile("mma.sync.aligned.m8n8k16.row.col.s32.s8.s8.s32 {%0,%1}, {%2}, {%3}, {%0,%1};\n"
                 : "+r"(d0), "+r"(d1)
                 : "r"(a0), "r"(b0));
}
#endif
#endif

#if defined(DG_SM75_PATH) && (defined(__CUDA_ARCH__) || defined(DG_EMU))  // (not nvcc's host pass)
// m16n8k16 from sm_75's instructions: f16, K 0-7 then 8-15 (a0, a1 and b0 hold the first 8 of K, a2, a3 and b1
// the second: one f32 rounding more per tile than sm_80's single instruction); s8, rows g then g + 8 (a0, a1:
// exact integer sums, the same result)
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                 uint32_t b0, uint32_t b1) {
    mma_m16n8k8_f16(d, a0, a1, b0);
    mma_m16n8k8_f16(d, a2, a3, b1);
}
__device__ __forceinline__ void mma_m16n8k16_s8(int (&d)[4], int a0, int a1, int b0) {
    mma_m8n8k16_s8(d[0], d[1], a0, b0);
    mma_m8n8k16_s8(d[2], d[3], a1, b0);
}
// no cp.async before sm_80: the 16 bytes copied at the call (through registers), nothing to wait for
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    *static_cast<Words4 *>(dst) = valid ? ld128<16>(static_cast<const uint8_t *>(src)) : Words4{};
}
__device__ __forceinline__ void cp_async_wait_all() {}
#endif

#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 750) || defined(DG_EMU)
// A K slice of the tile's rows of X, values k0 .. k0 + tk of each (both counts 16 bytes' worth), copied to xs
// in flight: cp.async, 16 bytes a copy, zeros for the rows past the tile (x_row[r] -1). The caller decodes W
// meanwhile, then waits (cp_async_wait_all) before the barrier that shows xs to the block. (On the sm_75 path
// the copies are done at the call, before the decode: staging them in registers would take 8-16 a thread.)
template <typename E, int STRIDE>
__device__ __forceinline__ void copy_x_async(int tid, E (*xs)[STRIDE], const E *x, long ld, int k0, int tk,
                                             const int *x_row) {
    constexpr int V = 16 / sizeof(E);  // values per copy
    for (int i = tid; i < MMA_TM * (tk / V); i += MMA_THREADS) {
        const int r = i / (tk / V), c = (i % (tk / V)) * V, row = x_row[r];
        cp_async16(&xs[r][c], row >= 0 ? x + row * ld + k0 + c : x, row >= 0);  // 16-aligned both sides
    }
}
#endif

// The row a lane gives ldmatrix for a 16-row, 32-byte (16 halves or 32 int8) corner of a row-major array in
// shared memory, and which 16 bytes of the row (0 or 1). A, [rows][k]: matrices (rows 0-7, first 16 bytes),
// (8-15, first), (0-7, second), (8-15, second): an m16n8k16 A fragment's a0..a3 (f16), or the a0, a1 of two
// 16-value groups (int8; x2: of one); lane l: row l % 16, bytes 16 (l / 16).
DG_HD int ldm_a_row(int lane) { return lane & 15; }
DG_HD int ldm_a_half(int lane) { return lane >> 4; }
// B kept as [n][k] (column-major): matrices (n 0-7, first 16 bytes), (0-7, second), (8-15, first), (8-15,
// second): b0, b1 of an n8 column tile, then of the next (f16), or the b of one n8 tile for two groups (int8,
// x2; x1: one group); lane l: n 8 (l / 16) + l % 8, bytes 16 ((l / 8) % 2).
DG_HD int ldm_b_row(int lane) { return (lane >> 4) * 8 + (lane & 7); }
DG_HD int ldm_b_half(int lane) { return (lane >> 3) & 1; }

// acc[mi][ni][i]: m16 tile mi and n8 tile ni of the warp's quarter, accumulator i, for the tile at (m0, n0);
// rows at or past m_end and columns at or past N are dropped; the others go where `ep` says
// (csrc/epilogue.cuh). Every thread of the block calls it: a gated tile meets in `scratch` (at least
// MMA_TM x (TN + 1) floats of shared memory the tile no longer reads) behind a barrier.
template <class S>
__device__ __forceinline__ void mma_store(const float (&acc)[S::MI][S::NI][4], const MmaLane &p, int m0, int m_end,
                                          int n0, int N, float * y, int ldy, const Epilogue &ep, void * scratch) {
    constexpr int TN = S::TN;
    // unrolled in full: acc stays in registers (a loop over it would put it on the stack, as nvcc did for the
    // wide tile's 32 accumulators with the scatter's atomics in the loop)
    if (ep.fe > 0) {
        float (*ex)[TN + 1] = reinterpret_cast<float (*)[TN + 1]>(scratch);
#pragma unroll
        for (int mi = 0; mi < S::MI; ++mi)
#pragma unroll
            for (int ni = 0; ni < S::NI; ++ni)
#pragma unroll
                for (int half = 0; half < 2; ++half)
#pragma unroll
                    for (int j = 0; j < 2; ++j)
                        ex[p.wm + mi * 16 + p.g + half * 8][p.wn + ni * 8 + p.t * 2 + j] = acc[mi][ni][half * 2 + j];
        __syncthreads();
        store_gated<MMA_TM, TN, MMA_THREADS>(ex, m0, m_end, n0, y, ldy, ep.fe);
        return;
    }
#pragma unroll
    for (int mi = 0; mi < S::MI; ++mi) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
            const int m = m0 + p.wm + mi * 16 + p.g + half * 8;
#pragma unroll
            for (int ni = 0; ni < S::NI; ++ni) {
#pragma unroll
                for (int j = 0; j < 2; ++j) {
                    const int n = n0 + p.wn + ni * 8 + p.t * 2 + j;
                    if (m < m_end && n < N) store_out(y, ldy, m, n, acc[mi][ni][half * 2 + j], ep);
                }
            }
        }
    }
}

}  // namespace dg
