// --bpw-sensitivity output (engine/bpw_output.h, docs/quantize.md "Mixed precision"): the KL of the
// model's output with one layer's variant is exactly 0 for the layer's own weights and gives the
// layer back bit-identical; it is deterministic and falls with the bits of the variant; through
// `gptq quantize` the plan keeps the budget exactly, is reproduced from its own measurements
// (--bpw-measured) and by --resume, and bad options are refused by name.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "engine/bpw_output.h"
#include "gptq/quantize.h"
#include "model/llama.h"
#include "quant/gptq.h"
#include "test_util.h"

using namespace gptq;
namespace fs = std::filesystem;
using json   = nlohmann::json;

namespace {

std::string tiny() {
    return test::source_path("models/tiny-llama");
}

// n_windows windows of seqlen tokens of a fixed pseudo-random id sequence, embedded.
std::vector<float> windows(llama_model& m, int64_t n_windows, int64_t seqlen) {
    std::vector<int32_t> ids(static_cast<size_t>(n_windows * seqlen));
    uint32_t             x = 12345;
    for (auto& id : ids) {
        x  = x * 1664525u + 1013904223u;
        id = static_cast<int32_t>((x >> 8) % static_cast<uint32_t>(m.hparams().n_vocab));
    }
    std::vector<float> h(ids.size() * static_cast<size_t>(m.hparams().n_embd));
    EXPECT_TRUE(m.embed(ids.data(), static_cast<int64_t>(ids.size()), h.data()).is_ok());
    return h;
}

// Round to nearest at `bits`, group 32: the layer's linear r as a variant.
layer_variant rtn_variant(const llama_layer& layer, linear_role r, int bits) {
    const linear_weights& lw = layer.linear(r);
    gptq_options          o;
    o.bits       = bits;
    o.group_size = 32;
    auto q       = rtn_quantize(ops_context{}, lw.w.data(), lw.n_out, lw.n_in, o);
    EXPECT_TRUE(q.is_ok());
    std::vector<float> w(lw.w.size());
    quantized_linear_dequantize(*q, w.data());
    layer_variant v;
    v.emplace_back(r, std::move(w));
    return v;
}

quantize_params bpw_run(const std::string& out, double bpw) {
    quantize_params p;
    p.model_path  = tiny();
    p.output_path = out;
    p.nsamples    = 4;
    p.seqlen      = 64;
    p.n_threads   = 2;
    p.target_bpw  = bpw;
    p.bpw_windows = 2;
    return p;
}

}  // namespace

