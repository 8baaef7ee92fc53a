// The families through GPTQ end to end (Gemma 2, Gemma 3 text, Qwen3, Phi-3 with its fused modules,
// Mistral-Nemo's head_dim), on the small random-weight goldens models of tests/data/arch
// (transformers' own classes) with a generated 512-token tokenizer: `quantize` picks the linear
// modules of every layer as the checkpoint stores them (true-sequential; Phi-3's qkv_proj and
// gate_up_proj whole), copies the norms unchanged (Gemma's (1 + w) is folded only in memory), the
// GPTQ checkpoint loads back, is closer to the F32 model than RTN's (mean KL on calibration-like
// text; perplexities reported), and `gptq ppl` / `gptq generate` run on it.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "gptq/make_random.h"
#include "gptq/ppl.h"
#include "gptq/quantize.h"
#include "model/llama.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

using namespace gptq;
namespace fs = std::filesystem;

namespace {

// A copy of tests/data/arch/<name> with a tokenizer (the generated one of make-random's micro
// shape: vocabulary 512, BOS 1, EOS 2, as the goldens models).
std::string model_with_tokenizer(const test::temp_dir& dir, const std::string& name) {
    const std::string out = dir.file(name);
    fs::create_directories(out);
    for (const char* f : {"config.json", "model.safetensors"})
        fs::copy_file(test::source_path("tests/data/arch/" + name + "/" + f), out + "/" + f);
    make_random_params p;
    p.like        = "micro";
    p.output_path = dir.file("micro-" + name);
    p.n_threads   = 2;
    p.progress    = false;
    EXPECT_TRUE(make_random_model(p).is_ok());
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"})
        fs::copy_file(p.output_path + "/" + f, out + "/" + f);
    return out;
}

quantize_params run_of(const std::string& model, const std::string& out, const std::string& method) {
    quantize_params p;
    p.model_path  = model;
    p.output_path = out;
    p.method      = method;
    p.bits        = 3;
    p.group_size  = 32;
    p.nsamples    = 16;
    p.seqlen      = 128;
    p.n_threads   = 2;
    return p;
}

// log-softmax of the logits of ids under model `dir`, [n, n_vocab].
std::vector<double> log_probs(const std::string& dir, const std::vector<int32_t>& ids, int64_t* n_vocab) {
    auto m = llama_model::open(dir);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    if (!m.is_ok()) return {};
    const int64_t      v = (*m)->hparams().n_vocab, n = static_cast<int64_t>(ids.size());
    std::vector<float> logits(static_cast<size_t>(n * v));
    EXPECT_TRUE((*m)->forward(ops_context{}, ids.data(), n, nullptr, logits.data()).is_ok());
    std::vector<double> lp(logits.size());
    for (int64_t t = 0; t < n; ++t) {
        double mx = -INFINITY, sum = 0;
        for (int64_t j = 0; j < v; ++j) mx = std::max<double>(mx, logits[size_t(t * v + j)]);
        for (int64_t j = 0; j < v; ++j) sum += std::exp(logits[size_t(t * v + j)] - mx);
        for (int64_t j = 0; j < v; ++j) lp[size_t(t * v + j)] = logits[size_t(t * v + j)] - mx - std::log(sum);
    }
    *n_vocab = v;
    return lp;
}

// Mean over positions of KL(p || q).
double mean_kl(const std::vector<double>& p, const std::vector<double>& q, int64_t v) {
    double        kl = 0;
    const int64_t n  = static_cast<int64_t>(p.size()) / v;
    for (size_t i = 0; i < p.size(); ++i) kl += std::exp(p[i]) * (p[i] - q[i]);
    return kl / static_cast<double>(n);
}

double ppl_of(const std::string& model, const std::string& dataset) {
    ppl_params p;
    p.model_path  = model;
    p.dataset     = dataset;
    p.seqlen      = 128;
    p.max_windows = 20;
    p.progress    = false;
    p.n_threads   = 2;
    auto r        = ppl_run(p);
    EXPECT_TRUE(r.is_ok()) << r.error().message();
    return r.is_ok() ? r->ppl : 0.0;
}

// norms_per_layer: the norm tensors each layer stores (input and post-attention; Gemma's pre/post
// feed-forward; q/k norms).
void check_family(const std::string& name, int64_t n_layer, int norms_per_layer) {
    test::temp_dir    dir("family-q-" + name);
    const std::string fp = model_with_tokenizer(dir, name);
    const auto        g  = run_of(fp, dir.file("gptq"), "gptq");
    const auto        r  = run_of(fp, dir.file("rtn"), "rtn");
    auto              rg = quantize_model(g);
    ASSERT_TRUE(rg.is_ok()) << rg.error().message();
    ASSERT_TRUE(quantize_model(r).is_ok());

    // The seven linears of every layer (a fused module's parts are solved apart with its one
    // Hessian, which is the same solve row by row), each better than RTN on its own
    // (Hessian-weighted) error; the checkpoint stores them by module as the original does.
    auto model = llama_model::open(fp);
    ASSERT_TRUE(model.is_ok()) << model.error().message();
    ASSERT_EQ((*model)->hparams().n_layer, n_layer);
    std::set<std::string> want;
    for (int64_t i = 0; i < n_layer; ++i)
        for (int k = 0; k < k_n_linear_roles; ++k) want.insert(llama_linear_name(i, static_cast<linear_role>(k)));
    std::set<std::string> got;
    for (const auto& l : rg->linears) {
        got.insert(l.name);
        EXPECT_LT(l.error_gptq, l.error_rtn) << l.name;
    }
    EXPECT_EQ(got, want);

    // Norms are copied as stored (w, not the 1 + w the forward folds in), embeddings too.
    auto src_fp = tensor_source::open(fp);
    auto src_q  = tensor_source::open(g.output_path);
    ASSERT_TRUE(src_fp.is_ok() && src_q.is_ok());
    for (int64_t i = 0; i < n_layer; ++i)
        for (const auto& m : llama_linear_modules((*model)->hparams(), i)) {
            EXPECT_NE((*src_q)->find(m.module + ".qweight"), nullptr) << m.module;
            EXPECT_NE((*src_fp)->find(m.module + ".weight"), nullptr) << m.module;
        }
    int n_norms = 0;
    for (const auto& t : (*src_fp)->names()) {
        if (t.find("norm") == std::string::npos && t != "model.embed_tokens.weight") continue;
        const auto* a = (*src_fp)->find(t);
        const auto* b = (*src_q)->find(t);
        ASSERT_NE(b, nullptr) << t;
        std::vector<float> x(static_cast<size_t>(a->info->numel())), y(x.size());
        ASSERT_TRUE((*src_fp)->read_f32(t, x.data()).is_ok());
        ASSERT_TRUE((*src_q)->read_f32(t, y.data()).is_ok());
        EXPECT_EQ(x, y) << t;
        n_norms += t.find("norm") != std::string::npos;
    }
    EXPECT_GE(n_norms, norms_per_layer * n_layer + 1);  // + the final norm

    // Closer to the F32 model than RTN: mean KL(F32 || quantized) over the first 256 tokens of the
    // calibration text. On random weights only text like the calibration's shows it: on other text
    // (WikiText-2) and in perplexity, GPTQ and RTN differ by noise (measured, these models and
    // Qwen3 / Mistral-Nemo alike: RTN's ppl is sometimes the closer one), so perplexity is reported,
    // not compared. Measured KL ratios GPTQ/RTN at 3 and 4 bits: 0.26 - 0.53; bound 0.75.
    auto tok = tokenizer::load(fp);
    ASSERT_TRUE(tok.is_ok()) << tok.error().message();
    std::vector<int32_t> ids =
        (*tok)->encode(test::read_file(test::source_path("data/calib/corpus-sample.txt")).substr(0, 20000), true);
    ids.resize(256);
    int64_t    v     = 0;
    const auto lp_fp = log_probs(fp, ids, &v), lp_g = log_probs(g.output_path, ids, &v),
               lp_r = log_probs(r.output_path, ids, &v);
    ASSERT_FALSE(lp_fp.empty() || lp_g.empty() || lp_r.empty());
    const double kl_g = mean_kl(lp_fp, lp_g, v), kl_r = mean_kl(lp_fp, lp_r, v);
    EXPECT_LT(kl_g, 0.75 * kl_r) << name << ": KL gptq " << kl_g << " rtn " << kl_r;
    const std::string cal  = test::source_path("data/calib/corpus-sample.txt");
    const double      p_fp = ppl_of(fp, cal), p_g = ppl_of(g.output_path, cal), p_r = ppl_of(r.output_path, cal);
    const double      w_fp = ppl_of(fp, "wikitext2"), w_g = ppl_of(g.output_path, "wikitext2"),
                 w_r = ppl_of(r.output_path, "wikitext2");
    std::printf(
        "[ family   ] %s: KL gptq %.3g rtn %.3g; ppl calib fp %.3f gptq %.3f rtn %.3f; wiki fp %.3f gptq %.3f rtn "
        "%.3f\n",
        name.c_str(), kl_g, kl_r, p_fp, p_g, p_r, w_fp, w_g, w_r);

    // The CLI on the GPTQ checkpoint: ppl and generate.
    auto pr =
        test::run_command(test::gptq_binary() + " ppl " + g.output_path + " --seqlen 64 --max-windows 2 --threads 2");
    EXPECT_EQ(pr.exit_code, 0) << pr.err;
    EXPECT_NE(pr.out.find("ppl "), std::string::npos) << pr.out;
    auto gr = test::run_command(test::gptq_binary() + " generate " + g.output_path +
                                " -p 'The quick brown fox' -n 12 --threads 2");
    EXPECT_EQ(gr.exit_code, 0) << gr.err;
    EXPECT_FALSE(gr.out.empty());
}

}  // namespace

#ifdef GPTQ_SANITIZE
#define SKIP_UNDER_SANITIZERS() \
    GTEST_SKIP() << "perplexity runs are too slow under sanitizers; the release build runs this"
#else
#define SKIP_UNDER_SANITIZERS() (void)0
#endif

TEST(family_quantize, gemma2_end_to_end) {
    SKIP_UNDER_SANITIZERS();
    check_family("gemma2", 4, 4);  // input, post_attention, pre/post_feedforward
}

TEST(family_quantize, gemma3_text_end_to_end) {
    SKIP_UNDER_SANITIZERS();
    check_family("gemma3", 6, 6);  // + q/k norms
}

TEST(family_quantize, qwen3_end_to_end) {
    SKIP_UNDER_SANITIZERS();
    check_family("qwen3", 3, 4);  // input, post_attention, q/k norms
}

TEST(family_quantize, phi3_fused_modules_end_to_end) {
    SKIP_UNDER_SANITIZERS();
    check_family("phi3", 3, 2);
}

TEST(family_quantize, mistral_nemo_end_to_end) {
    SKIP_UNDER_SANITIZERS();
    check_family("mistral-nemo", 3, 2);
}
