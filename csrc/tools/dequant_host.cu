// Host harness for csrc/quant/blocks.cuh: runs the kernels' dequantization on the CPU.
// usage: dequant_host TYPE K [MODE] < blocks.bin > floats.bin   (rows of K values, raw GGML bytes in, float32 out)
// MODE: blocks (dequant_row: block by block, the default), units (dequant_unit along the whole row, as the
// tiles, the head and get_rows decode it: a 16-value group or a float value per thread, the groups through
// decompose_unit, the int8 tile's own reading)
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../quant/blocks.cuh"

// a row as the tiles, the head and get_rows decode it: unit after unit
static bool row_by_units(int type, const uint8_t * row, float * y, int k) {
#define DG_CASE(T)                                                                                              \
    case dg::T:                                                                                                 \
        for (int u = 0; u < k / dg::Unit<dg::T>::VALUES; ++u) dg::dequant_unit<dg::T>(row, u, y + u * dg::Unit<dg::T>::VALUES); \
        return true;
    switch (type) {
        DG_FOR_EACH_TYPE(DG_CASE)
        default: return false;
    }
#undef DG_CASE
}

int main(int argc, char ** argv) {
    if (argc != 3 && argc != 4) {
        std::fprintf(stderr, "usage: %s GGML_TYPE K [blocks|units] < blocks > floats\n", argv[0]);
        return 2;
    }
    const int type = std::atoi(argv[1]);
    const int k = std::atoi(argv[2]);
    const std::string mode = argc == 4 ? argv[3] : "blocks";
    if (mode != "blocks" && mode != "units") {
        std::fprintf(stderr, "unknown mode %s\n", mode.c_str());
        return 2;
    }
    std::vector<unsigned char> in;
    unsigned char buf[1 << 16];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof buf, stdin)) > 0) in.insert(in.end(), buf, buf + n);
    int qk = 0, size = 0;
    if (!dg::block_shape(type, qk, size)) {
        std::fprintf(stderr, "unknown type %d\n", type);
        return 2;
    }
    if (k % qk) {
        std::fprintf(stderr, "K=%d is not a multiple of the block (%d)\n", k, qk);
        return 2;
    }
    const size_t row_bytes = (size_t)(k / qk) * size;
    if (in.size() % row_bytes) {
        std::fprintf(stderr, "input of %zu bytes is not whole rows of %zu\n", in.size(), row_bytes);
        return 2;
    }
    std::vector<float> out(k);
    for (size_t r = 0; r < in.size() / row_bytes; ++r) {
        const uint8_t * row = in.data() + r * row_bytes;
        const bool done = mode == "blocks" ? dg::dequant_row(type, row, out.data(), k)
                                           : row_by_units(type, row, out.data(), k);
        if (!done) {
            std::fprintf(stderr, "type %d has no %s decoding\n", type, mode.c_str());
            return 2;
        }
        std::fwrite(out.data(), sizeof(float), out.size(), stdout);
    }
    return 0;
}
