// gptq make-random (include/gptq/make_random.h): the shape table against the published config.json
// values, checkpoints the model loader accepts with exactly those shapes, byte-identical output for
// a seed, sharding, the generated tokenizer, and the CLI's errors.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "gptq/make_random.h"
#include "io/hf_config.h"
#include "io/json_file.h"
#include "io/tensor_source.h"
#include "model/llama.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

using namespace gptq;
using namespace gptq::test;
namespace fs = std::filesystem;

namespace {

// The hparams the runtime derives from the config.json make-random writes for `name`.
llama_hparams hparams_of(const std::string& name) {
    auto s = make_random_shape(name);
    EXPECT_TRUE(s.is_ok()) << s.error().message();
    auto j = json_parse(make_random_config_json(*s, "float16", 0), "config.json");
    EXPECT_TRUE(j.is_ok());
    auto cfg = model_config_parse(*j, "config.json");
    EXPECT_TRUE(cfg.is_ok()) << cfg.error().message();
    auto hp = llama_hparams_from_config(*cfg);
    EXPECT_TRUE(hp.is_ok()) << hp.error().message();
    return *hp;
}

result<make_random_report> make(const std::string& like, const std::string& out, uint64_t seed = 0,
                                uint64_t max_shard = 5'000'000'000, int threads = 2,
                                const std::string& dtype = "float16") {
    make_random_params p;
    p.like            = like;
    p.output_path     = out;
    p.seed            = seed;
    p.max_shard_bytes = max_shard;
    p.n_threads       = threads;
    p.dtype           = dtype;
    p.progress        = false;
    return make_random_model(p);
}

std::string all_safetensors_bytes(const std::string& dir) {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir))
        if (e.path().extension() == ".safetensors") names.push_back(e.path().filename().string());
    std::sort(names.begin(), names.end());
    std::string all;
    for (const auto& n : names) all += n + ":" + read_file(dir + "/" + n);
    return all;
}

}  // namespace

// Published values: config.json of meta-llama/Llama-2-7b-hf, Llama-2-13b-hf, Llama-2-70b-hf,
// Meta-Llama-3-8B on Hugging Face.
TEST(MakeRandom, Llama2_7bConfigIsThePublishedOne) {
    const llama_hparams hp = hparams_of("llama-2-7b");
    EXPECT_EQ(hp.n_vocab, 32000);
    EXPECT_EQ(hp.n_embd, 4096);
    EXPECT_EQ(hp.n_ff, 11008);
    EXPECT_EQ(hp.n_layer, 32);
    EXPECT_EQ(hp.n_head, 32);
    EXPECT_EQ(hp.n_head_kv, 32);
    EXPECT_EQ(hp.head_dim, 128);
    EXPECT_EQ(hp.max_position_embeddings, 4096);
    EXPECT_FLOAT_EQ(hp.rms_eps, 1e-5f);
    EXPECT_DOUBLE_EQ(hp.rope.theta, 10000.0);
    EXPECT_FALSE(hp.tie_embeddings);
    auto s = make_random_shape("llama-2-7b");
    ASSERT_TRUE(s.is_ok());
    EXPECT_EQ(s->n_params(), 6738415616);  // the parameter count of Llama-2-7b-hf
    EXPECT_EQ(s->bos_token_id, 1);
    EXPECT_EQ(s->eos_token_id, 2);
}

TEST(MakeRandom, OtherNamedConfigs) {
    const llama_hparams l13 = hparams_of("llama-2-13b");
    EXPECT_EQ(l13.n_embd, 5120);
    EXPECT_EQ(l13.n_ff, 13824);
    EXPECT_EQ(l13.n_layer, 40);
    EXPECT_EQ(l13.n_head, 40);
    EXPECT_EQ(l13.n_head_kv, 40);
    EXPECT_EQ(make_random_shape("llama-2-13b")->n_params(), 13015864320);

    const llama_hparams l70 = hparams_of("llama-2-70b");
    EXPECT_EQ(l70.n_embd, 8192);
    EXPECT_EQ(l70.n_ff, 28672);
    EXPECT_EQ(l70.n_layer, 80);
    EXPECT_EQ(l70.n_head, 64);
    EXPECT_EQ(l70.n_head_kv, 8);
    EXPECT_EQ(l70.n_vocab, 32000);
    EXPECT_EQ(make_random_shape("llama-2-70b")->n_params(), 68976648192);

    const llama_hparams l3 = hparams_of("llama-3-8b");
    EXPECT_EQ(l3.n_vocab, 128256);
    EXPECT_EQ(l3.n_embd, 4096);
    EXPECT_EQ(l3.n_ff, 14336);
    EXPECT_EQ(l3.n_layer, 32);
    EXPECT_EQ(l3.n_head_kv, 8);
    EXPECT_EQ(l3.max_position_embeddings, 8192);
    EXPECT_DOUBLE_EQ(l3.rope.theta, 500000.0);
    auto s3 = make_random_shape("llama-3-8b");
    EXPECT_EQ(s3->n_params(), 8030261248);
    EXPECT_EQ(s3->bos_token_id, 128000);
    EXPECT_EQ(s3->eos_token_id, 128001);
    EXPECT_EQ(s3->torch_dtype, "bfloat16");
}

