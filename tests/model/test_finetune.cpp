// LoRA fine-tuning (issue 21 Part 2, docs/lora.md "Fine-tuning"):
// - two optimizer steps on a GPTQ base against peft + transformers (tests/data/finetune, made by
//   scripts/make_finetune_goldens.py): loss, gradients of every A and B, the clipped AdamW update;
// - the whole model's LoRA gradients against finite differences of its loss (a tiny random Mistral
//   with a sliding window and an untied lm_head; the same as Qwen2 with q/k/v biases);
// - gradient accumulation equals one big batch; resume equals an uninterrupted run, bit for bit;
// - data: chat masking, text windows; the written adapter loads in Part 1's reader (and ppl);
// - errors: empty data, seqlen past the context, unknown target, jsonl without text/messages,
//   --device cuda:99 (no such device), a used output folder, --resume without a checkpoint, an unsupported family.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "engine/finetune_train.h"
#include "golden.h"
#include "gptq/finetune.h"
#include "interop_fixture.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "model/lora.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

using namespace gptq;
using namespace gptq::test;
namespace fs = std::filesystem;

namespace {

// Gradients against peft (F32 on both sides, different summation orders through 2 layers and a
// vocabulary of 8192): max |ours - peft| over a tensor / max |peft| of that tensor.
constexpr double k_grad_tol = 1e-4;
// Weights after the AdamW steps: |ours - peft| per element, in units of the step's lr. Adam moves a
// weight by about lr * g / (|g| + eps), so the update's error is ~ lr * (gradient's relative
// error): under 1e-3 lr where |g| > 1e-3 of its tensor's largest in every step so far (k_grad_tol
// relative to that is then <= 0.1 relative). Elements with smaller gradients (|g| down to 1e-7 here, as small as the
// gradient's absolute error) may move differently within a few percent of lr: bounded by 5e-2 lr.
constexpr double k_weight_tol_lr       = 1e-3;
constexpr double k_weight_tol_lr_small = 5e-2;
// Finite differences of an F32 forward: central differences with h = 1e-2 on weights of ~0.05
// and a loss summed in double; F32 rounding of the forward (~1e-7 of the loss) / h dominates.
constexpr double k_fd_tol = 2e-2;

const std::string k_golden = source_path("tests/data/finetune/golden.safetensors");
const std::string k_tiny   = source_path("models/tiny-llama");

train_batch golden_batch(const safetensors_file& f, int s) {
    const std::string p = "batch" + std::to_string(s) + ".";
    train_batch       b;
    b.ids     = golden_read_i32(f, p + "ids");
    b.targets = golden_read_i32(f, p + "targets");
    for (int32_t n : golden_read_i32(f, p + "n_tokens")) b.n_tokens.push_back(n);
    return b;
}

float golden_scalar(const safetensors_file& f, const std::string& name) {
    auto v = golden_read_f32(f, name);
    EXPECT_EQ(v.size(), 1u) << name;
    return v.empty() ? NAN : v[0];
}

std::string peft_name(int64_t layer, linear_role r, const char* ab) {
    return "base_model.model." + llama_linear_name(layer, r) + ".lora_" + ab + ".weight";
}

double rel_err(const std::vector<float>& a, const std::vector<float>& b) {
    double d = 0, m = 1e-30;
    for (size_t i = 0; i < b.size(); ++i) {
        d = std::max(d, std::fabs(static_cast<double>(a[i]) - b[i]));
        m = std::max(m, std::fabs(static_cast<double>(b[i])));
    }
    return d / m;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
    double d = 0;
    for (size_t i = 0; i < b.size(); ++i) d = std::max(d, std::fabs(static_cast<double>(a[i]) - b[i]));
    return d;
}

// Every adapted module's A and B, with its golden name.
template <typename F>
void each_tensor(lora_adapter& a, F&& fn) {
    for (size_t l = 0; l < a.layers.size(); ++l)
        for (size_t r = 0; r < a.layers[l].size(); ++r) {
            lora_module& m = a.layers[l][r];
            if (m.r == 0) continue;
            fn(peft_name(int64_t(l), linear_role(r), "A"), m.a);
            fn(peft_name(int64_t(l), linear_role(r), "B"), m.b);
        }
}

}  // namespace

