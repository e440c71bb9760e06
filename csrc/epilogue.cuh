// Where a matmul tile's outputs go (csrc/mm_tile.cuh, csrc/mma_tile.cuh): row m of Y, or, for the routed
// experts' down projection, the weighted scatter-add back to the tokens: y[out_rows[m]] += out_w[m] * value,
// so that the [pairs, D] product is never written (model.grouped_experts' index_add_, fused). The adds are
// float atomics: a token's top-k experts land in any order, as index_add_ on the GPU does. out_rows are not
// range-checked (the engine's own token ids, order // top_k: ops.moe_qmatmul's scatter).
#pragma once

namespace dg {

struct Epilogue {
    const int * out_rows;  // null: plain store of row m
    const float * out_w;
};

__device__ __forceinline__ void store_out(float * y, int ldy, int m, int n, float v, const Epilogue &ep) {
    if (ep.out_rows) {
        atomicAdd(&y[(long)ep.out_rows[m] * ldy + n], ep.out_w[m] * v);
    } else {
        y[(long)m * ldy + n] = v;
    }
}

}  // namespace dg
