// Loading refuses inconsistent or hostile checkpoints instead of giving a wrong answer (issue 15,
// docs/reliability.md): NaN/Inf in any floating tensor (found in the conversion pass), a config whose
// num_hidden_layers disagrees with the layers in the files, tensors the model does not use (warning,
// error with --strict), and files that are not regular files (a FIFO must not hang the reader).
// On copies of the bundled tiny-llama (4 layers, F16).
#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fmt/format.h>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "io/tensor_source.h"
#include "model/llama.h"
#include "test_util.h"

using namespace gptq;
namespace fs = std::filesystem;

namespace {

std::string tiny() {
    return test::source_path("models/tiny-llama");
}

std::string copy_tiny(const test::temp_dir& dir, const std::string& name = "model") {
    const std::string out = dir.file(name);
    fs::create_directories(out);
    for (const auto& e : fs::directory_iterator(tiny()))
        fs::copy_file(e.path(), out + "/" + e.path().filename().string());
    return out;
}

// Set element `i` of F16 tensor `name` in the copy's model.safetensors to `bits`.
void patch_f16(const std::string& model, const std::string& name, int64_t i, uint16_t bits) {
    std::string bytes = test::read_file(model + "/model.safetensors");
    auto h = safetensors_parse_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), bytes.size(), "x");
    ASSERT_TRUE(h.is_ok());
    bool found = false;
    for (const auto& t : h->tensors)
        if (t.name == name) {
            ASSERT_EQ(t.type, dtype::DTYPE_F16);
            std::memcpy(bytes.data() + h->data_start + t.begin + 2 * i, &bits, 2);
            found = true;
        }
    ASSERT_TRUE(found) << name;
    test::write_file(model + "/model.safetensors", bytes);
}

void set_config_key(const std::string& model, const std::string& key, const nlohmann::json& value) {
    auto j = nlohmann::json::parse(test::read_file(model + "/config.json"));
    j[key] = value;
    test::write_file(model + "/config.json", j.dump(2));
}

// Add tensors to the copy: model.safetensors stays as it is, `extra` goes to extra.safetensors, and
// an index maps every tensor to its file.
void add_extra_tensors(const std::string& model, const std::vector<std::string>& extra, int64_t n = 4,
                       uint16_t value = 0x3c00) {
    test::temp_dir            tmp("extra");
    std::vector<uint16_t>     data(static_cast<size_t>(n), value);
    std::vector<named_buffer> bufs;
    for (const auto& name : extra) bufs.push_back({{name, dtype::DTYPE_F16, {n}}, data.data()});
    ASSERT_TRUE(safetensors_save(tmp.path(), bufs, uint64_t(1) << 40).is_ok());
    fs::copy_file(tmp.file("model.safetensors"), model + "/extra.safetensors");
    auto src = tensor_source::open(model + "/model.safetensors");
    ASSERT_TRUE(src.is_ok());
    std::map<std::string, std::string> wm;
    for (const auto& n : (*src)->names()) wm[n] = "model.safetensors";
    for (const auto& n : extra) wm[n] = "extra.safetensors";
    ASSERT_TRUE(safetensors_index_write(model + "/model.safetensors.index.json", 1, wm).is_ok());
}

bool contains(const std::string& s, const std::string& what) {
    return s.find(what) != std::string::npos;
}

constexpr uint16_t k_f16_nan = 0x7e00, k_f16_inf = 0xfc00;  // NaN, -Inf

// `gptq CMD MODEL ARGS`, killed after 60 s so that a hang fails the test instead of stalling CI.
test::run_result run_gptq(const std::string& cmd, const std::string& model, const std::string& args) {
    return test::run_command("timeout 60 " + test::gptq_binary() + " " + cmd + " " + model + " " + args);
}

}  // namespace

TEST(load_validation, non_finite_values_in_any_float_tensor_are_refused_naming_it) {
    // A norm, a dense linear, the embeddings: each read through the conversion pass of read_f32.
    for (const std::string name : {"model.layers.2.input_layernorm.weight", "model.layers.0.self_attn.k_proj.weight",
                                   "model.embed_tokens.weight", "model.norm.weight"}) {
        SCOPED_TRACE(name);
        test::temp_dir dir("nonfinite");
        const auto     model = copy_tiny(dir);
        patch_f16(model, name, 7, name == "model.norm.weight" ? k_f16_inf : k_f16_nan);
        auto m = llama_model::open(model);
        ASSERT_TRUE(m.is_ok()) << m.error().message();  // open reads nothing
        status st = (*m)->layers_load_all();
        if (st.is_ok()) st = (*m)->globals_load();
        ASSERT_FALSE(st.is_ok());
        EXPECT_TRUE(contains(st.message(), "'" + name + "'")) << st.message();
        EXPECT_TRUE(contains(st.message(), "NaN or Inf at element 7 ")) << st.message();
        EXPECT_TRUE(contains(st.message(), "model.safetensors")) << st.message();
    }
}

