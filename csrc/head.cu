// The fused vocabulary head: per-position statistics of softcap(h · E_v) / T over the whole vocabulary
// and the self-conditioning input Σ softmax · E, without ever writing the [L, V] logits.
//
// head_partials<T>: block (s, y) takes positions y*HEAD_L .. +HEAD_L and the vocabulary rows of split s.
// Each thread keeps its share of h (columns d = tid + j*HEAD_THREADS) and of the accumulator
// Σ exp(z - m)·E_v in registers; per row, the row is dequantized into shared memory, the HEAD_L dot
// products are reduced over the block, and every thread applies the same online update (csrc/head.cuh).
// Partials go to global memory: [S, L] (m, s, t, arg), [S, L] (g, sample) and [S, L, D] acc.
// head_merge: one block per position merges the S partials in split order (ties keep the lowest row)
// and writes max, argmax, lse, entropy, the Gumbel-max sample [L] and sc = acc / s [L, D]. The sample's
// draws depend only on (seed, step, position, row) (csrc/philox.cuh), not on the split.
// Correctness first: one row at a time, float FMAs; the tensor-core epilogue version is measured
// against it on a GPU (issue 5). Shapes: D a multiple of the type's block and <= HEAD_THREADS*HEAD_MAXJ.
#include "head.cuh"

namespace dg {

constexpr int HEAD_L = 4;          // positions per block
constexpr int HEAD_THREADS = 256;
constexpr int HEAD_MAXJ = 16;      // columns per thread: D <= 4096
constexpr int HEAD_WARPS = HEAD_THREADS / 32;

template <int T>
__global__ void __launch_bounds__(HEAD_THREADS) head_partials(
        const float * __restrict__ h, int L, int D, const uint8_t * __restrict__ E, int V, int rows_per_split,
        float softcap, float inv_temperature, unsigned long long seed, int step, float * __restrict__ part_mst,
        int * __restrict__ part_arg, float * __restrict__ part_g, int * __restrict__ part_sample,
        float * __restrict__ part_acc) {
    constexpr int QK = Traits<T>::QK;
    constexpr int SIZE = Traits<T>::SIZE;
    extern __shared__ float e_row[];            // [D]
    __shared__ float red[HEAD_WARPS][HEAD_L];   // per-warp partial dot products
    __shared__ float z_s[HEAD_L];
    __shared__ float gz_s[HEAD_L];              // z + Gumbel noise

    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int s = blockIdx.x;
    const int l0 = blockIdx.y * HEAD_L;
    const int v0 = s * rows_per_split;
    const int v1 = min(V, v0 + rows_per_split);
    const long row_bytes = (long)(D / QK) * SIZE;

    float hr[HEAD_L][HEAD_MAXJ], acc[HEAD_L][HEAD_MAXJ];
#pragma unroll
    for (int l = 0; l < HEAD_L; ++l)
#pragma unroll
        for (int j = 0; j < HEAD_MAXJ; ++j) {
            const int d = tid + j * HEAD_THREADS;
            hr[l][j] = (l0 + l < L && d < D) ? h[(long)(l0 + l) * D + d] : 0.0f;
            acc[l][j] = 0.0f;
        }
    HeadPartial p[HEAD_L];
    for (int l = 0; l < HEAD_L; ++l) p[l] = head_empty();

    for (int v = v0; v < v1; ++v) {
        const uint8_t * row = E + (long)v * row_bytes;
        for (int u = tid; u < D / Unit<T>::VALUES; u += HEAD_THREADS) {  // 16-value groups: 176 at D = 2816
            dequant_unit<T>(row, u, &e_row[u * Unit<T>::VALUES]);
        }
        __syncthreads();
#pragma unroll
        for (int l = 0; l < HEAD_L; ++l) {
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < HEAD_MAXJ; ++j) {
                const int d = tid + j * HEAD_THREADS;
                if (d < D) dot = fmaf(hr[l][j], e_row[d], dot);
            }
            for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
            if (lane == 0) red[warp][l] = dot;
        }
        __syncthreads();
        if (tid < HEAD_L) {
            float dot = 0.0f;
            for (int w = 0; w < HEAD_WARPS; ++w) dot += red[w][tid];
            z_s[tid] = head_logit(dot, softcap, inv_temperature);
            gz_s[tid] = head_perturbed(z_s[tid], seed, step, l0 + tid, v);
        }
        __syncthreads();
#pragma unroll
        for (int l = 0; l < HEAD_L; ++l) {  // every thread runs the same update on the same numbers
            float scale, w;
            head_update(p[l], z_s[l], v, scale, w);
            head_sample_update(p[l], gz_s[l], v);
#pragma unroll
            for (int j = 0; j < HEAD_MAXJ; ++j) {
                const int d = tid + j * HEAD_THREADS;
                if (d < D) acc[l][j] = acc[l][j] * scale + w * e_row[d];
            }
        }
        __syncthreads();  // e_row and z_s are rewritten by the next row
    }
#pragma unroll
    for (int l = 0; l < HEAD_L; ++l) {
        if (l0 + l >= L) break;
        const long o = (long)s * L + l0 + l;
        if (tid == 0) store_partial(p[l], part_mst, part_arg, part_g, part_sample, o);
#pragma unroll
        for (int j = 0; j < HEAD_MAXJ; ++j) {
            const int d = tid + j * HEAD_THREADS;
            if (d < D) part_acc[o * D + d] = acc[l][j];
        }
    }
}

