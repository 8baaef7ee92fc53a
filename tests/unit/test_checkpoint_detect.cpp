// io/checkpoint, the one checkpoint detector of every command, on small GPTQ checkpoints built from
// the bundled tiny-llama in temp folders (RTN, well under a second each):
// - AutoGPTQ's layout (quantize_config.json with model_file_base_name, a config.json without
//   quantization_config, gptq_model-4bit-128g.safetensors) and quant_config.json load exactly
//   like our layout, through the library and the CLI (ppl, generate, bench on the CPU);
// - GPTQModel `dynamic` rules: a module with other bits / group size, a module left dense;
// - a quantized lm_head ("lm_head": true);
// - configs that disagree with the tensors are refused with file, field and both values;
// - two config files that disagree: the tensors decide, a warning, `inspect --check` lists it.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "gptq/quantize.h"
#include "io/checkpoint.h"
#include "io/gptq_checkpoint.h"
#include "model/llama.h"
#include "quant/gptq.h"
#include "test_util.h"

using namespace gptq;
namespace fs = std::filesystem;

namespace {

std::string tiny() {
    return test::source_path("models/tiny-llama");
}

json read_json(const std::string& path) {
    return json::parse(test::read_file(path));
}
void write_json(const std::string& path, const json& j) {
    test::write_file(path, j.dump(2));
}

// Every tensor of a .safetensors file as (declaration, bytes), to edit and write back.
using tensor_map = std::map<std::string, std::pair<safetensors_decl, std::vector<uint8_t>>>;

tensor_map read_all(const std::string& file) {
    tensor_map m;
    auto       src = tensor_source::open(file);
    EXPECT_TRUE(src.is_ok()) << src.error().message();
    for (const auto& name : (*src)->names()) {
        const tensor_entry*  e = (*src)->find(name);
        std::vector<uint8_t> bytes(e->info->nbytes());
        e->file->copy_to(*e->info, bytes.data());
        m[name] = {{name, e->info->type, e->info->shape}, std::move(bytes)};
    }
    return m;
}

void write_all(const std::string& file, const tensor_map& m) {
    std::vector<safetensors_decl> decls;
    for (const auto& [n, t] : m) decls.push_back(t.first);
    auto w = safetensors_writer::create(file, decls);
    ASSERT_TRUE(w.is_ok()) << w.error().message();
    for (const auto& [n, t] : m) ASSERT_TRUE((*w)->write(n, t.second.data(), t.second.size()).is_ok());
    ASSERT_TRUE((*w)->finish().is_ok());
}

// Replace (or add) a GPTQ module's tensors, packed by io's writer.
void put_module(tensor_map* m, const std::string& dir, const std::string& module, const gptq_linear_data& d) {
    for (const char* s : {".weight", ".qweight", ".qzeros", ".scales", ".g_idx"}) m->erase(module + s);
    const std::string tmp = dir + "/module.safetensors";
    {
        auto w = safetensors_writer::create(tmp, gptq_linear_decls(module, d.n_out, d.n_in, d.n_groups, d.bits, false));
        ASSERT_TRUE(w.is_ok());
        ASSERT_TRUE(gptq_linear_write(**w, module, d, gptq_checkpoint_format::GPTQ_FORMAT_V1).is_ok());
        ASSERT_TRUE((*w)->finish().is_ok());
    }
    for (auto& [n, t] : read_all(tmp)) (*m)[n] = std::move(t);
    fs::remove(tmp);
}

// RTN of an original weight [n_out, n_in] in the checkpoint's unpacked form (sym, so v1 holds it).
gptq_linear_data rtn_module(const std::vector<float>& w, int64_t n_out, int64_t n_in, int bits, int gs,
                            std::vector<float>* dequantized) {
    gptq_options o;
    o.bits       = bits;
    o.group_size = gs;
    auto q       = rtn_quantize(ops_context{}, w.data(), n_out, n_in, o);
    EXPECT_TRUE(q.is_ok());
    gptq_linear_data d;
    d.n_out    = n_out;
    d.n_in     = n_in;
    d.n_groups = q->n_groups;
    d.bits     = bits;
    d.codes    = q->codes;
    d.zeros    = q->zeros;
    d.g_idx    = q->g_idx;
    for (float s : q->scales) d.scales.push_back(f32_to_f16(s));
    dequantized->resize(w.size());
    quantized_linear_dequantize(*q, dequantized->data());
    return d;
}

std::vector<float> original_weight(const std::string& name, int64_t n_out, int64_t n_in) {
    auto               src = tensor_source::open(tiny());
    std::vector<float> w(static_cast<size_t>(n_out * n_in));
    EXPECT_TRUE((*src)->read_f32(name, w.data(), {n_out, n_in}).is_ok());
    return w;
}

// Our layout: `gptq quantize --method rtn` (4-bit, g128, sym, v1) of the bundled tiny-llama.
std::string make_ours(const test::temp_dir& dir, const std::string& name) {
    quantize_params p;
    p.model_path  = tiny();
    p.output_path = dir.file(name);
    p.method      = "rtn";
    p.n_threads   = 1;
    auto r        = quantize_model(p);
    EXPECT_TRUE(r.is_ok()) << r.error().message();
    return p.output_path;
}

// AutoGPTQ <= 0.7 / TheBloke: config.json without quantization_config, the weights named by
// quantize_config.json's model_file_base_name, AutoGPTQ's keys only.
std::string make_autogptq(const std::string& ours, const std::string& out) {
    fs::copy(ours, out, fs::copy_options::recursive);
    json c = read_json(out + "/config.json");
    c.erase("quantization_config");
    write_json(out + "/config.json", c);
    json q = read_json(out + "/quantize_config.json");
    for (const char* k : {"checkpoint_format", "lm_head", "meta", "pack_dtype", "quant_method"}) q.erase(k);
    q["model_file_base_name"] = "gptq_model-4bit-128g";
    write_json(out + "/quantize_config.json", q);
    fs::rename(out + "/model.safetensors", out + "/gptq_model-4bit-128g.safetensors");
    return out;
}

// Set a GPTQ config key in both config files (they stay in agreement).
void set_config(const std::string& dir, const std::string& key, const json& value) {
    json q = read_json(dir + "/quantize_config.json");
    q[key] = value;
    write_json(dir + "/quantize_config.json", q);
    json c                        = read_json(dir + "/config.json");
    c["quantization_config"][key] = value;
    write_json(dir + "/config.json", c);
}

std::vector<float> logits_of(const std::string& path) {
    auto m = llama_model::open(path);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    if (!m) return {};
    const std::vector<int32_t> ids = {1, 450, 4996, 1735, 1701, 432, 7204, 975, 278, 8166, 1203, 2988};
    std::vector<float>         logits(ids.size() * static_cast<size_t>((*m)->hparams().n_vocab));
    EXPECT_TRUE((*m)->forward(ops_context{}, ids.data(), int64_t(ids.size()), nullptr, logits.data()).is_ok());
    return logits;
}

std::string open_error(const std::string& path) {
    auto m = llama_model::open(path);
    return m.is_ok() ? std::string("(opened)") : m.error().message();
}

const std::string k_down1 = "model.layers.1.mlp.down_proj";
const std::string k_o2    = "model.layers.2.self_attn.o_proj";

}  // namespace

