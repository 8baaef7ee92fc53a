// LoRA adapters on the GPU (docs/lora.md) against the CPU reference (model/lora.h lora_forward,
// F32): the add kernel alone with per-row adapters, then the CUDA model_session with adapters
// (prefill, graph decode steps, a lockstep batch whose sequences use different adapters) on the
// FP16 tiny-llama and on an act-order GPTQ checkpoint of it (the int4 kernel, base stays quantized).
// The GPU path is gated (GPTQ_GPU_UNVALIDATED=1) until this test has passed on a device; it sets it.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "cuda_model_util.h"
#include "cuda_test_util.h"
#include "engine/model_session.h"
#include "golden.h"
#include "model/lora.h"
#include "ops/ops_cuda.h"
#include "test_util.h"

using namespace gptq;
using namespace gptq::test;

namespace {

// The F16 bound of test_llama_cuda (GPU F16 weights and activations vs CPU F32).
constexpr double k_f16_logits_rel_tol = 3e-2;
// The add kernel alone: F16 inputs and one F16 rounding of y.
constexpr double k_kernel_rel_tol = 2e-3;

void unvalidated_on() {
    setenv("GPTQ_GPU_UNVALIDATED", "1", 1);
}

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

std::unique_ptr<model_session> open(const std::string& model, const std::string& device, bool stack) {
    model_session_options o;
    o.model_path = model;
    auto d       = device_parse(device);
    EXPECT_TRUE(d.is_ok());
    o.device              = *d;
    o.n_threads           = 2;
    o.n_ctx_hint          = 128;
    const std::string dir = cuda_source_dir() + "/tests/data/lora/";
    o.loras               = {{dir + "adapter-a", 1.0}, {dir + "adapter-b", 1.0}};
    o.lora_stack          = stack;
    auto s                = model_session_open(o);
    EXPECT_TRUE(s.is_ok()) << s.error().message();
    return s.is_ok() ? std::move(*s) : nullptr;
}

// Prefill (every row's logits) and 6 decode steps (the graph after the first) with adapter 0, then
// a lockstep batch of two slots: slot 0 with adapter 1, slot 1 with none; GPU against CPU.
void check_model(const std::string& model) {
    unvalidated_on();
    auto gpu = open(model, "cuda", /*stack=*/false), cpu = open(model, "cpu", /*stack=*/false);
    ASSERT_TRUE(gpu && cpu);
    ASSERT_EQ(gpu->lora_names(), cpu->lora_names());
    const int64_t              V = gpu->n_vocab(), n = 24;
    const std::vector<int32_t> ids = cuda_test_ids(n, V);
    std::vector<float>         g(size_t(n * V)), c(size_t(n * V));
    GPTQ_EXPECT_OK(gpu->evaluate(ids.data(), n, g.data(), 0));
    GPTQ_EXPECT_OK(cpu->evaluate(ids.data(), n, c.data(), 0));
    double worst = 0;
    for (int64_t t = 0; t < n; ++t) {
        const double e = row_rel_error(g.data() + t * V, c.data() + t * V, V);
        worst          = std::max(worst, e);
        EXPECT_LE(e, k_f16_logits_rel_tol) << model << " prefill row " << t;
    }
    // The adapter matters here: the CPU without it is far from the CPU with it.
    std::vector<float> base(size_t(n * V));
    GPTQ_EXPECT_OK(cpu->evaluate(ids.data(), n, base.data(), -1));
    EXPECT_GT(row_rel_error(base.data() + (n - 1) * V, c.data() + (n - 1) * V, V), 3 * k_f16_logits_rel_tol);

    for (model_session* s : {gpu.get(), cpu.get()}) GPTQ_EXPECT_OK(s->reserve(2, 64));
    std::vector<float> gl(size_t(2 * V)), cl(size_t(2 * V));
    seq_step           one{.seq = 0, .ids = ids.data(), .n_tokens = 8, .lora = 0};
    GPTQ_EXPECT_OK(gpu->step({&one, 1}, gl.data()));
    GPTQ_EXPECT_OK(cpu->step({&one, 1}, cl.data()));
    for (int64_t t = 0; t < 6; ++t) {  // decode: the CUDA graph from the second step on
        seq_step d{.seq = 0, .ids = ids.data() + 8 + t, .n_tokens = 1, .lora = 0};
        GPTQ_EXPECT_OK(gpu->step({&d, 1}, gl.data()));
        GPTQ_EXPECT_OK(cpu->step({&d, 1}, cl.data()));
        const double e = row_rel_error(gl.data(), cl.data(), V);
        worst          = std::max(worst, e);
        EXPECT_LE(e, k_f16_logits_rel_tol) << model << " decode step " << t;
    }
    for (model_session* s : {gpu.get(), cpu.get()}) GPTQ_EXPECT_OK(s->reserve(2, 64));
    std::vector<seq_step> batch = {{.seq = 0, .ids = ids.data(), .n_tokens = 6, .lora = 1},
                                   {.seq = 1, .ids = ids.data() + 6, .n_tokens = 6, .lora = -1}};
    GPTQ_EXPECT_OK(gpu->step(batch, gl.data()));
    GPTQ_EXPECT_OK(cpu->step(batch, cl.data()));
    for (int i = 0; i < 4; ++i) {  // lockstep decode, adapters per sequence (graph for 2 rows)
        std::vector<seq_step> dec = {{.seq = 0, .ids = ids.data() + 12 + i, .n_tokens = 1, .lora = 1},
                                     {.seq = 1, .ids = ids.data() + 16 + i, .n_tokens = 1, .lora = -1}};
        GPTQ_EXPECT_OK(gpu->step(dec, gl.data()));
        GPTQ_EXPECT_OK(cpu->step(dec, cl.data()));
        for (int r = 0; r < 2; ++r) {
            const double e = row_rel_error(gl.data() + r * V, cl.data() + r * V, V);
            worst          = std::max(worst, e);
            EXPECT_LE(e, k_f16_logits_rel_tol) << model << " lockstep step " << i << " slot " << r;
        }
    }
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

TEST(lora_cuda, refused_without_the_unvalidated_switch) {
    GPTQ_SKIP_WITHOUT_GPU();
    unsetenv("GPTQ_GPU_UNVALIDATED");
    model_session_options o;
    o.model_path = cuda_source_dir() + "/models/tiny-llama";
    o.device     = {.cuda = true, .index = 0};
    o.loras      = {{cuda_source_dir() + "/tests/data/lora/adapter-a", 1.0}};
    auto s       = model_session_open(o);
    ASSERT_FALSE(s.is_ok());
    EXPECT_NE(s.error().message().find("GPTQ_GPU_UNVALIDATED"), std::string::npos) << s.error().message();
}

}  // namespace
