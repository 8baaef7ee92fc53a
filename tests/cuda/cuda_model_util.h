// Helpers shared by the GPU model tests (test_llama_cuda, test_offload_cuda): where the source tree
// is, the token ids they feed, and GPTQ checkpoints of tiny-llama made once per configuration.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "gptq/quantize.h"
#include "test_util.h"

namespace gptq::test {

// The source tree: GPTQ_SOURCE_DIR, or $GPTQ_TEST_SOURCE_DIR when set (the device bundle runs these
// binaries from a checkout at another path).
inline std::string cuda_source_dir() {
    const char* env = std::getenv("GPTQ_TEST_SOURCE_DIR");
    return env && *env ? std::string(env) : std::string(GPTQ_SOURCE_DIR);
}

inline std::vector<int32_t> cuda_test_ids(int64_t n, int64_t vocab) {
    std::vector<int32_t> ids(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 37 + 11) % vocab);
    return ids;
}

// A GPTQ checkpoint of tiny-llama, made once per tag (per test process) by the CPU quantizer.
inline std::string tiny_llama_gptq_checkpoint(const std::string& tag, int bits, int group, bool desc_act, bool sym,
                                              const std::string& method) {
    static temp_dir   dir("cuda-tiny-gptq");
    const std::string out = dir.file(tag);
    if (std::filesystem::exists(out)) return out;
    quantize_params p;
    p.model_path  = cuda_source_dir() + "/models/tiny-llama";
    p.output_path = out;
    p.bits        = bits;
    p.group_size  = group;
    p.desc_act    = desc_act;
    p.sym         = sym;
    p.method      = method;
    p.calib       = cuda_source_dir() + "/data/calib/corpus-sample.txt";
    p.nsamples    = 4;
    p.seqlen      = 64;
    p.n_threads   = 2;
    auto r        = quantize_model(p);
    EXPECT_TRUE(r.is_ok()) << r.error().message();
    return out;
}

// tiny-llama (tied lm_head) W4 g128 RTN with its embedding table quantized (--quantize-embeddings
// at embed_bits, group 128; docs/quantize.md "Quantized embeddings"), optionally with a GPTQ
// lm_head copy of its own (--quantize-lm-head), made once per tag.
inline std::string tiny_llama_quantized_embeddings_checkpoint(const std::string& tag, int embed_bits,
                                                              bool quantize_lm_head) {
    static temp_dir   dir("cuda-tiny-embed");
    const std::string out = dir.file(tag);
    if (std::filesystem::exists(out)) return out;
    quantize_params p;
    p.model_path          = cuda_source_dir() + "/models/tiny-llama";
    p.output_path         = out;
    p.method              = "rtn";
    p.quantize_embeddings = true;
    p.embed_bits          = embed_bits;
    p.quantize_lm_head    = quantize_lm_head;
    p.n_threads           = 2;
    auto r                = quantize_model(p);
    EXPECT_TRUE(r.is_ok()) << r.error().message();
    return out;
}

// tiny-llama W4 g64 GPTQ with its lm_head quantized too (--quantize-lm-head: the tied head's own
// GPTQ copy, GPTQModel's layout), plain or act-order, made once per tag.
inline std::string tiny_llama_lm_head_checkpoint(const std::string& tag, bool desc_act) {
    static temp_dir   dir("cuda-tiny-head");
    const std::string out = dir.file(tag);
    if (std::filesystem::exists(out)) return out;
    quantize_params p;
    p.model_path       = cuda_source_dir() + "/models/tiny-llama";
    p.output_path      = out;
    p.bits             = 4;
    p.group_size       = 64;
    p.desc_act         = desc_act;
    p.method           = "gptq";
    p.quantize_lm_head = true;
    p.calib            = cuda_source_dir() + "/data/calib/corpus-sample.txt";
    p.nsamples         = 4;
    p.seqlen           = 64;
    p.n_threads        = 2;
    auto r             = quantize_model(p);
    EXPECT_TRUE(r.is_ok()) << r.error().message();
    return out;
}

}  // namespace gptq::test
