// The entropy-bound sampler's accept / re-noise step for a batch of canvases, one block per canvas.
//
// For canvas b: sort the C positions by entropy (ascending), accept the prefix whose cumulative entropy
// minus its largest term stays within `bound` (Categorical entropies of the temperature-scaled logits,
// computed by the head), and build the next canvas: accepted positions take the denoised token, the
// others a fresh uniformly drawn token. As plugin/sampler.py's CounterSteps.accept_renoise: the fresh
// token of position b*C + i after step `step` is csrc/philox.cuh's sampler_token(seed, step, b*C + i,
// SAMPLER_RENOISE, vocab), so the kernel is deterministic and plugin/rng.py draws the same tokens. The
// cumulative sum runs sequentially in sorted order in double, each partial rounded to float, as
// torch.cumsum on the CPU computes it, so borderline acceptances agree.
// Shapes: entropy [B, C] f32; denoised, next [B, C] i32; accepted [B, C] u8; C <= 1024.
#include "philox.cuh"

namespace dg {

constexpr int ACCEPT_MAX = 1024;

extern "C" __global__ void accept_renoise(const float * __restrict__ entropy, const int * __restrict__ denoised,
                                          int * __restrict__ next, uint8_t * __restrict__ accepted, int C,
                                          float bound, unsigned long long seed, int step, int vocab) {
    __shared__ float key[ACCEPT_MAX];
    __shared__ int idx[ACCEPT_MAX];
    __shared__ uint8_t take[ACCEPT_MAX];
    const int b = blockIdx.x;
    const int tid = threadIdx.x;
    int P = 1;
    while (P < C) P <<= 1;  // bitonic sort needs a power of two: pad with +inf
    for (int i = tid; i < P; i += blockDim.x) {
        key[i] = i < C ? entropy[(long)b * C + i] : __int_as_float(0x7f800000);
        idx[i] = i;
    }
    __syncthreads();
    for (int k = 2; k <= P; k <<= 1) {
        for (int j = k >> 1; j > 0; j >>= 1) {
            for (int i = tid; i < P; i += blockDim.x) {
                const int p = i ^ j;
                if (p > i) {
                    const bool up = (i & k) == 0;
                    // order by (entropy, position) so that equal entropies sort deterministically
                    const bool greater = key[i] > key[p] || (key[i] == key[p] && idx[i] > idx[p]);
                    if (greater == up) {
                        const float tk = key[i]; key[i] = key[p]; key[p] = tk;
                        const int ti = idx[i]; idx[i] = idx[p]; idx[p] = ti;
                    }
                }
            }
            __syncthreads();
        }
    }
    if (tid == 0) {
        double cum = 0.0;  // torch.cumsum on the CPU: a double running sum, each output rounded to float
        for (int i = 0; i < C; ++i) {
            cum += (double)key[i];
            take[idx[i]] = ((float)cum - key[i]) <= bound;
        }
    }
    __syncthreads();
    for (int i = tid; i < C; i += blockDim.x) {
        const long o = (long)b * C + i;
        accepted[o] = take[i];
        next[o] = take[i] ? denoised[o] : sampler_token(seed, step, (int)o, SAMPLER_RENOISE, vocab);
    }
}

}  // namespace dg