TEST(checkpoint_detect, autogptq_layout_and_quant_config_load_like_ours) {
    test::temp_dir dir("det-auto");
    const auto     ours     = make_ours(dir, "ours");
    const auto     auto_dir = make_autogptq(ours, dir.file("auto"));

    auto ck = checkpoint_detect(auto_dir);
    ASSERT_TRUE(ck.is_ok()) << ck.error().message();
    EXPECT_TRUE(ck->check().is_ok()) << ck->check().message();
    ASSERT_TRUE(ck->gptq.has_value());
    EXPECT_EQ(ck->gptq->bits, 4);
    EXPECT_EQ(ck->gptq->group_size, 128);
    EXPECT_EQ(ck->modules.size(), 28u);
    EXPECT_NE(ck->weights.reason.find("model_file_base_name 'gptq_model-4bit-128g'"), std::string::npos)
        << ck->weights.reason;
    EXPECT_TRUE(ck->findings.empty());

    const auto expect = logits_of(ours);
    ASSERT_FALSE(expect.empty());
    EXPECT_EQ(logits_of(auto_dir), expect);

    // quant_config.json (the other file name AutoGPTQ and GPTQModel read), no model_file_base_name.
    const std::string qc = dir.file("quant-config");
    fs::copy(auto_dir, qc, fs::copy_options::recursive);
    json q = read_json(qc + "/quantize_config.json");
    q.erase("model_file_base_name");
    write_json(qc + "/quant_config.json", q);
    fs::remove(qc + "/quantize_config.json");
    auto c2 = checkpoint_detect(qc);
    ASSERT_TRUE(c2.is_ok()) << c2.error().message();
    EXPECT_EQ(c2->gptq_files, std::vector<std::string>{"quant_config.json"});
    EXPECT_EQ(c2->weights.reason, "the folder's only .safetensors file");
    EXPECT_EQ(logits_of(qc), expect);

    // A GPTQ checkpoint is refused as quantize's input whatever file says so.
    quantize_params p;
    p.model_path  = auto_dir;
    p.output_path = dir.file("twice");
    p.method      = "rtn";
    auto r        = quantize_model(p);
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.error().message().find("already quantized"), std::string::npos) << r.error().message();
    EXPECT_NE(r.error().message().find("quantize_config.json"), std::string::npos) << r.error().message();
}