TEST(finetune, two_steps_match_peft_on_a_gptq_base) {
    temp_dir gdir("ft-gptq");
    ASSERT_TRUE(assemble(fixture_json("gptqmodel-w4-act-order"), gdir.path()));
    llama_open_options oo;
    oo.keep_f16 = true;
    auto model  = llama_model::open(gdir.path(), oo);
    ASSERT_TRUE(model) << model.error().message();
    ASSERT_NE((*model)->quantization(), nullptr);
    const llama_hparams& hp   = (*model)->hparams();
    auto                 init = lora_adapter_load(source_path("tests/data/lora/adapter-a2"), hp, 1.0f);
    ASSERT_TRUE(init) << init.error().message();
    auto          adapter = std::make_shared<lora_adapter>(*init);
    const int32_t idx     = (*model)->lora_add(adapter);
    lora_trainer  trainer(**model, adapter, idx, adamw_config{});
    auto          f = safetensors_file::open(k_golden);
    ASSERT_TRUE(f) << f.error().message();
    thread_pool pool(2);
    ops_context ctx;
    ctx.pool = &pool;
    std::map<std::string, std::vector<bool>> small;  // elements with a small gradient in some step so far
    for (int s = 1; s <= 2; ++s) {
        const std::string p  = "step" + std::to_string(s) + ".";
        const double      lr = golden_scalar(**f, p + "lr");
        EXPECT_NEAR(lr, finetune_lr_at(1e-3, s - 1, 4, 0), 1e-9);  // the schedule is transformers'
        auto st = trainer.step(ctx, {golden_batch(**f, s)}, lr);
        ASSERT_TRUE(st) << st.error().message();
        EXPECT_NEAR(st->loss, golden_scalar(**f, p + "loss"), 1e-5 * std::fabs(st->loss)) << p;
        EXPECT_NEAR(st->grad_norm, golden_scalar(**f, p + "grad_norm"), 1e-4 * st->grad_norm) << p;
        EXPECT_GT(st->grad_norm, 1.0) << "the golden's steps clip: the clipping path is checked";
        double       worst_g = 0, worst_w = 0;
        int          n     = 0;
        lora_adapter grads = trainer.grads();
        each_tensor(grads, [&](const std::string& name, std::vector<float>& g) {
            const auto want = golden_read_f32(**f, p + "grad." + name);
            ASSERT_EQ(want.size(), g.size()) << name;
            worst_g = std::max(worst_g, rel_err(g, want));
            ++n;
        });
        double worst_small = 0;
        each_tensor(trainer.adapter(), [&](const std::string& name, std::vector<float>& w) {
            const auto want = golden_read_f32(**f, p + "weight." + name);
            const auto g    = golden_read_f32(**f, p + "grad." + name);
            ASSERT_EQ(want.size(), w.size()) << name;
            double gmax = 0;
            for (float x : g) gmax = std::max(gmax, std::fabs(double(x)));
            std::vector<bool>& sm = small[name];
            sm.resize(w.size(), false);
            for (size_t i = 0; i < w.size(); ++i) {
                const double e = std::fabs(double(w[i]) - want[i]) / lr;
                sm[i]          = sm[i] || std::fabs(double(g[i])) <= 1e-3 * gmax;
                if (!sm[i])
                    worst_w = std::max(worst_w, e);
                else
                    worst_small = std::max(worst_small, e);
            }
        });
        EXPECT_EQ(n, 2 * 7 * 2);
        EXPECT_LT(worst_g, k_grad_tol) << p;
        EXPECT_LT(worst_w, k_weight_tol_lr) << p;
        EXPECT_LT(worst_small, k_weight_tol_lr_small) << p;
        std::printf("step %d: loss %.6f, grad rel err %.2e, weight err %.2e lr (small gradients: %.2e lr)\n", s,
                    st->loss, worst_g, worst_w, worst_small);
    }
}

