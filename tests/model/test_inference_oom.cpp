// Out of memory during inference (docs/reliability.md): `gptq ppl` and generation estimate what
// they will hold, refuse up front with both figures when the machine (or GPTQ_MEMORY_LIMIT_BYTES)
// has less, and the CLI exits 1 with that message instead of being killed half way.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <string>
#include <vector>

#include "gptq/generate.h"
#include "gptq/ppl.h"
#include "io/tensor_source.h"
#include "model/llama.h"
#include "test_util.h"

using namespace gptq;

namespace {

std::string tiny() {
    return test::source_path("models/tiny-llama");
}

bool contains(const std::string& s, const std::string& sub) {
    return s.find(sub) != std::string::npos;
}

struct memory_limit {  // GPTQ_MEMORY_LIMIT_BYTES for the scope
    explicit memory_limit(const char* bytes) { setenv("GPTQ_MEMORY_LIMIT_BYTES", bytes, 1); }
    ~memory_limit() { unsetenv("GPTQ_MEMORY_LIMIT_BYTES"); }
};

TEST(inference_oom, resident_bytes_of_a_dense_model_is_its_f32_size) {
    // tiny-llama ties lm_head to the embeddings, so every tensor of the file is held once in F32.
    auto model = llama_model::open(tiny());
    ASSERT_TRUE(model.is_ok()) << model.error().message();
    auto src = tensor_source::open(tiny());
    ASSERT_TRUE(src.is_ok());
    EXPECT_EQ((*model)->resident_bytes(), 4 * (*src)->total_params());
}

TEST(inference_oom, ppl_refuses_with_needed_and_available_before_loading) {
    ppl_params p;
    p.model_path  = tiny();
    p.seqlen      = 64;
    p.max_windows = 1;
    p.n_threads   = 1;
    p.progress    = false;
    {
        memory_limit lim("4096");
        auto         r = ppl_run(p);
        ASSERT_FALSE(r.is_ok());
        EXPECT_EQ(r.error().code(), status_code::STATUS_OUT_OF_MEMORY);
        const std::string& msg = r.error().message();
        EXPECT_TRUE(contains(msg, "needs about ") && contains(msg, "weights ") && contains(msg, "activations ")) << msg;
        EXPECT_TRUE(contains(msg, "only 4.00 KiB is available (GPTQ_MEMORY_LIMIT_BYTES)")) << msg;
        EXPECT_TRUE(contains(msg, tiny())) << msg;
    }
    auto ok = ppl_run(p);  // and without the limit it runs
    ASSERT_TRUE(ok.is_ok()) << ok.error().message();
    EXPECT_TRUE(std::isfinite(ok->ppl));

    auto cli = test::run_command("GPTQ_MEMORY_LIMIT_BYTES=4096 " + test::gptq_binary() + " ppl " + tiny() +
                                 " --seqlen 64 --max-windows 1");
    EXPECT_EQ(cli.exit_code, 1);
    EXPECT_TRUE(contains(cli.err, "needs about") && contains(cli.err, "available")) << cli.err;
}

TEST(inference_oom, generation_checks_the_model_at_open_and_the_kv_cache_per_call) {
    generator_options o;
    o.model_path = tiny();
    o.n_threads  = 1;
    {
        memory_limit lim("4096");
        auto         g = generator::open(o);
        ASSERT_FALSE(g.is_ok());
        EXPECT_EQ(g.error().code(), status_code::STATUS_OUT_OF_MEMORY);
        EXPECT_TRUE(contains(g.error().message(), "loading " + tiny())) << g.error().message();
    }
    auto g = generator::open(o);
    ASSERT_TRUE(g.is_ok()) << g.error().message();
    generate_params gp;
    gp.max_new_tokens = 1000000;  // cut to the context: 16 sequences x 2048 positions x 4 layers x
                                  // kv_dim 128 x 2 x 2 bytes (F16 K, V) = 64 MiB of KV cache, beyond 32 MiB
    {
        memory_limit lim("33554432");
        auto         r = (*g)->generate_batch(std::vector<std::string>(16, "Hello"), gp);
        ASSERT_FALSE(r.is_ok());
        EXPECT_EQ(r.error().code(), status_code::STATUS_OUT_OF_MEMORY);
        EXPECT_TRUE(contains(r.error().message(), "KV cache") && contains(r.error().message(), "32.00 MiB"))
            << r.error().message();
    }
    gp.max_new_tokens = 4;
    gp.ignore_eos     = true;
    auto r            = (*g)->generate("Hello", gp);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_EQ(r->tokens.size(), 4u);
}

}  // namespace
