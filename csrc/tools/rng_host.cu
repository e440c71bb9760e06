// Host harness for csrc/philox.cuh.
// usage: rng_host SEED STEP POS V0 N > (N uint32 first words, then N float32 uniforms, for v = V0 .. V0+N-1)
//        rng_host kat C0 C1 C2 C3 K0 K1 > (the 4 uint32 words of Philox4x32-10), hex arguments
//        rng_host tokens SEED STEP KIND VOCAB POS0 N > (N int32 sampler_token draws, pos = POS0 .. POS0+N-1)
//        rng_host uniform W... > (a float32 philox_uniform per hex word W)
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../philox.cuh"

int main(int argc, char ** argv) {
    if (argc == 8 && std::strcmp(argv[1], "kat") == 0) {
        uint32_t a[6];
        for (int i = 0; i < 6; ++i) a[i] = (uint32_t)std::strtoul(argv[2 + i], nullptr, 16);
        const dg::Philox4 r = dg::philox4x32_10(a[0], a[1], a[2], a[3], a[4], a[5]);
        std::fwrite(r.v, sizeof(uint32_t), 4, stdout);
        return 0;
    }
    if (argc == 8 && std::strcmp(argv[1], "tokens") == 0) {
        const unsigned long long seed = std::strtoull(argv[2], nullptr, 10);
        const int step = std::atoi(argv[3]), vocab = std::atoi(argv[5]), pos0 = std::atoi(argv[6]), n = std::atoi(argv[7]);
        const uint32_t kind = (uint32_t)std::atoi(argv[4]);
        if (n < 0 || pos0 < 0 || vocab < 1) {
            std::fprintf(stderr, "bad arguments: POS0 >= 0, N >= 0, VOCAB >= 1\n");
            return 2;
        }
        std::vector<int> tok(n);
        for (int i = 0; i < n; ++i) tok[i] = dg::sampler_token(seed, step, pos0 + i, kind, vocab);
        std::fwrite(tok.data(), sizeof(int), tok.size(), stdout);
        return 0;
    }
    if (argc >= 2 && std::strcmp(argv[1], "uniform") == 0) {
        for (int i = 2; i < argc; ++i) {
            const float u = dg::philox_uniform((uint32_t)std::strtoul(argv[i], nullptr, 16));
            std::fwrite(&u, sizeof(float), 1, stdout);
        }
        return 0;
    }
    if (argc != 6) {
        std::fprintf(stderr, "usage: %s SEED STEP POS V0 N | kat C0 C1 C2 C3 K0 K1 | tokens SEED STEP KIND VOCAB POS0 N | uniform W...\n",
                     argv[0]);
        return 2;
    }
    const unsigned long long seed = std::strtoull(argv[1], nullptr, 10);
    const int step = std::atoi(argv[2]), pos = std::atoi(argv[3]), v0 = std::atoi(argv[4]), n = std::atoi(argv[5]);
    if (n < 0 || v0 < 0) {
        std::fprintf(stderr, "bad arguments: V0 >= 0, N >= 0\n");
        return 2;
    }
    std::vector<uint32_t> words(n);
    std::vector<float> u(n);
    for (int i = 0; i < n; ++i) {
        words[i] = dg::sampler_word(seed, step, pos, v0 + i);
        u[i] = dg::philox_uniform(words[i]);  // the uniform head_perturbed draws from the word
    }
    std::fwrite(words.data(), sizeof(uint32_t), words.size(), stdout);
    std::fwrite(u.data(), sizeof(float), u.size(), stdout);
    return 0;
}