constexpr int HEAD_MAX_SPLITS = 1024;

extern "C" __global__ void __launch_bounds__(HEAD_THREADS) head_merge(
        const float * __restrict__ part_mst, const int * __restrict__ part_arg, const float * __restrict__ part_g,
        const int * __restrict__ part_sample, const float * __restrict__ part_acc, int S, int L, int D,
        float * __restrict__ out_max, int * __restrict__ out_arg, float * __restrict__ out_lse,
        float * __restrict__ out_entropy, int * __restrict__ out_sample, float * __restrict__ out_sc) {
    __shared__ float factor[HEAD_MAX_SPLITS];  // what each split's acc is multiplied by
    __shared__ float inv_s;
    const int l = blockIdx.x, tid = threadIdx.x;
    if (tid == 0) {
        const HeadPartial a = head_merge_splits([&](int s) {
            return load_partial(part_mst, part_arg, part_g, part_sample, (long)s * L + l);
        }, S, factor);
        out_max[l] = a.m;
        out_arg[l] = a.arg;
        out_lse[l] = head_lse(a);
        out_entropy[l] = head_entropy(a);
        out_sample[l] = a.sample;
        inv_s = 1.0f / a.s;
    }
    __syncthreads();
    for (int d = tid; d < D; d += HEAD_THREADS) {
        float sum = 0.0f;
        for (int s = 0; s < S; ++s) sum = fmaf(part_acc[((long)s * L + l) * D + d], factor[s], sum);
        out_sc[(long)l * D + d] = sum * inv_s;
    }
}

// The statistics of one vocabulary chunk's logits, for the head on tensor cores (plugin/cuda/head_ops.py
// head_stats_chunked): the chunk's raw logits z [L, n] (rows v0 .. v0+n-1 of the head, from a matmul
// kernel) -> per position the partial head_merge reads, (m, s, t) [L, 3], arg, g, sample [L] (absolute
// rows), and P = exp(z' - m) [L, n] as f16 bits, z' = softcap(z) / T, for the GEMM P @ E_chunk that gives
// the partial's acc. One block per position; threads stride over the chunk, so ties go to the lower row
// by comparing rows (head_merge's order rule does the same across chunks). Two passes over the row of z:
// the max and the Gumbel-max sample, then the weights and their sums against that max. The first takes the
// rows by fours, 4c .. 4c + 3 (any v0: the fours of the head, cut at the chunk's ends), one Philox call for
// the four rows' uniforms (csrc/philox.cuh sampler_words) where one a row used one of its four words.

