// CPU offload in llama_cuda_model (docs/multi-gpu.md, "CPU offload on one GPU"): modules kept in
// pinned host memory and staged through two device buffers run the same kernels in the same order
// as resident ones, so the logits must be bit-for-bit those of the fully resident model: a prefill
// of 40 tokens and 8 decode steps, with the CUDA graph (copies captured into it, a second stream
// forked and joined) and without, for several placements (one module, every module, alternate
// layers, the globals) on tiny-llama (tied lm_head), the random test models (biases, sliding
// windows, untied lm_head) and GPTQ checkpoints of tiny-llama (int4 kernel, act-order, generic
// 3-bit). Then the engine: ppl and greedy generation with --max-memory / --device-map identical to
// the resident run, and a plan over two GPUs refused.
//
// Paths: the source tree is GPTQ_SOURCE_DIR, or $GPTQ_TEST_SOURCE_DIR when set (device bundle).
#include <gtest/gtest.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <vector>

#include "cuda_model_util.h"
#include "cuda_test_util.h"
#include "gptq/generate.h"
#include "gptq/ppl.h"
#include "gptq/quantize.h"
#include "model/llama.h"
#include "model/llama_cuda.h"
#include "test_util.h"

using namespace gptq;

namespace {

constexpr int64_t k_n_prefill = 40;
constexpr int64_t k_n_decode  = 8;

std::string source_dir() {
    return test::cuda_source_dir();
}

std::vector<int32_t> test_ids(int64_t n, int64_t vocab) {
    return test::cuda_test_ids(n, vocab);
}

struct run_out {
    std::vector<float> logits;  // [k_n_prefill + k_n_decode, n_vocab]
    uint64_t           weight_bytes = 0, offload_bytes = 0, staging_bytes = 0;
    int64_t            n_offloaded = 0, graph_replays = 0;
    bool               tied = false, head_int4 = false;
};

// Prefill k_n_prefill tokens, then k_n_decode decode steps; then a second sequence (reset): the
// same prefill again must give the same rows (slots reused across passes, a graph replayed before).
run_out run(const std::string& dir, const offload_placement& off, bool graph) {
    run_out            r;
    llama_cuda_options o;
    o.graph   = graph;
    o.n_ctx   = 64;
    o.offload = off;
    auto m    = llama_cuda_model::open(dir, o);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    if (!m.is_ok()) return r;
    const int64_t V   = (*m)->hparams().n_vocab;
    const auto    ids = test_ids(k_n_prefill + k_n_decode, V);
    r.logits.assign(ids.size() * static_cast<size_t>(V), 0.0f);
    status st = (*m)->prefill(ids.data(), k_n_prefill, r.logits.data());
    EXPECT_TRUE(st.is_ok()) << st.message();
    for (int64_t t = k_n_prefill; t < k_n_prefill + k_n_decode && st.is_ok(); ++t) {
        st = (*m)->decode(ids[static_cast<size_t>(t)], r.logits.data() + t * V);
        EXPECT_TRUE(st.is_ok()) << "decode " << t << ": " << st.message();
    }
    if (!st.is_ok()) return {};
    (*m)->reset();
    std::vector<float> again(static_cast<size_t>(k_n_prefill * V));
    st = (*m)->prefill(ids.data(), k_n_prefill, again.data());
    EXPECT_TRUE(st.is_ok()) << st.message();
    EXPECT_EQ(std::memcmp(again.data(), r.logits.data(), again.size() * sizeof(float)), 0)
        << dir << ": a second sequence after reset differs from the first";
    r.weight_bytes  = (*m)->weight_bytes();
    r.offload_bytes = (*m)->offload_bytes();
    r.staging_bytes = (*m)->staging_bytes();
    r.n_offloaded   = (*m)->n_offloaded();
    r.graph_replays = (*m)->graph_replays();
    r.tied          = (*m)->hparams().tie_embeddings;
    r.head_int4     = (*m)->lm_head_int4();
    return r;
}

// Rows that differ in any bit, and the first one.
void expect_identical(const run_out& got, const run_out& want, int64_t V, const std::string& what) {
    ASSERT_EQ(got.logits.size(), want.logits.size()) << what;
    int64_t n_bad = 0, first = -1;
    for (int64_t t = 0; t < k_n_prefill + k_n_decode; ++t)
        if (std::memcmp(got.logits.data() + t * V, want.logits.data() + t * V, size_t(V) * sizeof(float)) != 0) {
            n_bad += 1;
            if (first < 0) first = t;
        }
    EXPECT_EQ(n_bad, 0) << what << ": " << n_bad << " rows differ from the resident model, first row " << first
                        << (first >= k_n_prefill ? " (decode)" : " (prefill)");
}

offload_placement layers(std::vector<int64_t> l, bool embed = false, bool norm = false, bool lm_head = false) {
    offload_placement p;
    p.layers  = std::move(l);
    p.embed   = embed;
    p.norm    = norm;
    p.lm_head = lm_head;
    return p;
}

std::string describe(const offload_placement& p) {
    std::string s = "layers {";
    for (size_t i = 0; i < p.layers.size(); ++i) s += (i ? "," : "") + std::to_string(p.layers[i]);
    s += "}";
    if (p.embed) s += " embed";
    if (p.norm) s += " norm";
    if (p.lm_head) s += " lm_head";
    return s;
}

// own_head: the lm_head is a module of its own in every placement (a GPTQ lm_head), never a second
// copy of the tied table.
void check_offload(const std::string& dir, const std::vector<offload_placement>& placements, bool own_head = false) {
    auto host = llama_model::open(dir);
    ASSERT_TRUE(host.is_ok()) << host.error().message();
    const int64_t V = (*host)->hparams().n_vocab;
    for (bool graph : {true, false}) {
        const run_out base = run(dir, {}, graph);
        ASSERT_FALSE(base.logits.empty());
        EXPECT_EQ(base.n_offloaded, 0);
        EXPECT_EQ(base.offload_bytes, 0u);
        EXPECT_EQ(base.staging_bytes, 0u);
        for (const auto& p : placements) {
            const std::string what = dir + " " + describe(p) + (graph ? " (graph)" : " (no graph)");
            const run_out     got  = run(dir, p, graph);
            ASSERT_FALSE(got.logits.empty()) << what;
            expect_identical(got, base, V, what);
            EXPECT_EQ(got.n_offloaded, p.n_modules()) << what;
            EXPECT_GT(got.offload_bytes, 0u) << what;
            EXPECT_GT(got.staging_bytes, 0u) << what;
            EXPECT_EQ(got.graph_replays, base.graph_replays) << what;
            EXPECT_EQ(got.head_int4, base.head_int4) << what;
            if (graph) {
                EXPECT_EQ(got.graph_replays, k_n_decode - 1) << what;
            }
            // Weights moved, not duplicated: except a tied lm_head made a module of its own (its
            // table then exists twice: with the embeddings and as lm_head).
            const bool tied_copy = got.tied && !own_head && (p.embed || p.lm_head);
            if (!tied_copy)
                EXPECT_EQ(got.weight_bytes + got.offload_bytes, base.weight_bytes) << what;
            else
                EXPECT_GT(got.weight_bytes + got.offload_bytes, base.weight_bytes) << what;
            EXPECT_LT(got.weight_bytes, base.weight_bytes + (tied_copy ? base.weight_bytes : 0)) << what;
        }
    }
}

// Placements for a model of n layers: one layer, the middle ones, alternate layers with the
// globals, everything.
std::vector<offload_placement> placements(int64_t n) {
    std::vector<int64_t> all, odd;
    for (int64_t i = 0; i < n; ++i) {
        all.push_back(i);
        if (i % 2) odd.push_back(i);
    }
    std::vector<int64_t>           middle(all.begin() + 1, all.end() - 1);
    std::vector<offload_placement> out;
    for (auto p : {layers({n - 1}), layers(middle), layers(odd, false, false, true), layers({0}, true, true, false),
                   layers(all, true, true, true)})
        if (p.any()) out.push_back(p);  // a 2-layer model has no middle layers
    return out;
}

int64_t n_layer(const std::string& dir) {
    auto m = llama_model::open(dir);
    return m ? (*m)->hparams().n_layer : 0;
}

std::string gptq_checkpoint(const std::string& tag, int bits, int group, bool desc_act, bool sym,
                            const std::string& method) {
    return test::tiny_llama_gptq_checkpoint(tag, bits, group, desc_act, sym, method);
}

}  // namespace

