// Host harness for csrc/head.cuh: the fused head's split-and-merge algorithm, serially on the CPU.
// usage: head_host TYPE L D V SPLITS SOFTCAP TEMPERATURE SEED STEP < (h: L*D float32, then E: V GGML rows of D)
//        > (max: L float32, argmax: L int32, lse: L float32, entropy: L float32, sample: L int32,
//           sc: L*D float32)
// Splits and rows are visited in the order csrc/head.cu's blocks cover them and head_merge merges them.
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "../head.cuh"

struct Splits {  // the partials of one position, by split (head_merge reads them from global memory)
    const dg::HeadPartial * p;
    DG_HD dg::HeadPartial operator()(int s) const { return p[s]; }
};

int main(int argc, char ** argv) {
    if (argc != 10) {
        std::fprintf(stderr, "usage: %s GGML_TYPE L D V SPLITS SOFTCAP TEMPERATURE SEED STEP < h,E > stats\n", argv[0]);
        return 2;
    }
    const int type = std::atoi(argv[1]), L = std::atoi(argv[2]), D = std::atoi(argv[3]), V = std::atoi(argv[4]);
    const int S = std::atoi(argv[5]);
    const float softcap = (float)std::atof(argv[6]), temperature = (float)std::atof(argv[7]);
    const unsigned long long seed = std::strtoull(argv[8], nullptr, 10);
    const int step = std::atoi(argv[9]);
    int qk = 0, size = 0;
    if (!dg::block_shape(type, qk, size)) {
        std::fprintf(stderr, "unknown type %d\n", type);
        return 2;
    }
    if (L < 1 || D < 1 || V < 1 || S < 1 || S > V || D % qk || !(temperature > 0.0f)) {
        std::fprintf(stderr, "bad shape: L, D, V >= 1, 1 <= SPLITS <= V, D a multiple of %d, TEMPERATURE > 0\n", qk);
        return 2;
    }
    const size_t row_bytes = (size_t)(D / qk) * size;
    std::vector<float> h((size_t)L * D);
    std::vector<unsigned char> E((size_t)V * row_bytes);
    if (std::fread(h.data(), sizeof(float), h.size(), stdin) != h.size() ||
        std::fread(E.data(), 1, E.size(), stdin) != E.size()) {
        std::fprintf(stderr, "input too short: need %zu floats of h and %zu bytes of E\n", h.size(), E.size());
        return 2;
    }
    std::vector<float> Ef((size_t)V * D);
    for (int v = 0; v < V; ++v) dg::dequant_row(type, E.data() + v * row_bytes, Ef.data() + (size_t)v * D, D);

    const int rows_per_split = (V + S - 1) / S;
    const float inv_t = 1.0f / temperature;
    std::vector<float> mx(L), lse(L), ent(L), sc((size_t)L * D);
    std::vector<int> arg(L), sample(L);
    std::vector<float> acc((size_t)S * D), factor(S);
    for (int l = 0; l < L; ++l) {
        std::vector<dg::HeadPartial> part(S, dg::head_empty());
        for (int s = 0; s < S; ++s) {  // one kernel block's rows
            float * a = &acc[(size_t)s * D];
            for (int d = 0; d < D; ++d) a[d] = 0.0f;
            for (int v = s * rows_per_split; v < V && v < (s + 1) * rows_per_split; ++v) {
                const float * e = &Ef[(size_t)v * D];
                float dot = 0.0f;
                for (int d = 0; d < D; ++d) dot += h[(size_t)l * D + d] * e[d];
                float scale, w;
                const float z = dg::head_logit(dot, softcap, inv_t);
                dg::head_update(part[s], z, v, scale, w);
                dg::head_sample_update(part[s], dg::head_perturbed(z, seed, step, l, v), v);
                for (int d = 0; d < D; ++d) a[d] = a[d] * scale + w * e[d];
            }
        }
        const dg::HeadPartial m = dg::head_merge_splits(Splits{part.data()}, S, factor.data());  // as head_merge
        mx[l] = m.m, arg[l] = m.arg, lse[l] = dg::head_lse(m), ent[l] = dg::head_entropy(m), sample[l] = m.sample;
        for (int d = 0; d < D; ++d) {
            float sum = 0.0f;
            for (int s = 0; s < S; ++s) sum += acc[(size_t)s * D + d] * factor[s];
            sc[(size_t)l * D + d] = sum / m.s;
        }
    }
    std::fwrite(mx.data(), sizeof(float), L, stdout);
    std::fwrite(arg.data(), sizeof(int), L, stdout);
    std::fwrite(lse.data(), sizeof(float), L, stdout);
    std::fwrite(ent.data(), sizeof(float), L, stdout);
    std::fwrite(sample.data(), sizeof(int), L, stdout);
    std::fwrite(sc.data(), sizeof(float), sc.size(), stdout);
    return 0;
}
