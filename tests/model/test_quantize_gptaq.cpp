// gptq quantize --gptaq (GPTAQ, docs/quantize.md "GPTAQ") end to end on the bundled tiny-llama: it
// runs, an interrupted run resumes to the same bytes (the full-precision stream is rebuilt
// through the finished layers' original weights), the last layer's output on the calibration
// windows is closer to the full-precision model's than plain GPTQ's at 3 bits (what GPTAQ fits and
// plain GPTQ ignores), and the options it cannot take are refused by name, in the API and the CLI.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <memory>

#include "gptq/make_random.h"
#include "gptq/quantize.h"
#include "gptq/tokenize.h"
#include "model/llama.h"
#include "quantize_fixture.h"
#include "test_util.h"

using namespace gptq;
namespace fs = std::filesystem;

namespace {

std::string tiny() {
    return test::source_path("models/tiny-llama");
}

// A calibration text of the bundled corpus' first 64 KiB in dir (contiguous windows read it from
// the start, so the test knows the windows).
std::string calib_text(const test::temp_dir& dir) {
    const std::string path = dir.file("calib.txt");
    test::write_file(path, test::read_file(test::source_path("data/calib/corpus-sample.txt")).substr(0, 64 << 10));
    return path;
}

quantize_params gptaq_run(const std::string& out, const std::string& calib) {
    quantize_params p = test::small_quantize_params(tiny(), out);
    p.calib           = calib;
    p.calib_sampling  = "contiguous";
    p.gptaq           = true;
    return p;
}

// sum |h_q - h_fp|^2 / sum |h_fp|^2 of the last decoder layer's output over the windows.
[[maybe_unused]] double last_layer_error(const std::string& fp_path, const std::string& q_path,
                                         const std::vector<int32_t>& ids, int64_t n_windows, int64_t seqlen) {
    auto fp = llama_model::open(fp_path);
    auto q  = llama_model::open(q_path);
    EXPECT_TRUE(fp.is_ok() && q.is_ok());
    EXPECT_TRUE((*fp)->globals_load().is_ok());
    EXPECT_TRUE((*q)->globals_load().is_ok());
    const llama_hparams& hp = (*fp)->hparams();
    const ops_context    ctx;
    double               num = 0, den = 0;
    for (int64_t j = 0; j < n_windows; ++j) {
        std::vector<float> a(size_t(seqlen * hp.n_embd)), b(a.size());
        EXPECT_TRUE((*fp)->embed(ids.data() + j * seqlen, seqlen, a.data()).is_ok());
        b = a;
        for (int64_t i = 0; i < hp.n_layer; ++i) {
            auto la = (*fp)->layer_load(i);
            auto lb = (*q)->layer_load(i);
            EXPECT_TRUE(la.is_ok() && lb.is_ok());
            (*fp)->layer_forward(ctx, **la, a.data(), seqlen, 0, nullptr);
            (*q)->layer_forward(ctx, **lb, b.data(), seqlen, 0, nullptr);
        }
        for (size_t k = 0; k < a.size(); ++k) {
            num += double(b[k] - a[k]) * (b[k] - a[k]);
            den += double(a[k]) * a[k];
        }
    }
    return num / den;
}

}  // namespace

TEST(quantize_gptaq, runs_and_resumes_byte_identically) {
    test::temp_dir dir("q-gptaq-resume");
    const auto     calib    = calib_text(dir);
    auto           straight = gptaq_run(dir.file("straight"), calib);
    straight.gar            = true;
    auto r                  = quantize_model(straight);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_EQ(r->linears.size(), 28u);
    for (const auto& l : r->linears) EXPECT_TRUE(std::isfinite(l.error_gptq) && l.error_gptq > 0) << l.name;

    auto cut              = straight;
    cut.output_path       = dir.file("resumed");
    cut.stop_after_layers = 2;
    auto stopped          = quantize_model(cut);
    ASSERT_FALSE(stopped.is_ok());
    EXPECT_EQ(stopped.error().code(), status_code::STATUS_CANCELLED);

    auto without              = cut;  // a work folder made with --gptaq does not continue without it
    without.stop_after_layers = -1;
    without.resume            = true;
    without.gptaq             = false;
    auto refused              = quantize_model(without);
    ASSERT_FALSE(refused.is_ok());
    EXPECT_NE(refused.error().message().find("was made with --gptaq, this run without it"), std::string::npos)
        << refused.error().message();
    auto other_alpha              = cut;
    other_alpha.stop_after_layers = -1;
    other_alpha.resume            = true;
    other_alpha.gptaq_alpha       = 0.5;
    auto refused_alpha            = quantize_model(other_alpha);
    ASSERT_FALSE(refused_alpha.is_ok());
    EXPECT_NE(refused_alpha.error().message().find("--gptaq-alpha 0.25, this run asks for 0.5"), std::string::npos)
        << refused_alpha.error().message();

    cut.stop_after_layers = -1;
    cut.resume            = true;
    auto resumed          = quantize_model(cut);
    ASSERT_TRUE(resumed.is_ok()) << resumed.error().message();
    for (const char* f : {"model.safetensors", "config.json", "quantize_config.json"})
        EXPECT_EQ(test::read_file(straight.output_path + "/" + f), test::read_file(cut.output_path + "/" + f)) << f;

    // And it is not plain GPTQ: the same run without --gptaq writes other codes.
    auto plain        = straight;
    plain.output_path = dir.file("plain");
    plain.gptaq       = false;
    ASSERT_TRUE(quantize_model(plain).is_ok());
    EXPECT_NE(test::read_file(plain.output_path + "/model.safetensors"),
              test::read_file(straight.output_path + "/model.safetensors"));
}