extern "C" __global__ void __launch_bounds__(HEAD_THREADS) head_chunk_stats(
        const float * __restrict__ z, int n, int v0, float softcap, float inv_temperature, unsigned long long seed,
        int step, float * __restrict__ mst, int * __restrict__ arg, float * __restrict__ g,
        int * __restrict__ sample, uint16_t * __restrict__ p) {
    __shared__ float red_a[HEAD_WARPS], red_b[HEAD_WARPS];
    __shared__ int red_ia[HEAD_WARPS], red_ib[HEAD_WARPS];
    const int l = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const float * zl = z + (long)l * n;
    float m = 0.0f, gm = 0.0f;
    int im = -1, ig = -1;  // -1: no row yet
    for (int c = v0 / 4 + tid; 4 * c < v0 + n; c += HEAD_THREADS) {
        const Philox4 r = sampler_words(seed, step, l, (uint32_t)c);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int j = 4 * c + i - v0;  // the chunk's row
            if (j < 0 || j >= n) continue;
            const float zz = head_logit(zl[j], softcap, inv_temperature);
            head_take(m, im, zz, j);
            head_take(gm, ig, head_perturbed_word(zz, r.v[i]), j);
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o), og = __shfl_xor_sync(0xffffffffu, gm, o);
        const int oim = __shfl_xor_sync(0xffffffffu, im, o), oig = __shfl_xor_sync(0xffffffffu, ig, o);
        head_take(m, im, om, oim);
        head_take(gm, ig, og, oig);
    }
    if (lane == 0) { red_a[warp] = m; red_ia[warp] = im; red_b[warp] = gm; red_ib[warp] = ig; }
    __syncthreads();
    m = red_a[0]; im = red_ia[0]; gm = red_b[0]; ig = red_ib[0];  // every thread reduces the same 8, in order
    for (int w = 1; w < HEAD_WARPS; ++w) {
        head_take(m, im, red_a[w], red_ia[w]);
        head_take(gm, ig, red_b[w], red_ib[w]);
    }
    float s = 0.0f, t = 0.0f;
    for (int j = tid; j < n; j += HEAD_THREADS) {
        const float zz = head_logit(zl[j], softcap, inv_temperature);
        const float w = expf(zz - m);
        s += w;
        t += w * zz;
        p[(long)l * n + j] = f32_to_f16_bits(w);
    }
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        t += __shfl_xor_sync(0xffffffffu, t, o);
    }
    __syncthreads();  // everyone has read red_* above
    if (lane == 0) { red_a[warp] = s; red_b[warp] = t; }
    __syncthreads();
    if (tid == 0) {
        s = 0.0f;
        t = 0.0f;
        for (int w = 0; w < HEAD_WARPS; ++w) { s += red_a[w]; t += red_b[w]; }
        store_partial(HeadPartial{m, s, t, im < 0 ? -1 : v0 + im, gm, ig < 0 ? -1 : v0 + ig}, mst, arg, g, sample, l);
    }
}

// Merge one chunk's partial (head_chunk_stats' outputs and its acc = P @ E_chunk [L, D]) into a running
// partial of the chunks before it, in place (head_stats_chunked keeps one running partial instead of
// one per chunk). One block per position; the same head_merge as head_merge_splits, so the result is the
// merge of the chunks in row order. A running partial with no rows yet (arg -1) takes the chunk's; its
// values must be finite (the caller zeroes them), as its acc is multiplied by 0 then.
extern "C" __global__ void __launch_bounds__(HEAD_THREADS) head_merge_into(
        float * __restrict__ run_mst, int * __restrict__ run_arg, float * __restrict__ run_g,
        int * __restrict__ run_sample, float * __restrict__ run_acc, const float * __restrict__ mst,
        const int * __restrict__ arg, const float * __restrict__ g, const int * __restrict__ sample,
        const float * __restrict__ acc, int D) {
    __shared__ float fa_s, fb_s;
    const int l = blockIdx.x, tid = threadIdx.x;
    if (tid == 0) {
        HeadPartial a = load_partial(run_mst, run_arg, run_g, run_sample, l);
        float fa, fb;
        head_merge(a, load_partial(mst, arg, g, sample, l), fa, fb);
        store_partial(a, run_mst, run_arg, run_g, run_sample, l);
        fa_s = fa;
        fb_s = fb;
    }
    __syncthreads();
    const float fa = fa_s, fb = fb_s;
    for (int d = tid; d < D; d += HEAD_THREADS) {
        const long o = (long)l * D + d;
        run_acc[o] = fmaf(run_acc[o], fa, acc[o] * fb);
    }
}

}  // namespace dg

#ifndef __CUDACC_RTC__
// nvcc builds (CI's compile check) instantiate every type; at run time NVRTC instantiates by name
#define DG_HEAD_INST(T)                                                                                   \
    template __global__ void dg::head_partials<dg::T>(const float *, int, int, const uint8_t *, int, int, float, float, \
                                                  unsigned long long, int, float *, int *, float *, int *, float *);
DG_FOR_EACH_TYPE(DG_HEAD_INST)
#undef DG_HEAD_INST
#endif
