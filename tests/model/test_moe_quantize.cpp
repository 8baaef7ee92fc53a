// gptq quantize on mixture-of-experts models (docs/quantize.md "Mixture of experts"): micro
// Qwen2-MoE / Mixtral from make-random whose routers are rewritten so that calibration never routes
// a token to experts 4-7 (rows 0/1 and 2/3 are +-d, +-d': one of each pair is positive for every
// token, so top-2 always picks from experts 0-3; rows 4-7 are zero). Each --moe-coverage mode does
// what it says on those empty experts, the layer output keeps the real routing, the checkpoint
// has GPTQModel's names (router and shared expert gate unquantized) and loads back.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <random>

#include "core/thread_pool.h"
#include "gptq/make_random.h"
#include "gptq/quantize.h"
#include "io/safetensors.h"
#include "io/tensor_source.h"
#include "model/llama.h"
#include "quant/gptq.h"
#include "test_util.h"

using namespace gptq;
namespace fs = std::filesystem;
using json   = nlohmann::json;

namespace {

constexpr int64_t k_empty_first = 4;  // experts 4 .. 7 never get a calibration token

// make-random `like` into dir/name with every router's rows as described above (F32).
std::string moe_model_with_empty_experts(const test::temp_dir& dir, const std::string& like) {
    make_random_params mp;
    mp.like        = like;
    mp.output_path = dir.file(like);
    mp.n_threads   = 2;
    mp.progress    = false;
    auto made      = make_random_model(mp);
    EXPECT_TRUE(made.is_ok()) << made.error().message();
    auto m = llama_model::open(mp.output_path);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    const llama_hparams&                      hp  = (*m)->hparams();
    const tensor_source&                      src = (*m)->source();
    std::vector<safetensors_decl>             decls;
    std::map<std::string, std::vector<float>> routers;
    std::mt19937                              rng(5);
    std::normal_distribution<float>           nd;
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        if (!hp.is_moe(i)) continue;
        std::vector<float> w(static_cast<size_t>(hp.n_expert * hp.n_embd), 0.0f);
        for (int64_t pair = 0; pair < 2; ++pair)
            for (int64_t c = 0; c < hp.n_embd; ++c) {
                const float v                                          = nd(rng);
                w[static_cast<size_t>((2 * pair) * hp.n_embd + c)]     = v;
                w[static_cast<size_t>((2 * pair + 1) * hp.n_embd + c)] = -v;
            }
        routers[llama_moe_router_name(hp, i) + ".weight"] = std::move(w);
    }
    for (const auto& name : src.names()) {
        const tensor_entry* e = src.find(name);
        decls.push_back({name, routers.count(name) ? dtype::DTYPE_F32 : e->info->type, e->info->shape});
    }
    const std::string out = dir.file(like + "-empty");
    fs::create_directories(out);
    for (const auto& f : fs::directory_iterator(mp.output_path))
        if (f.path().extension() != ".safetensors") fs::copy_file(f.path(), out / f.path().filename());
    auto w = safetensors_writer::create(out + "/model.safetensors", decls);
    EXPECT_TRUE(w.is_ok());
    for (const auto& name : src.names()) {
        const tensor_entry* e = src.find(name);
        if (auto it = routers.find(name); it != routers.end())
            EXPECT_TRUE((*w)->write(name, it->second.data(), it->second.size() * 4).is_ok());
        else
            EXPECT_TRUE((*w)->write(name, e->file->bytes(*e->info), e->info->nbytes()).is_ok());
    }
    EXPECT_TRUE((*w)->finish().is_ok());
    return out;
}

quantize_params moe_run(const std::string& model, const std::string& out, const std::string& coverage) {
    quantize_params p;
    p.model_path   = model;
    p.output_path  = out;
    p.nsamples     = 4;
    p.seqlen       = 32;
    p.group_size   = 32;
    p.n_threads    = 2;
    p.moe_coverage = coverage;
    return p;
}

const quantize_linear_report* find(const quantize_report& r, const std::string& name) {
    for (const auto& l : r.linears)
        if (l.name == name) return &l;
    return nullptr;
}

