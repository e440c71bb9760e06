// Counter-based random numbers for the GPU sampler: Philox4x32-10 (Salmon et al., "Parallel random
// numbers: as easy as 1, 2, 3", SC'11; the generator of Random123 and of cuRAND's Philox). Any thread
// draws the number of any (seed, step, position, vocabulary index) directly, with no state, so a
// vocabulary split over blocks draws the same numbers whatever the split (the Gumbel-max sample of the
// fused head, issue 5). plugin/rng.py is the numpy reference (bit-exact for the words and the
// uniforms; tests/test_csrc.py runs both).
#pragma once
#include "quant/blocks.cuh"  // DG_HD

namespace dg {

struct Philox4 {
    uint32_t v[4];
};

DG_HD void philox_mulhilo(uint32_t a, uint32_t b, uint32_t &hi, uint32_t &lo) {
    const uint64_t p = (uint64_t)a * (uint64_t)b;
    hi = (uint32_t)(p >> 32);
    lo = (uint32_t)p;
}

// Philox4x32 with 10 rounds: counter (c0..c3), key (k0, k1).
DG_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1) {
    for (int round = 0; round < 10; ++round) {
        if (round > 0) {  // the key schedule: Weyl sequence of the golden ratio and sqrt(3) - 1
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        uint32_t hi0, lo0, hi1, lo1;
        philox_mulhilo(0xD2511F53u, c0, hi0, lo0);
        philox_mulhilo(0xCD9E8D57u, c2, hi1, lo1);
        const uint32_t n0 = hi1 ^ c1 ^ k0, n2 = hi0 ^ c3 ^ k1;
        c0 = n0;
        c1 = lo1;
        c2 = n2;
        c3 = lo0;
    }
    return Philox4{{c0, c1, c2, c3}};
}

// A float32 uniform in (0, 1), never 0 or 1: the top 23 bits, centred in their interval, (2k + 1) / 2^24 for
// k < 2^23, each exact in float32 (the largest is 1 - 2^-24). With 24 bits the largest, 1 - 2^-25, rounded
// to 1.0, whose Gumbel noise is +inf: that row won the sample whatever its logit, at about 1 position in 64
// per pass over a 262144-row vocabulary.
DG_HD float philox_uniform(uint32_t x) { return (float)(x >> 9) * 1.1920928955078125e-07f + 5.9604644775390625e-08f; }

// The sampler's words for vocabulary rows 4c .. 4c + 3 at canvas position pos of denoising step `step`: the
// four words of Philox(counter = (c, pos, step, 0), key = the 64-bit seed), word i for row 4c + i. One call
// per four rows (the chunked head's threads take rows by fours: csrc/head.cu head_chunk_stats).
DG_HD Philox4 sampler_words(unsigned long long seed, int step, int pos, uint32_t c) {
    return philox4x32_10(c, (uint32_t)pos, (uint32_t)step, 0u, (uint32_t)seed, (uint32_t)(seed >> 32));
}

// Row v's word: word v % 4 of counter v / 4 (selected, not indexed: an indexed array would go to local memory)
DG_HD uint32_t sampler_word(unsigned long long seed, int step, int pos, int v) {
    const Philox4 r = sampler_words(seed, step, pos, (uint32_t)v >> 2);
    const int i = v & 3;
    return i == 0 ? r.v[0] : i == 1 ? r.v[1] : i == 2 ? r.v[2] : r.v[3];
}

// Uniform token draws (the initial canvas and the re-noised positions) come from a second stream,
// counter = (kind, pos, step, 1), so they never reuse a Gumbel draw's counter (v / 4, pos, step, 0).
// kind: SAMPLER_RENOISE for the tokens re-drawn after step `step`, SAMPLER_INIT for the canvas that
// step `step` is the first pass over (plugin/rng.py has the same constants).
constexpr uint32_t SAMPLER_RENOISE = 0u, SAMPLER_INIT = 1u, SAMPLER_TOKEN_STREAM = 1u;

// A token in [0, vocab): the first word scaled by vocab in integers, floor(word * vocab / 2^32), exact
// on host and device (no float rounding up to vocab).
DG_HD int sampler_token(unsigned long long seed, int step, int pos, uint32_t kind, int vocab) {
    const uint32_t w = philox4x32_10(kind, (uint32_t)pos, (uint32_t)step, SAMPLER_TOKEN_STREAM, (uint32_t)seed,
                                     (uint32_t)(seed >> 32)).v[0];
    return (int)(((uint64_t)w * (uint64_t)vocab) >> 32);
}

}  // namespace dg
