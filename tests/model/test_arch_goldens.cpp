// The architecture families (io/arch.h) against transformers: small seeded random-weight models
// built with transformers' own classes (scripts/make_arch_goldens.py, tests/data/arch/<name>/).
// Per model: logits of fixed sequences (F32, 1e-3 relative per row), the greedy continuation
// through the KV cache (token for token), the perplexity of a fixed sequence, and the
// transformers 4 dialect of its config.json parsed to the same hparams.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "golden.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/tensor_source.h"
#include "model/llama.h"
#include "model/perplexity.h"
#include "test_util.h"

using namespace gptq;

namespace {

// Logits vs transformers (F32 compute both sides): the bound; summation order gives ~1e-6.
constexpr double k_logit_rel_tol = 1e-3;
// ppl from those logits: exp of a mean of ~100 log-softmax values, each off by ~1e-6 relative.
constexpr double k_ppl_rel_tol = 1e-4;

const std::string k_arch = std::string(GPTQ_SOURCE_DIR) + "/tests/data/arch/";
const std::string k_moe  = std::string(GPTQ_SOURCE_DIR) + "/tests/data/moe/";  // scripts/make_moe_goldens.py

ops_context ctx() {
    static thread_pool pool(2);
    return ops_context{&pool, false};
}

int32_t argmax(const float* x, int64_t n) {
    return static_cast<int32_t>(std::max_element(x, x + n) - x);
}

// Two golden sequences prefilled together in one ragged batch through the KV cache, then decoded
// greedily one token each per step: the tokens each sequence picks over `steps` steps.
std::pair<std::vector<int32_t>, std::vector<int32_t>> batch_greedy(llama_model& m, const test::golden_seq& a,
                                                                   const test::golden_seq& b, int64_t n_ctx,
                                                                   size_t steps) {
    const llama_hparams& hp = m.hparams();
    kv_cache             ca = kv_cache::create(hp, n_ctx), cb = kv_cache::create(hp, n_ctx);
    std::vector<int32_t> ids(a.ids);
    ids.insert(ids.end(), b.ids.begin(), b.ids.end());
    int64_t              n[2]      = {static_cast<int64_t>(a.ids.size()), static_cast<int64_t>(b.ids.size())};
    kv_cache*            caches[2] = {&ca, &cb};
    std::vector<float>   logits(static_cast<size_t>(2 * hp.n_vocab));
    std::vector<int32_t> got_a, got_b;
    for (size_t t = 0; t < steps; ++t) {
        const status st = m.forward_batch(ctx(), ids.data(), n, 2, caches, logits.data());
        EXPECT_TRUE(st.is_ok()) << st.message();
        if (!st.is_ok()) break;
        got_a.push_back(argmax(logits.data(), hp.n_vocab));
        got_b.push_back(argmax(logits.data() + hp.n_vocab, hp.n_vocab));
        ids  = {got_a.back(), got_b.back()};
        n[0] = n[1] = 1;
    }
    return {got_a, got_b};
}

std::vector<int32_t> first(const std::vector<int32_t>& v, size_t n) {
    return std::vector<int32_t>(v.begin(), v.begin() + static_cast<int64_t>(n));
}

void check_family(const std::string& name, const std::string& root = k_arch) {
    const std::string dir = root + name;
    auto              m   = llama_model::open(dir, {.strict = true});
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    const llama_hparams& hp = (*m)->hparams();
    const auto           g  = test::golden_load_file(dir + "/golden.safetensors");
    ASSERT_FALSE(g.seqs.empty());
    double worst = 0;
    for (const auto& s : g.seqs) {
        const int64_t      n = static_cast<int64_t>(s.ids.size());
        std::vector<float> logits(static_cast<size_t>(n * hp.n_vocab));
        ASSERT_TRUE((*m)->forward(ctx(), s.ids.data(), n, nullptr, logits.data()).is_ok());
        for (size_t r = 0; r < s.positions.size(); ++r) {
            const double e = test::row_rel_error(logits.data() + s.positions[r] * hp.n_vocab,
                                                 s.logits.data() + static_cast<int64_t>(r) * hp.n_vocab, hp.n_vocab);
            worst          = std::max(worst, e);
            EXPECT_LE(e, k_logit_rel_tol) << name << ": seq of " << n << " tokens, position " << s.positions[r];
        }
        // Greedy: prefill, then one token at a time through the cache (as transformers' generate).
        ASSERT_FALSE(s.greedy.empty()) << name;
        const int64_t        n_new = static_cast<int64_t>(s.greedy.size());
        kv_cache             cache = kv_cache::create(hp, n + n_new);
        std::vector<int32_t> got;
        ASSERT_TRUE((*m)->forward(ctx(), s.ids.data(), n, &cache, logits.data()).is_ok());
        int32_t next = argmax(logits.data() + (n - 1) * hp.n_vocab, hp.n_vocab);
        for (int64_t t = 0; t < n_new; ++t) {
            got.push_back(next);
            if (t + 1 == n_new) break;
            ASSERT_TRUE((*m)->forward(ctx(), &next, 1, &cache, logits.data()).is_ok());
            next = argmax(logits.data(), hp.n_vocab);
        }
        EXPECT_EQ(got, s.greedy) << name << ": greedy continuation of the " << n << "-token sequence";
    }
    ASSERT_FALSE(g.ppl_ids.empty());
    const int64_t n_ppl = static_cast<int64_t>(g.ppl_ids.size());
    auto          p     = perplexity_evaluate(**m, ctx(), g.ppl_ids, n_ppl, 1);
    ASSERT_TRUE(p.is_ok()) << p.error().message();
    EXPECT_NEAR(p->ppl(), g.ppl, k_ppl_rel_tol * g.ppl) << name;
    std::printf("[ arch     ] %s: max rel error logits %.3g, ppl %.6f (transformers %.6f)\n", name.c_str(), worst,
                p->ppl(), g.ppl);
}

// config.v4.json (the transformers 4 spelling of the same config) gives the same hparams.
void check_v4_dialect(const std::string& name, const std::string& root = k_arch) {
    auto c5 = model_config_load(root + name + "/config.json");
    auto c4 = model_config_load(root + name + "/config.v4.json");
    ASSERT_TRUE(c5.is_ok()) << c5.error().message();
    ASSERT_TRUE(c4.is_ok()) << c4.error().message();
    auto h5 = llama_hparams_from_config(*c5);
    auto h4 = llama_hparams_from_config(*c4);
    ASSERT_TRUE(h5.is_ok()) << h5.error().message();
    ASSERT_TRUE(h4.is_ok()) << h4.error().message();
    EXPECT_EQ(h4->arch, h5->arch);
    EXPECT_EQ(h4->head_dim, h5->head_dim);
    EXPECT_EQ(h4->n_head_kv, h5->n_head_kv);
    EXPECT_EQ(h4->window, h5->window);
    EXPECT_EQ(h4->tie_embeddings, h5->tie_embeddings);
    EXPECT_EQ(h4->rope.type, h5->rope.type);
    EXPECT_EQ(h4->rope.theta, h5->rope.theta);
    EXPECT_EQ(h4->rope.short_factor, h5->rope.short_factor);
    EXPECT_EQ(h4->rope.long_factor, h5->rope.long_factor);
    EXPECT_EQ(h4->rope.attention_factor, h5->rope.attention_factor);
    EXPECT_EQ(h4->rope.original_max_position_embeddings, h5->rope.original_max_position_embeddings);
    EXPECT_EQ(h4->qk_norm, h5->qk_norm);
    EXPECT_EQ(h4->fused_qkv, h5->fused_qkv);
    EXPECT_EQ(c4->dtype_name, c5->dtype_name);
    // Gemma's options (defaults elsewhere).
    EXPECT_EQ(h4->act, h5->act);
    EXPECT_EQ(h4->norm_plus_one, h5->norm_plus_one);
    EXPECT_EQ(h4->attn_out_norm, h5->attn_out_norm);
    EXPECT_EQ(h4->mlp_out_norm, h5->mlp_out_norm);
    EXPECT_EQ(h4->embed_scale, h5->embed_scale);
    EXPECT_EQ(h4->attn_scale, h5->attn_scale);
    EXPECT_EQ(h4->attn_softcap, h5->attn_softcap);
    EXPECT_EQ(h4->final_softcap, h5->final_softcap);
    EXPECT_EQ(h4->rope.factor, h5->rope.factor);
    EXPECT_EQ(h4->rope_local_differs, h5->rope_local_differs);
    EXPECT_EQ(h4->rope_local.type, h5->rope_local.type);
    EXPECT_EQ(h4->rope_local.theta, h5->rope_local.theta);
}

}  // namespace

