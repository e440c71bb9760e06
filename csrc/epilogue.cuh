// Where a matmul tile's outputs go (csrc/mm_tile.cuh, csrc/mma_tile.cuh), beyond row m of Y:
// - scatter (the routed experts' down projection): y[out_rows[m]] += out_w[m] * value, so that the
//   [pairs, D] product is never written (model.grouped_experts' index_add_, fused). The adds are float
//   atomics: a token's top-k experts land in any order, as index_add_ on the GPU does. out_rows are not
//   range-checked (the engine's own token ids, order // top_k: ops.moe_qmatmul's scatter).
// - gated (the experts' gate_up projection, fe > 0): the tile takes gate rows j0 .. and the matching up rows
//   fe + j0 .. of W [2 fe, K] and stores gelu_tanh(gate) * up into y [.., fe] (model.geglu, fused), so the
//   [pairs, 2 fe] product is never written either. The accumulators meet in shared memory.
#pragma once
#include "quant/blocks.cuh"

namespace dg {

struct Epilogue {
    const int * out_rows = nullptr;  // null: no scatter
    const float * out_w = nullptr;
    int fe = 0;                      // > 0: gated, fe output columns

    // output columns a tile of tile_n W rows covers: half of them when gated (gate and up rows)
    __device__ __forceinline__ int cols(int tile_n) const { return fe > 0 ? tile_n / 2 : tile_n; }
};

__device__ __forceinline__ void store_out(float * y, int ldy, int m, int n, float v, const Epilogue &ep) {
    if (ep.out_rows) {
        atomicAdd(&y[(long)ep.out_rows[m] * ldy + n], ep.out_w[m] * v);
    } else {
        y[(long)m * ldy + n] = v;
    }
}

// the row of W that tile row r (of tile_n) multiplies, for a tile whose first output column is n0; -1 past
// the matrix. Gated: rows 0 .. tile_n/2 - 1 are gate rows n0 + r, the others the up rows fe + n0 + r - tile_n/2
__device__ __forceinline__ int tile_w_row(int r, int n0, int N, int tile_n, const Epilogue &ep) {
    if (ep.fe <= 0) return n0 + r < N ? n0 + r : -1;
    const int half = ep.cols(tile_n), j = n0 + r % half;
    return j < ep.fe ? (r < half ? j : ep.fe + j) : -1;
}

// A K slice of the tile's TN weight rows into shared memory ws[TN][LD] (float, or f16 bits): unit after unit
// (a 16-value group, or a float value) over the block's THREADS threads, tile rows past the matrix zeroed.
// w: the matrix's first row; u0: the slice's first unit along a row (any group, so a slice may start
// inside a K-quant super-block); units: the slice's units per row.
template <int T, int THREADS, class Out, int TN, int LD>
__device__ __forceinline__ void stage_w_rows(int tid, Out (&ws)[TN][LD], const uint8_t * w, long row_bytes, int u0,
                                             int units, int n0, int N, const Epilogue &ep) {
    constexpr int UV = Unit<T>::VALUES;
    for (int i = tid; i < TN * units; i += THREADS) {
        const int r = i / units, u = i % units;
        Out * dst = &ws[r][u * UV];
        const int wr = tile_w_row(r, n0, N, TN, ep);
        if (wr >= 0) {
            dequant_unit<T>(w + (long)wr * row_bytes, u0 + u, dst);
        } else {
            for (int j = 0; j < UV; ++j) dst[j] = Out(0);
        }
    }
}

// torch's F.gelu(x, approximate="tanh")
__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// gated tiles: every thread of the block calls this once its accumulators are in ex[r][c] (gate in columns
// 0 .. TN/2 - 1, up in TN/2 ..) and the block has synchronised; rows at or past m_end and columns at or past
// fe are dropped
template <int TM, int TN, int THREADS>
__device__ __forceinline__ void store_gated(const float (*ex)[TN + 1], int m0, int m_end, int n0, float * y, int ldy,
                                            int fe) {
    for (int i = threadIdx.x; i < TM * (TN / 2); i += THREADS) {
        const int r = i / (TN / 2), c = i % (TN / 2), m = m0 + r, j = n0 + c;
        if (m < m_end && j < fe) y[(long)m * ldy + j] = gelu_tanh(ex[r][c]) * ex[r][c + TN / 2];
    }
}

}  // namespace dg