TEST(load_validation, ppl_and_generate_exit_non_zero_on_a_nan_weight) {
    test::temp_dir dir("nonfinite-cli");
    const auto     model = copy_tiny(dir);
    patch_f16(model, "model.layers.1.post_attention_layernorm.weight", 3, k_f16_nan);
    for (const auto& [cmd, args] : std::vector<std::pair<std::string, std::string>>{
             {"ppl", "--seqlen 32 --max-windows 1 --json"}, {"generate", "-p hello -n 4 --temperature 0"}}) {
        SCOPED_TRACE(cmd);
        const auto r = run_gptq(cmd, model, args);
        EXPECT_NE(r.exit_code, 0);
        EXPECT_TRUE(contains(r.err, "model.layers.1.post_attention_layernorm.weight")) << r.err;
        EXPECT_TRUE(contains(r.err, "NaN or Inf")) << r.err;
        EXPECT_FALSE(contains(r.out, "\"ppl\"")) << r.out;
    }
}

TEST(load_validation, read_f32_refuses_non_finite_in_every_float_dtype) {
    test::temp_dir        dir("read-f32");
    const float           inf = std::numeric_limits<float>::infinity();
    std::vector<float>    f32 = {1, 2, inf, 4};
    std::vector<uint16_t> f16 = {0x3c00, 0x7c01, 0x3c00, 0x7e00}, bf16 = {0x3f80, 0x3f80, 0x7f80, 0x3f80};
    ASSERT_TRUE(safetensors_save(dir.path(),
                                 {{{"a", dtype::DTYPE_F32, {4}}, f32.data()},
                                  {{"b", dtype::DTYPE_F16, {4}}, f16.data()},
                                  {{"c", dtype::DTYPE_BF16, {4}}, bf16.data()}},
                                 uint64_t(1) << 40)
                    .is_ok());
    auto src = tensor_source::open(dir.path());
    ASSERT_TRUE(src.is_ok());
    std::vector<float> out(4);
    for (const auto& [name, first, count] :
         std::vector<std::tuple<std::string, int, int>>{{"a", 2, 1}, {"b", 1, 2}, {"c", 2, 1}}) {
        SCOPED_TRACE(name);
        const status st = (*src)->read_f32(name, out.data());
        ASSERT_FALSE(st.is_ok());
        EXPECT_TRUE(contains(
            st.message(), fmt::format("'{}' holds NaN or Inf at element {} ({} non-finite value", name, first, count)))
            << st.message();
    }
}

TEST(load_validation, fewer_layers_in_the_config_than_in_the_files_is_an_error) {
    test::temp_dir dir("layers");
    const auto     model = copy_tiny(dir);
    set_config_key(model, "num_hidden_layers", 3);
    auto m = llama_model::open(model);
    ASSERT_FALSE(m.is_ok());
    const std::string msg = m.error().message();
    EXPECT_TRUE(contains(msg, "config.json")) << msg;
    EXPECT_TRUE(contains(msg, "num_hidden_layers is 3 but the weights hold layers up to 3")) << msg;
    const auto r = run_gptq("ppl", model, "--seqlen 32 --max-windows 1");
    EXPECT_EQ(r.exit_code, 1) << r.err;
    EXPECT_TRUE(contains(r.err, "num_hidden_layers is 3")) << r.err;
}

TEST(load_validation, more_layers_in_the_config_than_in_the_files_names_the_missing_tensor) {
    test::temp_dir dir("layers-more");
    const auto     model = copy_tiny(dir);
    set_config_key(model, "num_hidden_layers", 5);
    auto m = llama_model::open(model);
    ASSERT_FALSE(m.is_ok());
    EXPECT_TRUE(contains(m.error().message(), "'model.layers.4.")) << m.error().message();
    EXPECT_TRUE(contains(m.error().message(), "is missing")) << m.error().message();
}

