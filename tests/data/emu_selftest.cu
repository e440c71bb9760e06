// Kernels with one mistake each (and correct twins), for tests/test_cuda_emu.py: the CPU emulator
// (tests/cuda_emu.h) must report each mistake as a GPU would show it, or fail to hide it.
#include "mma_tile.cuh"

namespace dg {

extern "C" __global__ void shift_read(const float * __restrict__ x, float * __restrict__ y, int n, int shift) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + shift];  // shift 1: the last thread reads one past x's end
}

extern "C" __global__ void neighbour(const float * __restrict__ x, float * __restrict__ y, int sync) {
    __shared__ float s[64];
    const int t = threadIdx.x;
    s[t] = x[t];
    if (sync) __syncthreads();  // without it, a thread may read its neighbour's slot before it is written
    y[t] = s[(t + 1) % blockDim.x];
}

extern "C" __global__ void two_barriers(float * __restrict__ y) {
    if (threadIdx.x < 16) {
        __syncthreads();
    } else {
        __syncthreads();
    }
    y[threadIdx.x] = 1.0f;
}

extern "C" __global__ void shuffle_after_exit(float * __restrict__ y, int exit_lane) {
    if ((int)threadIdx.x == exit_lane) return;
    y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (float)threadIdx.x, 1);
}

// lanes 0-15 sum their values among themselves (mask 0x0000ffff) while lanes 16-31 wait at the barrier; then
// lanes 16-31 do the same with their half (mask 0xffff0000), or (bad) name the whole warp
extern "C" __global__ void half_warps(float * __restrict__ y, int bad) {
    const unsigned lane = threadIdx.x;
    float v = (float)lane;
    if (lane < 16) {
        for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, o);
    }
    __syncthreads();
    if (lane >= 16) {
        const unsigned mask = bad ? 0xffffffffu : 0xffff0000u;
        for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(mask, v, o);
    }
    y[lane] = v;
}

// a template's shared array, as the tiles have them: block b writes the slots t with t + b even only, so
// each block reads the other half unwritten (not the previous block's values)
template <int N>
__global__ void half_written(float * __restrict__ y) {
    __shared__ float s[N];
    const int t = threadIdx.x, b = blockIdx.x;
    if ((t + b) % 2 == 0) s[t] = 1.0f;
    __syncthreads();
    y[b * N + t] = s[t];
}
template __global__ void half_written<32>(float *);

extern "C" __global__ void past_shared(float * __restrict__ y, int i) {
    __shared__ float s[32];
    s[threadIdx.x % 32] = 0.0f;
    __syncthreads();
    y[threadIdx.x] = s[i];  // i = 32: past the array
}

extern "C" __global__ void word_at(const uint8_t * __restrict__ bytes, int * __restrict__ y, int offset) {
    y[threadIdx.x] = *reinterpret_cast<const int *>(bytes + 4 * threadIdx.x + offset);  // offset 2: misaligned
}

extern "C" __global__ void big_shared(float * __restrict__ y, int both) {
    __shared__ float a[7680];  // 30 KB
    a[threadIdx.x] = 1.0f;
    if (both) {
        __shared__ float b[7680];  // 30 KB more: 60 KB (the emulator counts the declarations a block reaches)
        b[threadIdx.x] = 2.0f;
    }
    __syncthreads();
    y[threadIdx.x] = a[threadIdx.x];
}

extern "C" __global__ void traps(int when) {
    if (when) __trap();
}

extern "C" __global__ void scalar_sizes(float * __restrict__ y, int a, long b, float c) {
    y[0] = (float)a;
    y[1] = (float)b;
    y[2] = c;
}

// one m16n8k16 tile through the tiles' instructions: a [16, 16] and b [8, 16] (rows of B^T) as f16 bits,
// each lane loading its fragments as the PTX ISA lays them out; d [16, 8] = a b^T in f32
extern "C" __global__ void mma_f16_tile(const uint16_t * __restrict__ a, const uint16_t * __restrict__ b,
                                        float * __restrict__ d) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    auto pair = [](const uint16_t * p) { return (uint32_t)p[0] | ((uint32_t)p[1] << 16); };
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_m16n8k16_f16(acc, pair(&a[g * 16 + 2 * t]), pair(&a[(g + 8) * 16 + 2 * t]), pair(&a[g * 16 + 2 * t + 8]),
                     pair(&a[(g + 8) * 16 + 2 * t + 8]), pair(&b[g * 16 + 2 * t]), pair(&b[g * 16 + 2 * t + 8]));
    for (int i = 0; i < 4; ++i) d[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)] = acc[i];
}

// the same for int8: a [16, 16], b [8, 16] int8, d [16, 8] int32
extern "C" __global__ void mma_s8_tile(const int8_t * __restrict__ a, const int8_t * __restrict__ b, int * __restrict__ d) {
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    auto quad = [](const int8_t * p) { int v; memcpy(&v, p, 4); return v; };
    int acc[4] = {0, 0, 0, 0};
    mma_m16n8k16_s8(acc, quad(&a[g * 16 + 4 * t]), quad(&a[(g + 8) * 16 + 4 * t]), quad(&b[g * 16 + 4 * t]));
    for (int i = 0; i < 4; ++i) d[(i < 2 ? g : g + 8) * 8 + 2 * t + (i & 1)] = acc[i];
}

// ldmatrix: a [32, 8] of halves staged in shared memory; lane l gives the row `shift` + l of it, `skew` halves
// into it (0: 16-aligned); d [32, N]: what each lane gets (shift 1 with N = 4: lane 31 gives a row past the array)
template <int N>
__global__ void ldmatrix_rows(const uint16_t * __restrict__ a, uint32_t * __restrict__ d, int shift, int skew) {
    __shared__ __align__(16) uint16_t s[32][8];
    const int lane = threadIdx.x;
    for (int i = 0; i < 8; ++i) s[lane][i] = a[lane * 8 + i];
    __syncthreads();
    uint32_t r[N];
    ldmatrix<N>(r, &s[0][0] + (lane + shift) * 8 + skew);
    for (int j = 0; j < N; ++j) d[lane * N + j] = r[j];
}
template __global__ void ldmatrix_rows<1>(const uint16_t *, uint32_t *, int, int);
template __global__ void ldmatrix_rows<2>(const uint16_t *, uint32_t *, int, int);
template __global__ void ldmatrix_rows<4>(const uint16_t *, uint32_t *, int, int);

// cp.async: thread t copies 16 bytes of a (from byte `skew`; zeros where t % 4 == 3) into shared row t, and
// reads its neighbour's row back into d; wait 1: wait then barrier (right), 0: never waits, 2: barrier then
// wait, 3: reads its own row (which held 7s) between the copy and the wait, into d, then waits
extern "C" __global__ void copy_rows(const uint8_t * __restrict__ a, uint8_t * __restrict__ d, int skew, int wait) {
    __shared__ __align__(16) uint8_t s[32][16];
    const int t = threadIdx.x;
    for (int i = 0; i < 16; ++i) s[t][i] = 7;
    cp_async16(&s[t][0], a + 16 * t + skew, t % 4 != 3);
    if (wait == 3) {
        for (int i = 0; i < 16; ++i) d[16 * t + i] = s[t][i];
        cp_async_wait_all();
        return;
    }
    if (wait == 1) cp_async_wait_all();
    __syncthreads();
    if (wait == 2) cp_async_wait_all();
    for (int i = 0; i < 16; ++i) d[16 * t + i] = s[(t + 1) % 32][i];
}

}  // namespace dg
