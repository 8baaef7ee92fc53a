// LoRA adapters on the GPU (docs/lora.md) against the CPU reference (model/lora.h lora_forward,
// F32): the add kernel (kernels/cuda/lora.cu) alone with per-row adapters, then the CUDA
// model_session with two adapters: evaluate, prefill + graph decode steps, and ragged steps whose
// sequences sit at different positions with different adapters (and none), on the FP16 tiny-llama
// and an act-order GPTQ checkpoint of it (the int4 kernel: the base stays quantized).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda_model_util.h"
#include "cuda_test_util.h"
#include "engine/lora_load.h"
#include "engine/model_session.h"
#include "golden.h"
#include "mixed_check.h"
#include "model/lora.h"
#include "ops/ops_cuda.h"
#include "test_util.h"

using namespace gptq;
using namespace gptq::test;

namespace {

// The add kernel alone: F16 inputs and one F16 rounding of y.
constexpr double k_kernel_rel_tol = 2e-3;

lora_module random_module(std::mt19937& rng, int64_t r, int64_t n_in, int64_t n_out, float scale) {
    std::normal_distribution<float> d(0.0f, 0.05f);
    lora_module                     m;
    m.r     = r;
    m.scale = scale;
    m.a.resize(size_t(r * n_in));
    m.b.resize(size_t(n_out * r));
    for (auto& v : m.a) v = d(rng);
    for (auto& v : m.b) v = d(rng);
    return m;
}

TEST(lora_cuda, add_kernel_matches_cpu_per_row_adapters) {
    GPTQ_SKIP_WITHOUT_GPU();
    std::mt19937      rng(21);
    const int64_t     n_rows = 5, n_in = 320, n_out = 600;  // n_out not a multiple of the 256-column blocks
    const lora_module m0 = random_module(rng, 8, n_in, n_out, 2.0f), m1 = random_module(rng, 3, n_in, n_out, 0.5f);
    const std::vector<int32_t> rows = {0, -1, 1, 1, 0};
    const auto                 x16  = random_f16(rng, size_t(n_rows * n_in));
    const auto                 y16  = random_f16(rng, size_t(n_rows * n_out));
    // CPU reference in F32 on the F16 values.
    std::vector<float> x = to_f32(x16), want = to_f32(y16);
    const ops_context  ctx{};
    for (int64_t i = 0; i < n_rows; ++i)
        if (rows[size_t(i)] >= 0)
            lora_forward(ctx, rows[size_t(i)] == 0 ? m0 : m1, x.data() + i * n_in, want.data() + i * n_out, 1, n_in,
                         n_out);
    auto c = cuda_context::create(0);
    ASSERT_TRUE(c.is_ok()) << c.error().message();
    auto up = [](const void* p, size_t bytes) {
        auto b = cuda_buffer::from_host(p, bytes);
        EXPECT_TRUE(b.is_ok());
        return std::move(*b);
    };
    cuda_buffer                 a0 = up(m0.a.data(), m0.a.size() * 4), b0 = up(m0.b.data(), m0.b.size() * 4);
    cuda_buffer                 a1 = up(m1.a.data(), m1.a.size() * 4), b1 = up(m1.b.data(), m1.b.size() * 4);
    std::vector<cuda_lora_slot> slots  = {{a0.as<float>(), b0.as<float>(), 8, 2.0f},
                                          {a1.as<float>(), b1.as<float>(), 3, 0.5f}};
    cuda_buffer                 dslots = up(slots.data(), slots.size() * sizeof(cuda_lora_slot));
    cuda_buffer                 drows = up(rows.data(), rows.size() * 4), dx = up(x16.data(), x16.size() * 2);
    cuda_buffer                 dy = up(y16.data(), y16.size() * 2);
    GPTQ_EXPECT_OK(op_cuda_lora_add(**c, dx.as<uint16_t>(), dy.as<uint16_t>(), n_rows, n_in, n_out, drows.as<int32_t>(),
                                    dslots.as<cuda_lora_slot>(), 8));
    GPTQ_EXPECT_OK((*c)->synchronize());
    std::vector<uint16_t> got16(y16.size());
    GPTQ_EXPECT_OK(dy.download(got16.data(), got16.size() * 2));
    const std::vector<float> got = to_f32(got16);
    for (int64_t i = 0; i < n_rows; ++i)
        EXPECT_LE(row_rel_error(got.data() + i * n_out, want.data() + i * n_out, n_out), k_kernel_rel_tol)
            << "row " << i << " adapter " << rows[size_t(i)];
    // Row 1 (no adapter) is untouched bit for bit.
    EXPECT_TRUE(std::equal(got16.begin() + n_out, got16.begin() + 2 * n_out, y16.begin() + n_out));
}

// The F16 bound of test_llama_cuda (GPU F16 weights and activations vs CPU F32).
constexpr double k_f16_logits_rel_tol = 3e-2;

std::unique_ptr<model_session> open(const std::string& model, const std::string& device) {
    model_session_options o;
    o.model_path = model;
    auto d       = device_parse(device);
    EXPECT_TRUE(d.is_ok());
    o.device              = *d;
    o.n_threads           = 2;
    o.n_ctx_hint          = 128;
    const std::string dir = cuda_source_dir() + "/tests/data/lora/";
    o.loras               = {{dir + "adapter-a", 1.0}, {dir + "adapter-b", 1.0}};
    o.lora_stack          = false;  // adapter 0 = a, 1 = b, chosen per sequence
    auto s                = model_session_open(o);
    EXPECT_TRUE(s.is_ok()) << s.error().message();
    return s.is_ok() ? std::move(*s) : nullptr;
}

// The same steps on both sessions; each row GPU vs CPU. Returns the worst relative error.
double steps_compare(model_session& gpu, model_session& cpu, std::span<const seq_step> steps, const char* what) {
    const int64_t      V = gpu.n_vocab();
    std::vector<float> g(steps.size() * size_t(V)), c(steps.size() * size_t(V));
    const status       sg = gpu.step(steps, g.data()), sc = cpu.step(steps, c.data());
    EXPECT_TRUE(sg.is_ok()) << what << ": " << sg.message();
    EXPECT_TRUE(sc.is_ok()) << what << ": " << sc.message();
    if (!sg.is_ok() || !sc.is_ok()) return 1.0;
    double worst = 0;
    for (size_t r = 0; r < steps.size(); ++r) {
        const double e = row_rel_error(g.data() + r * size_t(V), c.data() + r * size_t(V), V);
        worst          = std::max(worst, e);
        EXPECT_LE(e, k_f16_logits_rel_tol)
            << what << " row " << r << " (slot " << steps[r].seq << ", adapter " << steps[r].lora << ")";
    }
    return worst;
}

void check_model(const std::string& model) {
    auto gpu = open(model, "cuda"), cpu = open(model, "cpu");
    ASSERT_TRUE(gpu && cpu);
    ASSERT_EQ(gpu->lora_names(), cpu->lora_names());
    const int64_t              V = gpu->n_vocab(), n = 24;
    const std::vector<int32_t> ids = cuda_test_ids(n, V);
    // evaluate with adapter 0: every row.
    std::vector<float> g(size_t(n * V)), c(size_t(n * V)), base(size_t(n * V));
    GPTQ_EXPECT_OK(gpu->evaluate(ids.data(), n, g.data(), 0));
    GPTQ_EXPECT_OK(cpu->evaluate(ids.data(), n, c.data(), 0));
    double worst = 0;
    for (int64_t t = 0; t < n; ++t) {
        const double e = row_rel_error(g.data() + t * V, c.data() + t * V, V);
        worst          = std::max(worst, e);
        EXPECT_LE(e, k_f16_logits_rel_tol) << model << " evaluate row " << t;
    }
    // The adapter matters here: the CPU without it is far from the CPU with it.
    GPTQ_EXPECT_OK(cpu->evaluate(ids.data(), n, base.data(), -1));
    EXPECT_GT(row_rel_error(base.data() + (n - 1) * V, c.data() + (n - 1) * V, V), 3 * k_f16_logits_rel_tol);

    // Ragged: three slots, prompts of different lengths, adapters 0, 1 and none; then decode steps
    // (graphs from the second on) with subsets and a slot reused with another adapter.
    for (model_session* s : {gpu.get(), cpu.get()}) GPTQ_EXPECT_OK(s->reserve(3, 64));
    std::vector<seq_step> pre = {{.seq = 0, .ids = ids.data(), .n_tokens = 8, .lora = 0},
                                 {.seq = 1, .ids = ids.data() + 8, .n_tokens = 5, .lora = 1},
                                 {.seq = 2, .ids = ids.data() + 13, .n_tokens = 3, .lora = -1}};
    worst                     = std::max(worst, steps_compare(*gpu, *cpu, pre, "prefill"));
    for (int t = 0; t < 6; ++t) {
        std::vector<seq_step> dec = {{.seq = 0, .ids = ids.data() + 16 + t, .n_tokens = 1, .lora = 0},
                                     {.seq = 1, .ids = ids.data() + 17 + t, .n_tokens = 1, .lora = 1},
                                     {.seq = 2, .ids = ids.data() + 10 + t, .n_tokens = 1, .lora = -1}};
        if (t == 3) dec.erase(dec.begin());  // a subset
        worst = std::max(worst, steps_compare(*gpu, *cpu, dec, "decode"));
    }
    for (model_session* s : {gpu.get(), cpu.get()}) s->seq_reset(2);
    std::vector<seq_step> again = {{.seq = 2, .ids = ids.data() + 3, .n_tokens = 4, .lora = 1},
                                   {.seq = 0, .ids = ids.data() + 5, .n_tokens = 1, .lora = 0}};
    worst                       = std::max(worst, steps_compare(*gpu, *cpu, again, "reused slot"));
    for (int t = 0; t < 3; ++t) {
        std::vector<seq_step> dec = {{.seq = 2, .ids = ids.data() + t, .n_tokens = 1, .lora = 1},
                                     {.seq = 1, .ids = ids.data() + 2 + t, .n_tokens = 1, .lora = 1},
                                     {.seq = 0, .ids = ids.data() + 4 + t, .n_tokens = 1, .lora = 0}};
        worst                     = std::max(worst, steps_compare(*gpu, *cpu, dec, "decode after reuse"));
    }
    // A mixed step (one pass on the GPU): a chunk with adapter 0 beside decode tokens with adapter 1.
    std::vector<seq_step> mixed = {{.seq = 1, .ids = ids.data() + 9, .n_tokens = 1, .lora = 1},
                                   {.seq = 0, .ids = ids.data() + 11, .n_tokens = 6, .lora = 0},
                                   {.seq = 2, .ids = ids.data() + 1, .n_tokens = 1, .lora = 1}};
    worst                       = std::max(worst, steps_compare(*gpu, *cpu, mixed, "mixed"));
    std::printf("[ lora gpu ] %s: max rel error vs the CPU %.3g\n", model.c_str(), worst);
}

TEST(lora_cuda, fp16_model_matches_cpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    check_model(cuda_source_dir() + "/models/tiny-llama");
}

TEST(lora_cuda, gptq_act_order_model_matches_cpu) {
    GPTQ_SKIP_WITHOUT_GPU();
    check_model(tiny_llama_gptq_checkpoint("w4g64-act", 4, 64, true, true, "gptq"));
}

// Mixed passes with two adapters on different sequences (and slots without one): every row
// against the separate passes (tests/cuda/mixed_check.h), the rows' adapters read per token.
void check_mixed(const std::string& model) {
    auto host = llama_model::open(model);
    ASSERT_TRUE(host.is_ok()) << host.error().message();
    const std::string dir = cuda_source_dir() + "/tests/data/lora/";
    auto              ad  = lora_adapters_open({{dir + "adapter-a", 1.0}, {dir + "adapter-b", 1.0}}, (*host)->hparams(),
                                               /*stack=*/false);
    ASSERT_TRUE(ad.is_ok()) << ad.error().message();
    llama_cuda_options o;
    o.n_ctx     = 64;
    o.page_size = 8;
    o.loras     = *ad;
    check_mixed_steps(model, o, {0, 1, -1, 1});  // slot 2 (reset and reused mid-plan) without one
    check_mixed_steps(model, o, {1, -1, 0, 0});
}

TEST(lora_cuda, mixed_steps_match_separate_passes) {
    GPTQ_SKIP_WITHOUT_GPU();
    check_mixed(cuda_source_dir() + "/models/tiny-llama");
    check_mixed(tiny_llama_gptq_checkpoint("w4g64-act", 4, 64, true, true, "gptq"));
}

TEST(lora_cuda, unknown_adapter_index_is_an_error) {
    GPTQ_SKIP_WITHOUT_GPU();
    auto gpu = open(cuda_source_dir() + "/models/tiny-llama", "cuda");
    ASSERT_TRUE(gpu);
    GPTQ_EXPECT_OK(gpu->reserve(1, 16));
    const int32_t      id = 1;
    std::vector<float> l(size_t(gpu->n_vocab()));
    seq_step           s{.seq = 0, .ids = &id, .n_tokens = 1, .lora = 2};
    const status       st = gpu->step({&s, 1}, l.data());
    ASSERT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("LoRA adapter 2"), std::string::npos) << st.message();
    EXPECT_EQ(gpu->seq_pos(0), 0);
}

}  // namespace