TEST(checkpoint_detect, autogptq_layout_through_the_cli) {
    test::temp_dir dir("det-cli");
    const auto     ours     = make_ours(dir, "ours");
    const auto     auto_dir = make_autogptq(ours, dir.file("auto"));
    const auto     gptq     = test::gptq_binary();
    auto           run_both = [&](const std::string& args) {
        auto a = test::run_command(gptq + " " + args + " " + ours);
        auto b = test::run_command(gptq + " " + args + " " + auto_dir);
        EXPECT_EQ(a.exit_code, 0) << args << ": " << a.err;
        EXPECT_EQ(b.exit_code, 0) << args << ": " << b.err;
        return std::make_pair(a, b);
    };
    auto ppl = run_both("ppl --seqlen 64 --max-windows 2 --threads 1 --json");
    ASSERT_EQ(ppl.first.exit_code, 0);
    EXPECT_EQ(json::parse(ppl.first.out)["ppl"], json::parse(ppl.second.out)["ppl"]);

    auto gen = run_both("generate -p 'Once upon a time' -n 8 --temperature 0 --threads 1");
    EXPECT_EQ(gen.first.out, gen.second.out);
    EXPECT_FALSE(gen.first.out.empty());

    auto bench = run_both("bench --device cpu --batch 1 --prompt 8 --gen 2 --repeat 1 --threads 1 --json");
    ASSERT_EQ(bench.second.exit_code, 0);
    EXPECT_NE(bench.second.out.find("gptq-4bit-g128"), std::string::npos) << bench.second.out;

    auto inspect = test::run_command(gptq + " inspect --json " + auto_dir);
    ASSERT_EQ(inspect.exit_code, 0) << inspect.err;
    auto j = json::parse(inspect.out);
    EXPECT_EQ(j["quantization"]["group_size"], 128);
    EXPECT_EQ(j["quantization"]["module_kinds"], json({{"4-bit g128", 28}}));
    EXPECT_EQ(j["n_params"], json::parse(test::run_command(gptq + " inspect --json " + tiny()).out)["n_params"]);
}

