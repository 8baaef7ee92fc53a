// gptq quantize on hostile inputs (docs/reliability.md), on copies of the bundled tiny-llama with
// patched tensors: NaN/Inf in weights is refused naming the tensor; activations that overflow are
// refused naming the layer; an all-zero calibration signal falls back to RTN (bit-identical to
// --method rtn); a calibration text of one repeated token (singular Hessians) gives a finite
// checkpoint; a group size that does not divide in_features is refused up front; the memory plan
// refuses with what was needed and what was free, keeping the work folder for --resume; and a
// work folder is never taken for a model.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>

#include "gptq/quantize.h"
#include "io/hf_config.h"
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

quantize_params small_run(const std::string& model, const std::string& out) {
    quantize_params p;
    p.model_path  = model;
    p.output_path = out;
    p.nsamples    = 2;
    p.seqlen      = 32;
    p.n_threads   = 2;
    return p;
}

// A copy of tiny-llama in `dir` whose tensor `name` has F16 element i set to fn(i) for every i
// with pick(i). Returns the folder.
template <typename Pick, typename Value>
std::string patched_model(const test::temp_dir& dir, const std::string& name, Pick pick, Value value) {
    const std::string out = dir.file("model");
    fs::create_directories(out);
    for (const auto& e : fs::directory_iterator(tiny()))
        fs::copy_file(e.path(), out + "/" + e.path().filename().string());
    std::string bytes = test::read_file(out + "/model.safetensors");
    auto h = safetensors_parse_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), bytes.size(), "x");
    EXPECT_TRUE(h.is_ok());
    for (const auto& t : h->tensors)
        if (t.name == name) {
            EXPECT_EQ(t.type, dtype::DTYPE_F16);
            for (int64_t i = 0; i < t.numel(); ++i)
                if (pick(i)) {
                    const uint16_t v = value(i);
                    std::memcpy(bytes.data() + h->data_start + t.begin + 2 * i, &v, 2);
                }
        }
    test::write_file(out + "/model.safetensors", bytes);
    return out;
}

constexpr uint16_t k_f16_nan = 0x7e00, k_f16_inf = 0x7c00, k_f16_60000 = 0x7b53, k_f16_zero = 0;

bool contains(const std::string& s, const std::string& what) {
    return s.find(what) != std::string::npos;
}

}  // namespace

TEST(quantize_hostile, nan_or_inf_in_a_weight_is_refused_naming_the_tensor) {
    struct cse {
        std::string name;
        uint16_t    value;
        std::string method;
    };
    for (const auto& c : {cse{"model.layers.1.mlp.up_proj.weight", k_f16_nan, "rtn"},
                          cse{"model.layers.2.post_attention_layernorm.weight", k_f16_inf, "gptq"},
                          cse{"model.embed_tokens.weight", k_f16_nan, "gptq"}}) {
        SCOPED_TRACE(c.name);
        test::temp_dir dir("q-nan");
        const auto     model = patched_model(
                dir, c.name, [](int64_t i) { return i == 100; }, [&](int64_t) { return c.value; });
        auto p   = small_run(model, dir.file("out"));
        p.method = c.method;
        auto r   = quantize_model(p);
        ASSERT_FALSE(r.is_ok());
        EXPECT_TRUE(contains(r.error().message(), "'" + c.name + "'")) << r.error().message();
        EXPECT_TRUE(contains(r.error().message(), "NaN or Inf at element 100 ")) << r.error().message();
        EXPECT_FALSE(fs::exists(dir.file("out")));
    }
}

TEST(quantize_hostile, overflowing_activations_are_refused_naming_the_layer) {
    // Layer 0's MLP norm and gate/up weights at 60000 (finite in F16): gate * up reaches ~1e21, and
    // its square in down_proj's Hessian overflows F32.
    test::temp_dir dir("q-overflow");
    std::string    model = patched_model(
           dir, "model.layers.0.post_attention_layernorm.weight", [](int64_t) { return true; },
           [](int64_t) { return k_f16_60000; });
    for (const char* t : {"model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"}) {
        std::string bytes = test::read_file(model + "/model.safetensors");
        auto        h =
            safetensors_parse_header(reinterpret_cast<const uint8_t*>(bytes.data()), bytes.size(), bytes.size(), "x");
        ASSERT_TRUE(h.is_ok());
        for (const auto& ti : h->tensors)
            if (ti.name == t)
                for (int64_t i = 0; i < ti.numel(); ++i)
                    std::memcpy(bytes.data() + h->data_start + ti.begin + 2 * i, &k_f16_60000, 2);
        test::write_file(model + "/model.safetensors", bytes);
    }
    auto r = quantize_model(small_run(model, dir.file("out")));
    ASSERT_FALSE(r.is_ok());
    EXPECT_TRUE(contains(r.error().message(), "layer 0")) << r.error().message();
    EXPECT_TRUE(contains(r.error().message(), "model.layers.0.mlp.down_proj")) << r.error().message();
    EXPECT_TRUE(contains(r.error().message(), "Hessian")) << r.error().message();
    EXPECT_FALSE(fs::exists(dir.file("out")));
}