TEST(bpw_sensitivity, kl_is_zero_unchanged_deterministic_and_falls_with_bits) {
    auto m = llama_model::open(tiny());
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    ASSERT_TRUE((*m)->globals_load().is_ok());
    const int64_t n_win = 2, seqlen = 48;
    auto out = output_sensitivity::make(**m, ops_context{}, nullptr, n_win, seqlen, windows(**m, n_win, seqlen));
    ASSERT_TRUE(out.is_ok()) << out.error().message();
    auto layer0 = (*m)->layer_load(0);
    ASSERT_TRUE(layer0.is_ok());
    ASSERT_TRUE((*out)->advance(**layer0).is_ok());  // measure on layer 1: a layer with one after it
    auto layer = (*m)->layer_load(1);
    ASSERT_TRUE(layer.is_ok());
    const std::vector<float> down_before = (*layer)->linear(linear_role::LINEAR_DOWN).w;

    // Variants: 0 the layer's own down_proj; 1..4 down_proj at 2, 3, 4, 8 bits; 5 = 2 again.
    const int bits[] = {0, 2, 3, 4, 8, 2};
    auto      make   = [&](size_t k) -> result<layer_variant> {
        if (bits[k] == 0) return layer_variant{{linear_role::LINEAR_DOWN, down_before}};
        return rtn_variant(**layer, linear_role::LINEAR_DOWN, bits[k]);
    };
    auto kl = (*out)->layer_variants(**layer, 6, make);
    ASSERT_TRUE(kl.is_ok()) << kl.error().message();
    EXPECT_EQ((*kl)[0], 0.0) << "the unchanged model is the reference";
    EXPECT_EQ((*kl)[5], (*kl)[1]) << "deterministic";
    EXPECT_EQ((*layer)->linear(linear_role::LINEAR_DOWN).w, down_before) << "the layer's weights given back";
    // KL >= 0 (Gibbs) and, on the same windows, each bit less rounds coarser: the KL grows by a
    // large factor per bit (measured 6x, 4.4x, 280x here), far above the F32 rounding of the log-softmax
    // (a KL of ~1e-7 at most), so a strict order is a fair check of the measure, not of luck.
    for (int k = 1; k <= 4; ++k) EXPECT_GT((*kl)[static_cast<size_t>(k)], 0.0) << bits[k] << " bits";
    for (int k = 1; k <= 4; ++k) RecordProperty("kl_" + std::to_string(bits[k]) + "bit", std::to_string((*kl)[k]));
    EXPECT_GT((*kl)[1], 2.0 * (*kl)[2]);
    EXPECT_GT((*kl)[2], 2.0 * (*kl)[3]);
    EXPECT_GT((*kl)[3], 2.0 * (*kl)[4]);

    // lm_head: its own weight gives 0, a rounded one more.
    ASSERT_TRUE((*out)->advance(**layer).is_ok());
    for (int64_t j = 2; j < (*m)->hparams().n_layer; ++j) {
        auto l = (*m)->layer_load(j);
        ASSERT_TRUE(l.is_ok());
        ASSERT_TRUE((*out)->advance(**l).is_ok());
    }
    auto head = (*m)->lm_head_dense_weight();
    ASSERT_TRUE(head.is_ok());
    auto k0 = (*out)->lm_head_variant(*head);
    ASSERT_TRUE(k0.is_ok());
    EXPECT_EQ(*k0, 0.0);
    gptq_options o;
    o.bits           = 3;
    o.group_size     = 32;
    const int64_t nv = (*m)->hparams().n_vocab, ne = (*m)->hparams().n_embd;
    auto          q = rtn_quantize(ops_context{}, head->data(), nv, ne, o);
    ASSERT_TRUE(q.is_ok());
    std::vector<float> hq(head->size());
    quantized_linear_dequantize(*q, hq.data());
    auto k3 = (*out)->lm_head_variant(hq);
    ASSERT_TRUE(k3.is_ok());
    EXPECT_GT(*k3, 0.0);
}

// The default measure through quantize_model: within budget and tight, the same plan from its own
// measurements (--bpw-measured, also at another target: only the allocation reruns), the Hessian
// errors of an output plan are those a --bpw-sensitivity hessian run measures, --resume keeps it.
TEST(bpw_sensitivity, output_plan_budget_measured_reuse_and_resume) {
    test::temp_dir dir("bpw-out");
    auto           a = bpw_run(dir.file("a"), 3.5);
    a.report_path    = dir.file("a.json");
    auto ra          = quantize_model(a);
    ASSERT_TRUE(ra.is_ok()) << ra.error().message();
    const json plan = json::parse(test::read_file(a.report_path))["bit_plan"];
    EXPECT_EQ(plan["bpw_sensitivity"], "output");
    EXPECT_EQ(plan["bpw_windows"], 2);
    const uint64_t budget = plan["budget_bytes"].get<uint64_t>(), bytes = plan["bytes"].get<uint64_t>();
    EXPECT_LE(bytes, budget);
    for (const auto& m : plan["modules"]) {
        double last = 1e300;
        for (const auto& c : m["candidates"]) {
            EXPECT_GE(c["error"].get<double>(), 0.0) << m["module"];
            EXPECT_GT(c["error_hessian"].get<double>(), 0.0) << m["module"];
            EXPECT_LT(c["error"].get<double>(), last) << m["module"] << " " << c.dump();  // bits ascending
            last = c["error"].get<double>();
            if (c["error"].get<double>() < m["error"].get<double>())  // tight: no better choice fits
                EXPECT_GT(bytes - m["bytes"].get<uint64_t>() + c["bytes"].get<uint64_t>(), budget) << m["module"];
        }
    }

    // Planned again from its own measurements: the same plan, the same files.
    auto b         = bpw_run(dir.file("b"), 3.5);
    b.bpw_measured = a.report_path;
    ASSERT_TRUE(quantize_model(b).is_ok());
    EXPECT_EQ(test::read_file(b.output_path + "/quantize_config.json"),
              test::read_file(a.output_path + "/quantize_config.json"));
    EXPECT_EQ(test::read_file(b.output_path + "/model.safetensors"),
              test::read_file(a.output_path + "/model.safetensors"));

    // Its Hessian errors are those of the old measure: a hessian run gives the same plan as the
    // hessian plan made from this run's file.
    auto h            = bpw_run(dir.file("h"), 3.25);
    h.bpw_sensitivity = "hessian";
    h.report_path     = dir.file("h.json");
    ASSERT_TRUE(quantize_model(h).is_ok());
    auto hm            = bpw_run(dir.file("hm"), 3.25);
    hm.bpw_sensitivity = "hessian";
    hm.bpw_measured    = a.report_path;
    hm.report_path     = dir.file("hm.json");
    ASSERT_TRUE(quantize_model(hm).is_ok());
    const json ph = json::parse(test::read_file(h.report_path))["bit_plan"];
    const json pm = json::parse(test::read_file(hm.report_path))["bit_plan"];
    EXPECT_EQ(ph["dynamic"], pm["dynamic"]);
    EXPECT_EQ(ph["error"], pm["error"]);
    EXPECT_EQ(ph["bpw_sensitivity"], "hessian");

    // Interrupted and resumed: the plan comes from the work folder (not measured again).
    auto cut              = bpw_run(dir.file("cut"), 3.5);
    cut.stop_after_layers = 2;
    ASSERT_FALSE(quantize_model(cut).is_ok());
    ASSERT_TRUE(fs::exists(cut.output_path + ".partial/plan.json"));
    cut.stop_after_layers = -1;
    cut.resume            = true;
    auto resumed          = quantize_model(cut);
    ASSERT_TRUE(resumed.is_ok()) << resumed.error().message();
    EXPECT_EQ(test::read_file(cut.output_path + "/model.safetensors"),
              test::read_file(a.output_path + "/model.safetensors"));
    // ...and a resume with another measure is refused, naming the flag.
    auto other              = bpw_run(dir.file("other"), 3.5);
    other.stop_after_layers = 1;
    ASSERT_FALSE(quantize_model(other).is_ok());
    other.stop_after_layers = -1;
    other.resume            = true;
    other.bpw_sensitivity   = "hessian";
    auto refused            = quantize_model(other);
    ASSERT_FALSE(refused.is_ok());
    EXPECT_NE(refused.error().message().find("--bpw-sensitivity"), std::string::npos) << refused.error().message();
}