TEST(arch_goldens, qwen3) {
    check_family("qwen3");
}
TEST(arch_goldens, mistral_nemo_head_dim) {
    check_family("mistral-nemo");
}
TEST(arch_goldens, phi3_fused) {
    check_family("phi3");
}
TEST(arch_goldens, phi3_longrope) {
    check_family("phi3-longrope");
}

TEST(arch_goldens, gemma2) {
    check_family("gemma2");
}
TEST(arch_goldens, gemma3_text) {
    check_family("gemma3");
}

TEST(arch_config, transformers4_dialect_same_hparams) {
    for (const char* name : {"qwen3", "mistral-nemo", "phi3", "phi3-longrope", "gemma2", "gemma3"}) {
        SCOPED_TRACE(name);
        check_v4_dialect(name);
    }
    for (const char* name : {"mixtral", "qwen2-moe", "qwen3-moe"}) {
        SCOPED_TRACE(name);
        check_v4_dialect(name, k_moe);
    }
}

// Mixture of experts (scripts/make_moe_goldens.py): Mixtral top-2 renormalised; Qwen2-MoE with the
// shared expert, q/k/v biases and a dense layer (mlp_only_layers); Qwen3-MoE with q/k norms, top-4
// renormalised and every other layer sparse.
TEST(moe_goldens, mixtral) {
    check_family("mixtral", k_moe);
}
TEST(moe_goldens, qwen2_moe_shared_expert) {
    check_family("qwen2-moe", k_moe);
}
TEST(moe_goldens, qwen3_moe) {
    check_family("qwen3-moe", k_moe);
}

