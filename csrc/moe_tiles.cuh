// Which rows a tile of the grouped expert GEMM (csrc/moe.cu) takes, found on the device from two prefix
// sums that the GPU computes itself (no host sync for the per-expert counts): offsets[e] .. offsets[e+1]-1
// are expert e's (token, expert) pairs, tile_offsets[e] .. tile_offsets[e+1]-1 its tiles of `tile_m` rows
// (ceil(count / tile_m) of them; none for an expert without pairs). The launch has an upper bound of
// tiles, pairs / tile_m + E; the tiles past tile_offsets[E] have nothing to do. plugin/cuda/ops.expert_tiles
// is the list this search must reproduce (tests/test_csrc.py, through csrc/tools/moe_tiles_host.cu).
#pragma once
#include "quant/blocks.cuh"  // DG_HD

namespace dg {

// tile t -> (expert e, its pairs m0 .. m_end-1); false when t is past the last tile
DG_HD bool moe_tile(int t, const int * offsets, const int * tile_offsets, int E, int tile_m, int &e, int &m0,
                    int &m_end) {
    if (E <= 0 || t >= tile_offsets[E]) return false;
    int lo = 0, hi = E - 1;  // the last expert whose tiles start at or before t: empty experts are skipped
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tile_offsets[mid] <= t) lo = mid;
        else hi = mid - 1;
    }
    e = lo;
    m0 = offsets[e] + (t - tile_offsets[e]) * tile_m;
    m_end = offsets[e + 1] < m0 + tile_m ? offsets[e + 1] : m0 + tile_m;
    return true;
}

}  // namespace dg
