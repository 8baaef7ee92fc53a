// Shared pieces of the end-to-end quantization tests (test_quantize*, tiny models).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>

#include "gptq/ppl.h"
#include "gptq/quantize.h"

namespace gptq::test {

// A quantize run of `model` into `out` on a little calibration: 8 windows of 128 tokens, 2 of 32 in
// the ASan/UBSan build (the same code on less data), 2 threads.
inline quantize_params small_quantize_params(const std::string& model, const std::string& out) {
    quantize_params p;
    p.model_path  = model;
    p.output_path = out;
#ifdef GPTQ_SANITIZE
    p.nsamples = 2;
    p.seqlen   = 32;
#else
    p.nsamples = 8;
    p.seqlen   = 128;
#endif
    p.n_threads = 2;
    return p;
}

// WikiText-2 perplexity of `model` over its first `windows` windows of `seqlen` tokens (2 threads);
// a failed run fails the test and gives 0.
inline double ppl_of(const std::string& model, int64_t seqlen = 512, int64_t windows = 6) {
    ppl_params p;
    p.model_path  = model;
    p.seqlen      = seqlen;
    p.max_windows = windows;
    p.progress    = false;
    p.n_threads   = 2;
    auto res      = ppl_run(p);
    EXPECT_TRUE(res.is_ok()) << model << ": " << res.error().message();
    return res.is_ok() ? res->ppl : 0.0;
}

}  // namespace gptq::test