namespace {
// The tiny random Mistral of tests/data/arch (3 layers, untied lm_head, BF16 weights read as F32)
// with a 5-token sliding window, in a temporary folder.
std::string mistral_copy(const temp_dir& d) {
    const std::string src = source_path("tests/data/arch/mistral-nemo");
    fs::copy_file(src + "/model.safetensors", d.file("model.safetensors"));
    auto cfg              = nlohmann::json::parse(read_file(src + "/config.json"));
    cfg["sliding_window"] = 5;
    write_file(d.file("config.json"), cfg.dump());
    return d.path();
}

// The same weights as a Qwen2 model (q/k/v biases, random F32 ones added): the bias path.
std::string qwen2_copy(const temp_dir& d) {
    const std::string src     = source_path("tests/data/arch/mistral-nemo");
    auto              cfg     = nlohmann::json::parse(read_file(src + "/config.json"));
    cfg["architectures"]      = {"Qwen2ForCausalLM"};
    cfg["model_type"]         = "qwen2";
    cfg["use_sliding_window"] = false;
    cfg.erase("sliding_window");
    write_file(d.file("config.json"), cfg.dump());
    auto f = safetensors_file::open(src + "/model.safetensors");
    EXPECT_TRUE(f);
    std::vector<safetensors_decl>   decls;
    std::vector<std::vector<float>> biases;
    for (const auto& t : (*f)->tensors()) decls.push_back({t.name, t.type, t.shape});
    const int64_t                   kv = cfg["num_key_value_heads"].get<int64_t>() * cfg["head_dim"].get<int64_t>();
    const int64_t                   q  = cfg["num_attention_heads"].get<int64_t>() * cfg["head_dim"].get<int64_t>();
    std::mt19937                    rng(12);
    std::normal_distribution<float> nd(0.0f, 0.5f);
    for (int64_t l = 0; l < cfg["num_hidden_layers"].get<int64_t>(); ++l)
        for (auto [r, n] : {std::pair{"q_proj", q}, std::pair{"k_proj", kv}, std::pair{"v_proj", kv}}) {
            decls.push_back({"model.layers." + std::to_string(l) + ".self_attn." + r + ".bias", dtype::DTYPE_F32, {n}});
            biases.emplace_back(static_cast<size_t>(n));
            for (float& x : biases.back()) x = nd(rng);
        }
    auto w = safetensors_writer::create(d.file("model.safetensors"), decls);
    EXPECT_TRUE(w);
    for (const auto& t : (*f)->tensors()) EXPECT_TRUE((*w)->write(t.name, (*f)->bytes(t), t.nbytes()).is_ok());
    size_t i = 0;
    for (size_t k = (*f)->tensors().size(); k < decls.size(); ++k, ++i)
        EXPECT_TRUE((*w)->write(decls[k].name, biases[i].data(), biases[i].size() * 4).is_ok());
    EXPECT_TRUE((*w)->finish().is_ok());
    return d.path();
}

std::array<bool, k_n_linear_roles> all_roles() {
    std::array<bool, k_n_linear_roles> on{};
    on.fill(true);
    return on;
}

train_batch random_batch(std::mt19937& rng, int64_t vocab, std::vector<int64_t> lens) {
    train_batch b;
    for (int64_t n : lens) {
        for (int64_t i = 0; i < n; ++i) b.ids.push_back(static_cast<int32_t>(rng() % vocab));
        for (int64_t i = 0; i < n; ++i)
            b.targets.push_back(i + 1 < n && i % 3 != 1 ? b.ids[b.ids.size() - size_t(n) + size_t(i) + 1] : -1);
        b.n_tokens.push_back(n);
    }
    return b;
}
}  // namespace