TEST(offload_cuda, tiny_llama_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    const std::string dir = source_dir() + "/models/tiny-llama";
    check_offload(dir, placements(n_layer(dir)));
}
TEST(offload_cuda, rand_llama3_untied_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    const std::string dir = source_dir() + "/tests/data/model/rand-llama3";
    check_offload(dir, placements(n_layer(dir)));
}
TEST(offload_cuda, rand_qwen2_biases_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    const std::string dir = source_dir() + "/tests/data/model/rand-qwen2";
    check_offload(dir, placements(n_layer(dir)));
}
TEST(offload_cuda, rand_mistral_sliding_window_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    const std::string dir = source_dir() + "/tests/data/model/rand-mistral";
    check_offload(dir, placements(n_layer(dir)));
}
TEST(offload_cuda, gptq_int4_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    check_offload(gptq_checkpoint("w4g128-rtn", 4, 128, false, true, "rtn"), placements(4));
}
TEST(offload_cuda, gptq_int4_act_order_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    check_offload(gptq_checkpoint("w4g64-act", 4, 64, true, true, "gptq"), placements(4));
}
TEST(offload_cuda, gptq_3bit_generic_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    check_offload(gptq_checkpoint("w3g32-asym", 3, 32, false, false, "rtn"), placements(4));
}

// A quantized embedding table with the embeddings and the tied lm_head offloaded (each then a
// module of its own, both from the dequantized table): the resident model's logits.
TEST(offload_cuda, quantized_embeddings_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    const std::string dir = test::tiny_llama_quantized_embeddings_checkpoint("e4", 4, false);
    check_offload(dir, placements(n_layer(dir)));
}

