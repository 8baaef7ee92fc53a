// io: config.json (both transformers dialects), generation_config.json and GPTQ quantization
// configs (AutoGPTQ, GPTQModel, transformers spellings), including the errors for bad values.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "io/gptq_config.h"
#include "io/hf_config.h"
#include "test_util.h"

using namespace gptq;

namespace {

json llama_v4() {
    return json::parse(R"({
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
      "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
      "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 131072,
      "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "hidden_act": "silu",
      "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192, "rope_type": "llama3"},
      "tie_word_embeddings": false, "torch_dtype": "bfloat16", "bos_token_id": 128000,
      "eos_token_id": [128001, 128008, 128009], "attention_bias": false
    })");
}

}  // namespace

TEST(config, bundled_model_transformers5_dialect) {
    auto cfg = model_config_load(test::source_path("models/tiny-llama"));
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->family, model_family::MODEL_FAMILY_LLAMA);
    EXPECT_EQ(cfg->hidden_size, 256);
    EXPECT_EQ(cfg->intermediate_size, 768);
    EXPECT_EQ(cfg->num_hidden_layers, 4);
    EXPECT_EQ(cfg->num_attention_heads, 4);
    EXPECT_EQ(cfg->num_key_value_heads, 2);
    EXPECT_EQ(cfg->head_dim, 64);
    EXPECT_EQ(cfg->vocab_size, 8192);
    EXPECT_EQ(cfg->rope.type, rope_type::ROPE_DEFAULT);
    EXPECT_EQ(cfg->rope.theta, 10000.0);
    EXPECT_EQ(cfg->rms_norm_eps, 1e-5);
    EXPECT_TRUE(cfg->tie_word_embeddings);
    EXPECT_EQ(cfg->dtype_name, "float16");
    EXPECT_EQ(cfg->bos_token_id, 1);
    EXPECT_EQ(cfg->eos_token_ids, std::vector<int64_t>{2});
    EXPECT_FALSE(cfg->pad_token_id.has_value());
    EXPECT_FALSE(cfg->has_quantization_config);
    auto gen = generation_config_load(test::source_path("models/tiny-llama"));
    ASSERT_TRUE(gen.is_ok()) << gen.error().message();
    EXPECT_EQ(gen->bos_token_id, 1);
}