#ifndef GPTQ_SANITIZE
// At 3 bits the earlier layers' error reaching a layer is large; GPTAQ fits each linear to the
// full-precision model's output on the calibration windows, plain GPTQ to its own quantized
// inputs only, so on those windows the last layer's output must be closer to the full-precision
// model's with --gptaq (alpha 1: the whole correction; the default 0.25 too).
TEST(quantize_gptaq, last_layer_output_closer_to_full_precision_than_gptq) {
    test::temp_dir dir("q-gptaq-err");
    const auto     calib = calib_text(dir);
    auto           tok   = tokenizer_handle::load(tiny());
    ASSERT_TRUE(tok.is_ok());
    const std::vector<int32_t> ids = tok->encode(test::read_file(calib), false);
    auto                       p   = gptaq_run(dir.file("gptaq"), calib);
    p.bits                         = 3;
    ASSERT_GE(int64_t(ids.size()), p.nsamples * p.seqlen);
    auto plain        = p;
    plain.output_path = dir.file("plain");
    plain.gptaq       = false;
    auto full         = p;
    full.output_path  = dir.file("alpha1");
    full.gptaq_alpha  = 1.0;
    for (auto* run : {&p, &plain, &full}) ASSERT_TRUE(quantize_model(*run).is_ok()) << run->output_path;
    const double eg = last_layer_error(tiny(), plain.output_path, ids, p.nsamples, p.seqlen);
    const double ea = last_layer_error(tiny(), p.output_path, ids, p.nsamples, p.seqlen);
    const double e1 = last_layer_error(tiny(), full.output_path, ids, p.nsamples, p.seqlen);
    std::printf("last layer relative error: gptq %.5f, gptaq 0.25 %.5f, gptaq 1 %.5f\n", eg, ea, e1);
    EXPECT_LT(ea, eg);
    EXPECT_LT(e1, 0.9 * eg);
}
#endif

TEST(quantize_gptaq, refuses_what_it_cannot_take) {
    test::temp_dir dir("q-gptaq-refuse");
    auto           p              = gptaq_run(dir.file("out"), "default");
    auto           expect_refused = [&](quantize_params q, const std::string& text) {
        auto r = quantize_model(q);
        ASSERT_FALSE(r.is_ok()) << text;
        EXPECT_NE(r.error().message().find(text), std::string::npos) << r.error().message();
        EXPECT_FALSE(fs::exists(q.output_path + ".partial")) << "nothing left behind: " << text;
    };
    auto rtn   = p;
    rtn.method = "rtn";
    expect_refused(rtn, "--gptaq needs --method gptq");
    auto cuda   = p;
    cuda.device = "cuda";
    expect_refused(cuda, "--gptaq runs on the CPU only (--device cpu, not cuda)");
    auto alpha        = p;
    alpha.gptaq_alpha = 1.5;
    expect_refused(alpha, "--gptaq-alpha 1.5 must be in [0, 1]");
    auto lone        = p;
    lone.gptaq       = false;
    lone.gptaq_alpha = 0.5;
    expect_refused(lone, "--gptaq-alpha 0.5 needs --gptaq");

    make_random_params mp;  // a mixture of experts
    mp.like        = "micro-qwen2-moe";
    mp.output_path = dir.file("moe");
    mp.n_threads   = 2;
    mp.progress    = false;
    ASSERT_TRUE(make_random_model(mp).is_ok());
    auto moe       = p;
    moe.model_path = mp.output_path;
    expect_refused(moe, "is a mixture-of-experts model");

    // The CLI: --gptaq-alpha without --gptaq, and out of range, are refused before any work.
    const std::string bin = test::gptq_binary();
    auto a = test::run_command(bin + " quantize " + tiny() + " -o " + dir.file("cli") + " --gptaq-alpha 0.5");
    EXPECT_NE(a.exit_code, 0);
    EXPECT_NE(a.err.find("--gptaq"), std::string::npos) << a.err;
    auto b = test::run_command(bin + " quantize " + tiny() + " -o " + dir.file("cli") + " --gptaq --gptaq-alpha 2");
    EXPECT_NE(b.exit_code, 0);
    EXPECT_NE(b.err.find("--gptaq-alpha"), std::string::npos) << b.err;
    auto c = test::run_command(bin + " quantize " + tiny() + " -o " + dir.file("cli") + " --gptaq --method rtn");
    EXPECT_NE(c.exit_code, 0);
    EXPECT_NE(c.err.find("--gptaq needs --method gptq"), std::string::npos) << c.err;
    auto h = test::run_command(bin + " quantize --help");
    EXPECT_NE(h.out.find("2x the calibration"), std::string::npos) << "--help states the memory cost";
    EXPECT_FALSE(fs::exists(dir.file("cli")));
}