// A GPTQ lm_head on the int4 layout (its repacked weights, scales/zeros and act-order permutation
// staged as one module), offloaded alone and with the rest: the resident model's logits bit for bit.
TEST(offload_cuda, gptq_lm_head_int4_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    for (bool act : {false, true}) {
        const std::string dir = test::tiny_llama_lm_head_checkpoint(act ? "w4g64-head-act" : "w4g64-head", act);
        {
            auto m = llama_cuda_model::open(dir);
            ASSERT_TRUE(m.is_ok()) << m.error().message();
            ASSERT_TRUE((*m)->lm_head_int4()) << dir;
        }
        auto p = placements(4);
        p.push_back(layers({}, false, false, true));  // the lm_head alone
        check_offload(dir, p, /*own_head=*/true);
    }
}

TEST(offload_cuda, bad_placement_is_an_error) {
    GPTQ_SKIP_WITHOUT_GPU();
    const std::string  dir = source_dir() + "/models/tiny-llama";
    llama_cuda_options o;
    o.offload = layers({4});  // tiny-llama has layers 0-3
    auto m    = llama_cuda_model::open(dir, o);
    ASSERT_FALSE(m.is_ok());
    EXPECT_EQ(m.error().code(), status_code::STATUS_INVALID_ARGUMENT) << m.error().message();
    o.offload = layers({2, 1});
    EXPECT_FALSE(llama_cuda_model::open(dir, o).is_ok());
}

// The engine: --max-memory below the model offloads its tail (the planner), and ppl is the same
// number as with everything resident (the same logits).
TEST(offload_cuda, ppl_with_max_memory_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    ppl_params p;
    p.model_path  = source_dir() + "/models/tiny-llama";
    p.dataset     = source_dir() + "/data/wikitext2/wiki.test.raw.gptq_join.txt";
    p.seqlen      = 256;
    p.max_windows = 4;
    p.progress    = false;
    p.device      = "cuda";
    auto base     = ppl_run(p);
    ASSERT_TRUE(base.is_ok()) << base.error().message();
    EXPECT_EQ(base->offload_bytes, 0u);
    for (const std::string mem : {"0=88MiB,cpu=1GiB", "0=88MiB"}) {  // cpu= given, and the default
        p.max_memory = mem;
        auto off     = ppl_run(p);
        ASSERT_TRUE(off.is_ok()) << mem << ": " << off.error().message();
        EXPECT_GT(off->offload_bytes, 0u) << mem;
        EXPECT_EQ(off->ppl, base->ppl) << mem;
        EXPECT_EQ(off->nll_mean, base->nll_mean) << mem;
    }
    // Everything offloaded through a map file.
    test::temp_dir    d("offload-cuda-map");
    const std::string map = d.file("map.json");
    test::write_file(map, R"({"": "cpu"})");
    p.max_memory = "";
    p.device_map = map;
    auto all     = ppl_run(p);
    ASSERT_TRUE(all.is_ok()) << all.error().message();
    EXPECT_EQ(all->ppl, base->ppl);
    EXPECT_GT(all->offload_bytes, base->offload_bytes);
    // A plan over two GPUs: refused until the pipeline runtime exists.
    p.device_map = "";
    p.max_memory = "0=88MiB,1=1GiB";
    auto two     = ppl_run(p);
    ASSERT_FALSE(two.is_ok());
    EXPECT_EQ(two.error().code(), status_code::STATUS_UNSUPPORTED) << two.error().message();
    EXPECT_NE(two.error().message().find("issue #10"), std::string::npos) << two.error().message();
}

TEST(offload_cuda, greedy_generation_identical_to_resident) {
    GPTQ_SKIP_WITHOUT_GPU();
    const std::string dir = source_dir() + "/models/tiny-llama";
    generate_params   gp;
    gp.max_new_tokens                      = 24;
    gp.ignore_eos                          = true;
    gp.sampling.temperature                = 0.0f;
    gp.sampling.repetition_penalty         = 1.0f;
    const std::vector<std::string> prompts = {"The King James Bible", "Once upon a time"};
    auto                           base    = generator::open({.model_path = dir, .device = "cuda"});
    ASSERT_TRUE(base.is_ok()) << base.error().message();
    auto want = (*base)->generate_batch(prompts, gp);
    ASSERT_TRUE(want.is_ok()) << want.error().message();
    auto off = generator::open({.model_path = dir, .device = "cuda", .max_memory = "0=161MiB,cpu=1GiB"});
    ASSERT_TRUE(off.is_ok()) << off.error().message();
    auto got = (*off)->generate_batch(prompts, gp);
    ASSERT_TRUE(got.is_ok()) << got.error().message();
    ASSERT_EQ(got->size(), want->size());
    for (size_t i = 0; i < got->size(); ++i) {
        EXPECT_EQ((*got)[i].tokens, (*want)[i].tokens) << prompts[i];
        EXPECT_EQ((*got)[i].text, (*want)[i].text) << prompts[i];
    }
}
