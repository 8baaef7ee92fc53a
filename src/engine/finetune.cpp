// gptq finetune (include/gptq/finetune.h, docs/lora.md "Fine-tuning"): the schedule, AdamW over
// one LoRA adapter, checkpoints and --resume, and the flow that ties them to the data and writes
// the adapter in PEFT's format. The gradients come from llama_model::lora_loss_grad
// (model/llama_train.cpp).
#include "gptq/finetune.h"

#include <fmt/format.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>
#include <numbers>
#include <optional>

#include "core/dropout_mask.h"
#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "finetune_train.h"
#include "gptq/chat.h"
#include "gptq/device.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"
#ifdef GPTQ_HAVE_CUDA
#include "model/llama_cuda.h"
#endif

namespace gptq {

namespace {
namespace fs         = std::filesystem;
constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;
constexpr auto E_IO  = status_code::STATUS_IO_ERROR;

template <typename F>
void for_each_module(lora_adapter& a, F&& fn) {  // fn(lora_module&) over the adapted modules
    for (auto& layer : a.layers)
        for (lora_module& m : layer)
            if (m.r > 0) fn(m);
}
}  // namespace

double finetune_lr_at(double lr, int64_t step, int64_t total, int64_t warmup) {
    if (step < warmup) return lr * static_cast<double>(step) / static_cast<double>(std::max<int64_t>(1, warmup));
    const double progress =
        static_cast<double>(step - warmup) / static_cast<double>(std::max<int64_t>(1, total - warmup));
    return lr * std::max(0.0, 0.5 * (1.0 + std::cos(std::numbers::pi * 2.0 * 0.5 * progress)));
}

std::vector<int64_t> finetune_shuffle(int64_t n, uint64_t seed) {
    std::vector<int64_t> v(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) v[static_cast<size_t>(i)] = i;
    std::mt19937_64 rng(seed);
    for (int64_t i = n - 1; i > 0; --i) std::swap(v[static_cast<size_t>(i)], v[rng() % static_cast<uint64_t>(i + 1)]);
    return v;
}

std::vector<train_batch> finetune_batches(const std::vector<finetune_seq>& seqs, const std::vector<int64_t>& order,
                                          int64_t i0, int64_t i1, int64_t batch) {
    std::vector<train_batch> out;
    for (int64_t b0 = i0; b0 < i1; b0 += batch) {
        train_batch b;
        for (int64_t i = b0; i < std::min(i1, b0 + batch); ++i) {
            const finetune_seq& s = seqs[static_cast<size_t>(order[static_cast<size_t>(i)])];
            b.ids.insert(b.ids.end(), s.ids.begin(), s.ids.end());
            b.targets.insert(b.targets.end(), s.targets.begin(), s.targets.end());
            b.n_tokens.push_back(static_cast<int64_t>(s.ids.size()));
        }
        out.push_back(std::move(b));
    }
    return out;
}

lora_adapter lora_adapter_zeros_like(const lora_adapter& a) {
    lora_adapter z = a;
    for_each_module(z, [](lora_module& m) {
        std::fill(m.a.begin(), m.a.end(), 0.0f);
        std::fill(m.b.begin(), m.b.end(), 0.0f);
    });
    return z;
}

lora_trainer::lora_trainer(lora_loss_grad_fn fn, std::shared_ptr<lora_adapter> adapter, adamw_config cfg)
    : loss_grad_(std::move(fn)), adapter_(std::move(adapter)), cfg_(cfg) {
    grads_ = lora_adapter_zeros_like(*adapter_);
    m_     = lora_adapter_zeros_like(*adapter_);
    v_     = lora_adapter_zeros_like(*adapter_);
}

lora_trainer::lora_trainer(llama_model& model, std::shared_ptr<lora_adapter> adapter, int32_t lora_index,
                           adamw_config cfg)
    : lora_trainer([&model, lora_index](
                       const ops_context& ctx, const train_batch& b, lora_adapter* grads, float grad_scale,
                       lora_dropout_spec d) { return model.lora_loss_grad(ctx, b, lora_index, grads, grad_scale, d); },
                   std::move(adapter), cfg) {}

result<train_step_stats> lora_trainer::step(const ops_context& ctx, const std::vector<train_batch>& micro, double lr) {
    train_step_stats st;
    st.lr = lr;
    for (const train_batch& b : micro) {
        st.n_targets += b.n_targets();
        st.n_tokens += static_cast<int64_t>(b.ids.size());
    }
    if (st.n_targets == 0) return make_error(E_ARG, "a training step without any target token");
    // The adapted modules, each a unit of work below (module by module: the same bits whatever the
    // pool's size).
    std::vector<std::pair<size_t, size_t>> mods;
    for (size_t l = 0; l < adapter_->layers.size(); ++l)
        for (size_t r = 0; r < adapter_->layers[l].size(); ++r)
            if (adapter_->layers[l][r].r > 0) mods.emplace_back(l, r);
    auto over_modules = [&](const std::function<void(int64_t, int64_t)>& fn) {
        if (ctx.pool && mods.size() > 1)
            ctx.pool->parallel_for(static_cast<int64_t>(mods.size()), fn);
        else
            fn(0, static_cast<int64_t>(mods.size()));
    };
    over_modules([&](int64_t i0, int64_t i1) {  // in place: no new adapter-sized allocation per step
        for (int64_t i = i0; i < i1; ++i) {
            const auto [l, r] = mods[static_cast<size_t>(i)];
            std::fill(grads_.layers[l][r].a.begin(), grads_.layers[l][r].a.end(), 0.0f);
            std::fill(grads_.layers[l][r].b.begin(), grads_.layers[l][r].b.end(), 0.0f);
        }
    });
    const float grad_scale = static_cast<float>(1.0 / static_cast<double>(st.n_targets));
    double      loss       = 0.0;
    for (size_t i = 0; i < micro.size(); ++i) {
        // Each micro-batch's masks: a function of the seed, the Adam step (restored by --resume) and
        // the micro-batch, so a resumed run draws the same ones.
        lora_dropout_spec d;
        if (dropout_p_ > 0) {
            d.p    = dropout_p_;
            d.seed = dropout_mix(dropout_seed_ ^ dropout_mix(static_cast<uint64_t>(t_) * 4096 + i));
        }
        GPTQ_ASSIGN_OR_RETURN(double l, loss_grad_(ctx, micro[i], &grads_, grad_scale, d));
        loss += l;
    }
    st.loss = loss / static_cast<double>(st.n_targets);
    // Global norm over every A and B gradient (torch.nn.utils.clip_grad_norm_ with norm 2): each
    // module's squares summed in double, then the modules in order.
    std::vector<double> sq_mod(mods.size(), 0.0);
    over_modules([&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            const auto [l, r]    = mods[static_cast<size_t>(i)];
            const lora_module& g = grads_.layers[l][r];
            double             s = 0.0;
            for (float x : g.a) s += static_cast<double>(x) * x;
            for (float x : g.b) s += static_cast<double>(x) * x;
            sq_mod[static_cast<size_t>(i)] = s;
        }
    });
    double sq = 0.0;
    for (double s : sq_mod) sq += s;
    st.grad_norm = std::sqrt(sq);
    if (!std::isfinite(st.loss) || !std::isfinite(st.grad_norm))  // nothing updated: the adapter stays finite
        return make_error(status_code::STATUS_INTERNAL,
                          "training diverged at Adam step {}: loss {}, gradient norm {} (lower --lr, or keep "
                          "--max-grad-norm)",
                          t_ + 1, st.loss, st.grad_norm);
    const float clip = cfg_.max_grad_norm > 0 ? static_cast<float>(cfg_.max_grad_norm / (st.grad_norm + 1e-6)) : 1.0f;
    const bool  do_clip = cfg_.max_grad_norm > 0 && clip < 1.0f;
    // AdamW as torch's single-tensor implementation: decoupled decay, bias corrections in double.
    ++t_;
    const double bc1       = 1.0 - std::pow(cfg_.beta1, static_cast<double>(t_));
    const double bc2       = 1.0 - std::pow(cfg_.beta2, static_cast<double>(t_));
    const float  step_size = static_cast<float>(lr / bc1), bc2_sqrt = static_cast<float>(std::sqrt(bc2));
    // The Python scalars torch passes: 1 - beta computed in double, then rounded to F32.
    const float b1c = static_cast<float>(1.0 - cfg_.beta1), b2 = static_cast<float>(cfg_.beta2);
    const float b2c = static_cast<float>(1.0 - cfg_.beta2);
    const float eps = static_cast<float>(cfg_.eps), decay = static_cast<float>(1.0 - lr * cfg_.weight_decay);
    auto update = [&](std::vector<float>& w, std::vector<float>& g, std::vector<float>& m, std::vector<float>& v) {
        for (size_t i = 0; i < w.size(); ++i) {
            const float gi = do_clip ? g[i] * clip : g[i];
            w[i] *= decay;
            m[i] = m[i] + b1c * (gi - m[i]);  // torch: exp_avg.lerp_(grad, 1 - beta1)
            v[i] = v[i] * b2 + b2c * gi * gi;
            w[i] -= step_size * (m[i] / (std::sqrt(v[i]) / bc2_sqrt + eps));
        }
    };
    over_modules([&](int64_t i0, int64_t i1) {  // element by element
        for (int64_t i = i0; i < i1; ++i) {
            const auto [l, r] = mods[static_cast<size_t>(i)];
            lora_module& w    = adapter_->layers[l][r];
            lora_module& g    = grads_.layers[l][r];
            update(w.a, g.a, m_.layers[l][r].a, v_.layers[l][r].a);
            update(w.b, g.b, m_.layers[l][r].b, v_.layers[l][r].b);
        }
    });
    return st;
}