namespace {
void check_model_gradients(const std::string& path, lora_dropout_spec drop = {}) {
    auto model = llama_model::open(path);
    ASSERT_TRUE(model) << model.error().message();
    const llama_hparams& hp      = (*model)->hparams();
    auto                 adapter = std::make_shared<lora_adapter>(lora_adapter_init(hp, 4, 2.0f, all_roles(), 3));
    std::mt19937         rng(9);
    each_tensor(*adapter, [&](const std::string&, std::vector<float>& w) {  // B non-zero: A gets gradients
        std::normal_distribution<float> nd(0.0f, 0.05f);
        for (float& x : w) x = nd(rng);
    });
    const int32_t idx   = (*model)->lora_add(adapter);
    lora_adapter  grads = lora_adapter_zeros_like(*adapter);
    train_batch   b     = random_batch(rng, hp.n_vocab, {9, 4, 12});
    ops_context   ctx;
    auto          loss0 = (*model)->lora_loss_grad(ctx, b, idx, &grads, 1.0f, drop);
    ASSERT_TRUE(loss0) << loss0.error().message();
    // The 3 largest-gradient entries of every layer's q (A) and down (B) and of layer 0's every role.
    int n_checked = 0;
    for (int64_t l = 0; l < hp.n_layer; ++l)
        for (int ri = 0; ri < k_n_linear_roles; ++ri) {
            const linear_role r = linear_role(ri);
            if (l > 0 && r != linear_role::LINEAR_Q && r != linear_role::LINEAR_DOWN) continue;
            for (bool is_a : {true, false}) {
                std::vector<float>& w =
                    is_a ? adapter->layers[size_t(l)][size_t(ri)].a : adapter->layers[size_t(l)][size_t(ri)].b;
                std::vector<float>& g =
                    is_a ? grads.layers[size_t(l)][size_t(ri)].a : grads.layers[size_t(l)][size_t(ri)].b;
                std::vector<size_t> ix(g.size());
                std::iota(ix.begin(), ix.end(), 0);
                std::partial_sort(ix.begin(), ix.begin() + 3, ix.end(),
                                  [&](size_t x, size_t y) { return std::fabs(g[x]) > std::fabs(g[y]); });
                for (int k = 0; k < 3; ++k) {
                    const size_t i  = ix[size_t(k)];
                    const float  w0 = w[i], h = 1e-2f;
                    w[i]            = w0 + h;
                    const double lp = *(*model)->lora_loss_grad(ctx, b, idx, nullptr, 1.0f, drop);
                    w[i]            = w0 - h;
                    const double lm = *(*model)->lora_loss_grad(ctx, b, idx, nullptr, 1.0f, drop);
                    w[i]            = w0;
                    const double fd = (lp - lm) / (2.0 * h);
                    EXPECT_NEAR(g[i], fd, k_fd_tol * std::fabs(fd) + 1e-4)
                        << "layer " << l << " " << linear_role_name(r) << (is_a ? " A" : " B") << " entry " << i;
                    ++n_checked;
                }
            }
        }
    EXPECT_EQ(n_checked, 3 * 2 * (7 + 2 * (hp.n_layer - 1)));
}
}  // namespace

TEST(finetune, whole_model_gradients_match_finite_differences) {
    temp_dir          d("ft-fd");
    const std::string path = mistral_copy(d);
    auto              hp   = llama_model::open(path);
    ASSERT_TRUE(hp);
    ASSERT_EQ((*hp)->hparams().window[0], 5);
    check_model_gradients(path);
}

TEST(finetune, whole_model_gradients_with_qkv_biases) {
    temp_dir          d("ft-fd-qwen2");
    const std::string path = qwen2_copy(d);
    auto              m    = llama_model::open(path);
    ASSERT_TRUE(m) << m.error().message();
    ASSERT_TRUE((*m)->hparams().qkv_bias);
    check_model_gradients(path);
}

