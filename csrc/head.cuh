// The fused vocabulary head's per-position statistics, as __host__ __device__ code: the online update
// with one logit and the merge of two partials (plugin/cuda/head_ref.py is the contract in torch).
//
// For logits z_v (after the softcap, divided by the temperature) a partial over some rows v holds
//   m = max z, s = Σ exp(z - m), t = Σ exp(z - m)·z, arg = the first v with z_v = m,
// and, kept by the caller, acc = Σ exp(z - m)·E_v. Adding a row or merging two partials rescales the
// side with the smaller max (flash attention's online softmax, over the vocabulary). It also keeps the
// Gumbel-max sample: g = max (z_v + G_v), sample = its v, with G_v = -log(-log u_v) and u_v the
// counter-based uniform of csrc/philox.cuh, so the sample is a draw from softmax(z). The kernel
// (csrc/head.cu) and the host harness (csrc/tools/head_host.cu, tested on the CPU) share these.
#pragma once
#include "philox.cuh"
#include "quant/blocks.cuh"
#ifndef __CUDACC_RTC__
#include <math.h>
#endif

namespace dg {

struct HeadPartial {
    float m, s, t;
    int arg;
    float g;     // the largest z_v + G_v so far
    int sample;  // its v
};

DG_HD HeadPartial head_empty() { return HeadPartial{0.0f, 0.0f, 0.0f, -1, 0.0f, -1}; }  // arg < 0: no row yet

// partial o of the kernels' arrays: (m, s, t) in mst[o * 3 ..], arg, g and sample at [o]
DG_HD HeadPartial load_partial(const float * mst, const int * arg, const float * g, const int * sample, long o) {
    return HeadPartial{mst[o * 3 + 0], mst[o * 3 + 1], mst[o * 3 + 2], arg[o], g[o], sample[o]};
}
DG_HD void store_partial(const HeadPartial &p, float * mst, int * arg, float * g, int * sample, long o) {
    mst[o * 3 + 0] = p.m;
    mst[o * 3 + 1] = p.s;
    mst[o * 3 + 2] = p.t;
    arg[o] = p.arg;
    g[o] = p.g;
    sample[o] = p.sample;
}

// (a, ia) becomes (b, ib) where that one wins: the larger value, ties to the lower row, ib < 0 none
// (head_chunk_stats, whose threads see rows out of order, compares rows instead of relying on order)
DG_HD void head_take(float &a, int &ia, float b, int ib) {
    if (ib >= 0 && (ia < 0 || b > a || (b == a && ib < ia))) {
        a = b;
        ia = ib;
    }
}

// a standard Gumbel draw from a uniform in (0, 1)
DG_HD float head_gumbel(float u) { return -logf(-logf(u)); }

// a logit perturbed by the Gumbel draw of its Philox word (csrc/philox.cuh)
DG_HD float head_perturbed_word(float z, uint32_t word) { return z + head_gumbel(philox_uniform(word)); }

// the perturbed logit of row v at canvas position pos, denoising step `step`
DG_HD float head_perturbed(float z, unsigned long long seed, int step, int pos, int v) {
    return head_perturbed_word(z, sampler_word(seed, step, pos, v));
}

// add row v's perturbed logit gz to the sample (ties keep the earlier row)
DG_HD void head_sample_update(HeadPartial &p, float gz, int v) {
    if (p.sample < 0 || gz > p.g) {
        p.g = gz;
        p.sample = v;
    }
}

// the processed logit: softcap(dot) / T (softcap 0: none)
DG_HD float head_logit(float dot, float softcap, float inv_temperature) {
    const float z = softcap > 0.0f ? tanhf(dot / softcap) * softcap : dot;
    return z * inv_temperature;
}

// add row v with logit z; returns (scale for the old acc, weight of E_v): acc = acc·scale + w·E_v
DG_HD void head_update(HeadPartial &p, float z, int v, float &scale, float &w) {
    if (p.arg < 0 || z > p.m) {  // a new maximum (ties keep the earlier row)
        scale = p.arg < 0 ? 0.0f : expf(p.m - z);
        w = 1.0f;
        p.s = p.s * scale + 1.0f;
        p.t = p.t * scale + z;
        p.m = z;
        p.arg = v;
    } else {
        scale = 1.0f;
        w = expf(z - p.m);
        p.s += w;
        p.t += w * z;
    }
}

// merge b (rows after a's) into a; returns the factors for a's and b's acc: acc = acc_a·fa + acc_b·fb
DG_HD void head_merge(HeadPartial &a, const HeadPartial &b, float &fa, float &fb) {
    if (b.arg < 0) { fa = 1.0f; fb = 0.0f; return; }
    if (a.arg < 0) { a = b; fa = 0.0f; fb = 1.0f; return; }
    const float m = a.m > b.m ? a.m : b.m;
    fa = expf(a.m - m);
    fb = expf(b.m - m);
    a.s = a.s * fa + b.s * fb;
    a.t = a.t * fa + b.t * fb;
    if (b.m > a.m) a.arg = b.arg;  // ties keep the lower index, as argmax does
    a.m = m;
    if (b.g > a.g) {  // both have rows here; ties keep the lower index
        a.g = b.g;
        a.sample = b.sample;
    }
}

// merge S partials in split order (part(s) returns split s's HeadPartial); factor[s] is what split s's acc
// is multiplied by in the merged acc (before dividing by the merged s). factor has room for S floats.
template <class Part>
DG_HD HeadPartial head_merge_splits(Part part, int S, float *factor) {
    HeadPartial a = head_empty();
    for (int s = 0; s < S; ++s) {
        float fa, fb;
        head_merge(a, part(s), fa, fb);
        for (int r = 0; r < s; ++r) factor[r] *= fa;  // earlier splits rescale to the new max
        factor[s] = fb;
    }
    return a;
}

// the final statistics: log-sum-exp and entropy = lse - Σ p·z
DG_HD float head_lse(const HeadPartial &p) { return p.m + logf(p.s); }
DG_HD float head_entropy(const HeadPartial &p) { return head_lse(p) - p.t / p.s; }

}  // namespace dg