// Qwen/Qwen3-8B, mistralai/Mistral-Nemo-Base-2407, microsoft/Phi-3-mini-4k-instruct: their
// config.json values, and parameter counts equal to the published checkpoints' (sum of the
// safetensors index's tensors).
TEST(MakeRandom, OtherFamilies) {
    const llama_hparams q3 = hparams_of("qwen3-8b");
    EXPECT_EQ(q3.family, model_family::MODEL_FAMILY_QWEN3);
    EXPECT_TRUE(q3.qk_norm);
    EXPECT_EQ(q3.n_vocab, 151936);
    EXPECT_EQ(q3.n_embd, 4096);
    EXPECT_EQ(q3.n_ff, 12288);
    EXPECT_EQ(q3.n_layer, 36);
    EXPECT_EQ(q3.n_head, 32);
    EXPECT_EQ(q3.n_head_kv, 8);
    EXPECT_EQ(q3.head_dim, 128);
    EXPECT_FALSE(q3.qkv_bias);
    EXPECT_EQ(make_random_shape("qwen3-8b")->n_params(), 8190735360);

    const llama_hparams nemo = hparams_of("mistral-nemo-12b");
    EXPECT_EQ(nemo.family, model_family::MODEL_FAMILY_MISTRAL);
    EXPECT_EQ(nemo.n_embd, 5120);
    EXPECT_EQ(nemo.head_dim, 128);
    EXPECT_EQ(nemo.q_dim(), 4096);  // != n_embd
    EXPECT_EQ(nemo.n_head_kv, 8);
    EXPECT_EQ(nemo.window, std::vector<int64_t>(40, 0));
    EXPECT_EQ(make_random_shape("mistral-nemo-12b")->n_params(), 12247782400);

    const llama_hparams phi = hparams_of("phi-3-mini");
    EXPECT_EQ(phi.family, model_family::MODEL_FAMILY_PHI3);
    EXPECT_TRUE(phi.fused_qkv && phi.fused_gate_up);
    EXPECT_EQ(phi.n_vocab, 32064);
    EXPECT_EQ(phi.n_embd, 3072);
    EXPECT_EQ(phi.n_ff, 8192);
    EXPECT_EQ(phi.n_head_kv, 32);
    EXPECT_EQ(phi.window, std::vector<int64_t>(32, 2047));
    EXPECT_EQ(make_random_shape("phi-3-mini")->n_params(), 3821079552);
    const auto t   = llama_layer_tensors(phi, 0);
    const auto has = [&](const std::string& name, std::vector<int64_t> shape) {
        for (const auto& x : t)
            if (x.name == name) return x.shape == shape;
        return false;
    };
    EXPECT_TRUE(has("model.layers.0.self_attn.qkv_proj.weight", {9216, 3072}));
    EXPECT_TRUE(has("model.layers.0.mlp.gate_up_proj.weight", {16384, 3072}));
}

TEST(MakeRandom, LayersSuffixAndBadNames) {
    const llama_hparams hp = hparams_of("llama-2-70b-layers=4");
    EXPECT_EQ(hp.n_layer, 4);
    EXPECT_EQ(hp.n_embd, 8192);
    EXPECT_EQ(hp.n_head_kv, 8);

    auto unknown = make_random_shape("llama-9-1b");
    ASSERT_FALSE(unknown.is_ok());
    for (const auto& n : make_random_known_names())
        EXPECT_NE(unknown.error().message().find(n), std::string::npos) << n << ": " << unknown.error().message();
    EXPECT_FALSE(make_random_shape("llama-2-7b-layers=0").is_ok());
    EXPECT_FALSE(make_random_shape("llama-2-7b-layers=33").is_ok());
    EXPECT_FALSE(make_random_shape("llama-2-7b-layers=2x").is_ok());
    EXPECT_FALSE(make_random_shape("llama-2-7b-layers=").is_ok());
    EXPECT_TRUE(make_random_shape("llama-2-7b-layers=32").is_ok());
}

