// Host harness for csrc/quant/blocks.cuh: runs the kernels' dequantization on the CPU.
// usage: dequant_host TYPE K < blocks.bin > floats.bin   (rows of K values, raw GGML bytes in, float32 out)
//        dequant_host ints   (checks base.cuh's conversion-free int -> float against C casts: every int8 byte,
//                             and small_i32_to_f32 outward from 0 until it first differs; prints that range)
// Rows are decoded by dequant_row: unit after unit along the row (a 16-value group through decompose_unit,
// the int8 tile's own reading, or a float value), as the tiles, the head and get_rows decode them.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "../quant/blocks.cuh"

// every byte through s8_to_f32 equals its int8 value; small_i32_to_f32 is exact on [lo, hi], printed
static int check_ints() {
    for (uint32_t b = 0; b < 256; ++b) {
        for (int k = 0; k < 4; ++k) {
            const uint32_t w = (b << (8 * k)) | (0xA5u << (8 * ((k + 1) % 4)));  // another byte beside it
            if (dg::s8_to_f32(w, k) != (float)(int8_t)b) {
                std::fprintf(stderr, "s8_to_f32(0x%08x, %d) = %g, not %d\n", w, k, dg::s8_to_f32(w, k), (int8_t)b);
                return 1;
            }
        }
    }
    long hi = 0, lo = 0;
    while (hi < (1L << 24) && dg::small_i32_to_f32((int)(hi + 1)) == (float)(hi + 1)) ++hi;
    while (lo > -(1L << 24) && dg::small_i32_to_f32((int)(lo - 1)) == (float)(lo - 1)) --lo;
    std::printf("%ld %ld\n", lo, hi);
    return 0;
}

int main(int argc, char ** argv) {
    if (argc == 2 && std::string(argv[1]) == "ints") return check_ints();
    if (argc != 3) {
        std::fprintf(stderr, "usage: %s GGML_TYPE K < blocks > floats\n", argv[0]);
        return 2;
    }
    const int type = std::atoi(argv[1]);
    const int k = std::atoi(argv[2]);
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
        if (!dg::dequant_row(type, row, out.data(), k)) {
            std::fprintf(stderr, "type %d has no decoding\n", type);
            return 2;
        }
        std::fwrite(out.data(), sizeof(float), out.size(), stdout);
    }
    return 0;
}
