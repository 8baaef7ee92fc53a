// Tokenizer throughput: encode a whole text file (default: WikiText-2 test, 1.3 MB) as one string
// and line by line, on one core; best of N runs after one warm-up. Also checks decode round trip.
//
// Build: cmake -B build -DGPTQ_BUILD_BENCH=ON && ninja -C build bench_tokenizer
// Run:   build/bin/bench_tokenizer [TOKENIZER_PATH] [TEXT_FILE] [RUNS]
//        (defaults: models/tiny-llama, ../shared/data/wikitext2/wiki.test.raw, 3)
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace {

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

int main(int argc, char** argv) {
    const std::string src  = GPTQ_SOURCE_DIR;
    const std::string path = argc > 1 ? argv[1] : src + "/models/tiny-llama";
    const std::string file = argc > 2 ? argv[2] : src + "/../shared/data/wikitext2/wiki.test.raw";
    const int         runs = argc > 3 ? std::atoi(argv[3]) : 3;

    auto t0  = std::chrono::steady_clock::now();
    auto tok = gptq::tokenizer::load(path);
    if (!tok) {
        std::fprintf(stderr, "bench_tokenizer: %s\n", tok.error().message().c_str());
        return 1;
    }
    const double  load_s = seconds_since(t0);
    std::ifstream in(file, std::ios::binary);
    if (!in) {
        std::fprintf(stderr, "bench_tokenizer: %s: cannot open\n", file.c_str());
        return 1;
    }
    std::ostringstream ss;
    ss << in.rdbuf();
    const std::string        text = ss.str();
    std::vector<std::string> lines;
    for (size_t pos = 0; pos < text.size();) {
        size_t e = text.find('\n', pos);
        if (e == std::string::npos) e = text.size();
        lines.push_back(text.substr(pos, e - pos));
        pos = e + 1;
    }

    double               best_whole = 1e30, best_lines = 1e30, cold_whole = 0;
    size_t               n_whole = 0, n_lines = 0;
    std::vector<int32_t> ids;
    for (int r = 0; r <= runs; ++r) {  // run 0 warms up (and fills the word cache)
        t0              = std::chrono::steady_clock::now();
        ids             = (*tok)->encode(text, true);
        const double tw = seconds_since(t0);
        n_whole         = ids.size();
        t0              = std::chrono::steady_clock::now();
        n_lines         = 0;
        for (const auto& l : lines) n_lines += (*tok)->encode(l, true).size();
        const double tl = seconds_since(t0);
        if (r == 0) {
            cold_whole = tw;
        } else {
            best_whole = std::min(best_whole, tw);
            best_lines = std::min(best_lines, tl);
        }
    }
    t0                    = std::chrono::steady_clock::now();
    const std::string dec = (*tok)->decode(ids, true);
    const double      td  = seconds_since(t0);

    const double mb = static_cast<double>(text.size()) / 1e6;
    std::printf("tokenizer   %s (%s, vocab %d), load %.3f s\n", path.c_str(), gptq::tokenizer_kind_name((*tok)->kind()),
                (*tok)->vocab_size(), load_s);
    std::printf("text        %s: %.2f MB, %zu lines\n", file.c_str(), mb, lines.size());
    std::printf("whole text  %zu tokens in %.3f s  (%.2f MB/s, %.2f M tok/s), best of %d\n", n_whole, best_whole,
                mb / best_whole, n_whole / best_whole / 1e6, runs);
    std::printf("whole text  first run (empty word cache) %.3f s  (%.2f MB/s)\n", cold_whole, mb / cold_whole);
    std::printf("per line    %zu tokens in %.3f s  (%.2f MB/s)\n", n_lines, best_lines, mb / best_lines);
    std::printf("decode      %.3f s, round trip %s\n", td, dec == text ? "exact" : "differs");
    return 0;
}