// The MoE keys of each fixture's config (both dialects: check_v4_dialect compares the rest).
TEST(moe_config, hparams_of_each_family) {
    struct want {
        const char*       name;
        int64_t           n_expert, k, ff_expert, ff_shared;
        bool              renorm;
        std::vector<bool> moe_layer;
    };
    const want wants[] = {{"mixtral", 8, 2, 64, 0, true, {true, true}},
                          {"qwen2-moe", 8, 2, 32, 96, false, {true, false, true}},
                          {"qwen3-moe", 8, 4, 32, 0, true, {false, true, false}}};
    for (const want& w : wants)
        for (const char* file : {"/config.json", "/config.v4.json"}) {
            SCOPED_TRACE(std::string(w.name) + file);
            auto c = model_config_load(k_moe + w.name + file);
            ASSERT_TRUE(c.is_ok()) << c.error().message();
            auto h = llama_hparams_from_config(*c);
            ASSERT_TRUE(h.is_ok()) << h.error().message();
            EXPECT_EQ(h->n_expert, w.n_expert);
            EXPECT_EQ(h->n_expert_used, w.k);
            EXPECT_EQ(h->n_ff_expert, w.ff_expert);
            EXPECT_EQ(h->n_ff_shared, w.ff_shared);
            EXPECT_EQ(h->moe_renorm, w.renorm);
            EXPECT_EQ(h->moe_layer, w.moe_layer);
            EXPECT_EQ(h->options_beyond_gpu(), "");  // the GPU runtime runs the sparse block
        }
}