// The dequantized weight of a module of a quantized checkpoint.
std::vector<float> dequantized(const llama_model& m, int64_t i, int64_t expert, moe_proj p) {
    auto l = m.layer_load(i);
    EXPECT_TRUE(l.is_ok()) << l.error().message();
    return (*l)->moe->expert(expert).linear(p).dense();
}

std::vector<float> logits_of(llama_model& m, const std::vector<int32_t>& ids) {
    thread_pool        pool(2);
    std::vector<float> out(ids.size() * static_cast<size_t>(m.hparams().n_vocab));
    EXPECT_TRUE(m.forward({&pool, false}, ids.data(), static_cast<int64_t>(ids.size()), nullptr, out.data()).is_ok());
    return out;
}

}  // namespace

// route-all: the empty experts are GPTQ-quantized from every token's Hessian (their report says
// route-all with 0 tokens, GPTQ's weighted error below RTN's); rtn: they are exactly RTN; fail:
// an error naming them. The routed experts and every linear of layer 1 come out byte-identical in
// route-all and rtn runs: the empty experts change nothing the real routing sees, so the layer's
// output (the next layer's calibration input) kept the real routing.
TEST(moe_quantize, coverage_modes_on_empty_experts) {
    test::temp_dir    dir("q-moe");
    const std::string model = moe_model_with_empty_experts(dir, "micro-qwen2-moe");
    auto              orig  = llama_model::open(model);
    ASSERT_TRUE(orig.is_ok()) << orig.error().message();
    const llama_hparams& hp = (*orig)->hparams();

    auto pf = moe_run(model, dir.file("fail"), "fail");
    auto rf = quantize_model(pf);
    ASSERT_FALSE(rf.is_ok());
    EXPECT_EQ(rf.error().code(), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_NE(rf.error().message().find("layer 0: experts 4 (0), 5 (0), 6 (0), 7 (0)"), std::string::npos)
        << rf.error().message();
    EXPECT_NE(rf.error().message().find("--moe-coverage"), std::string::npos) << rf.error().message();
    EXPECT_FALSE(fs::exists(pf.output_path));

    auto pa = moe_run(model, dir.file("route-all"), "route-all");
    auto ra = quantize_model(pa);
    ASSERT_TRUE(ra.is_ok()) << ra.error().message();
    auto pr = moe_run(model, dir.file("rtn"), "rtn");
    auto rr = quantize_model(pr);
    ASSERT_TRUE(rr.is_ok()) << rr.error().message();

    const int64_t n_tokens = pa.nsamples * pa.seqlen;
    for (int64_t i = 0; i < hp.n_layer; ++i)
        for (int64_t e = 0; e < hp.n_expert; ++e) {
            const std::string name = llama_moe_expert_name(hp, i, e, moe_proj::MOE_DOWN);
            const auto*       a    = find(*ra, name);
            const auto*       r    = find(*rr, name);
            ASSERT_TRUE(a && r) << name;
            if (e >= k_empty_first) {
                EXPECT_EQ(a->tokens, 0) << name;
                EXPECT_EQ(a->coverage, "route-all") << name;
                EXPECT_EQ(r->coverage, "rtn") << name;
                EXPECT_GT(a->error_rtn, 0.0) << name;
                EXPECT_LT(a->error_gptq, a->error_rtn) << name;  // GPTQ against the all-token Hessian
            } else {
                EXPECT_GE(a->tokens, 2 * hp.n_embd / 16) << name;
                EXPECT_EQ(a->coverage, "routed") << name;
                EXPECT_EQ(a->tokens, r->tokens) << name;
            }
        }
    // Every token reaches two of experts 0-3: their counts add up to 2 tokens each.
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        int64_t sum = 0;
        for (int64_t e = 0; e < k_empty_first; ++e)
            sum += find(*ra, llama_moe_expert_name(hp, i, e, moe_proj::MOE_GATE))->tokens;
        EXPECT_EQ(sum, 2 * n_tokens) << "layer " << i;
        EXPECT_EQ(find(*ra, llama_moe_expert_name(hp, i, k_moe_shared, moe_proj::MOE_UP))->coverage, "all");
    }

    auto ma = llama_model::open(pa.output_path, {.strict = true});
    auto mr = llama_model::open(pr.output_path, {.strict = true});
    ASSERT_TRUE(ma.is_ok()) << ma.error().message();
    ASSERT_TRUE(mr.is_ok()) << mr.error().message();
    // rtn: the empty experts are exactly round to nearest of the original weights.
    gptq_options opt;
    opt.bits       = 4;
    opt.group_size = 32;
    auto lo        = (*orig)->layer_load(0);
    ASSERT_TRUE(lo.is_ok());
    for (moe_proj p : {moe_proj::MOE_GATE, moe_proj::MOE_UP, moe_proj::MOE_DOWN}) {
        const linear_weights& w = (*lo)->moe->expert(5).linear(p);
        auto                  q = rtn_quantize(ops_context{}, w.w.data(), w.n_out, w.n_in, opt);
        ASSERT_TRUE(q.is_ok());
        std::vector<float> expect(w.w.size());
        quantized_linear_dequantize(*q, expect.data());
        EXPECT_EQ(dequantized(**mr, 0, 5, p), expect) << moe_proj_name(p);
        EXPECT_NE(dequantized(**ma, 0, 5, p), expect) << moe_proj_name(p);  // route-all: GPTQ moved them
    }
    // The real routing: what the routed tokens see is the same in both runs.
    for (int64_t e = 0; e < k_empty_first; ++e)
        for (moe_proj p : {moe_proj::MOE_GATE, moe_proj::MOE_UP, moe_proj::MOE_DOWN})
            for (int64_t i = 0; i < hp.n_layer; ++i)
                EXPECT_EQ(dequantized(**ma, i, e, p), dequantized(**mr, i, e, p)) << i << " " << e;
    auto la = (*ma)->layer_load(1), lr = (*mr)->layer_load(1);
    ASSERT_TRUE(la.is_ok() && lr.is_ok());
    for (linear_role r : {linear_role::LINEAR_Q, linear_role::LINEAR_K, linear_role::LINEAR_V, linear_role::LINEAR_O})
        EXPECT_EQ((*la)->linear(r).dense(), (*lr)->linear(r).dense()) << linear_role_name(r);

    // And the quantized model stays close to the original.
    const std::vector<int32_t> ids = {1, 40, 41, 300, 7, 9, 120, 5};
    const auto                 a   = logits_of(**ma, ids);
    const auto                 o   = logits_of(**orig, ids);
    double                     err = 0, norm = 0;
    for (size_t k = 0; k < a.size(); ++k) {
        err += (a[k] - o[k]) * (a[k] - o[k]);
        norm += o[k] * o[k];
    }
    EXPECT_LT(std::sqrt(err / norm), 0.2);
}