result<double> lora_trainer::eval(const ops_context& ctx, const std::vector<train_batch>& batches) {
    double  loss = 0.0;
    int64_t n    = 0;
    for (const train_batch& b : batches) {
        GPTQ_ASSIGN_OR_RETURN(double l, loss_grad_(ctx, b, nullptr, 1.0f, lora_dropout_spec{}));  // no dropout
        loss += l;
        n += b.n_targets();
    }
    return n > 0 ? loss / static_cast<double>(n) : NAN;
}

namespace {

// The settings a checkpoint must share with the run that resumes it.
nlohmann::ordered_json run_fingerprint(const finetune_params& p) {
    std::error_code        ec;
    nlohmann::ordered_json j;
    j["model"]         = fs::absolute(p.model_path, ec).lexically_normal().string();
    j["data"]          = fs::absolute(p.data_path, ec).lexically_normal().string();
    j["data_bytes"]    = fs::file_size(p.data_path, ec);
    j["r"]             = p.r;
    j["alpha"]         = p.alpha;
    j["use_rslora"]    = p.use_rslora;
    j["targets"]       = p.targets;
    j["lr"]            = p.lr;
    j["epochs"]        = p.epochs;
    j["max_steps"]     = p.max_steps;
    j["seqlen"]        = p.seqlen;
    j["batch"]         = p.batch;
    j["grad_accum"]    = p.grad_accum;
    j["seed"]          = p.seed;
    j["eval_fraction"] = p.eval_fraction;
    j["warmup_ratio"]  = p.warmup_ratio;
    j["weight_decay"]  = p.weight_decay;
    j["max_grad_norm"] = p.max_grad_norm;
    j["init_adapter"]  = p.init_adapter;
    if (p.lora_dropout > 0) j["lora_dropout"] = p.lora_dropout;  // absent at 0: older checkpoints resume
    return j;
}

std::string module_key(size_t layer, size_t role) {
    return llama_linear_name(static_cast<int64_t>(layer), static_cast<linear_role>(role));
}

status optimizer_save(lora_trainer& t, const std::string& path) {
    std::vector<safetensors_decl>                                  decls;
    std::vector<std::pair<std::string, const std::vector<float>*>> data;
    auto&                                                          a = t.adapter();
    for (size_t l = 0; l < a.layers.size(); ++l)
        for (size_t r = 0; r < a.layers[l].size(); ++r) {
            if (a.layers[l][r].r == 0) continue;
            const std::string k = module_key(l, r);
            for (auto [moment, name] : {std::pair{&t.exp_avg(), "exp_avg"}, std::pair{&t.exp_avg_sq(), "exp_avg_sq"}}) {
                const lora_module& m = moment->layers[l][r];
                decls.push_back({k + ".lora_A." + name, dtype::DTYPE_F32, {static_cast<int64_t>(m.a.size())}});
                decls.push_back({k + ".lora_B." + name, dtype::DTYPE_F32, {static_cast<int64_t>(m.b.size())}});
                data.push_back({k + ".lora_A." + name, &m.a});
                data.push_back({k + ".lora_B." + name, &m.b});
            }
        }
    GPTQ_ASSIGN_OR_RETURN(auto w, safetensors_writer::create(path, decls));
    for (const auto& [name, v] : data) GPTQ_TRY(w->write(name, v->data(), v->size() * sizeof(float)));
    return w->finish();
}

status optimizer_load(lora_trainer& t, const std::string& path) {
    GPTQ_ASSIGN_OR_RETURN(auto f, safetensors_file::open(path));
    auto& a = t.adapter();
    for (size_t l = 0; l < a.layers.size(); ++l)
        for (size_t r = 0; r < a.layers[l].size(); ++r) {
            if (a.layers[l][r].r == 0) continue;
            const std::string k = module_key(l, r);
            for (auto [moment, name] : {std::pair{&t.exp_avg(), "exp_avg"}, std::pair{&t.exp_avg_sq(), "exp_avg_sq"}})
                for (auto [vec, ab] :
                     {std::pair{&moment->layers[l][r].a, "A"}, std::pair{&moment->layers[l][r].b, "B"}}) {
                    const std::string              tn   = k + ".lora_" + ab + "." + name;
                    const safetensors_tensor_info* info = f->find(tn);
                    if (!info || info->type != dtype::DTYPE_F32 || info->numel() != static_cast<int64_t>(vec->size()))
                        return make_error(E_ARG, "{}: tensor {} is missing or not F32 of {} values", path, tn,
                                          vec->size());
                    GPTQ_TRY(f->read_f32(*info, vec->data()));
                }
        }
    return status::ok();
}

struct run_state {
    int64_t step = 0;  // optimizer steps done
};

// out_dir/checkpoint: the adapter, the optimizer's moments and the step, written into a temporary
// folder and swapped in (the previous checkpoint is removed only once the new one is in place).
status checkpoint_save(const finetune_params& p, const llama_hparams& hp, lora_trainer& t, const run_state& s) {
    const std::string dir = path_join(p.out_dir, "checkpoint");
    const std::string tmp = dir + ".tmp-" + std::to_string(getpid());
    const std::string old = dir + ".old-" + std::to_string(getpid());
    std::error_code   ec;
    fs::remove_all(tmp, ec);
    lora_save_config c{p.r, p.alpha, p.use_rslora, p.model_path, p.lora_dropout};
    GPTQ_TRY(lora_adapter_save(t.adapter(), hp, c, tmp));
    GPTQ_TRY(optimizer_save(t, path_join(tmp, "optimizer.safetensors")));
    nlohmann::ordered_json j;
    j["step"]       = s.step;
    j["adam_steps"] = t.adam_steps();
    j["run"]        = run_fingerprint(p);
    GPTQ_TRY(file_write_atomic(path_join(tmp, "trainer_state.json"), j.dump(2) + "\n"));
    if (fs::exists(dir, ec)) fs::rename(dir, old, ec);
    if (ec) return make_error(E_IO, "renaming {} to {}: {}", dir, old, ec.message());
    fs::rename(tmp, dir, ec);
    if (ec) return make_error(E_IO, "renaming {} to {}: {}", tmp, dir, ec.message());
    fs::remove_all(old, ec);
    return status::ok();
}

// A crash between checkpoint_save's two renames leaves no checkpoint/ but the complete new one
// (checkpoint.tmp-PID, complete once trainer_state.json is in it: written last) and the previous
// one (checkpoint.old-PID): the newest complete one becomes checkpoint/ again. Stale temporary
// folders beside a checkpoint/ are removed.
status checkpoint_recover(const std::string& out_dir) {
    const std::string dir = path_join(out_dir, "checkpoint");
    std::error_code   ec;
    std::string       tmp_done, old;
    for (const auto& e : fs::directory_iterator(out_dir, ec)) {
        const std::string name = e.path().filename().string();
        if (name.starts_with("checkpoint.tmp-") && fs::exists(e.path() / "trainer_state.json", ec))
            tmp_done = e.path().string();
        else if (name.starts_with("checkpoint.old-"))
            old = e.path().string();
    }
    if (!fs::exists(dir, ec) && (!tmp_done.empty() || !old.empty())) {
        const std::string& from = tmp_done.empty() ? old : tmp_done;
        fs::rename(from, dir, ec);
        if (ec) return make_error(E_IO, "renaming {} to {}: {}", from, dir, ec.message());
        GPTQ_LOG_WARN("{}: recovered the checkpoint of an interrupted save from {}", out_dir, from);
    }
    for (const auto& e : fs::directory_iterator(out_dir, ec)) {
        const std::string name = e.path().filename().string();
        if (name.starts_with("checkpoint.tmp-") || name.starts_with("checkpoint.old-")) fs::remove_all(e.path(), ec);
    }
    return status::ok();
}

result<run_state> checkpoint_load(const finetune_params& p, const llama_hparams& hp, lora_trainer& t) {
    const std::string dir = path_join(p.out_dir, "checkpoint");
    GPTQ_ASSIGN_OR_RETURN(json j, json_read_file(path_join(dir, "trainer_state.json")));
    const nlohmann::ordered_json want = run_fingerprint(p);
    if (!j.contains("run") || !j["run"].is_object())
        return make_error(E_ARG, "{}/trainer_state.json: no \"run\" object", dir);
    for (const auto& [key, v] : want.items())
        if (!j["run"].contains(key) || json(j["run"][key]) != json(v))
            return make_error(E_ARG, "--resume: the checkpoint in {} was made with {} = {}, this run has {}", dir, key,
                              j["run"].contains(key) ? j["run"][key].dump() : "(none)", v.dump());
    run_state s;
    s.step         = j.value("step", int64_t(0));
    t.adam_steps() = j.value("adam_steps", int64_t(0));
    GPTQ_ASSIGN_OR_RETURN(lora_adapter a, lora_adapter_load(dir, hp, 1.0f));
    lora_adapter& cur = t.adapter();
    for (size_t l = 0; l < cur.layers.size(); ++l)
        for (size_t r = 0; r < cur.layers[l].size(); ++r) {
            lora_module&       m = cur.layers[l][r];
            const lora_module& n = a.layers[l][r];
            if (m.r != n.r)
                return make_error(E_ARG, "{}: {} has rank {}, expected {}", dir, module_key(l, r), n.r, m.r);
            m.a = n.a;  // the scale stays the run's (the same expression)
            m.b = n.b;
        }
    GPTQ_TRY(optimizer_load(t, path_join(dir, "optimizer.safetensors")));
    return s;
}

result<std::array<bool, k_n_linear_roles>> targets_parse(const std::string& list) {
    std::array<bool, k_n_linear_roles> on{};
    size_t                             pos = 0;
    bool                               any = false;
    while (pos <= list.size()) {
        const size_t      comma = std::min(list.find(',', pos), list.size());
        const std::string t     = list.substr(pos, comma - pos);
        pos                     = comma + 1;
        if (t.empty()) continue;
        bool found = false;
        for (int r = 0; r < k_n_linear_roles; ++r) {
            const std::string name = linear_role_name(static_cast<linear_role>(r));  // "q_proj"
            if (t == name || t + "_proj" == name) on[static_cast<size_t>(r)] = found = true;
        }
        if (!found)
            return make_error(E_ARG,
                              "--targets: unknown module '{}' (known: q, k, v, o, gate, up, down or q_proj, ...)", t);
        any = true;
    }
    if (!any) return make_error(E_ARG, "--targets '{}': no module named", list);
    return on;
}

status params_check(const finetune_params& p) {
    GPTQ_ASSIGN_OR_RETURN(device_spec d, device_parse(p.device));
    GPTQ_TRY(device_check(d));
    if (p.gpu_math != "tf32" && p.gpu_math != "bf16" && p.gpu_math != "f32")
        return make_error(E_ARG, "finetune --gpu-math '{}': expected tf32, bf16 or f32", p.gpu_math);
    if (p.model_path.empty() || p.data_path.empty() || p.out_dir.empty())
        return make_error(E_ARG, "finetune: a model, --data and -o are required");
    auto positive = [](const char* name, double v) -> status {
        if (!(v > 0) || !std::isfinite(v)) return make_error(E_ARG, "finetune --{}: {} must be > 0", name, v);
        return status::ok();
    };
    GPTQ_TRY(positive("r", static_cast<double>(p.r)));
    GPTQ_TRY(positive("alpha", p.alpha));
    GPTQ_TRY(positive("lr", p.lr));
    GPTQ_TRY(positive("epochs", static_cast<double>(p.epochs)));
    GPTQ_TRY(positive("batch", static_cast<double>(p.batch)));
    GPTQ_TRY(positive("grad-accum", static_cast<double>(p.grad_accum)));
    if (!(p.lora_dropout >= 0 && p.lora_dropout < 1))
        return make_error(E_ARG, "finetune --lora-dropout {}: must be in [0, 1)", p.lora_dropout);
    if (p.seqlen < 2) return make_error(E_ARG, "finetune --seqlen {}: must be at least 2", p.seqlen);
    if (!(p.eval_fraction >= 0 && p.eval_fraction < 1))
        return make_error(E_ARG, "finetune --eval-fraction {}: must be in [0, 1)", p.eval_fraction);
    if (!(p.warmup_ratio >= 0 && p.warmup_ratio <= 1))
        return make_error(E_ARG, "finetune --warmup-ratio {}: must be in [0, 1]", p.warmup_ratio);
    if (p.max_steps < 0 || p.save_every < 0 || p.eval_every < 0 || p.weight_decay < 0 || p.max_grad_norm < 0)
        return make_error(E_ARG,
                          "finetune: --max-steps, --save-every, --eval-every, --weight-decay and "
                          "--max-grad-norm must not be negative");
    std::error_code ec;
    if (p.resume) {
        if (fs::is_directory(p.out_dir, ec)) GPTQ_TRY(checkpoint_recover(p.out_dir));
        if (!fs::exists(path_join(path_join(p.out_dir, "checkpoint"), "trainer_state.json"), ec))
            return make_error(E_ARG, "finetune --resume: {} holds no checkpoint (checkpoint/trainer_state.json)",
                              p.out_dir);
    } else if (fs::exists(p.out_dir, ec) && !(fs::is_directory(p.out_dir, ec) && fs::is_empty(p.out_dir, ec))) {
        return make_error(E_ARG, "finetune -o {}: exists and is not empty (choose another folder, or --resume)",
                          p.out_dir);
    }
    return status::ok();
}

// The adapter the run starts from: PEFT's init, or --init-adapter's A and B (same targets and r).
result<std::shared_ptr<lora_adapter>> adapter_start(const finetune_params& p, const llama_hparams& hp,
                                                    const std::array<bool, k_n_linear_roles>& on, float scale) {
    auto a = std::make_shared<lora_adapter>(lora_adapter_init(hp, p.r, scale, on, p.seed));
    if (p.init_adapter.empty()) return a;
    GPTQ_ASSIGN_OR_RETURN(lora_adapter init, lora_adapter_load(p.init_adapter, hp, 1.0f));
    for (size_t l = 0; l < a->layers.size(); ++l)
        for (size_t r = 0; r < a->layers[l].size(); ++r) {
            lora_module&       m = a->layers[l][r];
            const lora_module& n = init.layers[l][r];
            if (m.r != n.r || (m.r > 0 && n.scale != scale))
                return make_error(E_ARG,
                                  "--init-adapter {}: {} has rank {} and scale {}, this run trains rank {} (scale {})",
                                  p.init_adapter, module_key(l, r), n.r, n.scale, m.r, m.r > 0 ? scale : 0.0f);
            m.a = n.a;
            m.b = n.b;
        }
    return a;
}

}  // namespace