// The tiny shape: the loader opens it (it checks every tensor's shape against the config) with
// the named dimensions; weights have the intended scale; the bundled tokenizer is copied.
TEST(MakeRandom, TinyLoadsWithTheNamedShapes) {
    temp_dir          d("mr-tiny");
    const std::string out = d.file("tiny");
    auto              rep = make("tiny", out, 7);
    ASSERT_TRUE(rep.is_ok()) << rep.error().message();
    EXPECT_FALSE(fs::exists(out + ".partial"));
    EXPECT_EQ(rep->n_shards, 1);
    EXPECT_NE(rep->tokenizer.find("copied"), std::string::npos) << rep->tokenizer;
    for (const char* f : {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"})
        EXPECT_TRUE(fs::exists(out + "/" + f)) << f;

    auto m = llama_model::open(out);
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    const llama_hparams& hp    = (*m)->hparams();
    const auto           shape = *make_random_shape("tiny");
    EXPECT_EQ(hp.n_vocab, shape.vocab_size);
    EXPECT_EQ(hp.n_embd, shape.hidden_size);
    EXPECT_EQ(hp.n_ff, shape.intermediate_size);
    EXPECT_EQ(hp.n_layer, shape.num_hidden_layers);
    EXPECT_EQ(hp.n_head, shape.num_attention_heads);
    EXPECT_EQ(hp.n_head_kv, shape.num_key_value_heads);
    EXPECT_EQ(static_cast<int64_t>((*m)->source().total_params()), rep->n_params);
    EXPECT_EQ(rep->n_params, shape.n_params());

    // Linears ~ N(0, 0.02), norms 1.
    const auto& src = (*m)->source();
    const auto  q   = src.find("model.layers.1.self_attn.q_proj.weight");
    ASSERT_NE(q, nullptr);
    EXPECT_EQ(q->info->type, dtype::DTYPE_F16);
    std::vector<float> w(static_cast<size_t>(q->info->numel()));
    ASSERT_TRUE(src.read_f32("model.layers.1.self_attn.q_proj.weight", w.data()).is_ok());
    double sum = 0, sq = 0;
    for (float x : w) {
        sum += x;
        sq += static_cast<double>(x) * x;
    }
    const double mean = sum / static_cast<double>(w.size());
    const double sd   = std::sqrt(sq / static_cast<double>(w.size()) - mean * mean);
    EXPECT_NEAR(mean, 0.0, 1e-3);
    EXPECT_NEAR(sd, 0.02, 5e-4);  // 65536 samples: the std of the estimate is ~0.02 / 360
    std::vector<float> norm(static_cast<size_t>(hp.n_embd));
    ASSERT_TRUE(src.read_f32("model.norm.weight", norm.data()).is_ok());
    for (float x : norm) ASSERT_EQ(x, 1.0f);

    // The forward pass gives finite logits.
    ASSERT_TRUE((*m)->globals_load().is_ok());
    std::vector<int32_t> ids = {1, 500, 8000, 42};
    std::vector<float>   logits(ids.size() * static_cast<size_t>(hp.n_vocab));
    const ops_context    ctx{nullptr, false};
    ASSERT_TRUE((*m)->forward(ctx, ids.data(), static_cast<int64_t>(ids.size()), nullptr, logits.data()).is_ok());
    for (float x : logits) ASSERT_TRUE(std::isfinite(x));
}

TEST(MakeRandom, SameSeedSameBytesWhateverTheThreads) {
    temp_dir d("mr-det");
    ASSERT_TRUE(make("micro", d.file("a"), 11, 5'000'000'000, 1).is_ok());
    ASSERT_TRUE(make("micro", d.file("b"), 11, 5'000'000'000, 3).is_ok());
    ASSERT_TRUE(make("micro", d.file("c"), 12).is_ok());
    const std::string a = all_safetensors_bytes(d.file("a"));
    EXPECT_FALSE(a.empty());
    EXPECT_EQ(a, all_safetensors_bytes(d.file("b")));
    EXPECT_NE(a, all_safetensors_bytes(d.file("c")));
    for (const char* f : {"config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"})
        EXPECT_EQ(read_file(d.file("a") + "/" + f), read_file(d.file("b") + "/" + f)) << f;
}

TEST(MakeRandom, ShardsBeyondTheMaxShardSize) {
    temp_dir          d("mr-shard");
    const std::string out = d.file("m");
    auto              rep = make("micro", out, 0, 60'000);  // micro: ~0.3 MB of F16 data
    ASSERT_TRUE(rep.is_ok()) << rep.error().message();
    EXPECT_GT(rep->n_shards, 2);
    EXPECT_TRUE(fs::exists(out + "/model.safetensors.index.json"));
    EXPECT_FALSE(fs::exists(out + "/model.safetensors"));
    auto src = tensor_source::open(out);
    ASSERT_TRUE(src.is_ok()) << src.error().message();
    EXPECT_EQ(static_cast<int64_t>((*src)->n_files()), rep->n_shards);
    EXPECT_EQ(static_cast<int64_t>((*src)->total_params()), rep->n_params);
    auto m = llama_model::open(out);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    auto idx = json_read_file(out + "/model.safetensors.index.json");
    ASSERT_TRUE(idx.is_ok());
    EXPECT_EQ((*idx)["weight_map"].size(), (*src)->names().size());
}

TEST(MakeRandom, BFloat16) {
    temp_dir d("mr-bf16");
    ASSERT_TRUE(make("micro", d.file("m"), 0, 5'000'000'000, 2, "bfloat16").is_ok());
    auto src = tensor_source::open(d.file("m"));
    ASSERT_TRUE(src.is_ok());
    for (const auto& n : (*src)->names()) EXPECT_EQ((*src)->find(n)->info->type, dtype::DTYPE_BF16) << n;
    auto cfg = model_config_load(d.file("m"));
    ASSERT_TRUE(cfg.is_ok());
    EXPECT_EQ(cfg->dtype_name, "bfloat16");
    EXPECT_FALSE(make("micro", d.file("x"), 0, 5'000'000'000, 2, "float32").is_ok());
}

// micro's vocabulary (512) is not the bundled tokenizer's: a byte-level BPE is generated.
TEST(MakeRandom, GeneratedTokenizerLoadsAndRoundTrips) {
    temp_dir          d("mr-tok");
    const std::string out = d.file("m");
    auto              rep = make("micro", out);
    ASSERT_TRUE(rep.is_ok());
    EXPECT_NE(rep->tokenizer.find("generated"), std::string::npos) << rep->tokenizer;
    auto tok = tokenizer::load(out);
    ASSERT_TRUE(tok.is_ok()) << tok.error().message();
    EXPECT_EQ((*tok)->vocab_size(), 512);
    EXPECT_EQ((*tok)->bos_id(), 1);
    const std::string    text = "Hello world, 123 \xc3\xa9t\xc3\xa9!\n";
    std::vector<int32_t> ids  = (*tok)->encode(text, true);
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids[0], 1);
    EXPECT_LT(ids.size(), text.size());  // some merges apply
    for (int32_t id : ids) {
        EXPECT_GE(id, 0);
        EXPECT_LT(id, 512);
    }
    EXPECT_EQ((*tok)->decode(ids, true), text);
}

// Every named shape up to 50k ids (the larger vocabularies take seconds each to generate; their
// id layout is Llama 3's, covered by the micro shapes) gets a tokenizer of exactly its vocabulary
// with BOS and EOS at the config's ids (Phi-3: Llama 2's low ids and its end of text, 32000, among
// the added tokens after them).
TEST(MakeRandom, EveryNamedShapeGeneratesItsTokenizer) {
    int n_checked = 0;
    for (const std::string& name : make_random_known_names()) {
        auto shape = make_random_shape(name);
        ASSERT_TRUE(shape.is_ok()) << name;
        if (shape->vocab_size > 50000) continue;
        ++n_checked;
        auto js = make_random_tokenizer_json(*shape);
        ASSERT_TRUE(js.is_ok()) << name << ": " << js.error().message();
        const auto                     j = nlohmann::json::parse(*js);
        std::set<int64_t>              ids;
        std::map<int64_t, std::string> added;
        for (const auto& [piece, id] : j["model"]["vocab"].items()) ids.insert(id.get<int64_t>());
        for (const auto& a : j["added_tokens"]) {
            ids.insert(a["id"].get<int64_t>());
            added[a["id"].get<int64_t>()] = a["content"];
        }
        EXPECT_EQ(static_cast<int64_t>(ids.size()), shape->vocab_size) << name;
        EXPECT_EQ(*ids.rbegin(), shape->vocab_size - 1) << name;
        EXPECT_TRUE(added.count(shape->bos_token_id)) << name << ": bos " << shape->bos_token_id;
        EXPECT_TRUE(added.count(shape->eos_token_id)) << name << ": eos " << shape->eos_token_id;
    }
    EXPECT_GE(n_checked, 3);
}

TEST(MakeRandom, RefusesAnExistingOutput) {
    temp_dir d("mr-exists");
    fs::create_directories(d.file("m"));
    auto r = make("micro", d.file("m"));
    ASSERT_FALSE(r.is_ok());
    EXPECT_NE(r.error().message().find("already exists"), std::string::npos);
}

TEST(MakeRandom, Cli) {
    temp_dir d("mr-cli");
    auto     ok = run_command(gptq_binary() + " -q make-random --like micro -o " + d.file("m") + " --seed 3");
    EXPECT_EQ(ok.exit_code, 0) << ok.err;
    EXPECT_NE(ok.out.find("wrote"), std::string::npos);
    auto cfg = json_read_file(d.file("m") + "/config.json");
    ASSERT_TRUE(cfg.is_ok());
    EXPECT_EQ((*cfg)["gptqkit_make_random"]["seed"], 3);
    auto bad = run_command(gptq_binary() + " make-random --like nope -o " + d.file("n"));
    EXPECT_EQ(bad.exit_code, 1);
    EXPECT_NE(bad.err.find("llama-2-7b"), std::string::npos) << bad.err;
    auto shard = run_command(gptq_binary() + " make-random --like micro --max-shard-size 5XB -o " + d.file("n"));
    EXPECT_EQ(shard.exit_code, 1);
    EXPECT_FALSE(fs::exists(d.file("n")));
}

// Published values: config.json of google/gemma-2-9b (transformers 4.42) and google/gemma-3-1b-pt
// (4.50); parameter counts as their model cards give them (9,241,705,984 and 999,885,952).
TEST(MakeRandom, GemmaConfigsAreThePublishedOnes) {
    const llama_hparams g2 = hparams_of("gemma-2-9b");
    EXPECT_EQ(g2.family, model_family::MODEL_FAMILY_GEMMA2);
    EXPECT_EQ(g2.n_vocab, 256000);
    EXPECT_EQ(g2.n_embd, 3584);
    EXPECT_EQ(g2.n_ff, 14336);
    EXPECT_EQ(g2.n_layer, 42);
    EXPECT_EQ(g2.n_head, 16);
    EXPECT_EQ(g2.n_head_kv, 8);
    EXPECT_EQ(g2.head_dim, 256);  // q_dim 4096 > hidden 3584
    EXPECT_TRUE(g2.tie_embeddings);
    EXPECT_EQ(g2.act, mlp_activation::ACT_GELU_TANH);
    EXPECT_TRUE(g2.norm_plus_one && g2.attn_out_norm && g2.mlp_out_norm && !g2.qk_norm);
    EXPECT_FLOAT_EQ(g2.attn_scale, 1.0f / 16.0f);
    EXPECT_EQ(g2.attn_softcap, 50.0f);
    EXPECT_EQ(g2.final_softcap, 30.0f);
    EXPECT_FLOAT_EQ(g2.embed_scale, std::sqrt(3584.0f));
    for (int64_t i = 0; i < 42; ++i) EXPECT_EQ(g2.window[size_t(i)], i % 2 == 0 ? 4096 : 0) << i;
    EXPECT_EQ(make_random_shape("gemma-2-9b")->n_params(), 9241705984);

    const llama_hparams g3 = hparams_of("gemma-3-1b");
    EXPECT_EQ(g3.family, model_family::MODEL_FAMILY_GEMMA3);
    EXPECT_EQ(g3.n_head_kv, 1);
    EXPECT_TRUE(g3.qk_norm);
    EXPECT_EQ(g3.attn_softcap, 0.0f);
    EXPECT_EQ(g3.final_softcap, 0.0f);
    EXPECT_EQ(g3.rope.theta, 1e6);
    EXPECT_TRUE(g3.rope_local_differs);
    EXPECT_EQ(g3.rope_local.theta, 1e4);
    for (int64_t i = 0; i < 26; ++i) EXPECT_EQ(g3.window[size_t(i)], (i + 1) % 6 != 0 ? 512 : 0) << i;
    EXPECT_EQ(make_random_shape("gemma-3-1b")->n_params(), 999885952);
}

// Mixture of experts: the published shapes (parameter counts as published: Mixtral 46.7 B, Qwen3
// 30.5 B, Qwen2 57.4 B) and the micro variants open with every tensor of the table.
TEST(MakeRandom, MoeConfigsAreThePublishedOnes) {
    const llama_hparams mx = hparams_of("mixtral-8x7b");
    EXPECT_EQ(mx.family, model_family::MODEL_FAMILY_MIXTRAL);
    EXPECT_EQ(mx.n_expert, 8);
    EXPECT_EQ(mx.n_expert_used, 2);
    EXPECT_EQ(mx.n_ff_expert, 14336);
    EXPECT_TRUE(mx.moe_renorm);
    EXPECT_EQ(mx.moe_layer, std::vector<bool>(32, true));
    EXPECT_EQ(make_random_shape("mixtral-8x7b")->n_params(), 46702792704);

    const llama_hparams q3 = hparams_of("qwen3-30b-a3b");
    EXPECT_EQ(q3.family, model_family::MODEL_FAMILY_QWEN3_MOE);
    EXPECT_EQ(q3.n_expert, 128);
    EXPECT_EQ(q3.n_expert_used, 8);
    EXPECT_EQ(q3.n_ff_expert, 768);
    EXPECT_EQ(q3.head_dim, 128);
    EXPECT_TRUE(q3.qk_norm && q3.moe_renorm);
    EXPECT_EQ(q3.n_ff_shared, 0);
    EXPECT_EQ(make_random_shape("qwen3-30b-a3b")->n_params(), 30532122624);
    const auto t3 = llama_layer_tensors(q3, 47);
    EXPECT_EQ(t3.back().name, "model.layers.47.mlp.experts.127.down_proj.weight");

    const llama_hparams q2 = hparams_of("qwen2-57b-a14b-layers=2");
    EXPECT_EQ(q2.family, model_family::MODEL_FAMILY_QWEN2_MOE);
    EXPECT_EQ(q2.n_expert, 64);
    EXPECT_EQ(q2.n_ff_expert, 2560);
    EXPECT_EQ(q2.n_ff_shared, 20480);
    EXPECT_FALSE(q2.moe_renorm);
    EXPECT_TRUE(q2.qkv_bias && !q2.o_bias);
    const int64_t n2 = make_random_shape("qwen2-57b-a14b")->n_params();
    EXPECT_GT(n2, 57'300'000'000);
    EXPECT_LT(n2, 57'500'000'000);
}

TEST(MakeRandom, MicroMoeLoadsAndRuns) {
    for (const char* like : {"micro-mixtral", "micro-qwen3-moe", "micro-qwen2-moe"}) {
        SCOPED_TRACE(like);
        temp_dir          d("mr-moe");
        const std::string out = d.file("m");
        auto              rep = make(like, out, 3);
        ASSERT_TRUE(rep.is_ok()) << rep.error().message();
        auto m = llama_model::open(out, {.strict = true});
        ASSERT_TRUE(m.is_ok()) << m.error().message();
        EXPECT_EQ(static_cast<int64_t>((*m)->source().total_params()), rep->n_params);
        EXPECT_EQ(rep->n_params, make_random_shape(like)->n_params());
        const llama_hparams& hp = (*m)->hparams();
        EXPECT_EQ(hp.n_expert, 8);
        std::vector<int32_t> ids = {1, 40, 41, 300, 7, 9};
        std::vector<float>   logits(ids.size() * static_cast<size_t>(hp.n_vocab));
        thread_pool          pool(2);
        ASSERT_TRUE((*m)->forward({&pool, false}, ids.data(), 6, nullptr, logits.data()).is_ok());
        for (float v : logits) ASSERT_TRUE(std::isfinite(v));
    }
}