TEST(config, transformers4_dialect_with_llama3_rope) {
    auto cfg = model_config_parse(llama_v4(), "config.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->head_dim, 128);
    EXPECT_EQ(cfg->rope.type, rope_type::ROPE_LLAMA3);
    EXPECT_EQ(cfg->rope.theta, 500000.0);
    EXPECT_EQ(cfg->rope.factor, 8.0);
    EXPECT_EQ(cfg->rope.high_freq_factor, 4.0);
    EXPECT_EQ(cfg->rope.original_max_position_embeddings, 8192);
    EXPECT_EQ(cfg->dtype_name, "bfloat16");
    EXPECT_EQ(cfg->eos_token_ids, (std::vector<int64_t>{128001, 128008, 128009}));
    EXPECT_FALSE(cfg->qkv_bias());
}

TEST(config, transformers5_rope_parameters_with_scaling) {
    json j = llama_v4();
    j.erase("rope_scaling");
    j.erase("rope_theta");
    j["rope_parameters"] = {{"rope_theta", 250000.0}, {"rope_type", "linear"}, {"factor", 2.0}};
    auto cfg             = model_config_parse(j, "config.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->rope.type, rope_type::ROPE_LINEAR);
    EXPECT_EQ(cfg->rope.theta, 250000.0);
    EXPECT_EQ(cfg->rope.factor, 2.0);
    // Legacy "type" key inside rope_scaling (transformers < 4.45).
    j.erase("rope_parameters");
    j["rope_scaling"] = {{"type", "dynamic"}, {"factor", 4.0}};
    cfg               = model_config_parse(j, "config.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->rope.type, rope_type::ROPE_DYNAMIC);
    EXPECT_EQ(cfg->rope.theta, 10000.0);
}

TEST(config, qwen2_and_mistral_specifics) {
    json q                  = llama_v4();
    q["architectures"]      = {"Qwen2ForCausalLM"};
    q["model_type"]         = "qwen2";
    q["use_sliding_window"] = true;
    q["sliding_window"]     = 4096;
    q["max_window_layers"]  = 28;
    q.erase("rope_scaling");
    auto cfg = model_config_parse(q, "config.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->family, model_family::MODEL_FAMILY_QWEN2);
    EXPECT_TRUE(cfg->qkv_bias());
    EXPECT_FALSE(cfg->o_bias());
    EXPECT_FALSE(cfg->layer_uses_sliding_window(27));
    EXPECT_TRUE(cfg->layer_uses_sliding_window(28));
    q["use_sliding_window"] = false;
    EXPECT_FALSE(model_config_parse(q, "config.json")->layer_uses_sliding_window(30));

    json m              = llama_v4();
    m["architectures"]  = {"MistralForCausalLM"};
    m["model_type"]     = "mistral";
    m["sliding_window"] = 4096;
    m.erase("rope_scaling");
    cfg = model_config_parse(m, "config.json");
    ASSERT_TRUE(cfg.is_ok());
    EXPECT_TRUE(cfg->layer_uses_sliding_window(0));
    m["sliding_window"] = nullptr;
    EXPECT_FALSE(model_config_parse(m, "config.json")->layer_uses_sliding_window(0));
}

TEST(config, bad_configs_name_the_key_and_value) {
    struct bad {
        const char* what;
        json        j;
        const char* expect;
    };
    auto with = [](const char* key, json v) {
        json j = llama_v4();
        if (v.is_discarded())
            j.erase(key);
        else
            j[key] = v;
        return j;
    };
    const json       discard = json(json::value_t::discarded);
    std::vector<bad> cases   = {
          {"no hidden_size", with("hidden_size", discard), "missing required key 'hidden_size'"},
          {"unsupported architecture", with("architectures", json::array({"GPT2LMHeadModel"})),
           "unsupported architecture 'GPT2LMHeadModel'"},
          {"string size", with("hidden_size", "big"), "key 'hidden_size' is \"big\", expected an integer"},
          {"negative layers", with("num_hidden_layers", -1), "num_hidden_layers is -1"},
          {"gqa mismatch", with("num_key_value_heads", 5), "not a multiple of num_key_value_heads 5"},
          {"yarn", with("rope_scaling", json{{"rope_type", "yarn"}, {"factor", 4.0}}), "unsupported rope type 'yarn'"},
          {"llama3 missing", with("rope_scaling", json{{"rope_type", "llama3"}, {"factor", 8.0}}),
           "missing required key 'low_freq_factor'"},
          {"gelu", with("hidden_act", "gelu"), "unsupported hidden_act 'gelu'"},
          {"eos string", with("eos_token_id", "x"), "key 'eos_token_id' is \"x\""},
          {"not object", json::array(), "expected a JSON object"},
          {"no arch no type",
           [] {
             json j = llama_v4();
             j.erase("architectures");
             j["model_type"] = "bert";
             return j;
         }(),
           "unsupported model_type 'bert'"},
    };
    for (const auto& c : cases) {
        auto cfg = model_config_parse(c.j, "models/x/config.json");
        ASSERT_FALSE(cfg.is_ok()) << c.what;
        EXPECT_NE(cfg.error().message().find("models/x/config.json"), std::string::npos) << cfg.error().message();
        EXPECT_NE(cfg.error().message().find(c.expect), std::string::npos) << c.what << ": " << cfg.error().message();
    }
}

TEST(config, files_missing_or_malformed) {
    test::temp_dir dir("cfg");
    auto           missing = model_config_load(dir.path());
    ASSERT_FALSE(missing.is_ok());
    EXPECT_EQ(missing.error().code(), status_code::STATUS_NOT_FOUND);
    test::write_file(dir.file("config.json"), "{\"hidden_size\": 12,,}");
    auto bad = model_config_load(dir.path());
    ASSERT_FALSE(bad.is_ok());
    EXPECT_NE(bad.error().message().find("config.json: invalid JSON at byte"), std::string::npos)
        << bad.error().message();
    // No generation_config.json: defaults; a malformed one: error.
    EXPECT_TRUE(generation_config_load(dir.path()).is_ok());
    test::write_file(dir.file("generation_config.json"), "{\"top_p\": 2.0}");
    auto g = generation_config_load(dir.path());
    ASSERT_FALSE(g.is_ok());
    EXPECT_NE(g.error().message().find("top_p 2 must be in (0, 1]"), std::string::npos) << g.error().message();
}

TEST(gptq_config, autogptq_gptqmodel_and_synonyms) {
    // TheBloke / AutoGPTQ: no quant_method or checkpoint_format (defaults gptq / gptq).
    auto a = gptq_config_parse(json::parse(R"({"bits":4,"group_size":128,"damp_percent":0.1,"desc_act":true,
        "static_groups":false,"sym":true,"true_sequential":true,"model_name_or_path":null,
        "model_file_base_name":"model"})"),
                               "quantize_config.json");
    ASSERT_TRUE(a.is_ok()) << a.error().message();
    EXPECT_EQ(a->bits, 4);
    EXPECT_EQ(a->group_size, 128);
    EXPECT_TRUE(a->desc_act);
    EXPECT_EQ(a->damp_percent, 0.1);
    EXPECT_EQ(a->format, gptq_checkpoint_format::GPTQ_FORMAT_V1);
    EXPECT_EQ(a->model_file_base_name, "model");

    // GPTQModel: damp_percent etc. under meta, format gptq_v2.
    auto g = gptq_config_parse(json::parse(R"({"bits":3,"group_size":-1,"desc_act":false,"sym":false,
        "lm_head":false,"quant_method":"gptq","checkpoint_format":"gptq_v2","pack_dtype":"int32",
        "meta":{"quantizer":["gptqmodel:4.0.0"],"damp_percent":0.05,"static_groups":true,"true_sequential":false}})"),
                               "config.json quantization_config");
    ASSERT_TRUE(g.is_ok()) << g.error().message();
    EXPECT_EQ(g->bits, 3);
    EXPECT_EQ(g->group_size, -1);
    EXPECT_FALSE(g->sym);
    EXPECT_EQ(g->format, gptq_checkpoint_format::GPTQ_FORMAT_V2);
    EXPECT_EQ(g->damp_percent, 0.05);
    EXPECT_TRUE(g->static_groups);
    EXPECT_FALSE(g->true_sequential);
    EXPECT_EQ(g->quantizer, std::vector<std::string>{"gptqmodel:4.0.0"});

    // Synonyms and legacy marlin flag.
    auto s = gptq_config_parse(json::parse(R"({"w_bit":8,"q_group_size":64,"sym":true,"is_marlin_format":true})"), "q");
    ASSERT_TRUE(s.is_ok()) << s.error().message();
    EXPECT_EQ(s->bits, 8);
    EXPECT_EQ(s->group_size, 64);
    EXPECT_EQ(s->format, gptq_checkpoint_format::GPTQ_FORMAT_MARLIN);

    // What we write parses back to the same settings.
    auto back = gptq_config_parse(g->to_json(), "ours");
    ASSERT_TRUE(back.is_ok()) << back.error().message();
    EXPECT_EQ(back->bits, 3);
    EXPECT_EQ(back->format, gptq_checkpoint_format::GPTQ_FORMAT_V2);
    EXPECT_EQ(back->damp_percent, 0.05);
    EXPECT_TRUE(back->static_groups);
}

TEST(gptq_config, bad_values) {
    struct bad {
        const char* j;
        const char* expect;
    };
    for (const auto& c : std::vector<bad>{
             {R"({"bits":5,"group_size":128})", "bits 5 is not supported"},
             {R"({"bits":4,"group_size":0})", "group_size 0 must be -1 or a positive integer"},
             {R"({"bits":4,"group_size":128,"damp_percent":1.5})", "damp_percent 1.5 must be in (0, 1)"},
             {R"({"bits":4,"group_size":128,"quant_method":"awq"})", "quant_method 'awq' is not supported"},
             {R"({"bits":4,"group_size":128,"checkpoint_format":"exl2"})", "checkpoint_format 'exl2'"},
             {R"({"bits":4,"group_size":128,"pack_dtype":"int64"})", "pack_dtype 'int64'"},
             {R"({"group_size":128})", "missing required key 'w_bit'"},
             {R"({"bits":"4","group_size":128})", "key 'bits' is \"4\", expected an integer"},
         }) {
        auto r = gptq_config_parse(json::parse(c.j), "quantize_config.json");
        ASSERT_FALSE(r.is_ok()) << c.j;
        EXPECT_NE(r.error().message().find(c.expect), std::string::npos) << r.error().message();
        EXPECT_NE(r.error().message().find("quantize_config.json"), std::string::npos);
    }
}

TEST(gptq_config, found_in_folder_by_precedence) {
    test::temp_dir dir("gcfg");
    EXPECT_EQ(gptq_config_find(dir.path()).error().code(), status_code::STATUS_NOT_FOUND);
    test::write_file(dir.file("config.json"), R"({"quantization_config":{"bits":8,"group_size":32,"sym":true}})");
    auto c = gptq_config_find(dir.path());
    ASSERT_TRUE(c.is_ok()) << c.error().message();
    EXPECT_EQ(c->bits, 8);
    test::write_file(dir.file("quantize_config.json"), R"({"bits":2,"group_size":64,"sym":true})");
    c = gptq_config_find(dir.path());
    ASSERT_TRUE(c.is_ok());
    EXPECT_EQ(c->bits, 2);
    EXPECT_NE(c->source.find("quantize_config.json"), std::string::npos);
}

// generation_config.json: absent keys take transformers 5's GenerationConfig defaults; values out
// of range are errors naming the file and key (issue 15, docs/generate.md "Defaults").
TEST(config, generation_config_defaults_and_ranges) {
    test::temp_dir dir("gencfg");
    auto           none = generation_config_load(dir.path());
    ASSERT_TRUE(none.is_ok());
    EXPECT_FALSE(none->found);
    EXPECT_FALSE(none->do_sample);
    EXPECT_EQ(none->temperature, 1.0);
    EXPECT_EQ(none->top_k, 50);
    EXPECT_EQ(none->top_p, 1.0);
    EXPECT_EQ(none->min_p, 0.0);
    EXPECT_EQ(none->repetition_penalty, 1.0);
    EXPECT_FALSE(none->max_length || none->max_new_tokens);

    test::write_file(dir.file("generation_config.json"),
                     R"({"do_sample": true, "temperature": 0.6, "top_p": 0.9, "min_p": 0.05, "top_k": null,
                         "eos_token_id": [128001, 128009], "max_length": 4096, "transformers_version": "4.45.0"})");
    auto g = generation_config_load(dir.path());
    ASSERT_TRUE(g.is_ok()) << g.error().message();
    EXPECT_TRUE(g->found);
    EXPECT_TRUE(g->do_sample);
    EXPECT_EQ(g->temperature, 0.6);
    EXPECT_EQ(g->top_k, 50);  // null: the default
    EXPECT_EQ(g->min_p, 0.05);
    EXPECT_EQ(g->eos_token_ids, (std::vector<int64_t>{128001, 128009}));
    EXPECT_EQ(g->max_length, 4096);

    for (const auto& [text, want] : std::vector<std::pair<std::string, std::string>>{
             {R"({"top_k": -1})", "top_k -1 must be >= 0"},
             {R"({"min_p": 1.5})", "min_p 1.5 must be in [0, 1]"},
             {R"({"repetition_penalty": 0})", "repetition_penalty 0 must be > 0"},
             {R"({"max_new_tokens": 0})", "max_new_tokens 0 must be > 0"},
             {R"({"max_length": -5})", "max_length -5 must be > 0"},
             {R"({"do_sample": "yes"})", "'do_sample'"}}) {
        test::write_file(dir.file("generation_config.json"), text);
        auto bad = generation_config_load(dir.path());
        ASSERT_FALSE(bad.is_ok()) << text;
        EXPECT_NE(bad.error().message().find("generation_config.json: "), std::string::npos) << bad.error().message();
        EXPECT_NE(bad.error().message().find(want), std::string::npos) << bad.error().message();
    }
}

namespace {
// The config is refused, and the message names the file and holds every part.
void expect_refused(const json& j, std::initializer_list<const char*> parts) {
    auto cfg = model_config_parse(j, "c.json");
    ASSERT_FALSE(cfg.is_ok());
    EXPECT_NE(cfg.error().message().find("c.json"), std::string::npos) << cfg.error().message();
    for (const char* part : parts)
        EXPECT_NE(cfg.error().message().find(part), std::string::npos) << cfg.error().message();
}

// google/gemma-2-9b's config.json (transformers 4.42).
json gemma2_9b_v4() {
    return json::parse(R"({
      "architectures": ["Gemma2ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "attn_logit_softcapping": 50.0, "bos_token_id": 2, "cache_implementation": "hybrid",
      "eos_token_id": 1, "final_logit_softcapping": 30.0, "head_dim": 256,
      "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 3584,
      "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 8192,
      "model_type": "gemma2", "num_attention_heads": 16, "num_hidden_layers": 42,
      "num_key_value_heads": 8, "pad_token_id": 0, "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06,
      "rope_theta": 10000.0, "sliding_window": 4096, "sliding_window_size": 4096,
      "torch_dtype": "float32", "transformers_version": "4.42.0.dev0", "use_cache": true,
      "vocab_size": 256000
    })");
}
// google/gemma-3-1b-pt's config.json (transformers 4.50).
json gemma3_1b_v4() {
    return json::parse(R"({
      "architectures": ["Gemma3ForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
      "attn_logit_softcapping": null, "bos_token_id": 2, "cache_implementation": "hybrid",
      "eos_token_id": 1, "final_logit_softcapping": null, "head_dim": 256,
      "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152, "initializer_range": 0.02,
      "intermediate_size": 6912, "max_position_embeddings": 32768, "model_type": "gemma3_text",
      "num_attention_heads": 4, "num_hidden_layers": 26, "num_key_value_heads": 1, "pad_token_id": 0,
      "query_pre_attn_scalar": 256, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000,
      "rope_scaling": null, "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
      "torch_dtype": "bfloat16", "transformers_version": "4.50.0.dev0", "use_cache": true,
      "vocab_size": 262144
    })");
}
}  // namespace

TEST(config, gemma2_published_config_and_defaults) {
    auto cfg = model_config_parse(gemma2_9b_v4(), "gemma-2-9b/config.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->family, model_family::MODEL_FAMILY_GEMMA2);
    EXPECT_EQ(cfg->act, mlp_activation::ACT_GELU_TANH);
    EXPECT_EQ(cfg->head_dim, 256);
    EXPECT_EQ(cfg->query_pre_attn_scalar, 256.0);
    EXPECT_EQ(cfg->attn_logit_softcapping, 50.0);
    EXPECT_EQ(cfg->final_logit_softcapping, 30.0);
    EXPECT_TRUE(cfg->tie_word_embeddings);  // absent: Gemma2Config's default
    EXPECT_FALSE(cfg->rope_local_differs);
    ASSERT_EQ(cfg->layer_types.size(), 42u);  // no layer_types: sliding on layers 0, 2, 4, ...
    for (int64_t i = 0; i < 42; ++i) EXPECT_EQ(cfg->layer_uses_sliding_window(i), i % 2 == 0) << i;

    // Absent soft-capping keys take transformers' defaults (50, 30); null turns them off.
    json j = gemma2_9b_v4();
    j.erase("attn_logit_softcapping");
    j.erase("final_logit_softcapping");
    j.erase("query_pre_attn_scalar");
    j.erase("hidden_activation");
    j.erase("hidden_act");
    cfg = model_config_parse(j, "c.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->attn_logit_softcapping, 50.0);
    EXPECT_EQ(cfg->final_logit_softcapping, 30.0);
    EXPECT_EQ(cfg->query_pre_attn_scalar, 256.0);
    EXPECT_EQ(cfg->act, mlp_activation::ACT_GELU_TANH);
    j["attn_logit_softcapping"]  = nullptr;
    j["final_logit_softcapping"] = nullptr;
    cfg                          = model_config_parse(j, "c.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->attn_logit_softcapping, 0.0);
    EXPECT_EQ(cfg->final_logit_softcapping, 0.0);

    // Gemma reads hidden_activation (as transformers), not hidden_act.
    j               = gemma2_9b_v4();
    j["hidden_act"] = "silu";
    cfg             = model_config_parse(j, "c.json");
    ASSERT_TRUE(cfg.is_ok());
    EXPECT_EQ(cfg->act, mlp_activation::ACT_GELU_TANH);
    j["hidden_activation"] = "gelu";
    expect_refused(j, {"hidden_activation", "gelu"});
}

TEST(config, gemma_bad_values_name_the_key) {
    json j                      = gemma2_9b_v4();
    j["attn_logit_softcapping"] = 0;  // transformers would divide by zero
    expect_refused(j, {"attn_logit_softcapping", "0"});
    j                            = gemma2_9b_v4();
    j["final_logit_softcapping"] = "30";
    expect_refused(j, {"final_logit_softcapping", "\"30\""});
    j                          = gemma2_9b_v4();
    j["query_pre_attn_scalar"] = -1;
    expect_refused(j, {"query_pre_attn_scalar", "-1"});
    j                   = gemma2_9b_v4();
    j["sliding_window"] = nullptr;  // sliding layers without a window
    expect_refused(j, {"sliding_window is null"});
    j                           = gemma3_1b_v4();
    j["sliding_window_pattern"] = 0;
    expect_refused(j, {"sliding_window_pattern", "0"});
    j                    = gemma3_1b_v4();
    j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 10000.0}};  // not per layer type
    expect_refused(j, {"rope_parameters", "layer type"});
    j                      = gemma3_1b_v4();
    j["num_hidden_layers"] = 100000;  // the default layer list is built, so bounded
    expect_refused(j, {"num_hidden_layers is 100000"});
    j                  = gemma3_1b_v4();
    j["architectures"] = {"Gemma3ForConditionalGeneration"};  // the multimodal checkpoint: refused by name
    expect_refused(j, {"Gemma3ForConditionalGeneration"});
}

TEST(config, gemma3_both_dialects) {
    auto cfg = model_config_parse(gemma3_1b_v4(), "gemma-3-1b/config.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->family, model_family::MODEL_FAMILY_GEMMA3);
    EXPECT_EQ(cfg->attn_logit_softcapping, 0.0);
    EXPECT_EQ(cfg->final_logit_softcapping, 0.0);
    EXPECT_EQ(cfg->rope.theta, 1e6);
    EXPECT_EQ(cfg->rope.type, rope_type::ROPE_DEFAULT);
    EXPECT_TRUE(cfg->rope_local_differs);
    EXPECT_EQ(cfg->rope_local.theta, 1e4);
    EXPECT_EQ(cfg->rope_local.type, rope_type::ROPE_DEFAULT);
    for (int64_t i = 0; i < 26; ++i) EXPECT_EQ(cfg->layer_uses_sliding_window(i), (i + 1) % 6 != 0) << i;

    // transformers 4: rope_scaling is the global layers' only; a missing rope_local_base_freq is 10000.
    json j            = gemma3_1b_v4();
    j["rope_scaling"] = {{"rope_type", "linear"}, {"factor", 8.0}};
    j.erase("rope_local_base_freq");
    j.erase("rope_theta");
    j["attn_logit_softcapping"] = 50.0;  // transformers' Gemma 3 never applies it
    cfg                         = model_config_parse(j, "c.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->rope.type, rope_type::ROPE_LINEAR);
    EXPECT_EQ(cfg->rope.factor, 8.0);
    EXPECT_EQ(cfg->rope.theta, 1e6);  // Gemma3TextConfig's default global base
    EXPECT_EQ(cfg->rope_local.type, rope_type::ROPE_DEFAULT);
    EXPECT_EQ(cfg->rope_local.theta, 1e4);
    EXPECT_EQ(cfg->attn_logit_softcapping, 0.0);

    // transformers 5: rope_parameters per layer type and layer_types; "_sliding_window_pattern" is
    // what later versions save when layer_types is absent.
    j = gemma3_1b_v4();
    for (const char* k : {"rope_theta", "rope_local_base_freq", "rope_scaling", "sliding_window_pattern"}) j.erase(k);
    j["rope_parameters"] = {{"full_attention", {{"rope_type", "linear"}, {"factor", 8.0}, {"rope_theta", 1000000.0}}},
                            {"sliding_attention", {{"rope_type", "default"}, {"rope_theta", 10000.0}}}};
    j["_sliding_window_pattern"] = 3;
    cfg                          = model_config_parse(j, "c.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->rope.type, rope_type::ROPE_LINEAR);
    EXPECT_EQ(cfg->rope_local.theta, 1e4);
    for (int64_t i = 0; i < 26; ++i) EXPECT_EQ(cfg->layer_uses_sliding_window(i), (i + 1) % 3 != 0) << i;
    j["layer_types"] = json::array();
    for (int64_t i = 0; i < 26; ++i) j["layer_types"].push_back(i == 4 ? "full_attention" : "sliding_attention");
    cfg = model_config_parse(j, "c.json");  // layer_types wins over the pattern
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    for (int64_t i = 0; i < 26; ++i) EXPECT_EQ(cfg->layer_uses_sliding_window(i), i != 4) << i;
}

// The families of io/arch.h beyond Llama: defaults from transformers' config classes, LongRoPE
// (Phi-3) in both spellings, and what is refused by name.
TEST(config, qwen3_phi3_and_refusals) {
    json q             = llama_v4();
    q["architectures"] = {"Qwen3ForCausalLM"};
    q["model_type"]    = "qwen3";
    q.erase("rope_scaling");
    auto cfg = model_config_parse(q, "config.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->family, model_family::MODEL_FAMILY_QWEN3);
    EXPECT_TRUE(cfg->arch->qk_norm);
    EXPECT_EQ(cfg->head_dim, 128);  // Qwen3Config's default, not hidden / heads
    EXPECT_FALSE(cfg->qkv_bias());
    // Windows: only with use_sliding_window; saved layer_types win over max_window_layers.
    q["sliding_window"]    = 64;
    q["max_window_layers"] = 30;
    q["layer_types"]       = std::vector<std::string>(32, "full_attention");
    q["layer_types"][3]    = "sliding_attention";
    EXPECT_FALSE(model_config_parse(q, "config.json")->layer_uses_sliding_window(3));
    q["use_sliding_window"] = true;
    EXPECT_TRUE(model_config_parse(q, "config.json")->layer_uses_sliding_window(3));
    EXPECT_FALSE(model_config_parse(q, "config.json")->layer_uses_sliding_window(31));
    q.erase("layer_types");
    EXPECT_TRUE(model_config_parse(q, "config.json")->layer_uses_sliding_window(31));
    EXPECT_FALSE(model_config_parse(q, "config.json")->layer_uses_sliding_window(3));
    q.erase("sliding_window");
    q.erase("use_sliding_window");

    json p                                = llama_v4();
    p["architectures"]                    = {"Phi3ForCausalLM"};
    p["model_type"]                       = "phi3";
    p["max_position_embeddings"]          = 131072;
    p["original_max_position_embeddings"] = 4096;
    std::vector<double> sf(64, 1.0), lf(64, 2.0);
    p["rope_scaling"] = {{"type", "su"}, {"short_factor", sf}, {"long_factor", lf}};
    cfg               = model_config_parse(p, "config.json");
    ASSERT_TRUE(cfg.is_ok()) << cfg.error().message();
    EXPECT_EQ(cfg->rope.type, rope_type::ROPE_LONGROPE);
    EXPECT_EQ(cfg->rope.original_max_position_embeddings, 4096);
    // transformers: sqrt(1 + ln(factor) / ln(original)) with factor = 131072 / 4096 = 32.
    EXPECT_DOUBLE_EQ(cfg->rope.attention_factor, std::sqrt(1.0 + std::log(32.0) / std::log(4096.0)));
    EXPECT_EQ(cfg->rope.long_factor, lf);
    p["rope_scaling"]["attention_factor"] = 1.25;
    EXPECT_EQ(model_config_parse(p, "config.json")->rope.attention_factor, 1.25);

    struct bad_case {
        json        j;
        std::string message;
    };
    auto with = [](json j, const std::string& key, json v) {
        j[key] = std::move(v);
        return j;
    };
    json short_list                            = p;
    short_list["rope_scaling"]["short_factor"] = std::vector<double>(10, 1.0);
    const std::vector<bad_case> bad            = {
                   {with(p, "rope_scaling", json{{"type", "yarn"}, {"factor", 2.0}}), "unsupported rope type 'yarn'"},
                   {short_list, "'short_factor' has 10 values, expected head_dim / 2 = 64"},
                   {with(llama_v4(), "rope_scaling", json{{"type", "longrope"}}), "unsupported rope type 'longrope'"},
                   {with(llama_v4(), "architectures", json{"FalconForCausalLM"}), "unsupported architecture 'FalconForCausalLM'"},
                   {with(llama_v4(), "partial_rotary_factor", 0.5), "partial_rotary_factor 0.5 is not supported"},
                   {with(llama_v4(), "layer_types", json{"full_attention"}), "'layer_types' is"},
    };
    for (const auto& b : bad) {
        auto r = model_config_parse(b.j, "config.json");
        ASSERT_FALSE(r.is_ok()) << b.message;
        EXPECT_NE(r.error().message().find(b.message), std::string::npos) << r.error().message();
    }
}