namespace {

struct split {
    std::vector<int64_t> train, eval;  // indices into the data's sequences, ascending
};

split split_data(int64_t n, double fraction, uint64_t seed) {
    int64_t n_eval = 0;
    if (fraction > 0 && n >= 2) n_eval = std::clamp<int64_t>(std::llround(fraction * static_cast<double>(n)), 1, n - 1);
    const std::vector<int64_t> perm = finetune_shuffle(n, seed ^ 0x9e3779b97f4a7c15ULL);
    split                      s;
    s.eval.assign(perm.begin(), perm.begin() + n_eval);
    s.train.assign(perm.begin() + n_eval, perm.end());
    std::sort(s.eval.begin(), s.eval.end());
    std::sort(s.train.begin(), s.train.end());
    return s;
}

// The loop over optimizer steps [start, total): micro-batches of the epoch's shuffled order, the
// schedule, eval losses, checkpoints, the progress bar.
struct train_loop {
    const finetune_params&           p;
    const llama_hparams&             hp;
    const std::vector<finetune_seq>& seqs;
    const split&                     sp;
    lora_trainer&                    trainer;
    const ops_context&               ctx;
    int64_t                          total = 0, warmup = 0, steps_per_epoch = 0;

    result<double> eval_loss() {
        if (sp.eval.empty()) return NAN;
        return trainer.eval(ctx, finetune_batches(seqs, sp.eval, 0, static_cast<int64_t>(sp.eval.size()), p.batch));
    }