// LoRA dropout: the loss is a function of the weights for a given mask seed, so its gradients still
// match finite differences; the masks keep 1 - p of the elements, scaled by 1 / (1 - p), and differ
// between modules and seeds; p 0 is no dropout at all.
TEST(finetune, lora_dropout_gradients_and_masks) {
    temp_dir          d("ft-fd-drop");
    const std::string path = mistral_copy(d);
    check_model_gradients(path, {0.3, 77});
    const int64_t      rows = 40, n_in = 2500;
    std::vector<float> x(static_cast<size_t>(rows * n_in), 2.0f), y(x.size()), z(x.size());
    lora_dropout_rows({0.3, 5}, 1, linear_role::LINEAR_Q, x.data(), y.data(), 0, rows, n_in);
    int64_t kept = 0;
    for (float v : y) {
        EXPECT_TRUE(v == 0.0f || v == static_cast<float>(2.0 / 0.7)) << v;
        kept += v != 0.0f;
    }
    EXPECT_NEAR(double(kept) / double(y.size()), 0.7, 0.01);  // 100k draws: 5 sigma is 0.007
    lora_dropout_rows({0.3, 5}, 1, linear_role::LINEAR_K, x.data(), z.data(), 0, rows, n_in);
    EXPECT_NE(y, z);
    lora_dropout_rows({0.3, 6}, 1, linear_role::LINEAR_Q, x.data(), z.data(), 0, rows, n_in);
    EXPECT_NE(y, z);
    // Rows from row0: the same draws as the rows of a whole batch.
    lora_dropout_rows({0.3, 5}, 1, linear_role::LINEAR_Q, x.data() + 7 * n_in, z.data(), 7, rows - 7, n_in);
    EXPECT_TRUE(std::equal(z.begin(), z.begin() + (rows - 7) * n_in, y.begin() + 7 * n_in));
    // Training with it: a different loss than without, p 0 the same as without; out of range refused.
    auto m = llama_model::open(path);
    ASSERT_TRUE(m);
    const llama_hparams& hp = (*m)->hparams();
    auto                 ad = std::make_shared<lora_adapter>(lora_adapter_init(hp, 4, 2.0f, all_roles(), 5));
    std::mt19937         rng(3);
    each_tensor(*ad, [&](const std::string&, std::vector<float>& w) {
        std::normal_distribution<float> nd(0.0f, 0.05f);
        for (float& v : w) v = nd(rng);
    });
    const int32_t     idx = (*m)->lora_add(ad);
    const train_batch b   = random_batch(rng, hp.n_vocab, {9, 12});
    const double      l0  = *(*m)->lora_loss_grad(ops_context{}, b, idx, nullptr, 1.0f);
    EXPECT_EQ(*(*m)->lora_loss_grad(ops_context{}, b, idx, nullptr, 1.0f, {0.0, 9}), l0);
    EXPECT_NE(*(*m)->lora_loss_grad(ops_context{}, b, idx, nullptr, 1.0f, {0.3, 9}), l0);
    EXPECT_EQ(*(*m)->lora_loss_grad(ops_context{}, b, idx, nullptr, 1.0f), l0);  // not left on after the call
    EXPECT_FALSE((*m)->lora_loss_grad(ops_context{}, b, idx, nullptr, 1.0f, {1.0, 9}));
}

TEST(finetune, gradient_accumulation_equals_one_batch) {
    temp_dir d("ft-accum");
    auto     m1 = llama_model::open(mistral_copy(d));
    ASSERT_TRUE(m1);
    const llama_hparams& hp = (*m1)->hparams();
    std::mt19937         rng(4);
    train_batch          one = random_batch(rng, hp.n_vocab, {7, 11});
    train_batch          a, b;  // the same two sequences as two micro-batches
    a.ids.assign(one.ids.begin(), one.ids.begin() + 7);
    a.targets.assign(one.targets.begin(), one.targets.begin() + 7);
    a.n_tokens = {7};
    b.ids.assign(one.ids.begin() + 7, one.ids.end());
    b.targets.assign(one.targets.begin() + 7, one.targets.end());
    b.n_tokens = {11};
    auto run   = [&](const std::vector<train_batch>& micro) {
        auto         m  = llama_model::open(d.path());
        auto         ad = std::make_shared<lora_adapter>(lora_adapter_init(hp, 4, 2.0f, all_roles(), 5));
        std::mt19937 r2(6);
        each_tensor(*ad, [&](const std::string&, std::vector<float>& w) {  // B != 0: A's gradients too
            std::normal_distribution<float> nd(0.0f, 0.05f);
            for (float& x : w) x = nd(r2);
        });
        const int32_t idx = (*m)->lora_add(ad);
        lora_trainer  t(**m, ad, idx, adamw_config{});
        auto          st = t.step(ops_context{}, micro, 1e-3);
        EXPECT_TRUE(st);
        return std::make_pair(st ? st->loss : NAN, t.grads());
    };
    auto [l1, g1] = run({one});
    auto [l2, g2] = run({a, b});
    EXPECT_NEAR(l1, l2, 1e-6 * l1);
    std::vector<std::vector<float>> t1, t2;
    each_tensor(g1, [&](const std::string&, std::vector<float>& v) { t1.push_back(v); });
    each_tensor(g2, [&](const std::string&, std::vector<float>& v) { t2.push_back(v); });
    ASSERT_EQ(t1.size(), t2.size());
    // F32 products over 18 rows against 7 + 11: summation order only.
    for (size_t i = 0; i < t1.size(); ++i) EXPECT_LT(rel_err(t2[i], t1[i]), 1e-5) << i;
}

