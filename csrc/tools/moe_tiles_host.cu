// Host harness for csrc/moe_tiles.cuh: the tiles of the grouped expert GEMM from per-expert pair counts.
// usage: moe_tiles_host TILE_M COUNT0 COUNT1 ... > (for t = 0 .. pairs / TILE_M + E - 1: int32 e, m0, m_end; -1 -1 -1 past the end)
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../moe_tiles.cuh"

int main(int argc, char ** argv) {
    if (argc < 3) {
        std::fprintf(stderr, "usage: %s TILE_M COUNT0 [COUNT1 ...]\n", argv[0]);
        return 2;
    }
    const int tile_m = std::atoi(argv[1]), E = argc - 2;
    std::vector<int> offsets(E + 1, 0), tile_offsets(E + 1, 0);
    for (int e = 0; e < E; ++e) {
        const int c = std::atoi(argv[2 + e]);
        if (c < 0 || tile_m < 1) {
            std::fprintf(stderr, "bad arguments: counts >= 0, TILE_M >= 1\n");
            return 2;
        }
        offsets[e + 1] = offsets[e] + c;
        tile_offsets[e + 1] = tile_offsets[e] + (c + tile_m - 1) / tile_m;
    }
    const int bound = offsets[E] / tile_m + E;
    for (int t = 0; t < bound; ++t) {
        int out[3] = {-1, -1, -1};
        int e = 0, m0 = 0, m_end = 0;
        if (dg::moe_tile(t, offsets.data(), tile_offsets.data(), E, tile_m, e, m0, m_end)) {
            out[0] = e;
            out[1] = m0;
            out[2] = m_end;
        }
        std::fwrite(out, sizeof(int), 3, stdout);
    }
    return 0;
}