TEST(checkpoint_detect, which_files_hold_the_weights) {
    test::temp_dir dir("det-files");
    const auto     ours     = make_ours(dir, "ours");
    const auto     auto_dir = make_autogptq(ours, dir.file("auto"));
    // model_file_base_name wins over model.safetensors and any other .safetensors file, which are
    // named as not read.
    fs::copy_file(tiny() + "/model.safetensors", auto_dir + "/model.safetensors");
    auto w = checkpoint_weights_locate(auto_dir);
    ASSERT_TRUE(w.is_ok()) << w.error().message();
    EXPECT_EQ(w->file, auto_dir + "/gptq_model-4bit-128g.safetensors");
    ASSERT_EQ(w->findings.size(), 1u);
    EXPECT_NE(w->findings[0].message.find("not read: model.safetensors"), std::string::npos) << w->findings[0].message;
    auto src = tensor_source::open(auto_dir);  // the same decision
    ASSERT_TRUE(src.is_ok());
    EXPECT_TRUE((*src)->has("model.layers.0.self_attn.q_proj.qweight"));
    EXPECT_EQ(logits_of(auto_dir), logits_of(ours));

    // Without the base name: model.safetensors (the FP16 model here, which the GPTQ config then
    // disagrees with: no quantized tensor at all).
    json q = read_json(auto_dir + "/quantize_config.json");
    q.erase("model_file_base_name");
    write_json(auto_dir + "/quantize_config.json", q);
    auto fp16 = checkpoint_weights_locate(auto_dir);
    ASSERT_TRUE(fp16.is_ok());
    EXPECT_EQ(fp16->reason, "model.safetensors");
    EXPECT_NE(open_error(auto_dir).find("describes a GPTQ checkpoint but no tensor is quantized"), std::string::npos)
        << open_error(auto_dir);

    // Two files and nothing to say which: an error naming them.
    fs::rename(auto_dir + "/model.safetensors", auto_dir + "/other.safetensors");
    auto two = checkpoint_weights_locate(auto_dir);
    ASSERT_FALSE(two.is_ok());
    EXPECT_NE(two.error().message().find("2 .safetensors files (gptq_model-4bit-128g.safetensors, other.safetensors)"),
              std::string::npos)
        << two.error().message();

    // A base name that names no file: the usual order, with a warning.
    q["model_file_base_name"] = "gptq_model-8bit-32g";
    write_json(auto_dir + "/quantize_config.json", q);
    fs::remove(auto_dir + "/other.safetensors");
    auto fallback = checkpoint_weights_locate(auto_dir);
    ASSERT_TRUE(fallback.is_ok());
    EXPECT_EQ(fallback->reason, "the folder's only .safetensors file");
    ASSERT_EQ(fallback->findings.size(), 1u);
    EXPECT_NE(fallback->findings[0].message.find("'gptq_model-8bit-32g'"), std::string::npos);

    // Only pickle weights: said so.
    test::temp_dir bin("det-bin");
    test::write_file(bin.file("pytorch_model.bin"), "x");
    auto b = checkpoint_weights_locate(bin.path());
    ASSERT_FALSE(b.is_ok());
    EXPECT_NE(b.error().message().find("pickle files (pytorch_model.bin)"), std::string::npos) << b.error().message();
}