// Bad MoE keys are errors naming the key and value.
TEST(moe_config, bad_values_named) {
    auto base = json_read_file(k_moe + "qwen3-moe/config.json");
    ASSERT_TRUE(base.is_ok());
    auto expect_error = [&](const char* key, json v, const char* needle) {
        json j = *base;
        if (v.is_null())
            j.erase(key);
        else
            j[key] = v;
        auto c = model_config_parse(j, "cfg.json");
        ASSERT_FALSE(c.is_ok()) << key;
        EXPECT_NE(c.error().message().find(needle), std::string::npos) << c.error().message();
    };
    expect_error("num_experts_per_tok", 9, "num_experts_per_tok is 9");
    expect_error("num_experts_per_tok", 0, "num_experts_per_tok is 0");
    expect_error("num_local_experts", 0, "num_local_experts is 0");
    expect_error("moe_intermediate_size", -4, "moe_intermediate_size is -4");
    expect_error("moe_intermediate_size", nullptr, "moe_intermediate_size");
    expect_error("decoder_sparse_step", 0, "decoder_sparse_step is 0");
    expect_error("mlp_only_layers", "1", "mlp_only_layers");
}

// The GPU runs the MoE block (llama_cuda_moe.h: the runtime and the calibration runner): the GPU
// check passes these models.
TEST(moe_config, gpu_runs_moe) {
    for (const char* name : {"mixtral", "qwen2-moe", "qwen3-moe"}) {
        auto c = model_config_load(k_moe + name);
        ASSERT_TRUE(c.is_ok()) << c.error().message();
        auto h = llama_hparams_from_config(*c);
        ASSERT_TRUE(h.is_ok()) << h.error().message();
        EXPECT_TRUE(llama_gpu_options_check(*h, "gptq generate --device cuda").is_ok()) << name;
    }
}

