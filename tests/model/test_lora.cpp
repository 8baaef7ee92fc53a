// LoRA adapters at inference (issue 21 Part 1, docs/lora.md) against peft + transformers
// (tests/data/lora, scripts/make_lora_goldens.py): logits within 1e-3 relative and the same greedy
// tokens, on the FP16 tiny-llama (one adapter, another with use_rslora and a regex target, both at
// once, a user scale) and on a GPTQ checkpoint (the base stays quantized); merge-lora's model
// against peft's merge_and_unload; a ragged batch whose rows use different adapters; the errors for
// the variants we do not run.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "engine/model_session.h"
#include "golden.h"
#include "gptq/lora.h"
#include "interop_fixture.h"
#include "io/safetensors.h"
#include "io/tensor_source.h"
#include "model/lora.h"
#include "test_util.h"

using namespace gptq;
using namespace gptq::test;
namespace fs = std::filesystem;

namespace {

// The bar (F32 both sides). Measured: about 1e-6 (see the printed figures).
constexpr double k_rel_tol = 1e-3;

const std::string k_dir  = source_path("tests/data/lora");
const std::string k_tiny = source_path("models/tiny-llama");

struct case_seq {
    std::vector<int32_t> ids, positions, greedy;
    std::vector<float>   logits;  // [positions, n_vocab]
};

std::vector<case_seq> golden_case(const std::string& name) {
    auto f = safetensors_file::open(k_dir + "/golden.safetensors");
    EXPECT_TRUE(f.is_ok()) << f.error().message();
    std::vector<case_seq> out;
    if (!f.is_ok()) return out;
    for (int k = 0;; ++k) {
        const std::string p = name + ".seq" + std::to_string(k) + ".";
        if (!(*f)->find(p + "ids")) break;
        out.push_back({golden_read_i32(**f, p + "ids"), golden_read_i32(**f, p + "positions"),
                       golden_read_i32(**f, p + "greedy"), golden_read_f32(**f, p + "logits")});
    }
    EXPECT_FALSE(out.empty()) << "no case " << name << " in golden.safetensors";
    return out;
}

lora_spec spec(const std::string& sub, double scale = 1.0) {
    return {k_dir + "/" + sub, scale};
}

std::unique_ptr<model_session> open_session(const std::string& model, std::vector<lora_spec> loras, bool stack = true,
                                            bool kv_f16 = true) {
    model_session_options o;
    o.model_path = model;
    o.n_threads  = 2;
    o.kv_f16     = kv_f16;
    o.loras      = std::move(loras);
    o.lora_stack = stack;
    auto s       = model_session_open(o);
    EXPECT_TRUE(s.is_ok()) << s.error().message();
    return s.is_ok() ? std::move(*s) : nullptr;
}

int32_t argmax(const float* x, int64_t n) {
    return static_cast<int32_t>(std::max_element(x, x + n) - x);
}

// Logits (evaluate) and greedy tokens (prefill + decode steps through the KV cache) of every
// sequence of the case, with adapter `lora` of the session; returns the worst relative error.
double check_case(model_session& s, const std::string& name, int32_t lora) {
    const int64_t V     = s.n_vocab();
    double        worst = 0;
    for (const case_seq& c : golden_case(name)) {
        const int64_t      n = static_cast<int64_t>(c.ids.size());
        std::vector<float> logits(static_cast<size_t>(n * V));
        EXPECT_TRUE(s.evaluate(c.ids.data(), n, logits.data(), lora).is_ok());
        for (size_t r = 0; r < c.positions.size(); ++r) {
            const double e = row_rel_error(logits.data() + c.positions[r] * V, c.logits.data() + r * V, V);
            worst          = std::max(worst, e);
            EXPECT_LE(e, k_rel_tol) << name << ": " << n << " tokens, position " << c.positions[r];
        }
        const int64_t n_new = static_cast<int64_t>(c.greedy.size());
        EXPECT_TRUE(s.reserve(1, n + n_new).is_ok());
        std::vector<int32_t> got;
        seq_step             st{.seq = 0, .ids = c.ids.data(), .n_tokens = n, .lora = lora};
        EXPECT_TRUE(s.step({&st, 1}, logits.data()).is_ok());
        for (int64_t t = 0; t < n_new; ++t) {
            got.push_back(argmax(logits.data(), V));
            st = {.seq = 0, .ids = &got.back(), .n_tokens = 1, .lora = lora};
            if (t + 1 < n_new) {
                EXPECT_TRUE(s.step({&st, 1}, logits.data()).is_ok());
            }
        }
        EXPECT_EQ(got, c.greedy) << name << ": greedy continuation of the " << n << "-token sequence";
    }
    std::printf("[ lora     ] %s: max rel error of the logits %.3g\n", name.c_str(), worst);
    return worst;
}

TEST(lora, fp16_one_adapter_matches_peft) {
    auto s = open_session(k_tiny, {spec("adapter-a")});
    ASSERT_TRUE(s);
    ASSERT_EQ(s->lora_names(), std::vector<std::string>{"adapter-a"});
    check_case(*s, "fp16_a", 0);
    // The adapter changes the logits well beyond the tolerance (the check above can fail).
    const auto         cases = golden_case("fp16_a");
    const case_seq&    c     = cases[0];
    const int64_t      n = static_cast<int64_t>(c.ids.size()), V = s->n_vocab();
    std::vector<float> base(static_cast<size_t>(n * V));
    ASSERT_TRUE(s->evaluate(c.ids.data(), n, base.data(), -1).is_ok());
    EXPECT_GT(row_rel_error(base.data() + c.positions[0] * V, c.logits.data(), V), 50 * k_rel_tol);
}

TEST(lora, fp16_rslora_regex_targets_matches_peft) {
    auto s = open_session(k_tiny, {spec("adapter-b")});
    ASSERT_TRUE(s);
    check_case(*s, "fp16_b", 0);
}

TEST(lora, fp16_two_adapters_summed_match_peft) {
    auto s = open_session(k_tiny, {spec("adapter-a"), spec("adapter-b")});
    ASSERT_TRUE(s);
    ASSERT_EQ(s->lora_names(), std::vector<std::string>{"adapter-a+adapter-b"});
    check_case(*s, "fp16_ab", 0);
}

TEST(lora, fp16_user_scale_matches_peft) {
    auto s = open_session(k_tiny, {spec("adapter-a", 0.5)});
    ASSERT_TRUE(s);
    check_case(*s, "fp16_a_s05", 0);
}

TEST(lora, gptq_base_stays_quantized_and_matches_peft) {
    temp_dir tmp("lora-gptq");
    ASSERT_TRUE(assemble(fixture_json("gptqmodel-w4-act-order"), tmp.path()));
    auto s = open_session(tmp.path(), {spec("adapter-a2")});
    ASSERT_TRUE(s);
    ASSERT_NE(s->model().quantization(), nullptr);
    check_case(*s, "gptq_a", 0);
    // An adapter of the 4-layer model does not fit the 2-layer one: an error naming the tensor.
    model_session_options o;
    o.model_path = tmp.path();
    o.loras      = {spec("adapter-a")};
    auto bad     = model_session_open(o);
    ASSERT_FALSE(bad.is_ok());
    EXPECT_NE(bad.error().message().find("layers.2."), std::string::npos) << bad.error().message();
}

TEST(lora, ragged_batch_rows_use_their_own_adapters) {
    // An F32 KV cache: the row without an adapter is compared with evaluate's (local F32 K/V) at 1e-5.
    auto s = open_session(k_tiny, {spec("adapter-a"), spec("adapter-b")}, /*stack=*/false, /*kv_f16=*/false);
    ASSERT_TRUE(s);
    ASSERT_EQ(s->lora_names(), (std::vector<std::string>{"adapter-a", "adapter-b"}));
    const auto a = golden_case("fp16_a"), b = golden_case("fp16_b");
    // Slot 0: seq 0 with a; slot 1: seq 1 with b; slot 2: seq 1 with none; slot 3: seq 0 with a.
    ASSERT_TRUE(s->reserve(4, 64).is_ok());
    const int64_t         V     = s->n_vocab();
    std::vector<seq_step> steps = {
        {.seq = 0, .ids = a[0].ids.data(), .n_tokens = int64_t(a[0].ids.size()), .lora = 0},
        {.seq = 1, .ids = b[1].ids.data(), .n_tokens = int64_t(b[1].ids.size()), .lora = 1},
        {.seq = 2, .ids = b[1].ids.data(), .n_tokens = int64_t(b[1].ids.size()), .lora = -1},
        {.seq = 3, .ids = a[0].ids.data(), .n_tokens = int64_t(a[0].ids.size()), .lora = 0},
    };
    std::vector<float> logits(static_cast<size_t>(4 * V));
    ASSERT_TRUE(s->step(steps, logits.data()).is_ok());
    // The last rows of the golden cases are the sequences' last tokens.
    ASSERT_EQ(a[0].positions.back(), int32_t(a[0].ids.size()) - 1);
    EXPECT_LE(row_rel_error(logits.data(), a[0].logits.data() + (a[0].positions.size() - 1) * V, V), k_rel_tol);
    EXPECT_LE(row_rel_error(logits.data() + V, b[1].logits.data() + (b[1].positions.size() - 1) * V, V), k_rel_tol);
    EXPECT_LE(row_rel_error(logits.data() + 3 * V, a[0].logits.data() + (a[0].positions.size() - 1) * V, V), k_rel_tol);
    std::vector<float> base(b[1].ids.size() * size_t(V));
    ASSERT_TRUE(s->evaluate(b[1].ids.data(), int64_t(b[1].ids.size()), base.data(), -1).is_ok());
    EXPECT_LE(row_rel_error(logits.data() + 2 * V, base.data() + (b[1].ids.size() - 1) * V, V), 1e-5);
    // An adapter the session does not hold: an error naming it, nothing advanced.
    seq_step     bad{.seq = 0, .ids = a[0].ids.data(), .n_tokens = 1, .lora = 2};
    const status st = s->step({&bad, 1}, logits.data());
    EXPECT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("LoRA adapter 2"), std::string::npos) << st.message();
}