TEST(gptq_config, dynamic_rules_file_order_anchoring_and_errors) {
    test::temp_dir dir("det-dyn-cfg");
    // File order differs from sorted order: the first rule in the file decides.
    test::write_file(dir.file("quantize_config.json"), R"({"bits": 4, "group_size": 128, "sym": true,
        "dynamic": {"+:model\\.layers\\.1\\..*": {"bits": 8, "group_size": 32},
                    "-:.*\\.o_proj": {},
                    "+:.*": {"bits": 2},
                    "layers\\.3\\.": {"bits": 3}}})");
    auto c = gptq_config_read(dir.file("quantize_config.json"));
    ASSERT_TRUE(c.is_ok()) << c.error().message();
    ASSERT_EQ(c->dynamic.size(), 4u);
    EXPECT_EQ(c->dynamic[0].key, "+:model\\.layers\\.1\\..*");
    auto l1 = c->for_module("model.layers.1.self_attn.o_proj");  // rule 0 before the skip rule
    ASSERT_TRUE(l1.has_value());
    EXPECT_EQ(l1->bits, 8);
    EXPECT_EQ(l1->group_size, 32);
    EXPECT_NE(l1->source.find("dynamic '+:model\\.layers\\.1\\..*'"), std::string::npos) << l1->source;
    EXPECT_FALSE(c->for_module("model.layers.2.self_attn.o_proj").has_value());  // "-:"
    auto l3 = c->for_module("model.layers.3.mlp.up_proj");  // "+:.*" comes first; "layers\.3\." is anchored anyway
    ASSERT_TRUE(l3.has_value());
    EXPECT_EQ(l3->bits, 2);
    EXPECT_EQ(l3->group_size, 128);

    // Anchored at the start (Python re.match), not at the end; no prefix = "+:".
    test::write_file(
        dir.file("quantize_config.json"),
        R"({"bits": 4, "group_size": 128, "dynamic": {"layers\\.3\\.": {"bits": 3}, "model\\.layers\\.0": {"bits": 8}}})");
    c = gptq_config_read(dir.file("quantize_config.json"));
    ASSERT_TRUE(c.is_ok()) << c.error().message();
    EXPECT_EQ(c->for_module("model.layers.3.mlp.up_proj")->bits, 4);
    EXPECT_EQ(c->for_module("model.layers.0.mlp.up_proj")->bits, 8);
    EXPECT_EQ(c->for_module("model.layers.01.mlp.up_proj")->bits, 8);  // a prefix match, as re.match

    // In config.json's quantization_config too, in file order.
    test::write_file(dir.file("config.json"), R"({"quantization_config": {"bits": 4, "group_size": 128,
        "dynamic": {"+:.*down.*": {"bits": 8}, "+:.*": {"bits": 2}}}})");
    auto cj = gptq_config_read(dir.file("config.json"), "quantization_config");
    ASSERT_TRUE(cj.is_ok()) << cj.error().message();
    EXPECT_EQ(cj->for_module("model.layers.0.mlp.down_proj")->bits, 8);

    for (const auto& [text, expect] : std::vector<std::pair<std::string, std::string>>{
             {R"({"bits": 4, "group_size": 128, "dynamic": {"+:model.(layers": {}}})", "does not compile at offset"},
             {R"({"bits": 4, "group_size": 128, "dynamic": {"+:.*": {"bits": 5}}})", "dynamic '+:.*': bits 5"},
             {R"({"bits": 4, "group_size": 128, "dynamic": {"+:.*": {"group_size": 0}}})", "group_size 0"},
             {R"({"bits": 4, "group_size": 128, "dynamic": {"+:.*": 8}})", "expected an object"},
             {R"({"bits": 4, "group_size": 128, "dynamic": ["x"]})", "dynamic is [\"x\"]"},
         }) {
        test::write_file(dir.file("bad.json"), text);
        auto r = gptq_config_read(dir.file("bad.json"));
        ASSERT_FALSE(r.is_ok()) << text;
        EXPECT_NE(r.error().message().find(expect), std::string::npos) << r.error().message();
        EXPECT_NE(r.error().message().find("bad.json"), std::string::npos) << r.error().message();
    }
}