namespace {
finetune_params tiny_params(const std::string& data, const std::string& out) {
    finetune_params p;
    p.model_path = k_tiny;
    p.data_path  = data;
    p.out_dir    = out;
    p.r          = 4;
    p.alpha      = 8;
    p.seqlen     = 32;
    p.batch      = 2;
    p.lr         = 1e-3;
    p.n_threads  = 2;
    p.progress   = false;
    return p;
}

std::string some_text() {
    std::string t;
    for (int i = 0; i < 40; ++i)
        t += "The river " + std::to_string(i) + " flows past the old mill, and the miller counts the sacks. ";
    return t;
}
}  // namespace

TEST(finetune, resume_equals_an_uninterrupted_run) {
    temp_dir d("ft-resume");
    write_file(d.file("data.txt"), some_text());
    finetune_params p = tiny_params(d.file("data.txt"), d.file("full"));
    p.max_steps       = 4;
    p.save_every      = 2;
    auto full         = finetune_run(p);
    ASSERT_TRUE(full) << full.error().message();
    EXPECT_EQ(full->steps, 4);
    // The same run "interrupted" after its step-2 checkpoint: the final adapter removed, resumed.
    p.out_dir = d.file("cut");
    ASSERT_TRUE(finetune_run(p));
    fs::remove(d.file("cut/adapter_config.json"));
    fs::remove(d.file("cut/adapter_model.safetensors"));
    // ... and interrupted in checkpoint_save between its renames: the new one is still the tmp-
    // folder, the previous one the old- folder; resume takes the complete new one.
    fs::rename(d.file("cut/checkpoint"), d.file("cut/checkpoint.tmp-1"));
    fs::create_directories(d.file("cut/checkpoint.old-1"));
    p.resume     = true;
    auto resumed = finetune_run(p);
    ASSERT_TRUE(resumed) << resumed.error().message();
    EXPECT_EQ(resumed->steps, 2);  // steps 3 and 4
    EXPECT_EQ(read_file(d.file("full/adapter_model.safetensors")), read_file(d.file("cut/adapter_model.safetensors")));
    EXPECT_EQ(read_file(d.file("full/adapter_config.json")), read_file(d.file("cut/adapter_config.json")));
    EXPECT_FALSE(fs::exists(d.file("cut/checkpoint.old-1")));
    // Another setting than the checkpoint's is refused, naming it.
    p.lr   = 2e-3;
    auto e = finetune_run(p);
    ASSERT_FALSE(e);
    EXPECT_NE(e.error().message().find("lr"), std::string::npos) << e.error().message();
}

TEST(finetune, lora_dropout_run_resumes_bit_identically_and_is_written) {
    temp_dir d("ft-drop-resume");
    write_file(d.file("data.txt"), some_text());
    finetune_params p = tiny_params(d.file("data.txt"), d.file("full"));
    p.max_steps       = 3;
    p.save_every      = 1;
    p.lora_dropout    = 0.25;
    auto full         = finetune_run(p);
    ASSERT_TRUE(full) << full.error().message();
    p.out_dir = d.file("cut");
    ASSERT_TRUE(finetune_run(p));
    fs::remove(d.file("cut/adapter_config.json"));
    fs::remove(d.file("cut/adapter_model.safetensors"));
    p.resume     = true;
    auto resumed = finetune_run(p);
    ASSERT_TRUE(resumed) << resumed.error().message();
    EXPECT_EQ(resumed->steps, 1);
    EXPECT_EQ(read_file(d.file("full/adapter_model.safetensors")), read_file(d.file("cut/adapter_model.safetensors")));
    const auto cfg = nlohmann::json::parse(read_file(d.file("full/adapter_config.json")));
    EXPECT_DOUBLE_EQ(cfg["lora_dropout"].get<double>(), 0.25);
    // Without dropout the same run trains to another adapter; another p is refused on resume.
    finetune_params q = tiny_params(d.file("data.txt"), d.file("nodrop"));
    q.max_steps       = 3;
    ASSERT_TRUE(finetune_run(q));
    EXPECT_NE(read_file(d.file("full/adapter_model.safetensors")),
              read_file(d.file("nodrop/adapter_model.safetensors")));
    p.lora_dropout = 0.5;
    auto e         = finetune_run(p);
    ASSERT_FALSE(e);
    EXPECT_NE(e.error().message().find("lora_dropout"), std::string::npos) << e.error().message();
    p.resume       = false;
    p.out_dir      = d.file("bad");
    p.lora_dropout = 1.0;
    auto e2        = finetune_run(p);
    ASSERT_FALSE(e2);
    EXPECT_NE(e2.error().message().find("--lora-dropout"), std::string::npos) << e2.error().message();
}