TEST(quantize_hostile, all_zero_calibration_signal_falls_back_to_rtn_exactly) {
    // Zero embeddings: every layer input is zero, so every Hessian is zero and every column dead.
    test::temp_dir dir("q-zero");
    const auto     model = patched_model(
            dir, "model.embed_tokens.weight", [](int64_t) { return true; }, [](int64_t) { return k_f16_zero; });
    auto pg = small_run(model, dir.file("gptq"));
    auto rg = quantize_model(pg);
    ASSERT_TRUE(rg.is_ok()) << rg.error().message();
    auto pr   = small_run(model, dir.file("rtn"));
    pr.method = "rtn";
    ASSERT_TRUE(quantize_model(pr).is_ok());
    EXPECT_EQ(test::read_file(dir.file("gptq/model.safetensors")), test::read_file(dir.file("rtn/model.safetensors")));
}

TEST(quantize_hostile, one_repeated_token_gives_a_finite_checkpoint) {
    test::temp_dir dir("q-repeat");
    std::string    text;
    for (int i = 0; i < 400; ++i) text += "the ";
    test::write_file(dir.file("calib.txt"), text);
    auto p  = small_run(tiny(), dir.file("out"));
    p.calib = dir.file("calib.txt");
    auto r  = quantize_model(p);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    for (const auto& l : r->linears) EXPECT_TRUE(std::isfinite(l.error_gptq)) << l.name;
    // Loading checks every scale is finite; every dequantized weight must be too.
    auto m = llama_model::open(dir.file("out"));
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    for (int64_t i = 0; i < (*m)->hparams().n_layer; ++i) {
        auto layer = (*m)->layer_load(i);
        ASSERT_TRUE(layer.is_ok()) << layer.error().message();
        for (const auto& lw : (*layer)->linears)
            for (float v : lw.w) ASSERT_TRUE(std::isfinite(v));
    }
}

TEST(quantize_hostile, group_size_not_dividing_in_features_is_refused_up_front) {
    test::temp_dir dir("q-group");
    auto           p = small_run(tiny(), dir.file("out"));
    p.group_size     = 96;  // hidden_size 256, intermediate_size 768 = 8 x 96
    auto r           = quantize_model(p);
    ASSERT_FALSE(r.is_ok());
    EXPECT_TRUE(contains(r.error().message(), "in_features 256 is not a multiple of --group-size 96"))
        << r.error().message();
    EXPECT_FALSE(fs::exists(dir.file("out.partial")));
}

TEST(quantize_hostile, memory_plan_refuses_with_needed_and_free_and_keeps_the_work_folder) {
    test::temp_dir dir("q-mem");
    auto           p    = small_run(tiny(), dir.file("out"));
    p.stop_after_layers = 2;
    auto first          = quantize_model(p);
    ASSERT_FALSE(first.is_ok());
    ASSERT_TRUE(fs::exists(dir.file("out.partial/layer-00001.safetensors")));

    // The work folder is not a model, for any loader.
    auto src = tensor_source::open(dir.file("out.partial"));
    ASSERT_FALSE(src.is_ok());
    EXPECT_TRUE(contains(src.error().message(), "unfinished")) << src.error().message();
    EXPECT_FALSE(model_config_load(dir.file("out.partial")).is_ok());
    EXPECT_FALSE(llama_model::open(dir.file("out.partial")).is_ok());
    auto insp = test::run_command(test::gptq_binary() + " inspect " + dir.file("out.partial"));
    EXPECT_EQ(insp.exit_code, 1);
    EXPECT_TRUE(contains(insp.err, "unfinished")) << insp.err;

    p.stop_after_layers = -1;
    p.resume            = true;
    setenv("GPTQ_MEMORY_LIMIT_BYTES", "4096", 1);
    auto oom = quantize_model(p);
    unsetenv("GPTQ_MEMORY_LIMIT_BYTES");
    ASSERT_FALSE(oom.is_ok());
    EXPECT_EQ(oom.error().code(), status_code::STATUS_OUT_OF_MEMORY);
    const std::string& msg = oom.error().message();
    EXPECT_TRUE(contains(msg, "needs about ")) << msg;
    EXPECT_TRUE(contains(msg, "only 4.00 KiB is available (GPTQ_MEMORY_LIMIT_BYTES)")) << msg;
    EXPECT_TRUE(contains(msg, "kept for --resume")) << msg;
    EXPECT_TRUE(fs::exists(dir.file("out.partial/layer-00000.safetensors")));
    EXPECT_TRUE(fs::exists(dir.file("out.partial/layer-00001.safetensors")));
    EXPECT_TRUE(fs::exists(dir.file("out.partial/state.json")));

    // Through the CLI too: exit 1 and one line naming both sizes.
    auto cli = test::run_command("GPTQ_MEMORY_LIMIT_BYTES=4096 " + test::gptq_binary() + " quantize " + tiny() +
                                 " -o " + dir.file("out") + " --nsamples 2 --seqlen 32 --threads 2 --resume");
    EXPECT_EQ(cli.exit_code, 1);
    EXPECT_TRUE(contains(cli.err, "needs about") && contains(cli.err, "available")) << cli.err;

    auto done = quantize_model(p);
    ASSERT_TRUE(done.is_ok()) << done.error().message();
    EXPECT_TRUE(fs::exists(dir.file("out/model.safetensors")));
    EXPECT_FALSE(fs::exists(dir.file("out/") + k_work_folder_marker));
    EXPECT_TRUE(llama_model::open(dir.file("out")).is_ok());
}