TEST(checkpoint_detect, dynamic_overrides_other_bits_and_a_dense_module) {
    test::temp_dir dir("det-dyn");
    const auto     out = make_ours(dir, "dyn");
    // layer 1 down_proj: 8-bit g32; layer 2 o_proj: the original dense weight.
    tensor_map         t = read_all(out + "/model.safetensors");
    std::vector<float> down_expect;
    const auto         down_w = original_weight(k_down1 + ".weight", 256, 768);
    put_module(&t, dir.path(), k_down1, rtn_module(down_w, 256, 768, 8, 32, &down_expect));
    for (const char* s : {".qweight", ".qzeros", ".scales", ".g_idx"}) t.erase(k_o2 + s);
    {
        auto                 src = tensor_source::open(tiny());
        auto                 e   = (*src)->get(k_o2 + ".weight");
        std::vector<uint8_t> bytes(e->info->nbytes());
        e->file->copy_to(*e->info, bytes.data());
        t[k_o2 + ".weight"] = {{k_o2 + ".weight", e->info->type, e->info->shape}, bytes};
    }
    write_all(out + "/model.safetensors", t);

    // Without the rules the config disagrees with both modules.
    const std::string err = open_error(out);
    EXPECT_NE(err.find(k_down1 + ": " + out + "/quantize_config.json says bits 4, but the tensors hold 8-bit codes"),
              std::string::npos)
        << err;

    json dyn = {{"+:model\\.layers\\.1\\.mlp\\.down_proj", {{"bits", 8}, {"group_size", 32}}},
                {"-:model\\.layers\\.2\\.self_attn\\.o_proj", json::object()}};
    set_config(out, "dynamic", dyn);
    auto m = llama_model::open(out);
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    ASSERT_NE((*m)->quantization_of(k_down1), nullptr);
    EXPECT_EQ((*m)->quantization_of(k_down1)->bits, 8);
    EXPECT_EQ((*m)->quantization_of(k_down1)->group_size, 32);
    EXPECT_EQ((*m)->quantization_of(k_o2), nullptr);
    EXPECT_EQ((*m)->quantization_of("model.layers.1.mlp.up_proj")->bits, 4);
    auto l1 = (*m)->layer_load(1);
    ASSERT_TRUE(l1.is_ok()) << l1.error().message();
    ASSERT_NE((*l1)->linear(linear_role::LINEAR_DOWN).q, nullptr);
    EXPECT_EQ((*l1)->linear(linear_role::LINEAR_DOWN).dense(), down_expect);
    auto l2 = (*m)->layer_load(2);
    ASSERT_TRUE(l2.is_ok()) << l2.error().message();
    EXPECT_EQ((*l2)->linear(linear_role::LINEAR_O).q, nullptr);
    EXPECT_EQ((*l2)->linear(linear_role::LINEAR_O).w, original_weight(k_o2 + ".weight", 256, 256));
    const auto logits = logits_of(out);
    ASSERT_FALSE(logits.empty());
    for (float x : logits) ASSERT_TRUE(std::isfinite(x));

    auto inspect = test::run_command(test::gptq_binary() + " inspect --json " + out);
    ASSERT_EQ(inspect.exit_code, 0) << inspect.err;
    auto j = json::parse(inspect.out);
    EXPECT_EQ(j["quantization"]["module_kinds"], json({{"4-bit g128", 26}, {"8-bit g32", 1}}));
    EXPECT_EQ(j["quantization"]["n_dynamic_rules"], 2);
    EXPECT_EQ(j["quantization"]["group_size"], 128);

    // A "-:" rule on a module whose tensors are GPTQ is refused.
    set_config(out, "dynamic", {{"-:model\\.layers\\.0\\.mlp\\.up_proj", json::object()}});
    EXPECT_NE(open_error(out).find("leaves it unquantized (dynamic '-:model\\.layers\\.0\\.mlp\\.up_proj') but its "
                                   "tensors are GPTQ"),
              std::string::npos)
        << open_error(out);
}

TEST(checkpoint_detect, quantized_lm_head) {
    test::temp_dir dir("det-lmhead");
    const auto     out = make_ours(dir, "lm");
    // Untie (the lm_head of the tied tiny model is its embedding table), then quantize lm_head.
    json c                   = read_json(out + "/config.json");
    c["tie_word_embeddings"] = false;
    write_json(out + "/config.json", c);
    const int64_t      V = 8192, E = 256;
    tensor_map         t = read_all(out + "/model.safetensors");
    std::vector<float> lm_expect;
    put_module(&t, dir.path(), "lm_head",
               rtn_module(original_weight("model.embed_tokens.weight", V, E), V, E, 4, 128, &lm_expect));
    write_all(out + "/model.safetensors", t);

    // lm_head false with lm_head tensors: refused.
    EXPECT_NE(open_error(out).find("says lm_head false, but the checkpoint holds a quantized lm_head"),
              std::string::npos)
        << open_error(out);
    set_config(out, "lm_head", true);
    auto m = llama_model::open(out);
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    ASSERT_NE((*m)->quantization_of("lm_head"), nullptr);
    const auto logits = logits_of(out);

    // The reference: the same model with lm_head.weight = the dequantized matrix, dense F32.
    const std::string ref = dir.file("ref");
    fs::copy(out, ref, fs::copy_options::recursive);
    set_config(ref, "lm_head", false);
    for (const char* s : {".qweight", ".qzeros", ".scales", ".g_idx"}) t.erase(std::string("lm_head") + s);
    std::vector<uint8_t> bytes(lm_expect.size() * 4);
    std::memcpy(bytes.data(), lm_expect.data(), bytes.size());
    t["lm_head.weight"] = {{"lm_head.weight", dtype::DTYPE_F32, {V, E}}, bytes};
    write_all(ref + "/model.safetensors", t);
    const auto expect = logits_of(ref);
    ASSERT_EQ(logits.size(), expect.size());
    double max_diff = 0, max_abs = 0;
    for (size_t i = 0; i < logits.size(); ++i) {
        max_diff = std::max(max_diff, double(std::fabs(logits[i] - expect[i])));
        max_abs  = std::max(max_abs, double(std::fabs(expect[i])));
    }
    // Same weights, two kernels (int codes dequantized on the fly vs a dense F32 GEMM): only the
    // F32 summation order differs, ~1e-6 of the logits' scale.
    EXPECT_LT(max_diff, 1e-5 * max_abs) << max_diff << " of " << max_abs;
    std::printf("lm_head logits: max |diff| %g of max |logit| %g\n", max_diff, max_abs);

    auto ppl = test::run_command(test::gptq_binary() + " ppl --seqlen 64 --max-windows 1 --threads 1 " + out);
    EXPECT_EQ(ppl.exit_code, 0) << ppl.err;

    // lm_head true without lm_head tensors: refused.
    set_config(ref, "lm_head", true);
    EXPECT_NE(open_error(ref).find("says lm_head true, but the checkpoint has no lm_head.qweight"), std::string::npos)
        << open_error(ref);
}