// The checkpoint's names are GPTQModel's: Mixtral block_sparse_moe.experts.E.w1/w2/w3 as GPTQ
// tensors, the router block_sparse_moe.gate.weight unquantized; Qwen2-MoE mlp.experts.E.*,
// mlp.shared_expert.* quantized, mlp.gate and mlp.shared_expert_gate unquantized; the quantize
// config is the dense one (GPTQModel writes no MoE keys); strict loading reads every tensor back.
TEST(moe_quantize, checkpoint_names_as_gptqmodel) {
    test::temp_dir dir("q-moe-names");
    for (const char* like : {"micro-mixtral", "micro-qwen2-moe", "micro-qwen3-moe"}) {
        SCOPED_TRACE(like);
        make_random_params mp;
        mp.like        = like;
        mp.output_path = dir.file(like);
        mp.n_threads   = 2;
        mp.progress    = false;
        ASSERT_TRUE(make_random_model(mp).is_ok());
        auto p        = moe_run(mp.output_path, dir.file(std::string("q-") + like), "route-all");
        p.report_path = dir.file(std::string(like) + ".json");
        auto r        = quantize_model(p);
        ASSERT_TRUE(r.is_ok()) << r.error().message();
        auto tensors = tensor_source::open(p.output_path);
        ASSERT_TRUE(tensors.is_ok());
        const std::string        l0 = "model.layers.0.";
        std::vector<std::string> quantized, plain;
        if (std::string(like) == "micro-mixtral") {
            quantized = {l0 + "block_sparse_moe.experts.0.w1", l0 + "block_sparse_moe.experts.7.w2",
                         l0 + "block_sparse_moe.experts.3.w3", l0 + "self_attn.q_proj"};
            plain     = {l0 + "block_sparse_moe.gate"};
        } else {
            quantized = {l0 + "mlp.experts.0.gate_proj", l0 + "mlp.experts.7.down_proj", l0 + "mlp.experts.3.up_proj"};
            plain     = {l0 + "mlp.gate"};
            if (std::string(like) == "micro-qwen2-moe") {
                quantized.push_back(l0 + "mlp.shared_expert.gate_proj");
                quantized.push_back(l0 + "mlp.shared_expert.down_proj");
                plain.push_back(l0 + "mlp.shared_expert_gate");
            }
        }
        for (const auto& m : quantized) {
            EXPECT_TRUE((*tensors)->has(m + ".qweight")) << m;
            EXPECT_TRUE((*tensors)->has(m + ".g_idx")) << m;
            EXPECT_FALSE((*tensors)->has(m + ".weight")) << m;
        }
        for (const auto& m : plain) {
            EXPECT_TRUE((*tensors)->has(m + ".weight")) << m;
            EXPECT_FALSE((*tensors)->has(m + ".qweight")) << m;
        }
        const auto qc = json::parse(test::read_file(p.output_path + "/quantize_config.json"));
        EXPECT_EQ(qc["bits"], 4);
        EXPECT_EQ(qc["group_size"], 32);
        EXPECT_EQ(qc["quant_method"], "gptq");
        const auto rep        = json::parse(test::read_file(p.report_path));
        bool       has_tokens = false;
        for (const auto& l : rep["linears"])
            if (l.contains("tokens") && l["coverage"] == "routed") has_tokens = true;
        EXPECT_TRUE(has_tokens);
        auto back = llama_model::open(p.output_path, {.strict = true});
        ASSERT_TRUE(back.is_ok()) << back.error().message();
        const auto logits = logits_of(**back, {1, 2, 3, 4});
        for (float v : logits) ASSERT_TRUE(std::isfinite(v));
    }
}