    status run(int64_t start, finetune_result* r) {
        const int64_t               per_step = p.batch * p.grad_accum, n_train = static_cast<int64_t>(sp.train.size());
        std::optional<progress_bar> bar;
        if (p.progress) bar.emplace("finetune", total - start, "step");
        const auto    t0        = std::chrono::steady_clock::now();
        const int64_t log_every = std::max<int64_t>(1, (total - start) / 20);
        for (int64_t k = start; k < total; ++k) {
            const int64_t        epoch = k / steps_per_epoch, j = k % steps_per_epoch;
            std::vector<int64_t> order = finetune_shuffle(n_train, p.seed + static_cast<uint64_t>(epoch));
            for (int64_t& o : order) o = sp.train[static_cast<size_t>(o)];
            const auto micro =
                finetune_batches(seqs, order, j * per_step, std::min(n_train, (j + 1) * per_step), p.batch);
            const double lr = finetune_lr_at(p.lr, k, total, warmup);
            const auto   ts = std::chrono::steady_clock::now();
            GPTQ_ASSIGN_OR_RETURN(train_step_stats st, trainer.step(ctx, micro, lr));
            r->step_seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - ts).count());
            r->step_losses.push_back(st.loss);
            r->steps++;
            r->n_train_tokens += st.n_tokens;
            r->train_loss     = st.loss;
            const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            const double tps  = secs > 0 ? static_cast<double>(r->n_train_tokens) / secs : 0.0;
            // A log line over the bar's line (on a terminal), which the next update draws again below.
            auto clear_bar = [&] {
                if (bar && bar->enabled()) std::fputs("\r\x1b[K", stderr);
            };
            if ((k + 1 - start) % log_every == 0 || k + 1 == total) {
                clear_bar();
                GPTQ_LOG_INFO("step {}/{}: loss {:.4f} lr {:.3g} grad_norm {:.4f} {:.0f} tok/s", k + 1, total, st.loss,
                              lr, st.grad_norm, tps);
            }
            const bool epoch_end = j + 1 == steps_per_epoch || k + 1 == total;
            if (epoch_end || (p.eval_every > 0 && (k + 1) % p.eval_every == 0)) {
                GPTQ_ASSIGN_OR_RETURN(r->eval_loss, eval_loss());
                clear_bar();
                if (!sp.eval.empty())
                    GPTQ_LOG_INFO("step {}/{} (epoch {}): eval loss {:.4f} (ppl {:.3f})", k + 1, total, epoch + 1,
                                  r->eval_loss, std::exp(r->eval_loss));
            }
            if (p.save_every > 0 && (k + 1) % p.save_every == 0 && k + 1 < total)
                GPTQ_TRY(checkpoint_save(p, hp, trainer, run_state{k + 1}));
            if (bar) {
                bar->set_note(fmt::format("loss {:.4f} {:.0f} tok/s", st.loss, tps));
                bar->update();
            }
        }
        if (bar) bar->finish();
        r->seconds           = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        r->tokens_per_second = r->seconds > 0 ? static_cast<double>(r->n_train_tokens) / r->seconds : 0.0;
        if (r->step_seconds.size() >= 2) {
            double sum = 0.0;
            for (size_t i = 1; i < r->step_seconds.size(); ++i) sum += r->step_seconds[i];
            r->step_seconds_mean = sum / static_cast<double>(r->step_seconds.size() - 1);
        }
        return status::ok();
    }
};

}  // namespace