TEST(checkpoint_detect, config_disagreeing_with_the_tensors_is_refused) {
    test::temp_dir dir("det-bad");
    const auto     out = make_ours(dir, "bad");
    const auto     qc  = out + "/quantize_config.json";
    struct c {
        const char* key;
        json        value;
        std::string expect;
    };
    for (const auto& [key, value, expect] : std::vector<c>{
             {"group_size", 100, "says group_size 100, but the tensors have 2 groups over 256 inputs (group size 128)"},
             {"group_size", 64, "says group_size 64, but the tensors have 2 groups over 256 inputs (group size 128)"},
             {"group_size", -1, "says group_size -1 (one group per row), but the tensors have 2 groups"},
             {"bits", 8, "says bits 8, but the tensors hold 4-bit codes"},
         }) {
        set_config(out, key, value);
        const std::string err = open_error(out);
        EXPECT_NE(err.find(expect), std::string::npos) << err;
        EXPECT_EQ(err.rfind(out + "/model.safetensors: ", 0), 0u) << err;
        EXPECT_NE(err.find(" modules (model.layers.0.mlp."), std::string::npos) << err;
        EXPECT_NE(err.find(qc), std::string::npos) << err;
        auto cli = test::run_command(test::gptq_binary() + " ppl --max-windows 1 --seqlen 64 " + out);
        EXPECT_EQ(cli.exit_code, 1);
        EXPECT_NE(cli.err.find(expect), std::string::npos) << cli.err;
        set_config(out, key, key == std::string("bits") ? json(4) : json(128));
    }
    ASSERT_EQ(open_error(out), "(opened)");

    // Act-order tensors (g_idx a permutation of k // 128) under desc_act false: refused; true: loads.
    tensor_map           t  = read_all(out + "/model.safetensors");
    auto&                gi = t["model.layers.0.mlp.up_proj.g_idx"].second;
    std::vector<int32_t> g(256);
    std::memcpy(g.data(), gi.data(), gi.size());
    std::swap(g[3], g[200]);
    std::memcpy(gi.data(), g.data(), gi.size());
    write_all(out + "/model.safetensors", t);
    EXPECT_NE(open_error(out).find("model.layers.0.mlp.up_proj: " + qc +
                                   " says desc_act false, but g_idx is in act-order (not k // 128)"),
              std::string::npos)
        << open_error(out);
    set_config(out, "desc_act", true);
    EXPECT_EQ(open_error(out), "(opened)");

    // g_idx that is no GPTQ grouping at all: refused whatever the config.
    std::swap(g[3], g[200]);
    g[0] = 1;  // group 0: 127 columns, group 1: 129
    std::memcpy(gi.data(), g.data(), gi.size());
    write_all(out + "/model.safetensors", t);
    EXPECT_NE(open_error(out).find("up_proj.g_idx does not split its 256 inputs into 2 groups of one size: group 0 "
                                   "has 127 columns, group 1 has 129"),
              std::string::npos)
        << open_error(out);
}