// --resume across a MoE layer gives the checkpoint of an uninterrupted run, byte for byte (the
// finished layer's experts are read back from the work folder).
TEST(moe_quantize, resume_is_byte_identical) {
    test::temp_dir    dir("q-moe-resume");
    const std::string model = moe_model_with_empty_experts(dir, "micro-qwen2-moe");
    auto              full  = moe_run(model, dir.file("full"), "route-all");
    ASSERT_TRUE(quantize_model(full).is_ok());
    auto part              = moe_run(model, dir.file("part"), "route-all");
    part.stop_after_layers = 1;
    auto stopped           = quantize_model(part);
    ASSERT_FALSE(stopped.is_ok());
    EXPECT_EQ(stopped.error().code(), status_code::STATUS_CANCELLED);
    part.stop_after_layers = -1;
    part.resume            = true;
    auto resumed           = quantize_model(part);
    ASSERT_TRUE(resumed.is_ok()) << resumed.error().message();
    EXPECT_EQ(test::read_file(full.output_path + "/model.safetensors"),
              test::read_file(part.output_path + "/model.safetensors"));
    // Another coverage mode is another run: named.
    auto other              = moe_run(model, dir.file("part2"), "route-all");
    other.stop_after_layers = 1;
    ASSERT_FALSE(quantize_model(other).is_ok());
    other.stop_after_layers = -1;
    other.resume            = true;
    other.moe_coverage      = "rtn";
    auto mismatch           = quantize_model(other);
    ASSERT_FALSE(mismatch.is_ok());
    EXPECT_NE(mismatch.error().message().find("--moe-coverage"), std::string::npos) << mismatch.error().message();
}