TEST(finetune, adapter_loads_in_part_1_and_lowers_the_loss) {
    temp_dir d("ft-out");
    write_file(d.file("data.txt"), some_text());
    finetune_params p = tiny_params(d.file("data.txt"), d.file("ad"));
    p.epochs          = 2;
    p.eval_fraction   = 0.2;
    auto r            = finetune_run(p);
    ASSERT_TRUE(r) << r.error().message();
    EXPECT_GT(r->n_eval_seqs, 0);
    EXPECT_LT(r->eval_loss, r->eval_loss_first);  // a repetitive text is learnt within two epochs
    auto model = llama_model::open(k_tiny);
    ASSERT_TRUE(model);
    auto a = lora_adapter_load(d.file("ad"), (*model)->hparams(), 1.0f);
    ASSERT_TRUE(a) << a.error().message();
    EXPECT_EQ(a->n_modules(), 4 * 7);
    EXPECT_FLOAT_EQ(a->module(0, linear_role::LINEAR_Q)->scale, 2.0f);
    auto cfg = nlohmann::json::parse(read_file(d.file("ad/adapter_config.json")));
    EXPECT_EQ(cfg["peft_type"], "LORA");
    EXPECT_EQ(cfg["r"], 4);
    EXPECT_EQ(cfg["lora_alpha"], 8);
    // The command line, with --json.
    auto cli = run_command(gptq_binary() + " finetune " + k_tiny + " --data " + d.file("data.txt") + " -o " +
                           d.file("cli") + " --r 4 --alpha 8 --seqlen 32 --batch 2 --max-steps 2 --json");
    ASSERT_EQ(cli.exit_code, 0) << cli.err;
    auto j = nlohmann::json::parse(cli.out);
    EXPECT_EQ(j["steps"], 2);
    EXPECT_EQ(j["n_trainable_params"], r->n_trainable_params);
    EXPECT_TRUE(fs::exists(d.file("cli/adapter_config.json")));
    auto ppl = run_command(gptq_binary() + " ppl " + k_tiny + " --dataset " + d.file("data.txt") +
                           " --seqlen 32 --lora " + d.file("ad"));
    EXPECT_EQ(ppl.exit_code, 0) << ppl.err;
}

TEST(finetune, chat_data_trains_on_assistant_tokens_only) {
    temp_dir d("ft-chat");
    for (const auto& e : fs::directory_iterator(k_tiny)) fs::copy_file(e.path(), d.file(e.path().filename().string()));
    auto cfg       = nlohmann::json::parse(read_file(k_tiny + "/tokenizer_config.json"));
    auto templates = nlohmann::json::parse(read_file(source_path("tests/data/generate/chat_templates.json")));
    for (const auto& t : templates["templates"])
        if (t["name"] == "llama-2") cfg["chat_template"] = t["template"];
    write_file(d.file("tokenizer_config.json"), cfg.dump());
    write_file(
        d.file("chat.jsonl"),
        R"({"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue sky"}, {"role": "user", "content": "Another?"}, {"role": "assistant", "content": "Green grass"}]})"
        "\n\n"
        R"({"text": "plain text lines are trained on every token"})"
        "\n");
    auto tok = tokenizer::load(d.path());
    ASSERT_TRUE(tok);
    auto data = finetune_data_read(d.file("chat.jsonl"), **tok, 256);
    ASSERT_TRUE(data) << data.error().message();
    ASSERT_EQ(data->seqs.size(), 2u);
    const finetune_seq&  c = data->seqs[0];
    std::vector<int32_t> trained;
    for (int32_t t : c.targets)
        if (t >= 0) trained.push_back(t);
    const std::string text = (*tok)->decode(trained, /*skip_special=*/false);
    EXPECT_NE(text.find("Blue sky"), std::string::npos) << text;
    EXPECT_NE(text.find("Green grass"), std::string::npos) << text;
    EXPECT_EQ(text.find("colour"), std::string::npos) << text;
    EXPECT_EQ(text.find("Another"), std::string::npos) << text;
    EXPECT_EQ(text.find("INST"), std::string::npos) << text;
    const finetune_seq& t = data->seqs[1];
    EXPECT_EQ(std::count(t.targets.begin(), t.targets.end(), -1), 1);  // all but the last row
    // And a short training run on it goes through.
    finetune_params p = tiny_params(d.file("chat.jsonl"), d.file("out"));
    p.model_path      = d.path();
    p.eval_fraction   = 0;
    auto r            = finetune_run(p);
    EXPECT_TRUE(r) << r.error().message();
    // The same template given with --chat-template to the model without one: the same sequences.
    write_file(d.file("llama2.jinja"), cfg["chat_template"].get<std::string>());
    auto plain = tokenizer::load(k_tiny);
    ASSERT_TRUE(plain);
    auto same = finetune_data_read(d.file("chat.jsonl"), **plain, 256, cfg["chat_template"].get<std::string>());
    ASSERT_TRUE(same) << same.error().message();
    ASSERT_EQ(same->seqs.size(), 2u);
    EXPECT_EQ(same->seqs[0].ids, c.ids);
    EXPECT_EQ(same->seqs[0].targets, c.targets);
    p.model_path         = k_tiny;
    p.out_dir            = d.file("out2");
    p.chat_template_file = d.file("llama2.jinja");
    r                    = finetune_run(p);
    EXPECT_TRUE(r) << r.error().message();
}

