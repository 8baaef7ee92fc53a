// gptq make-random (include/gptq/make_random.h): the shape table, the config files, a tokenizer,
// and the weights streamed tensor by tensor into shards.
//
// Weights: projections and embeddings ~ 0.02 * z with z approximately N(0, 1) (the sum of four
// 16-bit uniforms, centred and scaled: Irwin-Hall, bounded at +-3.46), norms = 1: the scale
// transformers initialises a Llama with (initializer_range 0.02), which keeps activations finite
// through 80 layers in F16. Every block of k_rng_block values has its own generator seeded from
// (seed, tensor name, block index), so the bytes do not depend on the thread count.
#include "gptq/make_random.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <thread>

#include "core/dtype.h"
#include "core/error.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "data_files.h"
#include "io/hf_config.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/tensor_source.h"
#include "model/llama.h"

namespace gptq {

namespace fs = std::filesystem;
using ojson  = nlohmann::ordered_json;

namespace {
constexpr status_code E_ARG          = status_code::STATUS_INVALID_ARGUMENT;
constexpr double      k_weight_std   = 0.02;     // transformers' initializer_range for Llama
constexpr int64_t     k_rng_block    = 1 << 16;  // values per independently seeded generator
constexpr const char* k_layers_infix = "-layers=";

// The published config.json values (Hugging Face meta-llama/<id>/config.json).
std::vector<random_model_shape> shape_table() {
    std::vector<random_model_shape> t;
    auto add = [&](const char* name, const char* hf, int64_t v, int64_t h, int64_t ff, int64_t l, int64_t nh,
                   int64_t nkv, int64_t maxpos, double theta, double eps, int64_t bos, int64_t eos, bool tie,
                   const char* dt) {
        random_model_shape s;
        s.name = s.base_name      = name;
        s.hf_model_id             = hf;
        s.vocab_size              = v;
        s.hidden_size             = h;
        s.intermediate_size       = ff;
        s.num_hidden_layers       = l;
        s.num_attention_heads     = nh;
        s.num_key_value_heads     = nkv;
        s.max_position_embeddings = maxpos;
        s.rope_theta              = theta;
        s.rms_norm_eps            = eps;
        s.bos_token_id            = bos;
        s.eos_token_id            = eos;
        s.tie_word_embeddings     = tie;
        s.torch_dtype             = dt;
        t.push_back(s);
    };
    //   name           HF model id                    vocab   hidden inter  layers heads kv maxpos theta    eps   bos
    //   eos
    add("llama-2-7b", "meta-llama/Llama-2-7b-hf", 32000, 4096, 11008, 32, 32, 32, 4096, 10000.0, 1e-5, 1, 2, false,
        "float16");
    add("llama-2-13b", "meta-llama/Llama-2-13b-hf", 32000, 5120, 13824, 40, 40, 40, 4096, 10000.0, 1e-5, 1, 2, false,
        "float16");
    add("llama-2-70b", "meta-llama/Llama-2-70b-hf", 32000, 8192, 28672, 80, 64, 8, 4096, 10000.0, 1e-5, 1, 2, false,
        "float16");
    add("llama-3-8b", "meta-llama/Meta-Llama-3-8B", 128256, 4096, 14336, 32, 32, 8, 8192, 500000.0, 1e-5, 128000,
        128001, false, "bfloat16");
    // Test shapes: tiny has the bundled tiny-llama's dimensions (its tokenizer is copied); micro is
    // smaller still and gets a generated tokenizer.
    add("tiny", "", 8192, 256, 768, 4, 4, 2, 2048, 10000.0, 1e-5, 1, 2, false, "float16");
    add("micro", "", 512, 64, 128, 2, 4, 2, 512, 10000.0, 1e-5, 1, 2, false, "float16");
    // Other families (io/arch.h): the published config's values beyond the columns above.
    auto family = [&](const char* architecture, const char* model_type, int64_t head_dim,
                      std::optional<int64_t> window) {
        t.back().architecture    = architecture;
        t.back().model_type      = model_type;
        t.back().head_dim_config = head_dim;
        t.back().sliding_window  = window;
    };
    add("qwen3-8b", "Qwen/Qwen3-8B", 151936, 4096, 12288, 36, 32, 8, 40960, 1000000.0, 1e-6, 151643, 151645, false,
        "bfloat16");
    family("Qwen3ForCausalLM", "qwen3", 128, std::nullopt);
    add("mistral-nemo-12b", "mistralai/Mistral-Nemo-Base-2407", 131072, 5120, 14336, 40, 32, 8, 1024000, 1000000.0,
        1e-5, 1, 2, false, "bfloat16");
    family("MistralForCausalLM", "mistral", 128, std::nullopt);
    add("phi-3-mini", "microsoft/Phi-3-mini-4k-instruct", 32064, 3072, 8192, 32, 32, 32, 4096, 10000.0, 1e-5, 1, 32000,
        false, "bfloat16");
    family("Phi3ForCausalLM", "phi3", 0, 2047);
    // Test shapes of those families (generated tokenizer).
    add("micro-qwen3", "", 512, 64, 128, 2, 4, 2, 512, 1000000.0, 1e-6, 1, 2, true, "bfloat16");
    family("Qwen3ForCausalLM", "qwen3", 32, std::nullopt);
    add("micro-nemo", "", 512, 96, 128, 2, 4, 2, 512, 1000000.0, 1e-5, 1, 2, false, "bfloat16");
    family("MistralForCausalLM", "mistral", 16, std::nullopt);
    add("micro-phi3", "", 512, 64, 128, 2, 4, 4, 512, 10000.0, 1e-5, 1, 2, false, "bfloat16");
    family("Phi3ForCausalLM", "phi3", 0, 64);
    // Gemma (google/gemma-2-9b, transformers 4.42; google/gemma-3-1b-pt, 4.50): head_dim 256 from the
    // config, (1 + w) norms (written as 0: the neutral value), tied embeddings.
    add("gemma-2-9b", "google/gemma-2-9b", 256000, 3584, 14336, 42, 16, 8, 8192, 10000.0, 1e-6, 2, 1, true, "float32");
    family("Gemma2ForCausalLM", "gemma2", 256, 4096);
    t.back().query_pre_attn_scalar   = 256;
    t.back().attn_logit_softcapping  = 50.0;
    t.back().final_logit_softcapping = 30.0;
    add("gemma-3-1b", "google/gemma-3-1b-pt", 262144, 1152, 6912, 26, 4, 1, 32768, 1000000.0, 1e-6, 2, 1, true,
        "bfloat16");
    family("Gemma3ForCausalLM", "gemma3_text", 256, 512);
    t.back().sliding_window_pattern = 6;
    t.back().query_pre_attn_scalar  = 256;
    t.back().rope_local_base_freq   = 10000.0;
    // Mixture of experts (mistralai/Mixtral-8x7B-v0.1, Qwen/Qwen3-30B-A3B, Qwen/Qwen2-57B-A14B).
    auto moe = [&](int64_t n, int64_t k, int64_t ff, int64_t ff_shared, bool norm_topk) {
        t.back().num_experts                     = n;
        t.back().num_experts_per_tok             = k;
        t.back().moe_intermediate_size           = ff;
        t.back().shared_expert_intermediate_size = ff_shared;
        t.back().norm_topk_prob                  = norm_topk;
    };
    add("mixtral-8x7b", "mistralai/Mixtral-8x7B-v0.1", 32000, 4096, 14336, 32, 32, 8, 32768, 1000000.0, 1e-5, 1, 2,
        false, "bfloat16");
    family("MixtralForCausalLM", "mixtral", 0, std::nullopt);
    moe(8, 2, 14336, 0, true);
    add("qwen3-30b-a3b", "Qwen/Qwen3-30B-A3B", 151936, 2048, 6144, 48, 32, 4, 40960, 1000000.0, 1e-6, 151643, 151645,
        false, "bfloat16");
    family("Qwen3MoeForCausalLM", "qwen3_moe", 128, std::nullopt);
    moe(128, 8, 768, 0, true);
    add("qwen2-57b-a14b", "Qwen/Qwen2-57B-A14B", 151936, 3584, 18944, 28, 28, 4, 131072, 1000000.0, 1e-6, 151643,
        151643, false, "bfloat16");
    family("Qwen2MoeForCausalLM", "qwen2_moe", 0, std::nullopt);
    moe(64, 8, 2560, 20480, false);
    // Test shapes of those families (generated tokenizer): 8 experts, top 2.
    add("micro-mixtral", "", 512, 64, 64, 2, 4, 2, 512, 1000000.0, 1e-5, 1, 2, false, "bfloat16");
    family("MixtralForCausalLM", "mixtral", 0, std::nullopt);
    moe(8, 2, 64, 0, true);
    add("micro-qwen3-moe", "", 512, 64, 128, 2, 4, 2, 512, 1000000.0, 1e-6, 1, 2, false, "bfloat16");
    family("Qwen3MoeForCausalLM", "qwen3_moe", 32, std::nullopt);
    moe(8, 2, 32, 0, true);
    add("micro-qwen2-moe", "", 512, 64, 128, 2, 4, 2, 512, 1000000.0, 1e-6, 1, 2, false, "bfloat16");
    family("Qwen2MoeForCausalLM", "qwen2_moe", 0, std::nullopt);
    moe(8, 2, 32, 64, false);
    return t;
}

uint64_t splitmix64(uint64_t& x) {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z          = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z          = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

uint64_t fnv1a(const std::string& s) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (unsigned char c : s) h = (h ^ c) * 0x100000001b3ull;
    return h;
}

// values [n] of a tensor in `type` (F16 or BF16): std * z, or all `constant` when std == 0.
void fill_tensor(thread_pool& pool, uint64_t seed, const std::string& name, double std_dev, float constant, dtype type,
                 int64_t n, uint16_t* out) {
    const int64_t  n_blocks    = (n + k_rng_block - 1) / k_rng_block;
    const uint64_t tensor_seed = seed * 0xD1B54A32D192ED03ull ^ fnv1a(name);
    // Irwin-Hall of 4: sum of 4 uniforms in [0, 1) has mean 2, variance 1/3.
    const float scale = static_cast<float>(std_dev * std::sqrt(3.0) / 65536.0);
    pool.parallel_for(n_blocks, [&](int64_t b0, int64_t b1) {
        std::vector<float> tmp(static_cast<size_t>(k_rng_block));
        for (int64_t b = b0; b < b1; ++b) {
            const int64_t i0 = b * k_rng_block, m = std::min(k_rng_block, n - i0);
            uint64_t      state = tensor_seed ^ (static_cast<uint64_t>(b) * 0x9E3779B97F4A7C15ull);
            splitmix64(state);
            for (int64_t i = 0; i < m; ++i) {
                if (std_dev == 0.0) {
                    tmp[static_cast<size_t>(i)] = constant;
                    continue;
                }
                const uint64_t r = splitmix64(state);
                const int64_t  s = static_cast<int64_t>(r & 0xFFFF) + static_cast<int64_t>((r >> 16) & 0xFFFF) +
                                  static_cast<int64_t>((r >> 32) & 0xFFFF) + static_cast<int64_t>(r >> 48) - 131070;
                tmp[static_cast<size_t>(i)] = static_cast<float>(s) * scale;
            }
            if (type == dtype::DTYPE_BF16)
                f32_to_bf16_row(tmp.data(), out + i0, static_cast<size_t>(m));
            else
                f32_to_f16_row(tmp.data(), out + i0, static_cast<size_t>(m));
        }
    });
}

// ---- the generated tokenizer -------------------------------------------------------------------

// GPT-2's byte -> printable code point map (what the ByteLevel pre-tokenizer and decoder use).
std::vector<std::string> byte_level_chars() {
    std::vector<std::string> out(256);
    auto                     utf8 = [](uint32_t cp) {
        std::string s;
        if (cp < 0x80) {
            s += static_cast<char>(cp);
        } else {  // every code point here is < 0x800
            s += static_cast<char>(0xC0 | (cp >> 6));
            s += static_cast<char>(0x80 | (cp & 0x3F));
        }
        return s;
    };
    uint32_t extra = 0;
    for (uint32_t b = 0; b < 256; ++b) {
        const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
        out[b]               = utf8(printable ? b : 256 + extra++);
    }
    return out;
}

// Bytes in the order their pairs get merged: lower-case letters, space, upper-case, digits,
// punctuation, then the rest; so that English text gets multi-byte tokens.
std::vector<int> byte_priority() {
    std::vector<int>  order;
    std::vector<bool> used(256, false);
    auto              take = [&](int b) {
        if (!used[static_cast<size_t>(b)]) {
            used[static_cast<size_t>(b)] = true;
            order.push_back(b);
        }
    };
    for (int c = 'a'; c <= 'z'; ++c) take(c);
    take(' ');
    for (int c = 'A'; c <= 'Z'; ++c) take(c);
    for (int c = '0'; c <= '9'; ++c) take(c);
    for (int c = '!'; c <= '~'; ++c) take(c);
    take('\n');
    for (int c = 0; c < 256; ++c) take(c);
    return order;
}

struct generated_tokenizer {
    ojson       tokenizer;  // tokenizer.json
    std::string bos, eos;
};

// A byte-level BPE tokenizer.json of exactly vocab_size ids: the special tokens at the ids the
// config names (Llama 2: <unk> <s> </s> at 0..2; Llama 3: <|begin_of_text|>, <|end_of_text|> and
// reserved tokens from 128000 on), the 256 byte tokens, then merges of byte pairs (most common
// letters first) and of a pair with a byte, until the vocabulary is full.
result<generated_tokenizer> tokenizer_generate(const random_model_shape& s) {
    const int64_t                                V = s.vocab_size;
    std::vector<std::pair<int64_t, std::string>> specials;
    if (s.bos_token_id == 2 && s.eos_token_id == 1) {  // Gemma's ids
        specials = {{0, "<pad>"}, {1, "<eos>"}, {2, "<bos>"}, {3, "<unk>"}};
    } else if (s.bos_token_id < 3 && s.eos_token_id < 3) {
        specials = {{0, "<unk>"}, {1, "<s>"}, {2, "</s>"}};
    } else if (s.bos_token_id < 3) {  // Llama 2's low ids, the end of text among added tokens (Phi-3: 32000 on)
        specials = {{0, "<unk>"}, {1, "<s>"}, {2, "</s>"}};
        for (int64_t id = s.eos_token_id, k = 0; id < V; ++id)
            specials.push_back(
                {id, id == s.eos_token_id ? std::string("<|endoftext|>") : fmt::format("<|placeholder{}|>", ++k)});
    } else {
        const int64_t first = std::min(s.bos_token_id, s.eos_token_id);
        for (int64_t id = first, k = 0; id < V; ++id) {
            if (id == s.bos_token_id)
                specials.push_back({id, "<|begin_of_text|>"});
            else if (id == s.eos_token_id)
                specials.push_back({id, "<|end_of_text|>"});
            else
                specials.push_back({id, fmt::format("<|reserved_special_token_{}|>", k++)});
        }
    }
    std::vector<bool> is_special(static_cast<size_t>(V), false);
    for (const auto& [id, content] : specials) is_special[static_cast<size_t>(id)] = true;
    const int64_t n_regular = V - static_cast<int64_t>(specials.size());
    if (n_regular < 256)
        return make_error(E_ARG, "{}: vocab_size {} leaves {} regular tokens; a byte-level tokenizer needs 256", s.name,
                          V, n_regular);

    const auto chars     = byte_level_chars();
    const auto prio      = byte_priority();
    ojson      vocab     = ojson::object();
    ojson      merges    = ojson::array();
    int64_t    next_id   = 0;
    auto       add_token = [&](const std::string& piece) {
        while (is_special[static_cast<size_t>(next_id)]) ++next_id;
        vocab[piece] = next_id++;
    };
    for (int b = 0; b < 256; ++b) add_token(chars[static_cast<size_t>(b)]);
    int64_t left = n_regular - 256;
    // Pairs (a, b) of bytes in priority order, by the larger of the two ranks: all pairs of the
    // first k bytes come before any pair that uses byte k + 1.
    std::vector<std::string> pairs;
    for (int k = 0; k < 256 && left > 0; ++k)
        for (int i = 0; i <= 2 * k && left > 0; ++i) {
            const int          a = i < k ? i : k, b = i < k ? k : i - k;
            const std::string& ca = chars[static_cast<size_t>(prio[static_cast<size_t>(a)])];
            const std::string& cb = chars[static_cast<size_t>(prio[static_cast<size_t>(b)])];
            add_token(ca + cb);
            merges.push_back(ca + " " + cb);
            pairs.push_back(ca + cb);
            --left;
        }
    // Then a pair followed by one of the 64 commonest bytes.
    for (size_t p = 0; p < pairs.size() && left > 0; ++p)
        for (int b = 0; b < 64 && left > 0; ++b) {
            const std::string& cb = chars[static_cast<size_t>(prio[static_cast<size_t>(b)])];
            add_token(pairs[p] + cb);
            merges.push_back(pairs[p] + " " + cb);
            --left;
        }
    if (left > 0) return make_error(E_ARG, "{}: vocab_size {} is too large for the generated tokenizer", s.name, V);

    generated_tokenizer g;
    ojson               added = ojson::array();
    for (const auto& [id, content] : specials) {
        added.push_back({{"id", id},
                         {"content", content},
                         {"single_word", false},
                         {"lstrip", false},
                         {"rstrip", false},
                         {"normalized", false},
                         {"special", true}});
        if (id == s.bos_token_id) g.bos = content;
        if (id == s.eos_token_id) g.eos = content;
    }
    const ojson bos_item = {{"SpecialToken", {{"id", g.bos}, {"type_id", 0}}}};
    ojson&      t        = g.tokenizer;
    t["version"]         = "1.0";
    t["truncation"]      = nullptr;
    t["padding"]         = nullptr;
    t["added_tokens"]    = added;
    t["normalizer"]      = nullptr;
    t["pre_tokenizer"]   = {
          {"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}};
    t["post_processor"] = {
        {"type", "TemplateProcessing"},
        {"single", {bos_item, {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
        {"pair",
         {bos_item,
          {{"Sequence", {{"id", "A"}, {"type_id", 0}}}},
          {{"SpecialToken", {{"id", g.bos}, {"type_id", 1}}}},
          {{"Sequence", {{"id", "B"}, {"type_id", 1}}}}}},
        {"special_tokens", {{g.bos, {{"id", g.bos}, {"ids", {s.bos_token_id}}, {"tokens", {g.bos}}}}}}};
    t["decoder"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}};
    t["model"]   = {{"type", "BPE"},
                    {"dropout", nullptr},
                    {"unk_token", nullptr},
                    {"continuing_subword_prefix", nullptr},
                    {"end_of_word_suffix", nullptr},
                    {"fuse_unk", false},
                    {"byte_fallback", false},
                    {"ignore_merges", false},
                    {"vocab", std::move(vocab)},
                    {"merges", std::move(merges)}};
    return g;
}

// tokenizer.json + tokenizer_config.json + special_tokens_map.json into `dir`: the bundled
// tiny-llama's when the vocabulary and special ids match, else generated. Returns what was done.
result<std::string> tokenizer_write(const random_model_shape& s, const std::string& dir) {
    constexpr const char* k_bundled = "models/tiny-llama";
    if (s.vocab_size == 8192 && s.bos_token_id == 1 && s.eos_token_id == 2) {
        auto cfg = bundled_data_resolve(std::string(k_bundled) + "/config.json");
        if (cfg) {
            auto bundled = model_config_load(*cfg);
            if (bundled && (*bundled).vocab_size == s.vocab_size) {
                const fs::path from = fs::path(*cfg).parent_path();
                for (const char* f :
                     {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"}) {
                    if (!fs::is_regular_file(from / f)) continue;
                    std::error_code ec;
                    fs::copy_file(from / f, fs::path(dir) / f, fs::copy_options::overwrite_existing, ec);
                    if (ec)
                        return make_error(status_code::STATUS_IO_ERROR, "copying {}: {}", (from / f).string(),
                                          ec.message());
                }
                return std::string("copied from ") + k_bundled;
            }
        }
    }
    GPTQ_ASSIGN_OR_RETURN(generated_tokenizer g, tokenizer_generate(s));
    GPTQ_TRY(file_write_atomic((fs::path(dir) / "tokenizer.json").string(), g.tokenizer.dump(2) + "\n"));
    ojson tc = {{"add_bos_token", true},
                {"add_eos_token", false},
                {"bos_token", g.bos},
                {"eos_token", g.eos},
                {"clean_up_tokenization_spaces", false},
                {"model_max_length", s.max_position_embeddings},
                {"tokenizer_class", "PreTrainedTokenizerFast"}};
    GPTQ_TRY(file_write_atomic((fs::path(dir) / "tokenizer_config.json").string(), tc.dump(2) + "\n"));
    ojson sm = {{"bos_token", g.bos}, {"eos_token", g.eos}};
    GPTQ_TRY(file_write_atomic((fs::path(dir) / "special_tokens_map.json").string(), sm.dump(2) + "\n"));
    return fmt::format("generated byte-level BPE ({} tokens)", s.vocab_size);
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

result<std::string> make_random_tokenizer_json(const random_model_shape& shape) {
    GPTQ_ASSIGN_OR_RETURN(generated_tokenizer g, tokenizer_generate(shape));
    return g.tokenizer.dump();
}

int64_t random_model_shape::n_params() const {
    const int64_t h = hidden_size, q = num_attention_heads * head_dim(), kv = num_key_value_heads * head_dim();
    // Norms: input and post-attention (Llama); Gemma adds the pre/post-feedforward ones; q/k norms
    // (io/arch.h qk_norm) on Qwen3 and Gemma 3.
    const bool    gemma = model_type == "gemma2" || model_type == "gemma3_text";
    const int64_t qk_norms =
        model_type == "qwen3" || model_type == "qwen3_moe" || model_type == "gemma3_text" ? 2 * head_dim() : 0;
    const int64_t qkv_bias = model_type == "qwen2_moe" ? q + 2 * kv : 0;
    // The MLP: dense, or the sparse block (router, experts, shared expert and its gate).
    const int64_t mlp =
        num_experts == 0 ? 3 * h * intermediate_size
                         : num_experts * h + num_experts * 3 * h * moe_intermediate_size +
                               (shared_expert_intermediate_size > 0 ? 3 * h * shared_expert_intermediate_size + h : 0);
    const int64_t per_layer = (gemma ? 4 * h : 2 * h) + 2 * q * h + 2 * kv * h + mlp + qk_norms + qkv_bias;
    return vocab_size * h * (tie_word_embeddings ? 1 : 2) + h + num_hidden_layers * per_layer;
}

std::vector<std::string> make_random_known_names() {
    std::vector<std::string> names;
    for (const auto& s : shape_table()) names.push_back(s.base_name);
    return names;
}

result<random_model_shape> make_random_shape(const std::string& name) {
    std::string  base   = name;
    int64_t      layers = -1;
    const size_t at     = name.find(k_layers_infix);
    if (at != std::string::npos) {
        base                  = name.substr(0, at);
        const std::string num = name.substr(at + std::string(k_layers_infix).size());
        size_t            pos = 0;
        try {
            layers = std::stoll(num, &pos);
        } catch (...) {
            pos = 0;
        }
        if (num.empty() || pos != num.size() || layers < 1)
            return make_error(E_ARG, "--like '{}': '{}' after '{}' is not a positive layer count", name, num,
                              k_layers_infix);
    }
    for (auto s : shape_table()) {
        if (s.base_name != base) continue;
        if (layers > s.num_hidden_layers)
            return make_error(E_ARG, "--like '{}': {} has {} layers, not {}", name, base, s.num_hidden_layers, layers);
        if (layers > 0) s.num_hidden_layers = layers;
        s.name = name;
        return s;
    }
    return make_error(E_ARG, "--like '{}': unknown model; known: {} (each may end in '{}N' to keep N layers)", name,
                      fmt::join(make_random_known_names(), ", "), k_layers_infix);
}

namespace {
// The Gemma keys of config.json beyond head_dim and sliding_window (transformers 4 dialect, as the
// published files spell them).
void gemma_config_keys(const random_model_shape& s, ojson* j) {
    ojson& c = *j;
    c.erase("hidden_act");
    c.erase("mlp_bias");
    c.erase("pretraining_tp");
    c["hidden_activation"]       = "gelu_pytorch_tanh";
    c["pad_token_id"]            = 0;
    c["query_pre_attn_scalar"]   = s.query_pre_attn_scalar;
    c["attn_logit_softcapping"]  = s.attn_logit_softcapping > 0 ? ojson(s.attn_logit_softcapping) : ojson(nullptr);
    c["final_logit_softcapping"] = s.final_logit_softcapping > 0 ? ojson(s.final_logit_softcapping) : ojson(nullptr);
    if (s.sliding_window_pattern > 0) c["sliding_window_pattern"] = s.sliding_window_pattern;
    if (s.rope_local_base_freq > 0) c["rope_local_base_freq"] = s.rope_local_base_freq;
    c["cache_implementation"] = "hybrid";
}
}  // namespace

namespace {
// The MoE keys (transformers 4 dialect, as the published files spell them).
void moe_config_keys(const random_model_shape& s, ojson* j) {
    ojson& c                  = *j;
    c["num_experts_per_tok"]  = s.num_experts_per_tok;
    c["output_router_logits"] = false;
    c["router_aux_loss_coef"] = 0.001;
    if (s.model_type == "mixtral") {
        c["num_local_experts"] = s.num_experts;  // experts of intermediate_size
        c["sliding_window"]    = nullptr;
        return;
    }
    c["num_experts"]           = s.num_experts;
    c["moe_intermediate_size"] = s.moe_intermediate_size;
    c["norm_topk_prob"]        = s.norm_topk_prob;
    c["decoder_sparse_step"]   = 1;
    c["mlp_only_layers"]       = ojson::array();
    c["use_sliding_window"]    = false;
    c["max_window_layers"]     = s.num_hidden_layers;
    if (s.shared_expert_intermediate_size > 0) c["shared_expert_intermediate_size"] = s.shared_expert_intermediate_size;
}
}  // namespace

std::string make_random_config_json(const random_model_shape& s, const std::string& dtype, uint64_t seed) {
    ojson j;
    j["architectures"]           = {s.architecture};
    j["attention_bias"]          = false;
    j["attention_dropout"]       = 0.0;
    j["bos_token_id"]            = s.bos_token_id;
    j["eos_token_id"]            = s.eos_token_id;
    j["hidden_act"]              = "silu";
    j["hidden_size"]             = s.hidden_size;
    j["initializer_range"]       = k_weight_std;
    j["intermediate_size"]       = s.intermediate_size;
    j["max_position_embeddings"] = s.max_position_embeddings;
    j["mlp_bias"]                = false;
    j["model_type"]              = s.model_type;
    if (s.head_dim_config > 0) j["head_dim"] = s.head_dim_config;
    if (s.sliding_window) j["sliding_window"] = *s.sliding_window;
    j["num_attention_heads"] = s.num_attention_heads;
    j["num_hidden_layers"]   = s.num_hidden_layers;
    j["num_key_value_heads"] = s.num_key_value_heads;
    j["pretraining_tp"]      = 1;
    j["rms_norm_eps"]        = s.rms_norm_eps;
    j["rope_scaling"]        = nullptr;
    j["rope_theta"]          = s.rope_theta;
    j["tie_word_embeddings"] = s.tie_word_embeddings;
    j["torch_dtype"]         = dtype;
    j["use_cache"]           = true;
    j["vocab_size"]          = s.vocab_size;
    const bool gemma         = s.model_type == "gemma2" || s.model_type == "gemma3_text";
    if (gemma) gemma_config_keys(s, &j);
    if (s.num_experts > 0) moe_config_keys(s, &j);
    j["gptqkit_make_random"] = {
        {"like", s.name},
        {"shape_of", s.hf_model_id},
        {"seed", seed},
        {"weights", gemma ? "random: N(0, 0.02) linears and embeddings, norms 0 (scale 1 + w = 1)"
                          : "random: N(0, 0.02) linears and embeddings, norms 1"}};
    return j.dump(2) + "\n";
}

namespace {
result<make_random_report> make_random_run(const make_random_params& p) {
    const auto t0 = std::chrono::steady_clock::now();
    GPTQ_ASSIGN_OR_RETURN(random_model_shape shape, make_random_shape(p.like));
    dtype type;
    if (p.dtype == "float16")
        type = dtype::DTYPE_F16;
    else if (p.dtype == "bfloat16")
        type = dtype::DTYPE_BF16;
    else
        return make_error(E_ARG, "--dtype '{}': expected float16 or bfloat16", p.dtype);
    if (p.output_path.empty()) return make_error(E_ARG, "no output folder given (-o)");
    if (p.max_shard_bytes == 0) return make_error(E_ARG, "--max-shard-size must be positive");
    if (p.n_threads < 0) return make_error(E_ARG, "--threads is {}, expected >= 0", p.n_threads);
    if (fs::exists(p.output_path))
        return make_error(E_ARG, "{}: already exists; choose another output folder or remove it", p.output_path);

    // The tensor table comes from model/ (the one place that knows HF names), fed the config we write.
    const std::string config_text = make_random_config_json(shape, p.dtype, p.seed);
    GPTQ_ASSIGN_OR_RETURN(json cj, json_parse(config_text, "config.json"));
    GPTQ_ASSIGN_OR_RETURN(model_config cfg, model_config_parse(cj, "config.json"));
    GPTQ_ASSIGN_OR_RETURN(llama_hparams hp, llama_hparams_from_config(cfg));
    std::vector<tensor_spec> specs;
    {
        auto g = llama_global_tensors(hp);
        specs.push_back(g[0]);  // embeddings first, as transformers orders them
        for (int64_t i = 0; i < hp.n_layer; ++i) {
            auto l = llama_layer_tensors(hp, i);
            specs.insert(specs.end(), l.begin(), l.end());
        }
        specs.push_back(g[1]);
        if (!g[2].optional) specs.push_back(g[2]);
    }
    std::vector<safetensors_decl> decls;
    int64_t                       max_numel = 0, total_numel = 0;
    for (const auto& t : specs) {
        decls.push_back({t.name, type, t.shape});
        int64_t n = 1;
        for (int64_t d : t.shape) n *= d;
        max_numel = std::max(max_numel, n);
        total_numel += n;
    }

    const std::string work = p.output_path + ".partial";
    std::error_code   ec;
    fs::remove_all(work, ec);  // a previous interrupted run's leftovers: nothing in it is reused
    fs::create_directories(work, ec);
    if (ec) return make_error(status_code::STATUS_IO_ERROR, "{}: cannot create: {}", work, ec.message());

    make_random_report rep;
    rep.n_params = total_numel;
    GPTQ_TRY(file_write_atomic((fs::path(work) / "config.json").string(), config_text));
    ojson gen = {
        {"_from_model_config", true}, {"bos_token_id", shape.bos_token_id}, {"eos_token_id", shape.eos_token_id}};
    GPTQ_TRY(file_write_atomic((fs::path(work) / "generation_config.json").string(), gen.dump(2) + "\n"));
    GPTQ_ASSIGN_OR_RETURN(rep.tokenizer, tokenizer_write(shape, work));

    const int n_threads =
        p.n_threads > 0 ? p.n_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    thread_pool                        pool(n_threads);
    std::vector<uint16_t>              buf(static_cast<size_t>(max_numel));  // one tensor: the peak of the run
    const shard_plan                   plan = safetensors_plan_shards(decls, p.max_shard_bytes);
    std::map<std::string, std::string> weight_map;
    uint64_t                           total_data = 0;
    std::unique_ptr<progress_bar>      bar;
    if (p.progress) bar = std::make_unique<progress_bar>("make-random", total_numel >> 20, "Mparam");
    int64_t done = 0;
    for (size_t k = 0; k < plan.shards.size(); ++k) {
        const std::string path = (fs::path(work) / plan.file_names[k]).string();
        GPTQ_ASSIGN_OR_RETURN(auto w, safetensors_writer::create(path, plan.shards[k]));
        for (const auto& d : plan.shards[k]) {
            int64_t n = 1;
            for (int64_t x : d.shape) n *= x;
            // 1-D tensors are norms except q/k/v biases (Qwen2-MoE), drawn as the weights.
            const bool is_norm = d.shape.size() == 1 && d.name.find("norm") != std::string::npos;
            // A norm's neutral weight: 1, or 0 where the family scales by (1 + w).
            fill_tensor(pool, p.seed, d.name, is_norm ? 0.0 : k_weight_std, hp.norm_plus_one ? 0.0f : 1.0f, type, n,
                        buf.data());
            GPTQ_TRY(w->write(d.name, buf.data(), static_cast<size_t>(n) * 2));
            weight_map[d.name] = plan.file_names[k];
            done += n;
            if (bar) bar->set(done >> 20);
        }
        total_data += w->data_size();
        GPTQ_TRY(w->finish());
        rep.n_bytes += fs::file_size(path);
    }
    if (bar) bar->finish();
    if (plan.shards.size() > 1)
        GPTQ_TRY(safetensors_index_write((fs::path(work) / "model.safetensors.index.json").string(), total_data,
                                         weight_map));
    rep.n_shards = static_cast<int64_t>(plan.shards.size());

    fs::rename(work, p.output_path, ec);
    if (ec) return make_error(status_code::STATUS_IO_ERROR, "renaming {} to {}: {}", work, p.output_path, ec.message());
    rep.output_path = p.output_path;
    rep.seconds     = seconds_since(t0);
    return rep;
}
}  // namespace

result<make_random_report> make_random_model(const make_random_params& params) {
    try {
        return make_random_run(params);
    } catch (const std::bad_alloc&) {
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "out of host memory while writing {} (one tensor of the model is held at a time)",
                          params.output_path);
    }
}

std::string make_random_report_text(const make_random_report& r) {
    return fmt::format("wrote {}: {:.3f} B parameters, {:.2f} GB in {} shard{}, tokenizer {}, {:.1f} s\n",
                       r.output_path, static_cast<double>(r.n_params) / 1e9, static_cast<double>(r.n_bytes) / 1e9,
                       r.n_shards, r.n_shards == 1 ? "" : "s", r.tokenizer, r.seconds);
}

}  // namespace gptq