result<finetune_result> finetune_run(const finetune_params& p) {
    GPTQ_TRY(params_check(p));
    GPTQ_ASSIGN_OR_RETURN(auto on, targets_parse(p.targets));
    // The backend: the CPU model (F16 weights kept as F16), or the model resident on the GPU
    // (llama_cuda_model::lora_loss_grad, docs/lora.md "Fine-tuning on the GPU").
    GPTQ_ASSIGN_OR_RETURN(const device_spec dev, device_parse(p.device));
    std::unique_ptr<llama_model> model;
#ifdef GPTQ_HAVE_CUDA
    std::unique_ptr<llama_cuda_model> gpu;
    if (dev.cuda) {
        GPTQ_ASSIGN_OR_RETURN(gpu, llama_cuda_model::open(p.model_path, llama_cuda_train_options(dev.index)));
        gpu->set_train_math(p.gpu_math == "f32"    ? cuda_train_math::F32
                            : p.gpu_math == "bf16" ? cuda_train_math::BF16
                                                   : cuda_train_math::TF32);
        gpu->set_train_profile(p.profile_ops);
    }
#endif
    if (!dev.cuda) {
        llama_open_options oo;
        oo.keep_f16 = true;
        GPTQ_ASSIGN_OR_RETURN(model, llama_model::open(p.model_path, oo));
    }
#ifdef GPTQ_HAVE_CUDA
    const llama_hparams& hp = gpu ? gpu->hparams() : model->hparams();
#else
    const llama_hparams& hp = model->hparams();
#endif
    GPTQ_TRY(llama_train_check(hp, p.model_path));
    if (p.seqlen > hp.max_position_embeddings)
        return make_error(E_ARG,
                          "finetune --seqlen {}: longer than the model's context of {} positions "
                          "(max_position_embeddings)",
                          p.seqlen, hp.max_position_embeddings);
    GPTQ_ASSIGN_OR_RETURN(auto tok, tokenizer::load(p.model_path));
    std::string tmpl;
    if (!p.chat_template_file.empty()) {
        GPTQ_ASSIGN_OR_RETURN(tmpl, chat_template_file_read(p.chat_template_file));
    }
    GPTQ_ASSIGN_OR_RETURN(finetune_data data, finetune_data_read(p.data_path, *tok, p.seqlen, tmpl));
    if (data.n_truncated > 0)
        GPTQ_LOG_WARN("{}: {} chat samples were longer than --seqlen {} and were cut", p.data_path, data.n_truncated,
                      p.seqlen);
    const split sp = split_data(static_cast<int64_t>(data.seqs.size()), p.eval_fraction, p.seed);

    const float scale = static_cast<float>(p.use_rslora ? p.alpha / std::sqrt(static_cast<double>(p.r))
                                                        : p.alpha / static_cast<double>(p.r));
    GPTQ_ASSIGN_OR_RETURN(std::shared_ptr<lora_adapter> adapter, adapter_start(p, hp, on, scale));
    adamw_config cfg;
    cfg.weight_decay  = p.weight_decay;
    cfg.max_grad_norm = p.max_grad_norm;
    lora_loss_grad_fn fn;
    if (model) {
        const int32_t index = model->lora_add(adapter);
        fn = [m = model.get(), index](const ops_context& ctx, const train_batch& b, lora_adapter* g, float s,
                                      lora_dropout_spec d) { return m->lora_loss_grad(ctx, b, index, g, s, d); };
    }
#ifdef GPTQ_HAVE_CUDA
    if (gpu)
        fn = [m = gpu.get(), adapter](const ops_context& ctx, const train_batch& b, lora_adapter* g, float s,
                                      lora_dropout_spec d) {
            return m->lora_loss_grad(b, *adapter, g, s, d, ctx.pool);
        };
#endif
    lora_trainer trainer(fn, adapter, cfg);
    trainer.set_dropout(p.lora_dropout, p.seed);
    run_state state;
    if (p.resume) {
        GPTQ_ASSIGN_OR_RETURN(state, checkpoint_load(p, hp, trainer));
    }

    thread_pool pool(p.n_threads);
    ops_context ctx;
    ctx.pool = &pool;
    train_loop    loop{p, hp, data.seqs, sp, trainer, ctx};
    const int64_t n_train = static_cast<int64_t>(sp.train.size());
    loop.steps_per_epoch  = (n_train + p.batch * p.grad_accum - 1) / (p.batch * p.grad_accum);
    loop.total            = p.max_steps > 0 ? p.max_steps : p.epochs * loop.steps_per_epoch;
    loop.warmup           = static_cast<int64_t>(std::ceil(p.warmup_ratio * static_cast<double>(loop.total)));

    finetune_result r;
    r.total_steps  = loop.total;
    r.n_train_seqs = n_train;
    r.n_eval_seqs  = static_cast<int64_t>(sp.eval.size());
    r.out_dir      = p.out_dir;
    for_each_module(*adapter,
                    [&](lora_module& m) { r.n_trainable_params += static_cast<int64_t>(m.a.size() + m.b.size()); });
    GPTQ_LOG_INFO(
        "finetune {}: {} train / {} eval sequences (seqlen {}), {} steps of {} micro-batch(es) x {} sequences, {} "
        "trainable "
        "parameters (r {}, alpha {}), {}{}",
        p.model_path, n_train, r.n_eval_seqs, p.seqlen, loop.total, p.grad_accum, p.batch, r.n_trainable_params, p.r,
        p.alpha, dev.cuda ? device_name(dev) : fmt::format("{} threads", pool.n_threads()),
        p.resume ? fmt::format(", resumed at step {}", state.step) : "");
    GPTQ_ASSIGN_OR_RETURN(r.eval_loss_first, loop.eval_loss());
    r.eval_loss = r.eval_loss_first;
    GPTQ_TRY(loop.run(state.step, &r));
#ifdef GPTQ_HAVE_CUDA
    if (gpu) {
        GPTQ_ASSIGN_OR_RETURN(cuda_memory_info mi, cuda_memory_info_get(gpu->context()));
        r.device_used_bytes   = mi.total - mi.free;
        r.device_weight_bytes = gpu->weight_bytes();
        r.device_train_bytes  = gpu->train_bytes();
    }
#endif
    lora_save_config c{p.r, p.alpha, p.use_rslora, p.model_path, p.lora_dropout};
    GPTQ_TRY(lora_adapter_save(*adapter, hp, c, p.out_dir));
    return r;
}