TEST(bpw_sensitivity, bad_options_are_refused_by_name) {
    test::temp_dir dir("bpw-bad");
    auto           expect_error = [&](quantize_params p, const std::string& words) {
        auto r = quantize_model(p);
        ASSERT_FALSE(r.is_ok()) << words;
        EXPECT_NE(r.error().message().find(words), std::string::npos) << r.error().message();
        EXPECT_FALSE(fs::exists(p.output_path));
    };
    auto p            = bpw_run(dir.file("x"), 3.5);
    p.bpw_sensitivity = "loss";
    expect_error(p, "--bpw-sensitivity 'loss'");
    p             = bpw_run(dir.file("x"), 3.5);
    p.bpw_windows = 0;
    expect_error(p, "--bpw-windows 0");
    p              = bpw_run(dir.file("x"), 3.5);
    p.bpw_measured = dir.file("missing.json");
    expect_error(p, "missing.json");

    // A plan of the hessian measure holds no output errors; one of other candidates does not fit.
    auto h            = bpw_run(dir.file("h"), 3.5);
    h.bpw_sensitivity = "hessian";
    h.report_path     = dir.file("h.json");
    ASSERT_TRUE(quantize_model(h).is_ok());
    p              = bpw_run(dir.file("x"), 3.5);
    p.bpw_measured = h.report_path;
    expect_error(p, "measured with --bpw-sensitivity hessian");
    p                 = bpw_run(dir.file("x"), 3.5);
    p.bpw_sensitivity = "hessian";
    p.bpw_measured    = h.report_path;
    p.bpw_group_sizes = {64};
    expect_error(p, "other candidates");
    // Files that are not this run's plan: other units, values of the wrong type.
    json one = {{"bpw_sensitivity", "hessian"}, {"modules", json::array({{{"module", "lm_head"}}})}};
    test::write_file(dir.file("one.json"), one.dump());
    p                 = bpw_run(dir.file("x"), 3.5);
    p.bpw_sensitivity = "hessian";
    p.bpw_measured    = dir.file("one.json");
    expect_error(p, "1 units, this run has 16");
    json bad                                               = json::parse(test::read_file(h.report_path));
    bad["bit_plan"]["modules"][0]["candidates"][0]["bits"] = "three";
    test::write_file(dir.file("bad.json"), bad.dump());
    p.bpw_measured = dir.file("bad.json");
    expect_error(p, "not a plan of this format");
}