TEST(load_validation, unknown_tensors_warn_and_strict_refuses) {
    test::temp_dir dir("unknown");
    const auto     model = copy_tiny(dir);
    // rotary_emb.inv_freq is a buffer older transformers saved: known, skipped silently.
    add_extra_tensors(model, {"model.layers.0.self_attn.rotary_emb.inv_freq", "model.layers.1.mlp.extra_norm.weight",
                              "vision_tower.proj.weight"});
    auto m = llama_model::open(model);
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    auto strict = llama_model::open(model, {.strict = true});
    ASSERT_FALSE(strict.is_ok());
    const std::string msg = strict.error().message();
    EXPECT_TRUE(contains(msg, "2 tensors the model does not use")) << msg;
    EXPECT_TRUE(contains(msg, "'model.layers.1.mlp.extra_norm.weight'")) << msg;
    EXPECT_TRUE(contains(msg, "'vision_tower.proj.weight'")) << msg;
    EXPECT_FALSE(contains(msg, "inv_freq")) << msg;

    const auto warn = run_gptq("ppl", model, "--seqlen 32 --max-windows 1 --json");
    EXPECT_EQ(warn.exit_code, 0) << warn.err;
    EXPECT_TRUE(contains(warn.err, "2 tensors the model does not use, ignored")) << warn.err;
    const auto refuse = run_gptq("ppl", model, "--seqlen 32 --max-windows 1 --strict");
    EXPECT_EQ(refuse.exit_code, 1) << refuse.err;
    EXPECT_TRUE(contains(refuse.err, "vision_tower.proj.weight")) << refuse.err;
    const auto gen = run_gptq("generate", model, "-p hi -n 2 --strict");
    EXPECT_EQ(gen.exit_code, 1) << gen.err;
}

TEST(load_validation, a_fifo_is_refused_without_hanging) {
    test::temp_dir dir("fifo");
    // model.safetensors a FIFO (nobody writes to it: opening it for reading would block forever).
    const auto model = copy_tiny(dir, "weights-fifo");
    fs::remove(model + "/model.safetensors");
    ASSERT_EQ(mkfifo((model + "/model.safetensors").c_str(), 0644), 0);
    auto src = tensor_source::open(model);
    ASSERT_FALSE(src.is_ok());
    EXPECT_TRUE(contains(src.error().message(), "model.safetensors: not a regular file (a FIFO)"))
        << src.error().message();
    for (const char* cmd : {"inspect", "ppl", "generate"}) {
        SCOPED_TRACE(cmd);
        const auto r = run_gptq(cmd, model, std::string(cmd) == "generate" ? "-p hi -n 2" : "");
        EXPECT_EQ(r.exit_code, 1) << r.err;  // not 124: timeout's code for a hang
        EXPECT_TRUE(contains(r.err, "FIFO")) << r.err;
    }
    // config.json a FIFO, and the model path itself a FIFO.
    const auto cfg_fifo = copy_tiny(dir, "config-fifo");
    fs::remove(cfg_fifo + "/config.json");
    ASSERT_EQ(mkfifo((cfg_fifo + "/config.json").c_str(), 0644), 0);
    auto m = llama_model::open(cfg_fifo);
    ASSERT_FALSE(m.is_ok());
    EXPECT_TRUE(contains(m.error().message(), "FIFO")) << m.error().message();
    ASSERT_EQ(mkfifo(dir.file("path-fifo").c_str(), 0644), 0);
    auto p = tensor_source::open(dir.file("path-fifo"));
    ASSERT_FALSE(p.is_ok());
    EXPECT_TRUE(contains(p.error().message(), "a FIFO, expected a model folder or a .safetensors file"))
        << p.error().message();
}

TEST(load_validation, a_bias_the_architecture_lacks_is_accepted_when_zero_and_refused_otherwise) {
    // AutoGPTQ writes a zero .bias for every linear of a Llama (tests/data/interop): harmless. A
    // non-zero one would be dropped by a model without biases: an error naming it.
    const std::string q = "model.layers.0.self_attn.q_proj.bias", down = "model.layers.3.mlp.down_proj.bias";
    {
        test::temp_dir dir("zero-bias");
        const auto     model = copy_tiny(dir);
        add_extra_tensors(model, {q, down}, 256, 0x0000);
        auto m = llama_model::open(model, {.strict = true});  // not even a warning: known and empty
        ASSERT_TRUE(m.is_ok()) << m.error().message();
    }
    {
        test::temp_dir dir("nonzero-bias");
        const auto     model = copy_tiny(dir);
        add_extra_tensors(model, {down}, 256, 0x3c00);
        auto m = llama_model::open(model);
        ASSERT_FALSE(m.is_ok());
        const std::string msg = m.error().message();
        EXPECT_TRUE(contains(msg, "'" + down + "' holds a non-zero value (1 at element 0)")) << msg;
        EXPECT_TRUE(contains(msg, "config.json gives this linear no bias")) << msg;
    }
}