TEST(lora, merge_lora_matches_peft_merge) {
    temp_dir          tmp("lora-merge");
    const std::string out = tmp.file("merged");
    ASSERT_TRUE(merge_lora_run({.base_path = k_tiny, .loras = {spec("adapter-a")}, .out_path = out}).is_ok());
    auto src = tensor_source::open(out);
    ASSERT_TRUE(src.is_ok()) << src.error().message();
    const tensor_entry* q = (*src)->find("model.layers.0.self_attn.q_proj.weight");
    ASSERT_NE(q, nullptr);
    EXPECT_EQ(q->info->type, dtype::DTYPE_F16);
    EXPECT_TRUE(fs::exists(out + "/tokenizer.json"));
    auto s = open_session(out, {});
    ASSERT_TRUE(s);
    check_case(*s, "merged_a", -1);
    // Refused: an existing output, and a GPTQ base.
    status again = merge_lora_run({.base_path = k_tiny, .loras = {spec("adapter-a")}, .out_path = out});
    EXPECT_FALSE(again.is_ok());
    temp_dir gptq_dir("lora-merge-gptq");
    ASSERT_TRUE(assemble(fixture_json("gptqmodel-w4-act-order"), gptq_dir.path()));
    status q4 =
        merge_lora_run({.base_path = gptq_dir.path(), .loras = {spec("adapter-a2")}, .out_path = tmp.file("m2")});
    EXPECT_EQ(q4.code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_NE(q4.message().find("GPTQ checkpoint"), std::string::npos) << q4.message();
    EXPECT_FALSE(fs::exists(tmp.file("m2")));
}

// ---- the variants we refuse ------------------------------------------------------------------

// A copy of adapter-b with its config edited by `edit` (and its tensors replaced when given).
std::string variant(const temp_dir& tmp, const std::string& name, const std::function<void(nlohmann::json&)>& edit) {
    const std::string dir = tmp.file(name);
    fs::create_directories(dir);
    nlohmann::json cfg = nlohmann::json::parse(read_file(k_dir + "/adapter-b/adapter_config.json"));
    edit(cfg);
    write_file(dir + "/adapter_config.json", cfg.dump());
    fs::copy_file(k_dir + "/adapter-b/adapter_model.safetensors", dir + "/adapter_model.safetensors");
    return dir;
}

std::string load_error(const std::string& dir) {
    auto m = llama_model::open(k_tiny);
    EXPECT_TRUE(m.is_ok());
    auto a = lora_adapter_load(dir, (*m)->hparams(), 1.0f);
    EXPECT_FALSE(a.is_ok()) << dir << " loaded";
    return a.is_ok() ? "" : a.error().message();
}

// dir/adapter_model.safetensors holding `t` (one file).
void save_adapter(const std::string& dir, const std::vector<named_buffer>& t) {
    fs::remove(dir + "/adapter_model.safetensors");
    ASSERT_TRUE(safetensors_save(dir, t, uint64_t(1) << 40).is_ok());
    fs::rename(dir + "/model.safetensors", dir + "/adapter_model.safetensors");
}

// Two tensors, A [r, in] and B [out, r] of layer 0's q_proj (b_rows and values as given).
void write_qa(const std::string& dir, int64_t a_rows, int64_t b_rows, float fill, bool with_b = true) {
    std::vector<float>        a(size_t(a_rows * 256), fill), b(size_t(b_rows * 4), 0.01f);
    std::vector<named_buffer> t = {
        {{"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", dtype::DTYPE_F32, {a_rows, 256}},
         a.data()}};
    if (with_b)
        t.push_back({{"base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight", dtype::DTYPE_F32, {b_rows, 4}},
                     b.data()});
    save_adapter(dir, t);
}

TEST(lora, unsupported_variants_are_errors_naming_what) {
    temp_dir tmp("lora-bad");
    auto     has = [](const std::string& msg, const std::string& what) {
        EXPECT_NE(msg.find(what), std::string::npos) << "'" << what << "' not in: " << msg;
    };
    has(load_error(variant(tmp, "dora", [](auto& c) { c["use_dora"] = true; })), "use_dora");
    has(load_error(variant(tmp, "bias", [](auto& c) { c["bias"] = "lora_only"; })), "bias \"lora_only\"");
    has(load_error(variant(tmp, "type", [](auto& c) { c["peft_type"] = "IA3"; })), "IA3");
    has(load_error(variant(tmp, "save", [](auto& c) { c["modules_to_save"] = {"lm_head"}; })), "modules_to_save");
    has(load_error(variant(tmp, "rank", [](auto& c) { c["rank_pattern"] = {{"q_proj", 8}}; })), "rank_pattern");
    has(load_error(variant(tmp, "target", [](auto& c) { c["target_modules"] = {"q_proj", "lm_head"}; })), "lm_head");
    has(load_error(variant(tmp, "r", [](auto& c) { c["r"] = 8; })), "expected [8, ");
    const std::string shape = variant(tmp, "shape", [](auto&) {});
    write_qa(shape, 4, 100, 0.01f);
    has(load_error(shape), "[100, 4]");
    const std::string nan = variant(tmp, "nan", [](auto&) {});
    write_qa(nan, 4, 256, std::nanf(""));
    has(load_error(nan), "non-finite");
    const std::string half = variant(tmp, "half", [](auto&) {});
    write_qa(half, 4, 256, 0.01f, /*with_b=*/false);
    has(load_error(half), "has lora_A but no lora_B");
    has(load_error(tmp.file("nowhere")), "no such folder");
    // A tensor for a module the model lacks.
    const std::string  emb = variant(tmp, "emb", [](auto&) {});
    std::vector<float> e(4 * 256, 0.0f);
    save_adapter(
        emb,
        {{{"base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight", dtype::DTYPE_F32, {4, 256}}, e.data()}});
    has(load_error(emb), "qkv_proj");
    // DoRA's magnitude vector among the tensors.
    const std::string mag = variant(tmp, "mag", [](auto&) {});
    save_adapter(mag,
                 {{{"base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector", dtype::DTYPE_F32, {256}},
                   e.data()}});
    has(load_error(mag), "DoRA");
    // Only the pickle form.
    const std::string bin = variant(tmp, "bin", [](auto&) {});
    fs::rename(bin + "/adapter_model.safetensors", bin + "/adapter_model.bin");
    has(load_error(bin), "adapter_model.bin");
}

TEST(lora, spec_parse) {
    auto a = lora_spec_parse("some/dir");
    ASSERT_TRUE(a.is_ok());
    EXPECT_EQ(a->path, "some/dir");
    EXPECT_EQ(a->scale, 1.0);
    auto b = lora_spec_parse("some/dir:0.5");
    ASSERT_TRUE(b.is_ok());
    EXPECT_EQ(b->path, "some/dir");
    EXPECT_EQ(b->scale, 0.5);
    auto c = lora_spec_parse("c:/odd:name");  // not a number after the last ':': the whole path
    ASSERT_TRUE(c.is_ok());
    EXPECT_EQ(c->path, "c:/odd:name");
    EXPECT_FALSE(lora_spec_parse("dir:inf").is_ok());
    EXPECT_FALSE(lora_spec_parse(":2").is_ok());
    EXPECT_FALSE(lora_spec_parse("").is_ok());
}

// The command line: generate with --lora gives peft's greedy tokens; a bad --lora is an error.
TEST(lora, cli_generate_with_lora) {
    if (!fs::exists(gptq_binary())) GTEST_SKIP() << "no gptq binary";
    const run_result r = run_command(gptq_binary() + " generate " + k_tiny + " -p 'Once upon a time' -n 6 " +
                                     "--temperature 0 --threads 2 --lora " + k_dir + "/adapter-a:1");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    const run_result base =
        run_command(gptq_binary() + " generate " + k_tiny + " -p 'Once upon a time' -n 6 --temperature 0 --threads 2");
    EXPECT_EQ(base.exit_code, 0) << base.err;
    EXPECT_NE(r.out, base.out) << "the adapter changed nothing";
    const run_result bad = run_command(gptq_binary() + " ppl " + k_tiny + " --lora " + k_dir + "/nowhere");
    EXPECT_NE(bad.exit_code, 0);
    EXPECT_NE(bad.err.find("nowhere"), std::string::npos) << bad.err;
}

}  // namespace