TEST(checkpoint_detect, config_files_that_disagree_are_warned_and_listed) {
    test::temp_dir dir("det-two");
    const auto     out    = make_ours(dir, "two");
    const auto     gptq   = test::gptq_binary();
    const auto     expect = logits_of(out);
    // config.json (what transformers reads) says 8-bit g64 asym; quantize_config.json 4-bit g128.
    json c                                 = read_json(out + "/config.json");
    c["quantization_config"]["bits"]       = 8;
    c["quantization_config"]["group_size"] = 64;
    c["quantization_config"]["sym"]        = false;
    write_json(out + "/config.json", c);
    auto ck = checkpoint_detect(out);
    ASSERT_TRUE(ck.is_ok()) << ck.error().message();
    EXPECT_TRUE(ck->check().is_ok()) << ck->check().message();
    EXPECT_EQ(ck->gptq->bits, 4);
    EXPECT_EQ(ck->gptq->group_size, 128);
    EXPECT_TRUE(ck->gptq->sym);
    std::string all;
    for (const auto& f : ck->findings) {
        EXPECT_EQ(f.level, checkpoint_finding_level::FINDING_WARNING);
        EXPECT_EQ(f.code, "config_files_disagree");
        all += f.message + "\n";
    }
    EXPECT_EQ(ck->findings.size(), 3u) << all;
    EXPECT_NE(all.find("quantize_config.json says bits 4, config.json quantization_config says bits 8; using bits 4 "
                       "(the tensors agree with it)"),
              std::string::npos)
        << all;
    EXPECT_NE(all.find("config.json quantization_config says group_size 64; using group_size 128"), std::string::npos)
        << all;
    EXPECT_NE(all.find("says sym false; using sym true (quantize_config.json is read first)"), std::string::npos)
        << all;
    EXPECT_EQ(logits_of(out), expect);

    // The commands warn and run; inspect --check lists every finding, exit 0 (warnings only).
    auto ppl = test::run_command(gptq + " ppl --seqlen 64 --max-windows 1 --threads 1 " + out);
    EXPECT_EQ(ppl.exit_code, 0) << ppl.err;
    EXPECT_NE(ppl.err.find("config.json quantization_config says bits 8"), std::string::npos) << ppl.err;
    auto check = test::run_command(gptq + " inspect --check " + out);
    EXPECT_EQ(check.exit_code, 0) << check.err;
    EXPECT_NE(check.out.find("warning: " + out + ": the GPTQ config files disagree: quantize_config.json says bits 4"),
              std::string::npos)
        << check.out;
    EXPECT_NE(check.out.find("0 errors, 3 warnings"), std::string::npos) << check.out;
    auto inspect = test::run_command(gptq + " inspect --json " + out);
    ASSERT_EQ(inspect.exit_code, 0) << inspect.err;
    EXPECT_EQ(json::parse(inspect.out)["quantization"]["group_size"], 128);
    EXPECT_EQ(json::parse(inspect.out)["findings"].size(), 3u);

    // The first file is the wrong one: the tensors still decide.
    c["quantization_config"] = read_json(out + "/quantize_config.json");
    write_json(out + "/config.json", c);
    json q          = read_json(out + "/quantize_config.json");
    q["group_size"] = 32;
    write_json(out + "/quantize_config.json", q);
    ck = checkpoint_detect(out);
    ASSERT_TRUE(ck.is_ok());
    EXPECT_TRUE(ck->check().is_ok()) << ck->check().message();
    EXPECT_EQ(ck->gptq->group_size, 128);
    EXPECT_EQ(logits_of(out), expect);

    // Both wrong (and in agreement with each other): an error; --check --json lists it, exit 1.
    set_config(out, "group_size", 64);
    auto bad = test::run_command(gptq + " inspect --check --json " + out);
    EXPECT_EQ(bad.exit_code, 1) << bad.err;
    auto j = json::parse(bad.out);
    EXPECT_EQ(j["n_errors"], 2);  // one per kind: the 24 modules of 256 inputs, the 4 of 768
    for (const auto& f : j["findings"]) {
        EXPECT_EQ(f["code"], "config_vs_tensors");
        EXPECT_NE(f["message"].get<std::string>().find("says group_size 64"), std::string::npos) << f;
    }
    auto plain = test::run_command(gptq + " inspect " + out);
    EXPECT_EQ(plain.exit_code, 1);
    EXPECT_NE(plain.err.find("says group_size 64, but the tensors have 2 groups"), std::string::npos) << plain.err;
}