std::string finetune_result_text(const finetune_result& r) {
    const std::string eval =
        r.n_eval_seqs == 0 ? std::string("eval loss: none (no held-out sequences: --eval-fraction 0)\n")
                           : fmt::format("eval loss: {:.4f} -> {:.4f} (ppl {:.3f} -> {:.3f})\n", r.eval_loss_first,
                                         r.eval_loss, std::exp(r.eval_loss_first), std::exp(r.eval_loss));
    std::string extra;
    if (r.step_seconds_mean > 0)
        extra += fmt::format("time per step (after the first): {:.3f} s\n", r.step_seconds_mean);
    if (r.device_used_bytes > 0)
        extra += fmt::format("GPU memory in use: {:.2f} GB (weights {:.2f} GB, training {:.2f} GB)\n",
                             double(r.device_used_bytes) / 1e9, double(r.device_weight_bytes) / 1e9,
                             double(r.device_train_bytes) / 1e9);
    return fmt::format(
        "adapter: {}\nsteps: {} of {} ({} train / {} eval sequences), {} tokens in {:.1f} s ({:.0f} tok/s)\n"
        "train loss (last step): {:.4f}\n{}{}",
        r.out_dir, r.steps, r.total_steps, r.n_train_seqs, r.n_eval_seqs, r.n_train_tokens, r.seconds,
        r.tokens_per_second, r.train_loss, eval, extra);
}