// A checkpoint with the experts stacked (transformers 5's in-memory experts.gate_up_proj /
// down_proj) is refused naming that layout, not read wrongly.
TEST(moe_config, stacked_experts_refused_by_name) {
    test::temp_dir    d("moe-stacked");
    const std::string from = k_moe + "mixtral";
    std::filesystem::copy_file(from + "/config.json", d.file("config.json"));
    auto src = tensor_source::open(from);
    ASSERT_TRUE(src.is_ok());
    std::vector<safetensors_decl> decls;
    const std::string             stacked = "model.layers.0.block_sparse_moe.experts.gate_up_proj";
    for (const auto& name : (*src)->names())
        if (name.find(".experts.") == std::string::npos)
            decls.push_back({name, (*src)->find(name)->info->type, (*src)->find(name)->info->shape});
    decls.push_back({stacked, dtype::DTYPE_F32, {8, 128, 64}});
    auto w = safetensors_writer::create(d.file("model.safetensors"), decls);
    ASSERT_TRUE(w.is_ok());
    for (const auto& dc : decls) {
        if (dc.name == stacked) {
            std::vector<float> zero(8 * 128 * 64, 0.0f);
            ASSERT_TRUE((*w)->write(dc.name, zero.data(), zero.size() * 4).is_ok());
            continue;
        }
        const tensor_entry* e = (*src)->find(dc.name);
        ASSERT_TRUE((*w)->write(dc.name, e->file->bytes(*e->info), e->info->nbytes()).is_ok());
    }
    ASSERT_TRUE((*w)->finish().is_ok());
    auto m = llama_model::open(d.path());
    ASSERT_FALSE(m.is_ok());
    EXPECT_EQ(m.error().code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_NE(m.error().message().find("stacked ('" + stacked + "')"), std::string::npos) << m.error().message();
}

// The ragged batch (generation's path) on MoE: two sequences prefilled together then decoded one
// token each per step give transformers' greedy tokens (the experts see both sequences' rows).
TEST(moe_goldens, ragged_batch_greedy) {
    for (const char* name : {"mixtral", "qwen2-moe", "qwen3-moe"}) {
        SCOPED_TRACE(name);
        auto m = llama_model::open(k_moe + name);
        ASSERT_TRUE(m.is_ok()) << m.error().message();
        const auto g = test::golden_load_file(k_moe + name + "/golden.safetensors");
        ASSERT_GE(g.seqs.size(), 3u);
        const auto&  a            = g.seqs[0];
        const auto&  b            = g.seqs[2];
        const size_t steps        = std::min(a.greedy.size(), b.greedy.size());
        const auto [got_a, got_b] = batch_greedy(**m, a, b, 80, steps);
        EXPECT_EQ(got_a, first(a.greedy, steps));
        EXPECT_EQ(got_b, first(b.greedy, steps));
    }
}

// What a backend that runs only the Llama layer must refuse (llama_hparams::options_beyond_llama).
TEST(arch_config, options_beyond_llama) {
    auto hp_of = [](const std::string& path) {
        auto c = model_config_load(path);
        EXPECT_TRUE(c.is_ok()) << c.error().message();
        auto h = llama_hparams_from_config(*c);
        EXPECT_TRUE(h.is_ok()) << h.error().message();
        return *h;
    };
    const std::string model = std::string(GPTQ_SOURCE_DIR) + "/tests/data/model/";
    EXPECT_EQ(hp_of(model + "rand-mistral").options_beyond_llama(), "");
    EXPECT_EQ(hp_of(model + "rand-qwen2").options_beyond_llama(), "");
    EXPECT_EQ(hp_of(k_arch + "mistral-nemo").options_beyond_llama(), "");
    EXPECT_EQ(hp_of(k_arch + "qwen3").options_beyond_llama(), "qk_norm");
    EXPECT_EQ(hp_of(k_arch + "phi3").options_beyond_llama(), "fused_qkv, fused_gate_up");
    EXPECT_EQ(hp_of(k_arch + "phi3-longrope").options_beyond_llama(), "longrope, fused_qkv, fused_gate_up");
    EXPECT_EQ(hp_of(k_arch + "gemma2").options_beyond_llama(),
              "norm_plus_one, sandwich_norms, gelu_pytorch_tanh, embed_scale, attn_scale, attn_softcap, final_softcap");
    EXPECT_EQ(hp_of(k_arch + "gemma3").options_beyond_llama(),
              "qk_norm, norm_plus_one, sandwich_norms, gelu_pytorch_tanh, embed_scale, attn_scale, final_softcap, "
              "rope_local");
}

// What the GPU layer refuses (llama_hparams::options_beyond_gpu): nothing left for these families
// (each option's refusal is lifted in its own commit; a refusal kept back appears here by name).
TEST(arch_config, options_beyond_gpu) {
    for (const char* name : {"qwen3", "mistral-nemo", "phi3", "phi3-longrope", "gemma2", "gemma3"}) {
        auto c = model_config_load(k_arch + name);
        ASSERT_TRUE(c.is_ok()) << c.error().message();
        auto h = llama_hparams_from_config(*c);
        ASSERT_TRUE(h.is_ok()) << h.error().message();
        EXPECT_EQ(h->options_beyond_gpu(), "") << name;
    }
}

// Gemma in a ragged batch (generation's path): the 7- and 64-token sequences prefilled together,
// then decoded one token each per step, give transformers' greedy tokens; the short one is inside
// the sliding window (8) at first, the long one past it on every local layer.
TEST(arch_goldens, gemma_ragged_batch_greedy) {
    for (const char* name : {"gemma2", "gemma3"}) {
        SCOPED_TRACE(name);
        auto m = llama_model::open(k_arch + name);
        ASSERT_TRUE(m.is_ok()) << m.error().message();
        const auto g = test::golden_load_file(k_arch + name + "/golden.safetensors");
        ASSERT_GE(g.seqs.size(), 3u);
        const auto&  a            = g.seqs[0];
        const auto&  b            = g.seqs[2];
        const size_t steps        = std::min(a.greedy.size(), b.greedy.size());
        const auto [got_a, got_b] = batch_greedy(**m, a, b, 80, steps);
        EXPECT_EQ(got_a, first(a.greedy, steps));
        EXPECT_EQ(got_b, first(b.greedy, steps));
    }
}

// LongRoPE's switch in a ragged batch: two sequences decoded together, one crossing
// original_max_position_embeddings (32) at this step, give the greedy tokens each gives alone.
TEST(arch_goldens, phi3_longrope_batch_across_the_switch) {
    auto m = llama_model::open(k_arch + "phi3-longrope");
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    const auto g = test::golden_load_file(k_arch + "phi3-longrope/golden.safetensors");
    ASSERT_GE(g.seqs.size(), 3u);
    const auto& a             = g.seqs[0];  // 28 tokens: crosses 32 during its greedy run
    const auto& b             = g.seqs[2];  // 48 tokens: long from the start
    const auto [got_a, got_b] = batch_greedy(**m, a, b, 64, a.greedy.size());
    EXPECT_EQ(got_a, a.greedy);
    EXPECT_EQ(got_b, first(b.greedy, got_b.size()));
}

// A chunk with all_logits that crosses the LongRoPE switch: the re-run computes the whole history
// again, and only the chunk's own rows come back, equal to the full sequence run at once.
TEST(arch_goldens, phi3_longrope_all_logits_across_the_switch) {
    auto m = llama_model::open(k_arch + "phi3-longrope");
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    const llama_hparams& hp = (*m)->hparams();
    const auto           g  = test::golden_load_file(k_arch + "phi3-longrope/golden.safetensors");
    const auto&          a  = g.seqs[2];  // 48 tokens
    ASSERT_GE(a.ids.size(), 40u);
    const int64_t      n0 = 28, n1 = 8;  // 28 cached (short factors), then 8 more: past 32
    std::vector<float> full(static_cast<size_t>((n0 + n1) * hp.n_vocab));
    ASSERT_TRUE((*m)->forward(ctx(), a.ids.data(), n0 + n1, nullptr, full.data()).is_ok());
    kv_cache           c         = kv_cache::create(hp, 64);
    kv_cache*          caches[1] = {&c};
    std::vector<float> first(static_cast<size_t>(hp.n_vocab));
    ASSERT_TRUE((*m)->forward_batch(ctx(), a.ids.data(), &n0, 1, caches, first.data()).is_ok());
    std::vector<float> chunk(static_cast<size_t>(n1 * hp.n_vocab), -1.0f);
    const bool         all = true;
    ASSERT_TRUE((*m)->forward_batch(ctx(), a.ids.data() + n0, &n1, 1, caches, chunk.data(), &all).is_ok());
    EXPECT_EQ(c.n_past, n0 + n1);
    float worst = 0;
    for (int64_t k = 0; k < n1 * hp.n_vocab; ++k) {
        const float want = full[static_cast<size_t>(n0 * hp.n_vocab + k)];
        worst            = std::max(worst, std::abs(chunk[static_cast<size_t>(k)] - want) / (std::abs(want) + 1e-3f));
    }
    EXPECT_LT(worst, 1e-4f);
}

// The GPU check (llama_gpu_options_check): every family's options run on the GPU (checked against
// the CPU on a device), so each fixture passes.
TEST(arch_config, gpu_options_check_accepts_every_family) {
    for (const char* name : {"qwen3", "gemma2", "gemma3", "phi3", "phi3-longrope", "mistral-nemo"}) {
        auto c = model_config_load(k_arch + name);
        ASSERT_TRUE(c.is_ok()) << c.error().message();
        auto h = llama_hparams_from_config(*c);
        ASSERT_TRUE(h.is_ok()) << h.error().message();
        EXPECT_EQ(h->options_beyond_gpu(), "") << name;
        EXPECT_TRUE(llama_gpu_options_check(*h, name).is_ok()) << name;
    }
}