TEST(finetune, bad_inputs_are_clear_errors) {
    temp_dir d("ft-errors");
    write_file(d.file("empty.txt"), "  \n");
    write_file(d.file("data.txt"), some_text());
    write_file(d.file("bad.jsonl"), "{\"prompt\": \"x\"}\n");
    write_file(d.file("chat.jsonl"), R"({"messages": [{"role": "user", "content": "hi"}]})"
                                     "\n");
    auto err = [&](finetune_params p) {
        auto r = finetune_run(p);
        EXPECT_FALSE(r);
        return r ? std::string() : r.error().message();
    };
    auto has = [](const std::string& msg, const std::string& what) {
        EXPECT_NE(msg.find(what), std::string::npos) << "message: " << msg << "\nexpected: " << what;
    };
    has(err(tiny_params(d.file("empty.txt"), d.file("o1"))), "no training tokens");
    finetune_params p = tiny_params(d.file("data.txt"), d.file("o2"));
    p.seqlen          = 4096;
    has(err(p), "max_position_embeddings");
    p         = tiny_params(d.file("data.txt"), d.file("o3"));
    p.targets = "q,lm_head";
    has(err(p), "unknown module 'lm_head'");
    has(err(tiny_params(d.file("bad.jsonl"), d.file("o4"))), "bad.jsonl:1: expected a string \"text\"");
    has(err(tiny_params(d.file("chat.jsonl"), d.file("o5"))), "chat template");
    p        = tiny_params(d.file("data.txt"), d.file("o6"));
    p.device = "cuda:99";  // no such device (or no CUDA in this build): refused by name, nothing trained
    has(err(p), "--device cuda:99");
    p          = tiny_params(d.file("data.txt"), d.file("o12"));
    p.gpu_math = "fp8";
    has(err(p), "--gpu-math 'fp8'");
    p = tiny_params(d.file("data.txt"), d.path());  // not empty
    has(err(p), "not empty");
    p        = tiny_params(d.file("data.txt"), d.file("o7"));
    p.resume = true;
    has(err(p), "no checkpoint");
    p            = tiny_params(d.file("data.txt"), d.file("o8"));
    p.model_path = source_path("tests/data/arch/gemma2");
    has(err(p), "LoRA training runs the Llama");
    p           = tiny_params(d.file("data.txt"), d.file("o9"));
    p.data_path = d.file("data.csv");
    has(err(p), "expected a .txt or .jsonl");
    p              = tiny_params(d.file("data.txt"), d.file("o11"));
    p.init_adapter = source_path("tests/data/lora/adapter-a");  // r 8, this run trains r 4
    has(err(p), "--init-adapter");
    // The CLI: exit 1 and the message.
    auto cli = run_command(gptq_binary() + " finetune " + k_tiny + " --data " + d.file("data.txt") + " -o " +
                           d.file("o10") + " --device cuda:99");
    EXPECT_EQ(cli.exit_code, 1);
    has(cli.err, "--device cuda:99");
}