std::string finetune_result_json(const finetune_result& r) {
    nlohmann::ordered_json j;
    auto num                = [](double x) { return std::isfinite(x) ? nlohmann::json(x) : nlohmann::json(nullptr); };
    j["adapter"]            = r.out_dir;
    j["steps"]              = r.steps;
    j["total_steps"]        = r.total_steps;
    j["n_train_seqs"]       = r.n_train_seqs;
    j["n_eval_seqs"]        = r.n_eval_seqs;
    j["n_train_tokens"]     = r.n_train_tokens;
    j["n_trainable_params"] = r.n_trainable_params;
    j["train_loss"]         = num(r.train_loss);
    j["eval_loss_first"]    = num(r.eval_loss_first);
    j["eval_loss"]          = num(r.eval_loss);
    j["seconds"]            = r.seconds;
    j["tokens_per_second"]  = r.tokens_per_second;
    j["step_seconds"]       = r.step_seconds;
    j["step_losses"]        = r.step_losses;
    j["step_seconds_mean"]  = r.step_seconds_mean;  // after the first step
    if (r.device_used_bytes > 0) {
        j["device_used_bytes"]   = r.device_used_bytes;
        j["device_weight_bytes"] = r.device_weight_bytes;
        j["device_train_bytes"]  = r.device_train_bytes;
    }
    return j.dump();
}

}  // namespace gptq
