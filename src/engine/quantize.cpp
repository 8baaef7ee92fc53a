// gptq quantize: the layer-by-layer driver (docs/quantize.md). GPTQ math lives in quant/, the
// model in model/, the checkpoint layout in io/; this file wires them together and owns the
// work folder, resume, the memory plan, progress and the report. The calibration passes, Hessians
// and solve run behind calibration.h's runner (CPU, or the GPU with --device cuda).
#include "gptq/quantize.h"

#include <fmt/format.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <map>
#include <new>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <thread>

#include "bit_plan.h"
#include "bpw_output.h"
#include "calibration.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "data_files.h"
#include "embed_quant.h"
#include "gptq/device.h"
#include "host_memory.h"
#include "io/gptq_checkpoint.h"
#include "io/gptq_config.h"
#include "io/gptq_pack.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/tensor_source.h"
#include "model/llama.h"
#include "quant/gptq.h"
#include "tokenizer/tokenizer.h"

namespace gptq {

namespace fs = std::filesystem;

namespace {

constexpr auto        E_ARG           = status_code::STATUS_INVALID_ARGUMENT;
constexpr const char* k_default_calib = "data/calib/corpus-sample.txt";
constexpr const char* k_wikitext2     = "data/wikitext2/wiki.test.raw.gptq_join.txt";
constexpr int         k_state_version = 1;

using clock = std::chrono::steady_clock;
double seconds_since(clock::time_point t0) {
    return std::chrono::duration<double>(clock::now() - t0).count();
}

std::string layer_file_name(int64_t i) {
    return fmt::format("layer-{:05}.safetensors", i);
}

// The settings that must match for --resume to continue a run (everything that changes output).
// moe: the MoE coverage settings change the output too (kept out of a dense model's identity, so
// that work folders of earlier versions still resume).
nlohmann::json run_identity(const quantize_params& p, const gptq_config& cfg, bool moe) {
    nlohmann::json j = {{"model", fs::weakly_canonical(p.model_path).string()},
                        {"config", cfg.to_json()},
                        {"method", p.method},
                        {"mse", p.mse},
                        {"gar", p.gar},
                        {"mse_hessian", p.mse_hessian},
                        {"calib_sampling", p.calib_sampling},
                        {"calib", p.calib},
                        {"nsamples", p.nsamples},
                        {"seqlen", p.seqlen},
                        {"seed", p.seed},
                        {"true_sequential", p.true_sequential},
                        {"target_bpw", p.target_bpw},
                        {"bpw_group_sizes", p.bpw_group_sizes}};
    if (p.gptaq) {  // only then: work folders of earlier versions still resume
        j["gptaq"]       = true;
        j["gptaq_alpha"] = p.gptaq_alpha;
    }
    if (p.quantize_embeddings) {  // only then: work folders of earlier versions still resume
        j["quantize_embeddings"] = true;
        j["embed_bits"]          = p.embed_bits;
        j["embed_group_size"]    = p.embed_group_size;
        j["embed_clip"]          = p.embed_clip;
    }
    if (p.target_bpw > 0) {  // kept out otherwise, so that work folders of earlier versions still resume
        j["bpw_sensitivity"] = p.bpw_sensitivity;
        if (p.bpw_sensitivity == "output") j["bpw_windows"] = p.bpw_windows;
        if (!p.bpw_measured.empty()) j["bpw_measured"] = p.bpw_measured;
    }
    if (moe) {
        j["moe_coverage"]   = p.moe_coverage;
        j["moe_min_tokens"] = p.moe_min_tokens;
    }
    return j;
}

// FNV-1a of a file's bytes as 16 hex digits: state.json keeps one per finished layer file, so
// that --resume tells a damaged file from a good one (not a defence against tampering).
result<std::string> file_hash(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return make_error(status_code::STATUS_IO_ERROR, "{}: cannot open", path);
    std::vector<char> buf(size_t(1) << 20);
    uint64_t          h = 14695981039346656037ull;
    while (in) {
        in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
        const auto n = static_cast<size_t>(in.gcount());
        for (size_t k = 0; k < n; ++k) h = (h ^ static_cast<unsigned char>(buf[k])) * 1099511628211ull;
    }
    if (in.bad()) return make_error(status_code::STATUS_IO_ERROR, "{}: read failed", path);
    return fmt::format("{:016x}", h);
}

// What differs between the identity a work folder was made with and this run's, in flag terms:
// "the work folder X was made with --group-size 128, this run asks for 64" (docs/quantize.md).
std::string resume_mismatch(const std::string& work, const nlohmann::json& was, const nlohmann::json& now) {
    struct setting {
        const char* key;   // in the identity ("config." for gptq_config::to_json's keys)
        const char* flag;  // what the user types
        bool        is_bool;
        bool        inverted;  // the flag sets the key to false
    };
    static const setting k_settings[] = {
        {"config.bits", "--bits", false, false},
        {"config.group_size", "--group-size", false, false},
        {"config.desc_act", "--desc-act", true, false},
        {"config.sym", "--no-sym", true, true},
        {"config.static_groups", "--static-groups", true, false},
        {"config.damp_percent", "--damp-percent", false, false},
        {"config.checkpoint_format", "--format", false, false},
        {"config.lm_head", "--quantize-lm-head", true, false},
        {"true_sequential", "--no-true-sequential", true, true},
        {"method", "--method", false, false},
        {"mse", "--mse", true, false},
        {"gar", "--gar", true, false},
        {"mse_hessian", "--mse-hessian", true, false},
        {"gptaq", "--gptaq", true, false},
        {"gptaq_alpha", "--gptaq-alpha", false, false},
        {"calib_sampling", "--calib-sampling", false, false},
        {"calib", "--calib", false, false},
        {"nsamples", "--nsamples", false, false},
        {"seqlen", "--seqlen", false, false},
        {"seed", "--seed", false, false},
        {"moe_coverage", "--moe-coverage", false, false},
        {"moe_min_tokens", "--moe-min-tokens", false, false},
        {"target_bpw", "--target-bpw", false, false},
        {"bpw_group_sizes", "--bpw-group-sizes", false, false},
        {"quantize_embeddings", "--quantize-embeddings", true, false},
        {"embed_bits", "--embed-bits", false, false},
        {"embed_group_size", "--embed-group-size", false, false},
        {"embed_clip", "--embed-clip", false, false},
        {"bpw_sensitivity", "--bpw-sensitivity", false, false},
        {"bpw_windows", "--bpw-windows", false, false},
        {"bpw_measured", "--bpw-measured", false, false},
    };
    auto at = [](const nlohmann::json& j, const std::string& key) {
        const nlohmann::json* v = &j;
        for (size_t a = 0, b; a <= key.size(); a = b + 1) {
            b = std::min(key.find('.', a), key.size());
            if (!v->is_object() || !v->contains(key.substr(a, b - a))) return nlohmann::json();
            v = &(*v)[key.substr(a, b - a)];
        }
        return *v;
    };
    auto text = [](const nlohmann::json& v) {
        return v.is_null() ? std::string("none") : v.is_string() ? v.get<std::string>() : v.dump();
    };
    std::vector<std::string> diffs;
    if (at(was, "model") != at(now, "model"))
        diffs.push_back(fmt::format("was made from the model {}, this run reads {}", text(at(was, "model")),
                                    text(at(now, "model"))));
    for (const auto& st : k_settings) {
        const nlohmann::json a = at(was, st.key), b = at(now, st.key);
        if (a == b) continue;
        if (st.is_bool) {
            const bool with_a = a.is_boolean() && a.get<bool>() != st.inverted;
            diffs.push_back(fmt::format("was made {} {}, this run {} it", with_a ? "with" : "without", st.flag,
                                        with_a ? "without" : "with"));
        } else {
            diffs.push_back(fmt::format("was made with {} {}, this run asks for {}", st.flag, text(a), text(b)));
        }
    }
    if (diffs.empty() && at(was, "config.meta") != at(now, "config.meta"))
        diffs.push_back(fmt::format("was made by {}, this is {}", text(at(was, "config.meta.quantizer")),
                                    text(at(now, "config.meta.quantizer"))));
    if (diffs.empty()) diffs.push_back("was made with other settings");
    std::string list;
    for (const auto& d : diffs) list += (list.empty() ? "" : "; it ") + d;
    return fmt::format(
        "--resume: the work folder {} {}; rerun with the same settings to continue it, or remove the folder to start "
        "over",
        work, list);
}

// Calibration token ids: the whole text tokenized once (no BOS), as the reference does for its
// WikiText-2/C4 loaders; a .jsonl file contributes the "text" field of every line, joined by "\n\n".
result<std::vector<int32_t>> calibration_tokens(const quantize_params& p, const tokenizer& tok,
                                                std::string* used_path) {
    std::string path = p.calib;
    if (p.calib == "default" || p.calib == "wikitext2") {
        auto found = bundled_data_resolve(p.calib == "default" ? k_default_calib : k_wikitext2);
        if (!found)
            return make_error(found.error().code(), "--calib {}: {}; pass --calib FILE (a text or .jsonl file)",
                              p.calib, found.error().message());
        path = *found;
    }
    if (p.calib == "wikitext2")
        GPTQ_LOG_WARN("calibrating on the WikiText-2 test split: perplexity on that split is then biased");
    *used_path = path;
    GPTQ_ASSIGN_OR_RETURN(std::string text, text_file_read(path));
    if (path.size() >= 6 && path.compare(path.size() - 6, 6, ".jsonl") == 0) {
        std::string joined;
        size_t      pos = 0, line_no = 0;
        while (pos < text.size()) {
            size_t end = text.find('\n', pos);
            if (end == std::string::npos) end = text.size();
            const std::string_view line(text.data() + pos, end - pos);
            ++line_no;
            pos = end + 1;
            if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
            auto j = json_parse(line, fmt::format("{} line {}", path, line_no));
            if (!j) return j.error();
            if (!j->is_object() || !j->contains("text") || !(*j)["text"].is_string())
                return make_error(status_code::STATUS_PARSE_ERROR,
                                  "{} line {}: expected an object with a string \"text\"", path, line_no);
            if (!joined.empty()) joined += "\n\n";
            joined += (*j)["text"].get<std::string>();
        }
        text.swap(joined);
    }
    std::vector<int32_t> ids = tok.encode(text, /*add_special=*/false);
    if (static_cast<int64_t>(ids.size()) <= p.seqlen)
        return make_error(E_ARG, "{}: {} tokens, need more than --seqlen {} for calibration windows", path, ids.size(),
                          p.seqlen);
    return ids;
}

// The calibration windows' embeddings into x [ids, n_embd] (llama_model::embed), in chunks on
// the pool's threads when there is one (after globals_load; the ids checked first, so that an
// error names its position in the whole).
status embed_windows(llama_model& model, const std::vector<int32_t>& ids, int64_t n_embd, thread_pool* pool, float* x) {
    const int64_t n = static_cast<int64_t>(ids.size());
    if (!pool || n < 4096) return model.embed(ids.data(), n, x);
    for (int64_t t = 0; t < n; ++t)
        if (ids[size_t(t)] < 0 || ids[size_t(t)] >= model.hparams().n_vocab)
            return model.embed(ids.data(), n, x);  // its error
    std::atomic<bool> failed{false};
    pool->parallel_for(n, [&](int64_t t0, int64_t t1) {
        if (!model.embed(ids.data() + t0, t1 - t0, x + t0 * n_embd).is_ok()) failed = true;
    });
    if (failed) return model.embed(ids.data(), n, x);  // not expected (ids checked): its error
    return status::ok();
}

// Linear groups in the order GPTQ quantizes them (true-sequential), or all at once.
std::vector<std::vector<linear_role>> quant_groups(bool true_sequential) {
    using R = linear_role;
    if (!true_sequential)
        return {{R::LINEAR_Q, R::LINEAR_K, R::LINEAR_V, R::LINEAR_O, R::LINEAR_GATE, R::LINEAR_UP, R::LINEAR_DOWN}};
    return {{R::LINEAR_Q, R::LINEAR_K, R::LINEAR_V}, {R::LINEAR_O}, {R::LINEAR_GATE, R::LINEAR_UP}, {R::LINEAR_DOWN}};
}

// The checkpoint module holding role r of layer i (a fused module, Phi-3's qkv_proj, holds several).
std::string module_of(const llama_hparams& hp, int64_t i, linear_role r) {
    for (const auto& m : llama_linear_modules(hp, i))
        for (linear_role x : m.roles)
            if (x == r) return m.module;
    return llama_linear_name(i, r);
}

// The neutral result of quant/ in the checkpoint's unpacked form.
// (q is taken: its codes move, hundreds of MB at the 7B shape.)
gptq_linear_data to_checkpoint_form(quantized_linear q, const linear_weights& lw) {
    gptq_linear_data d;
    d.n_out    = q.n_out;
    d.n_in     = q.n_in;
    d.n_groups = q.n_groups;
    d.bits     = q.bits;
    d.codes    = std::move(q.codes);
    d.zeros    = std::move(q.zeros);
    d.g_idx    = std::move(q.g_idx);
    d.scales.resize(q.scales.size());
    for (size_t i = 0; i < q.scales.size(); ++i) d.scales[i] = f32_to_f16(q.scales[i]);
    if (!lw.bias.empty()) {
        d.bias.resize(lw.bias.size());
        for (size_t i = 0; i < lw.bias.size(); ++i) d.bias[i] = f32_to_f16(lw.bias[i]);
    }
    return d;
}

struct run_state {
    quantize_params                 p;
    gptq_config                     cfg;
    gptq_options                    opt;
    std::string                     work;
    std::unique_ptr<llama_model>    model;
    int64_t                         n_samples = 0;
    quantize_report                 report;
    std::vector<std::string>        layer_hashes;  // of each finished layer file (state.json; --resume checks them)
    std::optional<gptq_linear_data> lm_head;       // --quantize-lm-head, once the layers are done
    std::optional<embed_quantized>  embed;         // --quantize-embeddings, before the calibration embeds
    nlohmann::json                  bit_plan;      // --target-bpw: the plan (plan.json in the work folder)
    nlohmann::json                  identity;      // run_identity before any plan (state.json; --resume)
    // GPTQ: the calibration windows' hidden states and the passes over them, on the CPU or (--device
    // cuda, experimental) the GPU (calibration.h); nullptr with --method rtn.
    std::unique_ptr<calibration_runner> calib;
};

// The GPTQ options of one checkpoint module: the base ones with its `dynamic` rule applied.
gptq_options options_for(const run_state& s, const std::string& module) {
    gptq_options o = s.opt;
    if (auto c = s.cfg.for_module(module)) {
        o.bits       = c->bits;
        o.group_size = c->group_size;
    }
    return o;
}

// dt seconds added to the entry `name` of a report's phase_seconds / detail_seconds (appended when new).
void add_seconds(std::vector<std::pair<std::string, double>>* list, const std::string& name, double dt) {
    for (auto& [n, v] : *list)
        if (n == name) {
            v += dt;
            return;
        }
    list->emplace_back(name, dt);
}

// The GPU solve's steps (gptq_stats' seconds; zero on the CPU) into the report's details.
void add_solve_details(quantize_report& r, const gptq_stats& st) {
    if (st.seconds_prepare + st.seconds_cholesky + st.seconds_loop + st.seconds_download == 0.0) return;
    add_seconds(&r.detail_seconds, "solve.prepare", st.seconds_prepare);
    add_seconds(&r.detail_seconds, "solve.cholesky", st.seconds_cholesky);
    add_seconds(&r.detail_seconds, "solve.loop", st.seconds_loop);
    add_seconds(&r.detail_seconds, "solve.download", st.seconds_download);
}

// Adds the wall time of its scope to the report's phase `name` (GPU work queued in the scope is
// waited for first, so that the time lands in the phase that queued it).
class phase_timer {
public:
    phase_timer(run_state& s, const char* name) : s_(s), name_(name), t0_(clock::now()) {}
    ~phase_timer() {
        if (s_.calib) (void)s_.calib->synchronize();
        add_seconds(&s_.report.phase_seconds, name_, seconds_since(t0_));
    }
    phase_timer(const phase_timer&)            = delete;
    phase_timer& operator=(const phase_timer&) = delete;

private:
    run_state&        s_;
    const char*       name_;
    clock::time_point t0_;
};

// "load 1.2 s, calibration 3.4 s, ..." from the report's phase times.
std::string phase_summary(const quantize_report& r) {
    std::string out;
    for (const auto& [name, secs] : r.phase_seconds)
        out += fmt::format("{}{} {:.1f} s", out.empty() ? "" : ", ", name, secs);
    return out;
}

// Tensor names of a layer's weights that are not quantized (norms; a MoE block's router and shared
// expert gate), copied unchanged. quantized: the modules written as GPTQ.
std::vector<std::string> layer_plain_tensors(const run_state& s, int64_t i,
                                             const std::vector<std::pair<std::string, gptq_linear_data>>& quantized) {
    std::vector<std::string> out;
    for (const auto& t : llama_layer_tensors(s.model->hparams(), i)) {
        bool linear = false;
        for (const auto& [module, d] : quantized)
            if (t.name.rfind(module + ".", 0) == 0) linear = true;
        if (!linear && s.model->source().has(t.name)) out.push_back(t.name);
    }
    return out;
}

// The quantized linears of layer i by checkpoint module: a fused module (Phi-3 qkv_proj,
// gate_up_proj) is its roles joined by output rows, written under the name it had.
result<std::vector<std::pair<std::string, gptq_linear_data>>> layer_modules_data(
    const run_state& s, int64_t i, const std::vector<std::pair<linear_role, gptq_linear_data>>& q) {
    std::vector<std::pair<std::string, gptq_linear_data>> out;
    for (const auto& m : llama_linear_modules(s.model->hparams(), i)) {
        std::vector<const gptq_linear_data*> parts;
        for (linear_role r : m.roles)
            for (const auto& [role, d] : q)
                if (role == r) parts.push_back(&d);
        if (parts.empty()) continue;
        if (parts.size() != m.roles.size())
            return make_error(E_ARG, "{}: {} of its {} parts quantized", m.module, parts.size(), m.roles.size());
        if (parts.size() == 1) {
            out.emplace_back(m.module, *parts[0]);
        } else {
            GPTQ_ASSIGN_OR_RETURN(gptq_linear_data d, gptq_linear_join_rows(parts, m.module));
            out.emplace_back(m.module, std::move(d));
        }
    }
    return out;
}

// Write layer i's tensors (norms copied, linears packed) to the work folder, atomically. moe: the
// quantized linears of its MoE block by module name (GPTQModel's names).
status write_layer(run_state& s, int64_t i, const std::vector<std::pair<linear_role, gptq_linear_data>>& by_role,
                   std::vector<std::pair<std::string, gptq_linear_data>> moe) {
    GPTQ_ASSIGN_OR_RETURN(auto q, layer_modules_data(s, i, by_role));
    for (auto& m : moe) q.push_back(std::move(m));
    const tensor_source&          src = s.model->source();
    std::vector<safetensors_decl> decls;
    const auto                    plain = layer_plain_tensors(s, i, q);
    for (const auto& name : plain) {
        const tensor_entry* e = src.find(name);
        decls.push_back({name, e->info->type, e->info->shape});
    }
    for (const auto& [module, d] : q) {
        auto ds = gptq_linear_decls(module, d.n_out, d.n_in, d.n_groups, d.bits, !d.bias.empty());
        decls.insert(decls.end(), ds.begin(), ds.end());
    }
    GPTQ_ASSIGN_OR_RETURN(auto w, safetensors_writer::create(path_join(s.work, layer_file_name(i)), decls));
    for (const auto& name : plain) {
        const tensor_entry* e = src.find(name);
        GPTQ_TRY(w->write(name, e->file->bytes(*e->info), e->info->nbytes()));
    }
    for (const auto& [module, d] : q) GPTQ_TRY(gptq_linear_write(*w, module, d, s.cfg.format));
    GPTQ_TRY(w->finish());
    GPTQ_ASSIGN_OR_RETURN(std::string h, file_hash(path_join(s.work, layer_file_name(i))));
    s.layer_hashes.resize(static_cast<size_t>(i) + 1);
    s.layer_hashes[static_cast<size_t>(i)] = h;
    return status::ok();
}

// report_json: quantize_report_json of the report as it was when layer layers_done - 1 was done.
status write_state(const run_state& s, int64_t layers_done, const std::string& report_json) {
    const auto     n = std::min<size_t>(s.layer_hashes.size(), static_cast<size_t>(layers_done));
    nlohmann::json j = {{"version", k_state_version},
                        {"identity", s.identity},
                        {"layers_done", layers_done},
                        {"layer_hashes", std::vector<std::string>(s.layer_hashes.begin(), s.layer_hashes.begin() + n)},
                        {"report", nlohmann::json::parse(report_json)}};
    return file_write_atomic(path_join(s.work, "state.json"), j.dump(1));
}

// Replace layer i's linears by those stored in its work-folder file (resume).
status load_finished_layer(run_state& s, int64_t i, llama_layer* layer) {
    GPTQ_ASSIGN_OR_RETURN(auto src, tensor_source::open(path_join(s.work, layer_file_name(i))));
    const llama_hparams& hp = s.model->hparams();
    for (const auto& m : llama_linear_modules(hp, i)) {
        const linear_slot s0   = llama_linear_slot(hp, i, m.roles[0]);
        const int64_t     n_in = hp.linear_shape(m.roles[0])[1];
        const auto        mc   = s.cfg.for_module(m.module);
        if (!mc) return make_error(status_code::STATUS_INTERNAL, "{}: not quantized by the plan", m.module);
        GPTQ_ASSIGN_OR_RETURN(gptq_linear_data whole, gptq_linear_read(*src, m.module, s0.n_out_module, n_in, *mc));
        for (linear_role role : m.roles) {
            const int64_t          n_out = hp.linear_shape(role)[0];
            const gptq_linear_data d     = gptq_linear_rows(whole, llama_linear_slot(hp, i, role).row0, n_out);
            std::vector<float>     w(static_cast<size_t>(n_out * n_in));
            d.dequantize(w.data());
            GPTQ_TRY(layer->linear_replace(role, std::move(w)));
        }
    }
    for (const moe_linear& ml : llama_moe_linears(hp, i)) {
        linear_weights& l = layer->moe->expert(ml.expert).linear(ml.proj);
        GPTQ_ASSIGN_OR_RETURN(gptq_linear_data d, gptq_linear_read(*src, ml.module, l.n_out, l.n_in, s.cfg));
        l.w.resize(static_cast<size_t>(l.n_out * l.n_in));
        d.dequantize(l.w.data());
        l.q.reset();
    }
    return status::ok();
}

// --resume: the layers of the work folder that can be kept, and their report entries. Another
// model or other settings: an error naming what changed. A finished layer's file that is missing:
// it and the layers after it are redone; one that is damaged (does not open, or its bytes are not
// those written, by the hash in state.json): an error naming the file.
result<int64_t> resume_state_load(run_state& s, const nlohmann::json& identity) {
    auto state = json_read_file(path_join(s.work, "state.json"));
    if (!state.is_ok()) return int64_t(0);  // killed before the first layer: start over in it
    const nlohmann::json& st = *state;
    if (st.value("identity", nlohmann::json()) != identity)
        return make_error(E_ARG, "{}", resume_mismatch(s.work, st.value("identity", nlohmann::json()), identity));
    int64_t layers_done = st.value("layers_done", int64_t(0));
    if (st.contains("report"))
        for (const auto& l : st["report"]["linears"])
            s.report.linears.push_back({l["name"].get<std::string>(), l["n_out"].get<int64_t>(),
                                        l["n_in"].get<int64_t>(), l.value("bits", 0), l.value("group_size", 0),
                                        l["error_gptq"].get<double>(), l["error_rtn"].get<double>(),
                                        l["damp_percent"].get<double>(), l["seconds"].get<double>(),
                                        l.value("tokens", int64_t(-1)), l.value("coverage", std::string())});
    const auto hashes = st.value("layer_hashes", std::vector<std::string>());
    for (int64_t i = 0; i < layers_done; ++i) {
        const std::string file = path_join(s.work, layer_file_name(i));
        if (!fs::exists(file)) {
            GPTQ_LOG_WARN("--resume: {} is missing: layers {} to {} are redone", file, i, layers_done - 1);
            layers_done = i;
            break;
        }
        std::string why;
        if (auto f = safetensors_file::open(file); !f) {
            why = f.error().message();
        } else if (static_cast<size_t>(i) < hashes.size()) {
            GPTQ_ASSIGN_OR_RETURN(const std::string h, file_hash(file));
            if (h != hashes[static_cast<size_t>(i)])
                why = fmt::format("its bytes are not those written (hash {}, state.json says {})", h,
                                  hashes[static_cast<size_t>(i)]);
        }
        if (!why.empty())
            return make_error(E_ARG,
                              "--resume: {} is damaged: {}. Delete that file to redo layer {} and those after it, "
                              "or remove {} to start over",
                              file, why, i, s.work);
        s.layer_hashes.push_back(static_cast<size_t>(i) < hashes.size() ? hashes[static_cast<size_t>(i)] : "");
    }
    // Drop report entries of layers that will be redone.
    s.report.linears.erase(std::remove_if(s.report.linears.begin(), s.report.linears.end(),
                                          [&](const quantize_linear_report& l) {
                                              int64_t li = -1;
                                              std::sscanf(l.name.c_str(), "model.layers.%ld.", &li);
                                              return li >= layers_done;
                                          }),
                           s.report.linears.end());
    return layers_done;
}

// NaN/Inf in the checkpoint's tensors would end up in the output (norms are copied, GPTQ would
// spread them): refuse, naming the tensor (docs/reliability.md).
status check_tensors_finite(const tensor_source& src, const std::vector<tensor_spec>& specs) {
    for (const auto& t : specs)
        if (const tensor_entry* e = src.find(t.name)) GPTQ_TRY(e->file->check_finite(*e->info));
    return status::ok();
}

// One linear quantized: GPTQ against h, or round to nearest when h is null (--method rtn, an
// uncovered expert with --moe-coverage rtn); the report's errors filled (GPTQ only). Returns the
// checkpoint form and the dequantized weight, which the caller puts back into the layer.
// resident (with h, its content unused): the runner's kept H, W and codes (calibration.h) for
// role r; the dequantized weight is then left empty (linear_update_kept puts it on the device).
struct linear_quantized {
    gptq_linear_data   data;
    std::vector<float> wq;
};
// rtn_pre: the RTN baseline computed ahead (the reader thread), else computed here.
// cross (GPTAQ, --gptaq): the runner's cross term of the same input as h; the solve is then
// gptaq_quantize with --gptaq-alpha (the report's errors stay tr(D H D^T) against the weight).
result<linear_quantized> quantize_linear(run_state& s, const ops_context& ctx, const linear_weights& lw,
                                         const gptq_options& opt, const std::vector<float>* h,
                                         quantize_linear_report* rep, bool resident = false,
                                         std::optional<quantized_linear>* rtn_pre = nullptr,
                                         linear_role                      r       = linear_role::LINEAR_Q,
                                         const std::vector<float>*        cross   = nullptr) {
    const std::string& name = rep->name;
    GPTQ_TRY(gptq_check_packable(lw.n_in, lw.n_out, opt.bits, name));
    rep->n_out      = lw.n_out;
    rep->n_in       = lw.n_in;
    rep->bits       = opt.bits;
    rep->group_size = opt.group_size;
    std::optional<phase_timer> t_rtn(std::in_place, s, "rtn");
    result<quantized_linear>   rtn = rtn_pre && *rtn_pre ? result<quantized_linear>(std::move(**rtn_pre))
                                                         : rtn_quantize(ctx, lw.w.data(), lw.n_out, lw.n_in, opt);
    if (!rtn) return rtn.error().with_context(name);
    t_rtn.reset();
    linear_quantized out;
    quantized_linear q;
    if (h && resident) {
        gptq_stats                 st;
        std::optional<phase_timer> t_solve(std::in_place, s, "solve");
        auto                       g = s.calib->solve_kept(r, lw.w.data(), lw.n_out, lw.n_in, opt, &st);
        if (!g) return g.error().with_context(name);
        t_solve.reset();
        phase_timer t(s, "error");
        q                 = std::move(g).value();
        rep->damp_percent = st.damp_percent_used;
        add_solve_details(s.report, st);
        GPTQ_ASSIGN_OR_RETURN(rep->error_rtn, s.calib->weighted_error_kept(&*rtn));
        GPTQ_ASSIGN_OR_RETURN(rep->error_gptq, s.calib->weighted_error_kept(nullptr));
    } else if (h) {
        out.wq.resize(lw.w.size());
        gptq_stats                 st;
        std::optional<phase_timer> t_solve(std::in_place, s, "solve");
        gptq_options               o = opt;
        o.gptaq                      = cross != nullptr;
        o.gptaq_alpha                = s.p.gptaq_alpha;
        auto g                       = cross ? s.calib->solve_gptaq(lw.w.data(), lw.n_out, lw.n_in, *h, *cross, o, &st)
                                             : s.calib->solve(lw.w.data(), lw.n_out, lw.n_in, *h, opt, &st);
        if (!g) return g.error().with_context(name);
        t_solve.reset();
        phase_timer t(s, "error");
        q                 = std::move(g).value();
        rep->damp_percent = st.damp_percent_used;
        add_solve_details(s.report, st);
        std::vector<float> wr(lw.w.size());
        quantized_linear_dequantize(ctx, *rtn, wr.data());
        quantized_linear_dequantize(ctx, q, out.wq.data());
        GPTQ_ASSIGN_OR_RETURN(rep->error_rtn, s.calib->weighted_error(lw.w.data(), wr.data(), lw.n_out, lw.n_in, *h));
        GPTQ_ASSIGN_OR_RETURN(rep->error_gptq,
                              s.calib->weighted_error(lw.w.data(), out.wq.data(), lw.n_out, lw.n_in, *h));
    } else {
        out.wq.resize(lw.w.size());
        q = std::move(rtn).value();
        quantized_linear_dequantize(q, out.wq.data());
    }
    phase_timer t(s, "write");
    out.data = to_checkpoint_form(std::move(q), lw);
    return out;
}

// The experts of MoE layer i that calibration routed fewer than the threshold tokens to, by
// --moe-coverage: route-all / rtn go on (logged), fail is an error naming them. Returns, per
// expert, whether it is under the threshold.
result<std::vector<bool>> moe_coverage_check(const run_state& s, int64_t i, const std::vector<int64_t>& counts) {
    const llama_hparams& hp  = s.model->hparams();
    const int64_t        min = s.p.moe_min_tokens >= 0 ? s.p.moe_min_tokens : 2 * hp.n_embd / 16;
    std::vector<bool>    under(counts.size(), false);
    std::string          list;
    int64_t              n_under = 0;
    for (size_t e = 0; e < counts.size(); ++e)
        if (counts[e] < min) {
            under[e] = true;
            if (n_under++ < 16) list += fmt::format("{}{} ({})", list.empty() ? "" : ", ", e, counts[e]);
        }
    if (n_under > 16) list += fmt::format(" and {} more", n_under - 16);
    const auto [lo, hi] = std::minmax_element(counts.begin(), counts.end());
    GPTQ_LOG_INFO("layer {}: calibration tokens per expert: min {}, max {} of {} x top-{}; {} of {} experts under {}",
                  i, *lo, *hi, s.report.n_calib_tokens, hp.n_expert_used, n_under, counts.size(), min);
    if (n_under == 0) return under;
    if (s.p.moe_coverage == "fail")
        return make_error(E_ARG,
                          "experts {} (calibration tokens routed to each) saw fewer than {} (--moe-min-tokens); "
                          "--moe-coverage fail stops here: use --moe-coverage route-all or rtn, more calibration "
                          "(--nsamples, --seqlen), or a lower --moe-min-tokens",
                          list, min);
    if (s.p.moe_coverage == "rtn")
        GPTQ_LOG_WARN(
            "layer {}: experts {} (calibration tokens routed to each) saw fewer than {}: round to nearest for them "
            "(--moe-coverage rtn)",
            i, list, min);
    else
        GPTQ_LOG_INFO(
            "layer {}: experts {} (calibration tokens routed to each) saw fewer than {}: their Hessians from every "
            "calibration token (--moe-coverage route-all)",
            i, list, min);
    return under;
}

// The sparse block of MoE layer i (docs/quantize.md "Mixture of experts"): the experts' and shared
// expert's gate/up from the Hessians of the tokens routed to each (one pass with the real
// routing), then their down from a second pass over the quantized gate/up. The router and the
// shared expert's gate stay unquantized (as GPTQModel). With --method rtn every expert is RTN.
status quantize_moe(run_state& s, const ops_context& ctx, int64_t i, llama_layer* layer,
                    std::vector<std::pair<std::string, gptq_linear_data>>* out) {
    const llama_hparams& hp   = s.model->hparams();
    const bool           gptq = s.p.method == "gptq";
    std::vector<int64_t> counts(static_cast<size_t>(hp.n_expert), -1);
    std::vector<bool>    under(static_cast<size_t>(hp.n_expert), false);
    if (gptq) {
        phase_timer t(s, "calibration");
        GPTQ_TRY(s.calib->moe_hessians_collect(*layer, linear_input::LINEAR_INPUT_GATE_UP, under));
        counts = s.calib->moe_token_counts();
    }
    if (gptq) {
        GPTQ_ASSIGN_OR_RETURN(under, moe_coverage_check(s, i, counts));
    }
    const bool route_all = s.p.moe_coverage == "route-all";
    auto       pass      = [&](std::initializer_list<moe_proj> projs) -> status {
        const linear_input in =
            *projs.begin() == moe_proj::MOE_DOWN ? linear_input::LINEAR_INPUT_DOWN : linear_input::LINEAR_INPUT_GATE_UP;
        if (gptq && in == linear_input::LINEAR_INPUT_DOWN) {
            phase_timer t(s, "calibration");
            GPTQ_TRY(s.calib->moe_hessians_collect(*layer, in, route_all ? under : std::vector<bool>(under.size())));
        }
        for (const moe_linear& ml : llama_moe_linears(hp, i)) {
            if (std::find(projs.begin(), projs.end(), ml.proj) == projs.end()) continue;
            const bool             shared   = ml.expert == k_moe_shared;
            const bool             is_under = !shared && under[static_cast<size_t>(ml.expert)];
            quantize_linear_report rep;
            rep.name     = ml.module;
            rep.tokens   = shared ? s.report.n_calib_tokens : counts[static_cast<size_t>(ml.expert)];
            rep.coverage = !gptq ? "" : shared ? "all" : !is_under ? "routed" : route_all ? "route-all" : "rtn";
            const auto         t0 = clock::now();
            std::vector<float> h;
            const bool         use_h = gptq && !(is_under && !route_all);
            if (use_h) {
                phase_timer t(s, "hessian");
                GPTQ_ASSIGN_OR_RETURN(h, s.calib->moe_hessian(in, ml.expert, is_under && route_all));
            }
            linear_weights& lw = layer->moe->expert(ml.expert).linear(ml.proj);
            GPTQ_ASSIGN_OR_RETURN(linear_quantized q,
                                             quantize_linear(s, ctx, lw, options_for(s, ml.module), use_h ? &h : nullptr, &rep));
            out->emplace_back(ml.module, std::move(q.data));
            {
                phase_timer t(s, "update");  // the next pass and the layer's output see the quantized expert
                lw.w = std::move(q.wq);
                lw.q.reset();
            }
            rep.seconds = seconds_since(t0);
            s.report.linears.push_back(rep);
        }
        return status::ok();
    };
    GPTQ_TRY(pass({moe_proj::MOE_GATE, moe_proj::MOE_UP}));
    return pass({moe_proj::MOE_DOWN});
}

// A layer as read from the checkpoint, by the layer loop or ahead of it by the reader thread
// (docs/quantize.md "Overlap"), which also checks its tensors and computes its linears' RTN
// baselines (checked / rtn); seconds: the read's own time.
struct layer_read {
    std::unique_ptr<llama_layer>                 layer;
    bool                                         checked = false;
    std::vector<std::optional<quantized_linear>> rtn;  // [k_n_linear_roles] or empty
    // For the GPU runner: the dense linears' weights as F16 when every value is in range and
    // widens back exactly (calibration_runner::layer_begin_f16); [k_n_linear_roles] or empty.
    std::vector<std::vector<uint16_t>> w16;
    double                             seconds = 0.0;
};

// w as F16 on the pool when every value is in the F16 range and widens back bit for bit (an F16
// checkpoint), else empty (the runner then converts, with its own errors).
std::vector<uint16_t> exact_f16(const std::vector<float>& w, thread_pool* pool) {
    std::vector<uint16_t> h(w.size());
    std::atomic<bool>     lossy{false};
    auto                  convert = [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1 && !lossy.load(std::memory_order_relaxed); ++i) {
            const float v = w[size_t(i)];
            h[size_t(i)]  = f32_to_f16(v);
            if (!(std::fabs(v) <= 65504.0f) ||
                std::bit_cast<uint32_t>(f16_to_f32(h[size_t(i)])) != std::bit_cast<uint32_t>(v))
                lossy = true;
        }
    };
    const int64_t n = static_cast<int64_t>(w.size());
    if (pool && n >= (int64_t(1) << 16))
        pool->parallel_for(n, convert);
    else
        convert(0, n);
    if (lossy) return {};
    return h;
}

// Read layer i on `pool`; ahead: also checked and, for a layer still to quantize (dense linears),
// its RTN baselines, and with f16 the linears' exact F16 copies. The errors are those the layer
// loop gives without it.
result<layer_read> read_layer(const run_state& s, int64_t i, thread_pool* pool, bool ahead, bool to_quantize,
                              bool f16 = false) {
    const auto  t0 = clock::now();
    const auto& hp = s.model->hparams();
    layer_read  rd;
    GPTQ_ASSIGN_OR_RETURN(rd.layer, s.model->layer_load(i, pool));
    if (ahead && to_quantize) {
        GPTQ_TRY(check_tensors_finite(s.model->source(), llama_layer_tensors(hp, i))
                     .with_context(fmt::format("layer {}", i)));
        rd.checked = true;
        const ops_context rctx{pool, false};
        rd.rtn.resize(k_n_linear_roles);
        for (int k = 0; k < k_n_linear_roles; ++k) {
            const auto r = static_cast<linear_role>(k);
            if (hp.is_moe(i) && k > static_cast<int>(linear_role::LINEAR_O)) continue;  // quantize_moe's
            const linear_weights& lw  = rd.layer->linear(r);
            const gptq_options    opt = options_for(s, module_of(hp, i, r));
            if (!gptq_check_packable(lw.n_in, lw.n_out, opt.bits, "").is_ok()) continue;  // quantize_linear says
            auto q = rtn_quantize(rctx, lw.w.data(), lw.n_out, lw.n_in, opt);
            if (q) rd.rtn[size_t(k)] = std::move(q).value();  // an error: quantize_linear gives it again
        }
        if (f16) {
            rd.w16.resize(k_n_linear_roles);
            for (int k = 0; k < k_n_linear_roles; ++k)
                if (!rd.layer->linear(static_cast<linear_role>(k)).w.empty())
                    rd.w16[size_t(k)] = exact_f16(rd.layer->linear(static_cast<linear_role>(k)).w, pool);
        }
    }
    rd.seconds = seconds_since(t0);
    return rd;
}

// Layer i's quantized linears: by role (dense) and by module (a MoE block's), for write_layer.
struct layer_quantized {
    std::vector<std::pair<linear_role, gptq_linear_data>> by_role;
    std::vector<std::pair<std::string, gptq_linear_data>> moe;
};

// uploaded (may be empty): called once the layer is on the calibration runner's device (at once
// without one), the moment the reader thread may start on the next layer without competing with
// the upload for the host's cores and memory bandwidth.
result<layer_quantized> quantize_layer(run_state& s, const ops_context& ctx, int64_t i, layer_read& rd,
                                       const std::function<void()>& uploaded) {
    const auto&  hp    = s.model->hparams();
    llama_layer* layer = rd.layer.get();
    if (!rd.checked) {
        phase_timer t(s, "check");
        GPTQ_TRY(check_tensors_finite(s.model->source(), llama_layer_tensors(hp, i)));
    }
    std::vector<std::pair<linear_role, gptq_linear_data>> out;
    const bool                                            gptq     = s.p.method == "gptq";
    const bool                                            resident = gptq && s.calib->resident();
    if (gptq) {
        phase_timer t(s, "upload");
        if (s.calib->two_streams()) GPTQ_TRY(s.calib->layer_begin_fp(*layer));  // GPTAQ: before any replace
        if (rd.w16.empty()) {
            GPTQ_TRY(s.calib->layer_begin(*layer));
        } else {
            GPTQ_TRY(s.calib->layer_begin_f16(*layer, rd.w16));
            std::vector<std::vector<uint16_t>>().swap(rd.w16);  // uploaded
        }
    }
    if (uploaded) uploaded();
    for (auto group : quant_groups(s.p.true_sequential)) {
        if (hp.is_moe(i))  // the sparse block replaces the MLP's linears: quantize_moe below
            group.erase(std::remove_if(group.begin(), group.end(),
                                       [](linear_role r) {
                                           return static_cast<int>(r) > static_cast<int>(linear_role::LINEAR_O);
                                       }),
                        group.end());
        if (group.empty()) continue;
        if (gptq) {  // Hessians of the distinct inputs this group reads
            phase_timer t(s, "calibration");
            GPTQ_TRY(s.calib->hessians_collect(*layer, group));
        }
        for (linear_role r : group) {
            const auto             t0 = clock::now();
            quantize_linear_report rep;
            rep.name = llama_linear_name(i, r);
            std::vector<float> h, cross;
            if (gptq) {
                phase_timer t(s, "hessian");
                if (resident) {
                    GPTQ_TRY(s.calib->hessian_keep(linear_role_input(r)));
                } else {
                    GPTQ_ASSIGN_OR_RETURN(h, s.calib->hessian(linear_role_input(r)));
                }
                if (s.calib->two_streams()) {
                    GPTQ_ASSIGN_OR_RETURN(cross, s.calib->cross_term(linear_role_input(r)));
                }
            }
            GPTQ_ASSIGN_OR_RETURN(
                linear_quantized q,
                quantize_linear(s, ctx, layer->linear(r), options_for(s, module_of(hp, i, r)), gptq ? &h : nullptr,
                                &rep, resident, rd.rtn.empty() ? nullptr : &rd.rtn[size_t(r)], r,
                                cross.empty() ? nullptr : &cross));
            out.emplace_back(r, std::move(q.data));
            {
                phase_timer t(s, "update");
                // Later groups see the quantized layer. Resident: on the device only; the host layer
                // keeps the original weight, which nothing reads after this (the runner's passes use
                // its own copy, a MoE block its own linears).
                if (resident) {
                    GPTQ_TRY(s.calib->linear_update_kept(r));
                } else {
                    if (gptq) GPTQ_TRY(s.calib->linear_update(r, q.wq));
                    GPTQ_TRY(layer->linear_replace(r, std::move(q.wq)));
                }
            }
            rep.seconds = seconds_since(t0);
            GPTQ_LOG_DEBUG("{}: error gptq {:.6g} rtn {:.6g} ({:.2f} s)", rep.name, rep.error_gptq, rep.error_rtn,
                           rep.seconds);
            s.report.linears.push_back(rep);
        }
    }
    layer_quantized lq;
    if (hp.is_moe(i)) GPTQ_TRY(quantize_moe(s, ctx, i, layer, &lq.moe));
    std::sort(out.begin(), out.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
    lq.by_role = std::move(out);
    return lq;
}

// --target-bpw candidates of a module [n_out, n_in]: bits {2, 3, 4, 8} x the group sizes
// (--group-size, --bpw-group-sizes) that divide n_in, where the shape can be packed.
std::vector<std::pair<int, int>> bit_candidates(const quantize_params& p, int64_t n_out, int64_t n_in) {
    std::vector<int> groups = {p.group_size};
    for (int g : p.bpw_group_sizes)
        if (std::find(groups.begin(), groups.end(), g) == groups.end()) groups.push_back(g);
    std::vector<std::pair<int, int>> out;
    for (int b : {2, 3, 4, 8}) {
        if (!gptq_check_packable(n_in, n_out, b, "").is_ok()) continue;
        for (int g : groups)
            if (g == -1 || (g > 0 && g <= n_in && n_in % g == 0)) out.emplace_back(b, g);
    }
    return out;
}

// GPTQ's Hessian-weighted error at every candidate for one linear (h: the runner's last
// hessian()), added to errs, and the output's own energy tr(W H W^T) added to signal (a fused
// module sums its parts).
status candidate_errors(calibration_runner& run, const ops_context& ctx, const gptq_options& base,
                        const std::vector<float>& w, int64_t n_out, int64_t n_in, const std::vector<float>& h,
                        const std::vector<std::pair<int, int>>& cands, std::vector<double>* errs, double* signal) {
    std::vector<float> wq(w.size(), 0.0f);
    GPTQ_ASSIGN_OR_RETURN(const double e0, run.weighted_error(w.data(), wq.data(), n_out, n_in, h));
    *signal += e0;
    for (size_t c = 0; c < cands.size(); ++c) {
        gptq_options o = base;
        o.bits         = cands[c].first;
        o.group_size   = cands[c].second;
        gptq_stats st;
        auto       q = run.solve(w.data(), n_out, n_in, h, o, &st);
        if (!q) return q.error();
        quantized_linear_dequantize(ctx, *q, wq.data());
        GPTQ_ASSIGN_OR_RETURN(const double e, run.weighted_error(w.data(), wq.data(), n_out, n_in, h));
        (*errs)[c] += e;
    }
    return status::ok();
}

// The module's choices with their absolute errors. Measured on tiny-llama (docs/quantize.md), the
// relative error (error / signal, as ExLlamaV2's per-layer measure) gave worse plans: 159.8 vs
// 158.0 ppl at 4.0 bpw; signal is kept in the plan for the report.
bit_plan_module plan_module(const std::string& module, int64_t n_out, int64_t n_in,
                            const std::vector<std::pair<int, int>>& cands, const std::vector<double>& errs,
                            double signal) {
    bit_plan_module pm;
    pm.module = module;
    pm.n_out  = n_out;
    pm.n_in   = n_in;
    for (size_t c = 0; c < cands.size(); ++c)
        pm.choices.push_back({cands[c].first, cands[c].second,
                              gptq_module_bytes(n_out, n_in, cands[c].first, cands[c].second), errs[c], errs[c]});
    pm.signal = signal;
    return pm;
}

// The unit of the plan a layer's module belongs to (bit_plan_module): q/k/v (separate, or
// Phi-3's fused qkv_proj) -> "<layer>.self_attn.qkv_proj", gate/up -> "<layer>.mlp.gate_up_proj",
// as vLLM names its fused linears; any other module is its own unit.
std::string plan_unit_of(const linear_module& m) {
    auto in = [&](std::initializer_list<linear_role> set) {
        for (linear_role r : m.roles)
            if (std::find(set.begin(), set.end(), r) == set.end()) return false;
        return true;
    };
    const std::string parent = m.module.substr(0, m.module.rfind('.'));
    using R                  = linear_role;
    if (in({R::LINEAR_Q, R::LINEAR_K, R::LINEAR_V})) return parent + ".qkv_proj";
    if (in({R::LINEAR_GATE, R::LINEAR_UP})) return parent + ".gate_up_proj";
    return m.module;
}

// Joins the plan modules of one unit: the candidates all members have, their errors, bytes
// (each member's tensors, g_idx included), output rows and signal summed.
bit_plan_module plan_unit(const std::string& unit, const std::vector<bit_plan_module>& parts) {
    if (parts.size() == 1 && parts[0].module == unit) return parts[0];
    bit_plan_module u;
    u.module = unit;
    u.n_in   = parts[0].n_in;
    for (const auto& p : parts) {
        u.members.push_back(p.module);
        u.n_out += p.n_out;
        u.signal += p.signal;
    }
    for (const bit_choice& c : parts[0].choices) {
        bit_choice sum{c.bits, c.group_size, 0, 0.0, 0.0};
        bool       everywhere = true;
        for (const auto& p : parts) {
            auto it = std::find_if(p.choices.begin(), p.choices.end(), [&](const bit_choice& o) {
                return o.bits == c.bits && o.group_size == c.group_size;
            });
            if (it == p.choices.end()) {
                everywhere = false;
                break;
            }
            sum.bytes += it->bytes;
            sum.error += it->error;
            sum.hessian_error += it->hessian_error;
        }
        if (everywhere) u.choices.push_back(sum);
    }
    return u;
}

// The sensitivity pass of --target-bpw, on its own runner: the unquantized model over the
// calibration windows, each layer's Hessians from one pass (the inputs of the FP16 model, not of
// the partly quantized one: a proxy), and GPTQ's error at every candidate of every module, the
// modules then joined into the plan's units (plan_unit_of).
result<std::vector<bit_plan_module>> measure_sensitivity(run_state& s, const ops_context& ctx, thread_pool* pool,
                                                         calibration_runner& run) {
    const llama_hparams&         hp = s.model->hparams();
    std::vector<bit_plan_module> mods;
    std::vector<linear_role>     all;
    for (int r = 0; r < k_n_linear_roles; ++r) all.push_back(static_cast<linear_role>(r));
    progress_bar bar("sensitivity", hp.n_layer, "layer");
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        GPTQ_ASSIGN_OR_RETURN(auto layer, s.model->layer_load(i, pool));
        GPTQ_TRY(run.layer_begin(*layer));
        GPTQ_TRY(run.hessians_collect(*layer, all));
        std::vector<std::pair<std::string, std::vector<bit_plan_module>>> units;  // in module order
        for (const auto& m : llama_linear_modules(hp, i)) {
            const int64_t       n_in  = hp.linear_shape(m.roles[0])[1];
            const int64_t       n_out = llama_linear_slot(hp, i, m.roles[0]).n_out_module;
            const auto          cands = bit_candidates(s.p, n_out, n_in);
            std::vector<double> errs(cands.size(), 0.0);
            double              signal = 0.0;
            for (linear_role r : m.roles) {
                const linear_weights& lw = layer->linear(r);
                GPTQ_ASSIGN_OR_RETURN(const std::vector<float> h, run.hessian(linear_role_input(r)));
                GPTQ_TRY(candidate_errors(run, ctx, s.opt, lw.w, lw.n_out, lw.n_in, h, cands, &errs, &signal)
                             .with_context(llama_linear_name(i, r)));
            }
            const std::string unit = plan_unit_of(m);
            if (units.empty() || units.back().first != unit) units.push_back({unit, {}});
            units.back().second.push_back(plan_module(m.module, n_out, n_in, cands, errs, signal));
        }
        for (const auto& [unit, parts] : units) mods.push_back(plan_unit(unit, parts));
        GPTQ_TRY(run.layer_forward(*layer));
        bar.update(1);
    }
    bar.finish();
    if (s.p.quantize_lm_head) {
        const int64_t n_out = hp.n_vocab, n_in = hp.n_embd;
        GPTQ_TRY(s.model->globals_load());
        GPTQ_ASSIGN_OR_RETURN(const std::vector<float> w, s.model->lm_head_dense_weight());
        GPTQ_ASSIGN_OR_RETURN(const std::vector<float> h, run.final_norm_hessian());
        const auto          cands = bit_candidates(s.p, n_out, n_in);
        std::vector<double> errs(cands.size(), 0.0);
        double              signal = 0.0;
        GPTQ_TRY(candidate_errors(run, ctx, s.opt, w, n_out, n_in, h, cands, &errs, &signal).with_context("lm_head"));
        mods.push_back(plan_module("lm_head", n_out, n_in, cands, errs, signal));
    }
    return mods;
}

// GPTQ of w [n_out, n_in] at (bits, group) on the Hessian h (the runner's last hessian()), dequantized;
// its Hessian-weighted error added to *err.
result<std::vector<float>> candidate_weight(calibration_runner& run, const ops_context& ctx, const gptq_options& base,
                                            const std::vector<float>& w, int64_t n_out, int64_t n_in,
                                            const std::vector<float>& h, std::pair<int, int> cand, double* err) {
    gptq_options o = base;
    o.bits         = cand.first;
    o.group_size   = cand.second;
    gptq_stats st;
    GPTQ_ASSIGN_OR_RETURN(const quantized_linear q, run.solve(w.data(), n_out, n_in, h, o, &st));
    std::vector<float> wq(w.size());
    quantized_linear_dequantize(ctx, q, wq.data());
    GPTQ_ASSIGN_OR_RETURN(const double e, run.weighted_error(w.data(), wq.data(), n_out, n_in, h));
    *err += e;
    return wq;
}

// The candidates every module of a unit has, in the first one's order.
std::vector<std::pair<int, int>> unit_candidates(const quantize_params& p, const llama_hparams& hp, int64_t i,
                                                 const std::vector<linear_module>& members) {
    std::vector<std::pair<int, int>> out;
    for (size_t a = 0; a < members.size(); ++a) {
        const int64_t n_in  = hp.linear_shape(members[a].roles[0])[1];
        const int64_t n_out = llama_linear_slot(hp, i, members[a].roles[0]).n_out_module;
        const auto    c     = bit_candidates(p, n_out, n_in);
        if (a == 0) {
            out = c;
            continue;
        }
        std::erase_if(out, [&](const auto& x) { return std::find(c.begin(), c.end(), x) == c.end(); });
    }
    return out;
}

// One unit of layer i for --bpw-sensitivity output: per candidate, GPTQ of every member on its
// unquantized inputs' Hessian (the runner's; its Hessian-weighted error kept for the report), the
// unit replaced by the results and the windows run from this layer to the logits (output_sensitivity):
// the unit's error at that candidate is the output's KL.
result<bit_plan_module> unit_output_errors(run_state& s, const ops_context& ctx, calibration_runner& run,
                                           output_sensitivity& out, llama_layer& layer, const std::string& unit,
                                           const std::vector<linear_module>& members) {
    const llama_hparams&             hp    = s.model->hparams();
    const int64_t                    i     = layer.index;
    const auto                       cands = unit_candidates(s.p, hp, i, members);
    std::vector<std::vector<double>> herr(members.size(), std::vector<double>(cands.size(), 0.0));
    std::vector<double>              signal(members.size(), 0.0);
    for (size_t a = 0; a < members.size(); ++a)
        for (linear_role r : members[a].roles) {
            const linear_weights& lw = layer.linear(r);
            GPTQ_ASSIGN_OR_RETURN(const std::vector<float> h, run.hessian(linear_role_input(r)));
            std::vector<float> zero(lw.w.size(), 0.0f);
            GPTQ_ASSIGN_OR_RETURN(const double e0, run.weighted_error(lw.w.data(), zero.data(), lw.n_out, lw.n_in, h));
            signal[a] += e0;
        }
    auto make = [&](size_t k) -> result<layer_variant> {
        layer_variant v;
        for (size_t a = 0; a < members.size(); ++a)
            for (linear_role r : members[a].roles) {
                const linear_weights& lw = layer.linear(r);
                GPTQ_ASSIGN_OR_RETURN(const std::vector<float> h, run.hessian(linear_role_input(r)));
                auto wq = candidate_weight(run, ctx, s.opt, lw.w, lw.n_out, lw.n_in, h, cands[k], &herr[a][k]);
                if (!wq) return wq.error().with_context(llama_linear_name(i, r));
                v.emplace_back(r, std::move(*wq));
            }
        return v;
    };
    GPTQ_ASSIGN_OR_RETURN(const std::vector<double> kl, out.layer_variants(layer, cands.size(), make));
    std::vector<bit_plan_module> parts;
    for (size_t a = 0; a < members.size(); ++a)
        parts.push_back(plan_module(members[a].module, llama_linear_slot(hp, i, members[a].roles[0]).n_out_module,
                                    hp.linear_shape(members[a].roles[0])[1], cands, herr[a], signal[a]));
    bit_plan_module u = plan_unit(unit, parts);  // every part has exactly `cands`, in that order
    for (size_t k = 0; k < cands.size(); ++k) u.choices[k].error = kl[k];
    return u;
}

// --bpw-sensitivity output: the sensitivity pass of measure_sensitivity with each unit's errors the
// output's KL (unit_output_errors); out advances with the runner, layer by layer, on the
// unquantized model. lm_head (--quantize-lm-head) is one more unit, measured on the final states.
result<std::vector<bit_plan_module>> measure_sensitivity_output(run_state& s, const ops_context& ctx, thread_pool* pool,
                                                                calibration_runner& run, output_sensitivity& out) {
    const llama_hparams&         hp = s.model->hparams();
    std::vector<bit_plan_module> mods;
    std::vector<linear_role>     all;
    for (int r = 0; r < k_n_linear_roles; ++r) all.push_back(static_cast<linear_role>(r));
    progress_bar bar("sensitivity", hp.n_layer, "layer");
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        GPTQ_ASSIGN_OR_RETURN(auto layer, s.model->layer_load(i, pool));
        GPTQ_TRY(run.layer_begin(*layer));
        GPTQ_TRY(run.hessians_collect(*layer, all));
        std::vector<std::pair<std::string, std::vector<linear_module>>> units;  // in module order
        for (const auto& m : llama_linear_modules(hp, i)) {
            const std::string unit = plan_unit_of(m);
            if (units.empty() || units.back().first != unit) units.push_back({unit, {}});
            units.back().second.push_back(m);
        }
        for (const auto& [unit, members] : units) {
            GPTQ_ASSIGN_OR_RETURN(bit_plan_module u, unit_output_errors(s, ctx, run, out, *layer, unit, members));
            mods.push_back(std::move(u));
        }
        GPTQ_TRY(run.layer_forward(*layer));
        GPTQ_TRY(out.advance(*layer));
        bar.update(1);
    }
    bar.finish();
    if (s.p.quantize_lm_head) {
        const int64_t n_out = hp.n_vocab, n_in = hp.n_embd;
        GPTQ_TRY(s.model->globals_load());
        GPTQ_ASSIGN_OR_RETURN(const std::vector<float> w, s.model->lm_head_dense_weight());
        GPTQ_ASSIGN_OR_RETURN(const std::vector<float> h, run.final_norm_hessian());
        const auto          cands = bit_candidates(s.p, n_out, n_in);
        std::vector<double> herr(cands.size(), 0.0), kl(cands.size(), 0.0);
        std::vector<float>  zero(w.size(), 0.0f);
        GPTQ_ASSIGN_OR_RETURN(const double signal, run.weighted_error(w.data(), zero.data(), n_out, n_in, h));
        for (size_t k = 0; k < cands.size(); ++k) {
            auto wq = candidate_weight(run, ctx, s.opt, w, n_out, n_in, h, cands[k], &herr[k]);
            if (!wq) return wq.error().with_context("lm_head");
            GPTQ_ASSIGN_OR_RETURN(kl[k], out.lm_head_variant(*wq));
        }
        bit_plan_module pm = plan_module("lm_head", n_out, n_in, cands, herr, signal);
        for (size_t k = 0; k < cands.size(); ++k) pm.choices[k].error = kl[k];
        mods.push_back(std::move(pm));
    }
    return mods;
}

// "model.layers.0.mlp.down_proj" -> "^model\.layers\.0\.mlp\.down_proj$" (module names hold
// letters, digits, '_' and '.'; anything else is escaped too).
std::string regex_exact(const std::string& name) {
    std::string out = "^";
    for (char c : name) {
        if (!std::isalnum(static_cast<unsigned char>(c)) && c != '_') out += '\\';
        out += c;
    }
    return out + "$";
}

// The `dynamic` key of a unit: its module alone, or its members and the fused name vLLM gives
// them: "^model\.layers\.0\.self_attn\.(?:q_proj|k_proj|v_proj|qkv_proj)$" (GPTQModel and our
// loader match the members, vLLM the fused module).
std::string unit_rule(const bit_plan_module& m) {
    if (m.members.empty()) return "+:" + regex_exact(m.module);
    const auto  cut    = m.module.rfind('.');  // the members share the unit's parent (plan_unit_of)
    std::string parent = regex_exact(m.module.substr(0, cut));
    parent.pop_back();  // "^model\.layers\.0\.self_attn"
    std::vector<std::string> leaves;
    for (const auto& name : m.members) leaves.push_back(name.substr(name.rfind('.') + 1));
    leaves.push_back(m.module.substr(cut + 1));
    std::string alt;
    for (const auto& leaf : leaves) {
        const std::string e = regex_exact(leaf);  // "^leaf$"
        alt += (alt.empty() ? "" : "|") + e.substr(1, e.size() - 2);
    }
    return "+:" + parent + "\\.(?:" + alt + ")$";
}

// s.cfg gets `dynamic` from the plan (a "+:" rule of bits and group size for each unit whose
// choice is not the base --bits / --group-size; the rules never overlap).
status bit_plan_config(run_state& s, const nlohmann::json& dynamic) {
    nlohmann::json cj = s.cfg.to_json();
    for (const auto& [key, rule] : dynamic.items()) cj["dynamic"][key] = rule;  // beside --quantize-embeddings' rule
    GPTQ_ASSIGN_OR_RETURN(gptq_config c, gptq_config_parse(cj, "--target-bpw plan"));
    s.cfg = std::move(c);
    return status::ok();
}

// The plan as JSON (plan.json, the report) and its rules; printed one module a line.
nlohmann::json bit_plan_describe(const run_state& s, const std::vector<bit_plan_module>& mods, const bit_plan& plan) {
    nlohmann::ordered_json pj, list = nlohmann::ordered_json::array();
    nlohmann::json         dynamic = nlohmann::json::object();
    for (size_t m = 0; m < mods.size(); ++m) {
        const bit_choice&      c     = mods[m].choices[plan.pick[m]];
        nlohmann::ordered_json cands = nlohmann::ordered_json::array();
        std::string            alt;
        for (const auto& o : mods[m].choices) {
            cands.push_back({{"bits", o.bits},
                             {"group_size", o.group_size},
                             {"bytes", o.bytes},
                             {"error", o.error},
                             {"error_hessian", o.hessian_error}});
            alt += fmt::format("{}{}b/g{} {:.3g}", alt.empty() ? "" : ", ", o.bits, o.group_size, o.error);
        }
        nlohmann::ordered_json members = nlohmann::ordered_json::array();
        for (const auto& name : mods[m].members) members.push_back(name);
        list.push_back({{"module", mods[m].module},
                        {"members", members},
                        {"n_out", mods[m].n_out},
                        {"n_in", mods[m].n_in},
                        {"bits", c.bits},
                        {"group_size", c.group_size},
                        {"bytes", c.bytes},
                        {"error", c.error},
                        {"signal", mods[m].signal},
                        {"candidates", cands}});
        if (c.bits != s.p.bits || c.group_size != s.p.group_size)
            dynamic[unit_rule(mods[m])] = {{"bits", c.bits}, {"group_size", c.group_size}};
        GPTQ_LOG_INFO("plan: {} {}-bit g{} ({} bytes, error {:.4g}; measured: {})", mods[m].module, c.bits,
                      c.group_size, c.bytes, c.error, alt);
    }
    pj["target_bpw"]      = s.p.target_bpw;
    pj["bpw_sensitivity"] = s.p.bpw_sensitivity;
    if (s.p.bpw_sensitivity == "output") pj["bpw_windows"] = std::min(s.p.bpw_windows, s.n_samples);
    pj["budget_bytes"] = plan.budget_bytes;
    pj["bytes"]        = plan.bytes;
    pj["n_weights"]    = plan.n_weights;
    pj["bpw"]          = plan.bpw();
    pj["error"]        = plan.error;
    pj["modules"]      = list;
    pj["dynamic"]      = nlohmann::ordered_json::parse(dynamic.dump());
    return nlohmann::json::parse(pj.dump());
}

// --bpw-measured FILE: the units and their candidates' errors of an earlier run's plan (its
// plan.json, or a --report JSON's bit_plan), so that other targets are planned without measuring
// again. The error the plan minimises is this run's --bpw-sensitivity: "error" of a plan measured
// with it, or "error_hessian" of an output plan for hessian. Every unit must be this run's (the
// same modules, candidates and bytes: the same model, --group-size, --bpw-group-sizes and
// --quantize-lm-head), else an error naming the first difference.
result<std::vector<bit_plan_module>> bit_plan_measured_read(const run_state& s) {
    const std::string& path = s.p.bpw_measured;
    GPTQ_ASSIGN_OR_RETURN(nlohmann::json j, json_read_file(path));
    if (j.contains("bit_plan")) j = j["bit_plan"];
    if (!j.is_object() || !j.contains("modules") || !j["modules"].is_array())
        return make_error(E_ARG, "--bpw-measured {}: no plan in it (plan.json, or a --report JSON with bit_plan)",
                          path);
    const std::string was = j.value("bpw_sensitivity", std::string("hessian"));
    if (s.p.bpw_sensitivity == "output" && was != "output")
        return make_error(E_ARG,
                          "--bpw-measured {}: measured with --bpw-sensitivity {}, which holds no output errors; "
                          "use --bpw-sensitivity {} or measure again",
                          path, was, was);
    if (s.p.bpw_sensitivity == "output" && j.value("bpw_windows", int64_t(0)) != std::min(s.p.bpw_windows, s.n_samples))
        return make_error(E_ARG, "--bpw-measured {}: measured on {} windows, this run asks for --bpw-windows {}", path,
                          j.value("bpw_windows", int64_t(0)), std::min(s.p.bpw_windows, s.n_samples));
    const char* key = s.p.bpw_sensitivity == "hessian" && was == "output" ? "error_hessian" : "error";
    // This run's units: names, members' shapes, candidates.
    const llama_hparams& hp = s.model->hparams();
    struct unit_shape {
        std::string                              name;
        std::vector<std::pair<int64_t, int64_t>> shapes;  // (n_out, n_in) of each member
        std::vector<std::pair<int, int>>         cands;
    };
    std::vector<unit_shape> units;
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        std::vector<std::pair<std::string, std::vector<linear_module>>> us;
        for (const auto& m : llama_linear_modules(hp, i)) {
            const std::string unit = plan_unit_of(m);
            if (us.empty() || us.back().first != unit) us.push_back({unit, {}});
            us.back().second.push_back(m);
        }
        for (const auto& [unit, members] : us) {
            unit_shape u{unit, {}, unit_candidates(s.p, hp, i, members)};
            for (const auto& m : members)
                u.shapes.emplace_back(llama_linear_slot(hp, i, m.roles[0]).n_out_module,
                                      hp.linear_shape(m.roles[0])[1]);
            units.push_back(std::move(u));
        }
    }
    if (s.p.quantize_lm_head)
        units.push_back({"lm_head", {{hp.n_vocab, hp.n_embd}}, bit_candidates(s.p, hp.n_vocab, hp.n_embd)});
    const auto& list = j["modules"];
    if (list.size() != units.size())
        return make_error(E_ARG, "--bpw-measured {}: {} units, this run has {} (another model, or --quantize-lm-head?)",
                          path, list.size(), units.size());
    std::vector<bit_plan_module> mods;
    for (size_t u = 0; u < units.size(); ++u) {
        const auto& m = list[u];
        if (m.value("module", std::string()) != units[u].name)
            return make_error(E_ARG, "--bpw-measured {}: unit {} is {}, this run's is {}", path, u,
                              m.value("module", std::string()), units[u].name);
        bit_plan_module pm;
        pm.module  = units[u].name;
        pm.members = m.value("members", std::vector<std::string>());
        pm.n_out   = m.value("n_out", int64_t(0));
        pm.n_in    = m.value("n_in", int64_t(0));
        pm.signal  = m.value("signal", 0.0);
        for (const auto& c : m.at("candidates")) {
            bit_choice ch{c.value("bits", 0), c.value("group_size", 0), c.value("bytes", uint64_t(0)),
                          c.value(key, -1.0), c.value("error_hessian", c.value("error", 0.0))};
            uint64_t   bytes = 0;
            for (const auto& [n_out, n_in] : units[u].shapes)
                bytes += gptq_module_bytes(n_out, n_in, ch.bits, ch.group_size);
            if (bytes != ch.bytes || ch.error < 0)
                return make_error(E_ARG,
                                  "--bpw-measured {}: {} at {} bits, group {}: {} bytes and error {}, this run "
                                  "has {} bytes for it",
                                  path, pm.module, ch.bits, ch.group_size, ch.bytes, ch.error, bytes);
            pm.choices.push_back(ch);
        }
        std::vector<std::pair<int, int>> got;
        for (const auto& ch : pm.choices) got.emplace_back(ch.bits, ch.group_size);
        if (got != units[u].cands)
            return make_error(E_ARG,
                              "--bpw-measured {}: {} has other candidates than this run's (--group-size, "
                              "--bpw-group-sizes)",
                              path, pm.module);
        mods.push_back(std::move(pm));
    }
    GPTQ_LOG_INFO("--target-bpw: the errors ({}) measured in {}", key, path);
    return mods;
}

// bit_plan_measured_read, a value of the wrong type in the file an error naming it.
result<std::vector<bit_plan_module>> bit_plan_measured(const run_state& s) {
    try {
        return bit_plan_measured_read(s);
    } catch (const nlohmann::json::exception& e) {
        return make_error(E_ARG, "--bpw-measured {}: not a plan of this format: {}", s.p.bpw_measured, e.what());
    }
}

// --target-bpw before the layer loop: the plan of an interrupted run (plan.json, with --resume),
// else measured on a runner of its own (make_runner) and solved; s.cfg gets its `dynamic`. x: the
// embedded calibration windows (--bpw-sensitivity output measures on the first --bpw-windows).
status bit_plan_make(run_state& s, const ops_context& ctx, thread_pool* pool, const std::vector<float>& x,
                     const std::function<result<std::unique_ptr<calibration_runner>>()>& make_runner) {
    const std::string saved = path_join(s.work, "plan.json");
    if (s.p.resume && fs::exists(saved)) {
        GPTQ_ASSIGN_OR_RETURN(s.bit_plan, json_read_file(saved));
        GPTQ_LOG_INFO("--target-bpw: the plan of {} ({:.4f} bits per weight)", saved, s.bit_plan.value("bpw", 0.0));
        return bit_plan_config(s, s.bit_plan.value("dynamic", nlohmann::json::object()));
    }
    std::vector<bit_plan_module> mods;
    if (!s.p.bpw_measured.empty()) {
        GPTQ_ASSIGN_OR_RETURN(mods, bit_plan_measured(s));
    } else if (s.p.bpw_sensitivity == "output") {
        const int64_t n_win = std::min(s.p.bpw_windows, s.n_samples), n_embd = s.model->hparams().n_embd;
        GPTQ_LOG_INFO(
            "--target-bpw {}: measuring each unit's effect on the output (KL on {} windows) at bits 2, 3, "
            "4, 8",
            s.p.target_bpw, n_win);
        GPTQ_ASSIGN_OR_RETURN(auto run, make_runner());
        phase_timer t(s, "sensitivity");
        GPTQ_ASSIGN_OR_RETURN(
            auto out, output_sensitivity::make(*s.model, ctx, pool, n_win, s.p.seqlen,
                                               std::vector<float>(x.begin(), x.begin() + n_win * s.p.seqlen * n_embd)));
        GPTQ_ASSIGN_OR_RETURN(mods, measure_sensitivity_output(s, ctx, pool, *run, *out));
    } else {
        GPTQ_LOG_INFO("--target-bpw {}: measuring each module's error at bits 2, 3, 4, 8", s.p.target_bpw);
        GPTQ_ASSIGN_OR_RETURN(auto run, make_runner());
        phase_timer t(s, "sensitivity");
        GPTQ_ASSIGN_OR_RETURN(mods, measure_sensitivity(s, ctx, pool, *run));
    }
    const uint64_t budget = bit_plan_budget_bytes(mods, s.p.target_bpw);
    GPTQ_ASSIGN_OR_RETURN(const bit_plan plan, bit_plan_solve(mods, budget));
    s.bit_plan = bit_plan_describe(s, mods, plan);
    GPTQ_LOG_INFO("plan: {} modules, {} bytes of a budget of {} ({:.4f} bits per weight, target {}), error {:.4g}",
                  mods.size(), plan.bytes, budget, plan.bpw(), s.p.target_bpw, plan.error);
    return bit_plan_config(s, s.bit_plan["dynamic"]);
}

// --quantize-lm-head: lm_head (the embedding table when tied) quantized like a layer's linear, GPTQ
// with the Hessian of its input, the final norm of the windows' hidden states after the last layer
// (the runner holds them once the layer loop is done, --resume included); RTN with --method rtn.
status quantize_lm_head(run_state& s, const ops_context& ctx) {
    const auto           t0 = clock::now();
    const llama_hparams& hp = s.model->hparams();
    GPTQ_TRY(s.model->globals_load());
    GPTQ_ASSIGN_OR_RETURN(const std::vector<float> w, s.model->lm_head_dense_weight());
    const int64_t          n_out = hp.n_vocab, n_in = hp.n_embd;
    quantize_linear_report rep;
    const gptq_options     opt = options_for(s, "lm_head");
    rep.name                   = "lm_head";
    rep.n_out                  = n_out;
    rep.n_in                   = n_in;
    rep.bits                   = opt.bits;
    rep.group_size             = opt.group_size;
    auto rtn                   = rtn_quantize(ctx, w.data(), n_out, n_in, opt);
    if (!rtn) return rtn.error().with_context("lm_head");
    quantized_linear q;
    if (s.p.method == "gptq") {
        std::vector<float> h;
        {
            phase_timer t(s, "calibration");
            GPTQ_ASSIGN_OR_RETURN(h, s.calib->final_norm_hessian());
        }
        gptq_stats st;
        {
            phase_timer t(s, "solve");
            auto        g = s.calib->solve(w.data(), n_out, n_in, h, opt, &st);
            if (!g) return g.error().with_context("lm_head");
            q = std::move(g).value();
        }
        phase_timer        t(s, "error");
        std::vector<float> wq(w.size()), wr(w.size());
        quantized_linear_dequantize(ctx, *rtn, wr.data());
        quantized_linear_dequantize(ctx, q, wq.data());
        rep.damp_percent = st.damp_percent_used;
        GPTQ_ASSIGN_OR_RETURN(rep.error_rtn, s.calib->weighted_error(w.data(), wr.data(), n_out, n_in, h));
        GPTQ_ASSIGN_OR_RETURN(rep.error_gptq, s.calib->weighted_error(w.data(), wq.data(), n_out, n_in, h));
    } else {
        q = std::move(rtn).value();
    }
    linear_weights no_bias;
    s.lm_head   = to_checkpoint_form(std::move(q), no_bias);
    rep.seconds = seconds_since(t0);
    s.report.linears.push_back(rep);
    GPTQ_LOG_INFO("lm_head: {} x {} quantized in {:.1f} s", n_out, n_in, rep.seconds);
    return status::ok();
}

// --quantize-embeddings: s.cfg gets a `dynamic` rule on model.embed_tokens when the table's bits or
// group size differ from the base ones (GPTQModel builds the module from them: without the rule it
// makes a base-bits module and refuses the tensors; docs/quantize.md "Quantized embeddings").
status embed_rule_config(run_state& s) {
    const int group = s.p.embed_group_size == 0 ? s.p.group_size : s.p.embed_group_size;
    if (s.p.embed_bits == s.p.bits && group == s.p.group_size) return status::ok();
    nlohmann::json cj                                       = s.cfg.to_json();
    cj["dynamic"]["+:" + regex_exact("model.embed_tokens")] = {{"bits", s.p.embed_bits}, {"group_size", group}};
    GPTQ_ASSIGN_OR_RETURN(gptq_config c, gptq_config_parse(cj, "--quantize-embeddings"));
    s.cfg = std::move(c);
    return status::ok();
}

// --quantize-embeddings: the table E (read from the checkpoint as F32) quantized in GPTQModel's
// layout (embed_quant.h) with the options of model.embed_tokens (base or its rule). Done before the
// calibration windows are embedded, which then use the dequantized table: the layers are quantized
// against the inputs the written model computes, as each layer is against the quantized layers
// before it. calib_ids: the calibration text's tokens (token weights; empty with --method rtn).
status quantize_embedding_table(run_state& s, const ops_context& ctx, const std::vector<int32_t>& calib_ids) {
    phase_timer          t(s, "embeddings");
    const auto           t0 = clock::now();
    const llama_hparams& hp = s.model->hparams();
    std::vector<float>   e(static_cast<size_t>(hp.n_vocab * hp.n_embd));
    GPTQ_TRY(s.model->source().read_f32("model.embed_tokens.weight", e.data(), {hp.n_vocab, hp.n_embd}));
    const gptq_options opt = options_for(s, "model.embed_tokens");
    const auto         wt  = embed_token_weights(hp.n_vocab, calib_ids);
    GPTQ_ASSIGN_OR_RETURN(embed_quantized q,
                          embed_table_quantize(ctx, e.data(), hp.n_vocab, hp.n_embd, opt, s.p.embed_clip, wt));
    auto& r      = s.report.embeddings;
    r.quantized  = true;
    r.bits       = opt.bits;
    r.group_size = opt.group_size;
    r.clip       = s.p.embed_clip;
    r.n_vocab    = hp.n_vocab;
    r.n_embd     = hp.n_embd;
    r.bytes      = gptq_module_bytes(hp.n_embd, hp.n_vocab, opt.bits, opt.group_size);
    r.bytes_f16  = static_cast<uint64_t>(hp.n_vocab * hp.n_embd) * 2;
    r.error      = q.error;
    r.error_rtn  = q.error_rtn;
    r.seconds    = seconds_since(t0);
    GPTQ_LOG_INFO(
        "model.embed_tokens: {} x {} table {}-bit g{} (clip {}): {} (F16 {}), error {:.4g} (plain RTN {:.4g})",
        hp.n_vocab, hp.n_embd, opt.bits, opt.group_size, s.p.embed_clip, human_bytes(r.bytes), human_bytes(r.bytes_f16),
        q.error, q.error_rtn);
    s.embed = std::move(q);
    return status::ok();
}

// Copy the non-layer tensors (embeddings, final norm, lm_head) unchanged into globals.safetensors.
status write_globals(run_state& s) {
    const tensor_source&          src = s.model->source();
    std::vector<safetensors_decl> decls;
    std::vector<std::string>      names;
    for (const auto& t : llama_global_tensors(s.model->hparams())) {
        const tensor_entry* e = src.find(t.name);
        if (!e) continue;                                       // optional (tied lm_head)
        if (s.lm_head && t.name == "lm_head.weight") continue;  // replaced by its GPTQ tensors
        if (s.embed && t.name == "model.embed_tokens.weight") continue;
        decls.push_back({t.name, e->info->type, e->info->shape});
        names.push_back(t.name);
    }
    if (s.embed) {
        const gptq_linear_data& e = s.embed->data;
        const auto ds             = gptq_linear_decls("model.embed_tokens", e.n_out, e.n_in, e.n_groups, e.bits, false);
        decls.insert(decls.end(), ds.begin(), ds.end());
    }
    if (s.lm_head) {
        const auto ds = gptq_linear_decls("lm_head", s.lm_head->n_out, s.lm_head->n_in, s.lm_head->n_groups,
                                          s.lm_head->bits, !s.lm_head->bias.empty());
        decls.insert(decls.end(), ds.begin(), ds.end());
    }
    GPTQ_ASSIGN_OR_RETURN(auto w, safetensors_writer::create(path_join(s.work, "globals.safetensors"), decls));
    for (const auto& name : names) {
        const tensor_entry* e = src.find(name);
        GPTQ_TRY(w->write(name, e->file->bytes(*e->info), e->info->nbytes()));
    }
    if (s.embed) GPTQ_TRY(gptq_linear_write(*w, "model.embed_tokens", s.embed->data, s.cfg.format));
    if (s.lm_head) GPTQ_TRY(gptq_linear_write(*w, "lm_head", *s.lm_head, s.cfg.format));
    return w->finish();
}

// Gather the per-layer files into the final shard layout (model.safetensors, or
// model-0000i-of-0000N.safetensors + index beyond max_shard_bytes).
status assemble_shards(run_state& s, uint64_t* bytes_out) {
    std::vector<std::unique_ptr<tensor_source>> parts;
    GPTQ_ASSIGN_OR_RETURN(auto globals, tensor_source::open(path_join(s.work, "globals.safetensors")));
    parts.push_back(std::move(globals));
    for (int64_t i = 0; i < s.model->hparams().n_layer; ++i) {
        GPTQ_ASSIGN_OR_RETURN(auto p, tensor_source::open(path_join(s.work, layer_file_name(i))));
        parts.push_back(std::move(p));
    }
    std::vector<safetensors_decl>              decls;
    std::map<std::string, const tensor_entry*> where;
    for (const auto& p : parts)
        for (const auto& name : p->names()) {
            const tensor_entry* e = p->find(name);
            decls.push_back({name, e->info->type, e->info->shape});
            where[name] = e;
        }
    const shard_plan                   plan = safetensors_plan_shards(decls, s.p.max_shard_bytes);
    std::map<std::string, std::string> weight_map;
    uint64_t                           total = 0;
    *bytes_out                               = 0;
    for (size_t k = 0; k < plan.shards.size(); ++k) {
        const std::string path = path_join(s.work, plan.file_names[k]);
        GPTQ_ASSIGN_OR_RETURN(auto w, safetensors_writer::create(path, plan.shards[k]));
        for (const auto& d : plan.shards[k]) {
            const tensor_entry* e = where[d.name];
            GPTQ_TRY(w->write(d.name, e->file->bytes(*e->info), e->info->nbytes()));
            weight_map[d.name] = plan.file_names[k];
        }
        total += w->data_size();
        GPTQ_TRY(w->finish());
        *bytes_out += fs::file_size(path);
    }
    if (plan.shards.size() > 1)
        GPTQ_TRY(safetensors_index_write(path_join(s.work, "model.safetensors.index.json"), total, weight_map));
    return status::ok();
}

status write_configs_and_copy_files(run_state& s) {
    const std::string src_dir = s.model->source().folder();
    GPTQ_ASSIGN_OR_RETURN(json config, json_read_file(path_join(src_dir, "config.json")));
    gptq_config cfg               = s.cfg;
    cfg.model_file_base_name      = "model";
    config["quantization_config"] = cfg.to_json();
    // A tied lm_head quantized is its own tensor now (GPTQModel unties too): the embedding table
    // stays F16 and transformers must not tie lm_head back to it.
    if (cfg.lm_head && s.model->hparams().tie_embeddings) config["tie_word_embeddings"] = false;
    GPTQ_TRY(file_write_atomic(path_join(s.work, "config.json"), config.dump(2) + "\n"));
    GPTQ_TRY(file_write_atomic(path_join(s.work, "quantize_config.json"), cfg.to_json().dump(2) + "\n"));
    // Tokenizer and generation files, unchanged.
    for (const auto& entry : fs::directory_iterator(src_dir)) {
        const std::string name = entry.path().filename().string();
        const bool        keep = name.rfind("tokenizer", 0) == 0 || name == "special_tokens_map.json" ||
                          name == "generation_config.json" || name == "vocab.json" || name == "merges.txt" ||
                          name == "added_tokens.json" || name.rfind("chat_template", 0) == 0;
        if (!keep || !entry.is_regular_file()) continue;
        std::error_code ec;
        fs::copy_file(entry.path(), path_join(s.work, name), fs::copy_options::overwrite_existing, ec);
        if (ec) return make_error(status_code::STATUS_IO_ERROR, "copying {}: {}", entry.path().string(), ec.message());
    }
    return status::ok();
}

status check_params(const quantize_params& p) {
    if (p.model_path.empty()) return make_error(E_ARG, "no model given");
    if (p.output_path.empty()) return make_error(E_ARG, "no output folder given (-o)");
    if (p.method != "gptq" && p.method != "rtn")
        return make_error(E_ARG, "--method '{}' is not supported (gptq or rtn)", p.method);
    if (!p.format.empty() && p.format != "gptq" && p.format != "gptq_v2")
        return make_error(E_ARG, "--format '{}' is not supported (gptq or gptq_v2)", p.format);
    if (p.target_bpw < 0 || (p.target_bpw > 0 && (p.target_bpw < 2.0 || p.target_bpw > 16.0)))
        return make_error(E_ARG, "--target-bpw {} must lie in [2, 16] bits per weight", p.target_bpw);
    if (p.target_bpw > 0 && p.method != "gptq")
        return make_error(E_ARG,
                          "--target-bpw needs --method gptq (the plan measures GPTQ's error on calibration data)");
    for (int g : p.bpw_group_sizes)
        if (g != -1 && g <= 0) return make_error(E_ARG, "--bpw-group-sizes: {} must be -1 or positive", g);
    if (p.bpw_sensitivity != "output" && p.bpw_sensitivity != "hessian")
        return make_error(E_ARG, "--bpw-sensitivity '{}': must be output or hessian", p.bpw_sensitivity);
    if (p.bpw_windows <= 0)
        return make_error(E_ARG, "--bpw-windows {}: must be at least 1 (calibration windows the output is measured on)",
                          p.bpw_windows);
    if (p.calib_sampling != "random" && p.calib_sampling != "contiguous")
        return make_error(E_ARG, "--calib-sampling '{}' is not supported (random or contiguous)", p.calib_sampling);
    if (p.mse && p.mse_hessian) return make_error(E_ARG, "--mse and --mse-hessian exclude each other");
    if (p.gptaq) {
        if (p.method != "gptq")
            return make_error(E_ARG, "--gptaq needs --method gptq (it changes GPTQ's solve; RTN reads no calibration)");
        if (!(p.gptaq_alpha >= 0.0 && p.gptaq_alpha <= 1.0))
            return make_error(E_ARG, "--gptaq-alpha {} must be in [0, 1]", p.gptaq_alpha);
        if (p.device != "cpu")
            return make_error(E_ARG,
                              "--gptaq runs on the CPU only (--device cpu, not {}): the GPU calibration runner carries "
                              "one stream of hidden states, GPTAQ needs the full-precision model's beside it",
                              p.device);
    } else if (p.gptaq_alpha != 0.25) {
        return make_error(E_ARG, "--gptaq-alpha {} needs --gptaq", p.gptaq_alpha);
    }
    if (p.gar && p.desc_act)
        return make_error(E_ARG, "--gar and --desc-act exclude each other (GAR is act-order inside groups)");
    if (p.nsamples <= 0) return make_error(E_ARG, "--nsamples {} must be positive", p.nsamples);
    if (p.seqlen < 2) return make_error(E_ARG, "--seqlen {} must be at least 2", p.seqlen);
    if (p.max_shard_bytes == 0) return make_error(E_ARG, "--max-shard-size must be positive");
    if (p.moe_coverage != "route-all" && p.moe_coverage != "rtn" && p.moe_coverage != "fail")
        return make_error(E_ARG, "--moe-coverage '{}' is not supported (route-all, rtn or fail)", p.moe_coverage);
    if (p.quantize_embeddings) {
        if (p.embed_bits != 2 && p.embed_bits != 3 && p.embed_bits != 4 && p.embed_bits != 8)
            return make_error(E_ARG, "--embed-bits {} is not supported (2, 3, 4 or 8)", p.embed_bits);
        if (!p.embed_clip.empty() && p.embed_clip != "none" && p.embed_clip != "uniform" && p.embed_clip != "frequency")
            return make_error(E_ARG, "--embed-clip '{}' is not supported (none, uniform or frequency)", p.embed_clip);
        if (p.embed_clip == "frequency" && p.method != "gptq")
            return make_error(E_ARG,
                              "--embed-clip frequency weights tokens by the calibration text, which --method rtn "
                              "does not read: use --embed-clip uniform");
    }
    if (p.moe_min_tokens < -1) return make_error(E_ARG, "--moe-min-tokens {} must be >= 0 (or -1)", p.moe_min_tokens);
    return status::ok();
}

}  // namespace

namespace {
result<quantize_report> quantize_model_run(const quantize_params& params);
}  // namespace

// Out of host memory in the middle of a run (the plan is an estimate): a message, not a crash, and
// the work folder stays for --resume.
result<quantize_report> quantize_model(const quantize_params& params) {
    try {
        return quantize_model_run(params);
    } catch (const std::bad_alloc&) {
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "out of host memory while quantizing {} (an allocation failed beyond the memory plan); the "
                          "finished layers in {}.partial are kept: free memory, then rerun with --resume",
                          params.model_path, params.output_path);
    }
}

namespace {
result<quantize_report> quantize_model_run(const quantize_params& params) {
    const auto t_start = clock::now();
    GPTQ_TRY(check_params(params));
    run_state s;
    s.p = params;
    if (s.p.embed_clip.empty()) s.p.embed_clip = s.p.method == "gptq" ? "frequency" : "uniform";
    std::optional<phase_timer> t_open(std::in_place, s, "open");

    // Options and the config we will write. Zeros in v1 unless asked: the format most readers take,
    // asymmetric included (docs/quantize.md, "Zero-point format").
    const auto zero_format =
        params.format == "gptq_v2" ? gptq_checkpoint_format::GPTQ_FORMAT_V2 : gptq_checkpoint_format::GPTQ_FORMAT_V1;
    s.cfg.bits            = params.bits;
    s.cfg.group_size      = params.group_size;
    s.cfg.desc_act        = params.desc_act;
    s.cfg.sym             = params.sym;
    s.cfg.static_groups   = params.static_groups;
    s.cfg.true_sequential = params.true_sequential;
    s.cfg.damp_percent    = params.damp_percent;
    s.cfg.format          = zero_format;
    s.cfg.quantizer       = {"gptqkit:0.1.0"};
    s.cfg.lm_head         = params.quantize_lm_head;
    s.opt.bits            = params.bits;
    s.opt.group_size      = params.group_size;
    s.opt.sym             = params.sym;
    s.opt.desc_act        = params.desc_act;
    s.opt.static_groups   = params.static_groups;
    s.opt.mse             = params.mse;
    s.opt.gar             = params.gar;
    s.opt.mse_hessian     = params.mse_hessian;
    s.opt.damp_percent    = params.damp_percent;
    if (!params.sym && s.cfg.format == gptq_checkpoint_format::GPTQ_FORMAT_V1) {
        // v1 stores zero - 1, so zero 0 does not exist there (format.md 1.4): keep zeros >= 1.
        s.opt.zero_min = 1;
        GPTQ_LOG_INFO(
            "asymmetric quantization written in the v1 'gptq' format (read by AutoGPTQ, transformers, vLLM, "
            "ExLlama): zero points are kept >= 1, as v1 stores zero - 1. GPTQModel's own loader refuses sym=false "
            "in v1 unless GPTQModel wrote it: --format gptq_v2 for it (docs/quantize.md, \"Zero-point format\")");
    }
    GPTQ_TRY(gptq_check_options(s.opt, 1));

    // --device: the CPU unless asked (the GPU calibration runner is experimental). Checked before
    // anything is read; the runner itself is opened once the calibration inputs exist.
    GPTQ_ASSIGN_OR_RETURN(const device_spec dev, device_parse(params.device));
    const bool gpu_calibration_wanted = dev.cuda && params.method == "gptq";
    if (gpu_calibration_wanted) GPTQ_TRY(device_check(dev));

    // The model.
    GPTQ_ASSIGN_OR_RETURN(s.model, llama_model::open(params.model_path));
    if (const gptq_config* q = s.model->quantization())  // found by the checkpoint detector (io/checkpoint.h)
        return make_error(E_ARG, "{}: already quantized ({} describes a GPTQ {}-bit checkpoint)", params.model_path,
                          q->source, q->bits);
    const llama_hparams& hp = s.model->hparams();
    // The options the GPU calibration layer (llama_cuda_layer.cpp) does not run yet (docs/architectures.md).
    if (gpu_calibration_wanted) GPTQ_TRY(llama_gpu_options_check(hp, params.model_path + " (quantize --device cuda)"));
    if (params.gptaq && hp.n_expert > 0)
        return make_error(E_ARG,
                          "--gptaq: {} is a mixture-of-experts model ({} experts), which GPTAQ does not handle here "
                          "(nor in GPTQModel); quantize it without --gptaq",
                          params.model_path, hp.n_expert);
    for (int64_t i = 0; i < hp.n_layer; ++i)
        for (const auto& m : llama_linear_modules(hp, i)) {  // as written: fused modules whole
            const int64_t n_out = llama_linear_slot(hp, i, m.roles[0]).n_out_module;
            const int64_t n_in  = hp.linear_shape(m.roles[0])[1];
            GPTQ_TRY(gptq_check_packable(n_in, n_out, params.bits, m.module));
            // A partial last group is a checkpoint that vLLM / Marlin / ExLlama refuse: say so now.
            if (params.group_size > 0 && n_in % params.group_size != 0)
                return make_error(E_ARG,
                                  "{}: in_features {} is not a multiple of --group-size {}; GPTQ kernels need "
                                  "whole groups: choose a group size that divides it, or -1",
                                  m.module, n_in, params.group_size);
        }
    for (int64_t i = 0; i < hp.n_layer; ++i)
        for (const moe_linear& ml : llama_moe_linears(hp, i)) {
            const auto shp = llama_moe_shape(hp, ml.expert, ml.proj);
            GPTQ_TRY(gptq_check_packable(shp[1], shp[0], params.bits, ml.module));
            if (params.group_size > 0 && shp[1] % params.group_size != 0)
                return make_error(E_ARG,
                                  "{}: in_features {} is not a multiple of --group-size {}; GPTQ kernels need "
                                  "whole groups: choose a group size that divides it, or -1",
                                  ml.module, shp[1], params.group_size);
        }
    if (params.quantize_lm_head) {
        GPTQ_TRY(gptq_check_packable(hp.n_embd, hp.n_vocab, params.bits, "lm_head"));
        if (params.group_size > 0 && hp.n_embd % params.group_size != 0)
            return make_error(E_ARG, "lm_head: in_features {} is not a multiple of --group-size {}", hp.n_embd,
                              params.group_size);
    }
    if (params.quantize_embeddings) {
        const int group = params.embed_group_size == 0 ? params.group_size : params.embed_group_size;
        GPTQ_TRY(embed_quant_check(hp.n_vocab, hp.n_embd, params.embed_bits, group)
                     .with_context(params.embed_group_size == 0
                                       ? fmt::format("--embed-group-size defaults to --group-size {}", group)
                                       : std::string("--quantize-embeddings")));
        GPTQ_TRY(embed_rule_config(s));
        if (hp.tie_embeddings && !params.quantize_lm_head)
            GPTQ_LOG_WARN(
                "--quantize-embeddings on a model with a tied lm_head: lm_head keeps using the (dequantized) table, "
                "the smallest file, but only gptqkit reads it: GPTQModel 7.6 refuses it (it ties lm_head to "
                "model.embed_tokens.weight, which a quantized table lacks), transformers loads it silently wrong; "
                "add --quantize-lm-head for a file GPTQModel reads (docs/quantize.md, \"Quantized embeddings\")");
        else
            GPTQ_LOG_WARN(
                "--quantize-embeddings: of the GPTQ readers only GPTQModel (and gptqkit) read a quantized "
                "model.embed_tokens; transformers + optimum load such a file silently wrong (the table left "
                "random) and vLLM does not load it (docs/quantize.md, \"Quantized embeddings\")");
    }
    GPTQ_TRY(check_tensors_finite(s.model->source(), llama_global_tensors(hp)));

    // Output and work folders.
    s.work = params.output_path + ".partial";
    if (fs::exists(params.output_path)) {
        // A run stopped between its final rename and the removal of the marker the folder carried
        // there: everything else in it is final (the rename comes after the last write).
        const std::string marker = path_join(params.output_path, k_work_folder_marker);
        if (fs::exists(marker) && !fs::exists(s.work)) {
            if (!params.resume)
                return make_error(E_ARG,
                                  "{}: a run was stopped right after it completed this folder ({} is still in it); "
                                  "pass --resume to finish it",
                                  params.output_path, k_work_folder_marker);
            std::error_code ec;
            fs::remove(marker, ec);
            if (ec) return make_error(status_code::STATUS_IO_ERROR, "removing {}: {}", marker, ec.message());
            GPTQ_LOG_INFO("{}: the previous run had completed it; only its marker was left (removed)",
                          params.output_path);
            s.report.output_path = params.output_path;
            s.report.method      = params.method;
            s.report.bits        = params.bits;
            s.report.group_size  = params.group_size;
            return s.report;
        }
        return make_error(E_ARG, "{}: already exists; choose another output folder or remove it", params.output_path);
    }
    int64_t    layers_done = 0;
    const auto identity    = run_identity(s.p, s.cfg, hp.n_expert > 0);
    s.identity             = identity;
    if (fs::exists(s.work)) {
        if (!params.resume)
            return make_error(E_ARG,
                              "{}: an interrupted run left this work folder; pass --resume to continue it, or "
                              "remove it to start over",
                              s.work);
        GPTQ_ASSIGN_OR_RETURN(layers_done, resume_state_load(s, identity));
        GPTQ_LOG_INFO("resuming {}: {} of {} layers already done", s.work, layers_done, hp.n_layer);
    }

    const int n_threads =
        params.n_threads > 0 ? params.n_threads : static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    thread_pool       pool(n_threads);
    const ops_context ctx{&pool, false};

    // Overlap (docs/quantize.md "Issue 18"; off with GPTQ_QUANTIZE_PLAIN=1): a reader thread reads
    // layer i + 1 (checks it, computes its RTN baselines) on a pool of its own while layer i is
    // quantized, and a writer thread writes layer i's file and state.json while layer i + 1 is. The
    // loop waits for each where the sequential code would have done the work ("load", "write"); the
    // threads' own times are read_thread / write_thread. Layer 0's read starts while the
    // calibration runner opens.
    const bool overlap = !quantize_plain_mode();
    // The reader also makes the layer's F16 copies for the GPU runner's upload.
    const bool                      want_f16 = overlap && gpu_calibration_wanted;
    std::unique_ptr<thread_pool>    read_pool;
    std::future<result<layer_read>> next_read;
    std::future<result<double>>     writer;
    auto                            read_ahead = [&](int64_t i) {
        if (i >= hp.n_layer) return;
        if (!read_pool) read_pool = std::make_unique<thread_pool>(std::max(1, n_threads / 2));
        next_read = std::async(std::launch::async, [&s, i, p = read_pool.get(), q = i >= layers_done, f16 = want_f16] {
            return read_layer(s, i, p, true, q, f16);
        });
    };
    auto join_writer = [&]() -> status {
        if (!writer.valid()) return status::ok();
        std::optional<result<double>> secs;
        {
            phase_timer t(s, "write");
            secs.emplace(writer.get());
        }
        if (!*secs) return secs->error();
        add_seconds(&s.report.detail_seconds, "write_thread", **secs);
        return status::ok();
    };
    // A quantized layer waits for the writer until the next layer is on the device (the writer's
    // packing would slow that upload down); any way out of the loop writes it first.
    struct pending_write {
        int64_t         i;
        layer_quantized lq;
        std::string     report_json;  // the report when the layer was done (state.json)
    };
    std::optional<pending_write> pending;
    auto                         launch_writer = [&]() -> status {
        if (!pending) return status::ok();
        GPTQ_TRY(join_writer());  // the layer before's
        writer = std::async(std::launch::async, [&s, pw = std::move(*pending)]() mutable -> result<double> {
            const auto t0 = clock::now();
            GPTQ_TRY(
                                        write_layer(s, pw.i, pw.lq.by_role, std::move(pw.lq.moe)).with_context(fmt::format("layer {}", pw.i)));
            GPTQ_TRY(write_state(s, pw.i + 1, pw.report_json));
            return seconds_since(t0);
        });
        pending.reset();
        return status::ok();
    };
    struct on_exit {
        std::function<void()> f;
        ~on_exit() { f(); }
    } flush_pending{[&] {
        if (pending) (void)launch_writer();
        if (writer.valid()) (void)join_writer();
    }};

    t_open.reset();

    // Calibration activations.
    if (params.method == "gptq") {
        std::optional<phase_timer> t_tok(std::in_place, s, "tokenize");
        GPTQ_ASSIGN_OR_RETURN(auto tok, tokenizer::load(params.model_path));
        std::string calib_path;
        GPTQ_ASSIGN_OR_RETURN(std::vector<int32_t> ids, calibration_tokens(params, *tok, &calib_path));
        s.n_samples = params.nsamples;
        std::mt19937_64                        rng(params.seed);
        std::uniform_int_distribution<int64_t> start(0, static_cast<int64_t>(ids.size()) - params.seqlen - 1);
        std::vector<int32_t>                   windows(static_cast<size_t>(s.n_samples * params.seqlen));
        if (params.calib_sampling == "contiguous" && s.n_samples * params.seqlen > static_cast<int64_t>(ids.size()))
            return make_error(E_ARG,
                              "--calib-sampling contiguous: {} holds {} tokens, fewer than --nsamples {} x --seqlen {}",
                              calib_path, ids.size(), s.n_samples, params.seqlen);
        for (int64_t j = 0; j < s.n_samples; ++j) {
            const int64_t i0 = params.calib_sampling == "contiguous" ? j * params.seqlen : start(rng);
            std::copy(ids.begin() + i0, ids.begin() + i0 + params.seqlen, windows.begin() + j * params.seqlen);
        }
        s.report.n_calib_tokens = s.n_samples * params.seqlen;
        t_tok.reset();
        if (params.quantize_embeddings) GPTQ_TRY(quantize_embedding_table(s, ctx, ids));
        GPTQ_LOG_INFO("calibration: {} windows of {} tokens from {} ({} tokens)", s.n_samples, params.seqlen,
                      calib_path, ids.size());

        // Memory plan: inputs, a scratch copy, one layer in F32, its Hessians, the layer's activations.
        const uint64_t x_bytes     = static_cast<uint64_t>(s.n_samples * params.seqlen * hp.n_embd) * 4;
        uint64_t       layer_bytes = 0, h_bytes = 0, moe_h_bytes = 0;
        for (int r = 0; r < k_n_linear_roles; ++r) {
            const auto shp = hp.linear_shape(static_cast<linear_role>(r));
            layer_bytes += static_cast<uint64_t>(shp[0] * shp[1]) * 4 * 3;  // weights, quantized copy, GPTQ work copy
            // H, U, copies; GPTAQ: its cross term, D U^T and P too
            h_bytes = std::max<uint64_t>(h_bytes, static_cast<uint64_t>(shp[1] * shp[1]) * 4 * (params.gptaq ? 7 : 4));
        }
        // A MoE layer: every expert's weights, and per expert the Hessians of one input at a time
        // (gate/up: n_embd^2 each, plus the all-token one; down: n_ff_expert^2 each).
        if (hp.n_expert > 0) {
            uint64_t experts = 0;
            for (moe_proj pr : {moe_proj::MOE_GATE, moe_proj::MOE_UP, moe_proj::MOE_DOWN}) {
                const auto a = llama_moe_shape(hp, 0, pr), b = llama_moe_shape(hp, k_moe_shared, pr);
                experts += static_cast<uint64_t>(hp.n_expert * a[0] * a[1] + b[0] * b[1]) * 4 * 2;
            }
            layer_bytes += experts;
            const int64_t n_in = std::max(hp.n_embd, std::max(hp.n_ff_expert, hp.n_ff_shared));
            moe_h_bytes        = static_cast<uint64_t>(hp.n_expert + 1) * static_cast<uint64_t>(n_in * n_in) * 4;
        }
        const uint64_t act_bytes = static_cast<uint64_t>(params.seqlen) *
                                   static_cast<uint64_t>(2 * hp.n_embd + 2 * hp.kv_dim() + hp.q_dim() + 3 * hp.n_ff +
                                                         hp.n_head * params.seqlen) *
                                   4;
        // With the GPU calibration the host holds no per-thread activations.
        const uint64_t act_host = gpu_calibration_wanted ? 0 : act_bytes * static_cast<uint64_t>(n_threads);
        // Overlap (not GPTQ_QUANTIZE_PLAIN): the reader's next layer (F32 weights, their RTN codes
        // and, for the GPU, their F16 copies) and the writer's layer (codes).
        const uint64_t ahead_bytes = quantize_plain_mode() ? 0
                                                           : layer_bytes / 3 + 2 * (layer_bytes / 12) +
                                                                 (gpu_calibration_wanted ? layer_bytes / 6 : 0);
        // --quantize-embeddings: the dequantized table (F32) and its codes, held until written.
        const uint64_t embed_held =
            s.embed ? s.embed->table.size() * 4 + s.embed->data.codes.size() + s.embed->data.scales.size() * 6 : 0;
        // GPTAQ: the full-precision stream (as many bytes as the inputs) and the layer's F32 copy.
        const uint64_t fp_bytes = params.gptaq ? x_bytes + layer_bytes / 3 : 0;
        const uint64_t plan =
            x_bytes + fp_bytes + layer_bytes + ahead_bytes + 3 * h_bytes + moe_h_bytes + act_host + embed_held;
        s.report.peak_plan_bytes = plan;
        const uint64_t avail     = host_memory_available();
        GPTQ_LOG_INFO(
            "memory plan: calibration inputs {}{} + one layer {} + the reader's and writer's layers {} + Hessians {} + "
            "activations {}{} = {} (available {})",
            human_bytes(x_bytes),
            fp_bytes ? " + the full-precision stream and layer (--gptaq) " + human_bytes(fp_bytes) : std::string(),
            human_bytes(layer_bytes), human_bytes(ahead_bytes), human_bytes(3 * h_bytes + moe_h_bytes),
            human_bytes(act_bytes),
            embed_held ? " + the quantized embedding table " + human_bytes(embed_held) : std::string(),
            human_bytes(plan), avail ? human_bytes(avail) : "unknown");
        GPTQ_TRY(host_memory_check(
            "quantizing", plan,
            "lower --nsamples or --seqlen" +
                (fs::exists(s.work) ? fmt::format(" (the finished layers in {} are kept for --resume)", s.work)
                                    : std::string())));
        std::optional<phase_timer> t_embed(std::in_place, s, "embed");
        std::vector<float>         x(static_cast<size_t>(s.n_samples * params.seqlen * hp.n_embd));
        GPTQ_TRY(s.model->globals_load());
        if (s.embed)
            GPTQ_TRY(embed_rows(s.embed->table, hp.n_embd, hp.embed_scale, windows, x.data()));
        else
            GPTQ_TRY(embed_windows(*s.model, windows, hp.n_embd, quantize_plain_mode() ? nullptr : &pool, x.data()));
        // GPTAQ: the full-precision stream, embedded by the full-precision table.
        std::vector<float> x_fp;
        if (params.gptaq) {
            if (s.embed) {
                x_fp.resize(x.size());
                GPTQ_TRY(
                    embed_windows(*s.model, windows, hp.n_embd, quantize_plain_mode() ? nullptr : &pool, x_fp.data()));
            } else {
                x_fp = x;
            }
        }
        t_embed.reset();
        auto make_runner = [&](std::vector<float> xs,
                               std::vector<float> xs_fp = {}) -> result<std::unique_ptr<calibration_runner>> {
            if (gpu_calibration_wanted)
                return calibration_runner_cuda(dev, *s.model, ctx, &pool, s.n_samples, params.seqlen, std::move(xs));
            return calibration_runner_cpu(*s.model, ctx, s.n_samples, params.seqlen, std::move(xs), std::move(xs_fp));
        };
        if (params.target_bpw > 0) GPTQ_TRY(bit_plan_make(s, ctx, &pool, x, [&] { return make_runner(x); }));
        if (overlap) read_ahead(0);  // s.cfg is final (the bit plan made)
        {
            phase_timer t(s, "runner");
            GPTQ_ASSIGN_OR_RETURN(s.calib, make_runner(std::move(x), std::move(x_fp)));
        }
        if (gpu_calibration_wanted) s.report.peak_plan_bytes = s.calib->device_plan_bytes();
    }

    if (params.quantize_embeddings && !s.embed) GPTQ_TRY(quantize_embedding_table(s, ctx, {}));  // --method rtn

    // The work folder is made only now, so that a run failing its checks leaves nothing behind.
    if (!fs::exists(s.work)) {
        std::error_code ec;
        fs::create_directories(s.work, ec);
        if (ec) return make_error(status_code::STATUS_IO_ERROR, "{}: cannot create: {}", s.work, ec.message());
    }
    // Until the final rename the folder says it is unfinished, so that no loader takes it for a model.
    if (!fs::exists(path_join(s.work, k_work_folder_marker))) {
        GPTQ_TRY(file_write_atomic(path_join(s.work, k_work_folder_marker),
                                   "This folder is the work folder of an unfinished `gptq quantize`; continue it with "
                                   "--resume. It becomes the output folder when complete.\n"));
    }
    if (!s.bit_plan.is_null()) GPTQ_TRY(file_write_atomic(path_join(s.work, "plan.json"), s.bit_plan.dump(1) + "\n"));
    progress_bar bar("quantize", hp.n_layer, "layer");
    bar.set(layers_done);
    if (overlap && !next_read.valid()) read_ahead(0);  // --method rtn: not started yet
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        if (params.stop_after_layers >= 0 && i >= params.stop_after_layers && i >= layers_done) {
            GPTQ_TRY(launch_writer());
            GPTQ_TRY(join_writer());
            return make_error(status_code::STATUS_CANCELLED,
                              "stopped after {} layers as asked (--stop-after-layers); "
                              "continue with --resume",
                              i);
        }
        const auto                 t_layer = clock::now();
        std::optional<phase_timer> t_load(std::in_place, s, "load");
        layer_read                 rd;
        if (overlap) {
            auto r = next_read.get();
            if (!r) return r.error();
            rd = std::move(r).value();
            if (i < layers_done) read_ahead(i + 1);  // else once layer i is uploaded (below)
        } else {
            GPTQ_ASSIGN_OR_RETURN(rd, read_layer(s, i, &pool, false, i >= layers_done));
        }
        t_load.reset();
        if (overlap) add_seconds(&s.report.detail_seconds, "read_thread", rd.seconds);
        llama_layer* layer = rd.layer.get();
        if (i < layers_done) {
            if (params.method == "gptq") {
                // GPTAQ: the full-precision stream goes through the layer as read, before its
                // linears become the finished layer's.
                if (s.calib->two_streams()) GPTQ_TRY(s.calib->layer_begin_fp(*layer));
                GPTQ_TRY(load_finished_layer(s, i, layer));
                GPTQ_TRY(s.calib->layer_begin(*layer));
                GPTQ_TRY(s.calib->layer_forward(*layer));
            }
            continue;
        }
        status launched  = status::ok();  // layer i - 1's writer, started once layer i is uploaded
        auto   quantized = quantize_layer(s, ctx, i, rd, [&, i] {
            if (!overlap) return;
            read_ahead(i + 1);
            launched = launch_writer();
        });
        GPTQ_TRY(launched);
        if (!quantized) return quantized.error().with_context(fmt::format("layer {}", i));
        layer_quantized lq = std::move(quantized).value();
        if (!overlap) {
            phase_timer t(s, "write");
            GPTQ_TRY(write_layer(s, i, lq.by_role, std::move(lq.moe)).with_context(fmt::format("layer {}", i)));
        } else {
            GPTQ_TRY(launch_writer());  // (started already, unless the layer had nothing to upload)
            pending = pending_write{i, std::move(lq), quantize_report_json(s.report)};
        }
        if (params.method == "gptq") {
            phase_timer t(s, "forward");
            GPTQ_TRY(s.calib->layer_forward(*layer).with_context(fmt::format("layer {}", i)));
        }
        if (!overlap) {
            phase_timer t(s, "state");
            GPTQ_TRY(write_state(s, i + 1, quantize_report_json(s.report)));
        }
        bar.update(1);
        // One line per layer: the error GPTQ minimises against RTN's.
        double eg = 0, er = 0;
        for (const auto& l : s.report.linears)
            if (l.name.rfind(fmt::format("model.layers.{}.", i), 0) == 0) {
                eg += l.error_gptq;
                er += l.error_rtn;
            }
        if (!bar.enabled()) {
            if (params.method == "gptq")
                GPTQ_LOG_INFO("layer {}/{}: error {:.4g} (RTN {:.4g}, ratio {:.3f}) in {:.1f} s (so far: {})", i + 1,
                              hp.n_layer, eg, er, er > 0 ? eg / er : 0.0, seconds_since(t_layer),
                              phase_summary(s.report));
            else
                GPTQ_LOG_INFO("layer {}/{} in {:.1f} s", i + 1, hp.n_layer, seconds_since(t_layer));
        }
    }
    GPTQ_TRY(launch_writer());
    GPTQ_TRY(join_writer());
    bar.finish();

    // Finish: lm_head, globals, shards, configs, tokenizer; then the work folder becomes the output.
    if (params.quantize_lm_head) GPTQ_TRY(quantize_lm_head(s, ctx));
    std::optional<phase_timer> t_assemble(std::in_place, s, "assemble");
    GPTQ_TRY(write_globals(s));
    uint64_t bytes_out = 0;
    GPTQ_TRY(assemble_shards(s, &bytes_out));
    GPTQ_TRY(write_configs_and_copy_files(s));
    for (const auto& entry : fs::directory_iterator(s.work)) {
        const std::string name = entry.path().filename().string();
        if (name.rfind("layer-", 0) == 0 || name == "globals.safetensors" || name == "state.json" ||
            name == "plan.json" || name.find(".tmp-") != std::string::npos)
            fs::remove(entry.path());
    }
    // The folder becomes the output with its marker, which goes last: a run stopped in between
    // leaves either OUT.partial or OUT with the marker, both refused by loaders and finished by
    // --resume, never a folder that looks complete under the work name.
    std::error_code ec;
    fs::rename(s.work, params.output_path, ec);
    if (ec)
        return make_error(status_code::STATUS_IO_ERROR, "renaming {} to {}: {}", s.work, params.output_path,
                          ec.message());
    fs::remove(path_join(params.output_path, k_work_folder_marker), ec);
    if (ec)
        return make_error(status_code::STATUS_IO_ERROR, "removing {}: {}",
                          path_join(params.output_path, k_work_folder_marker), ec.message());
    t_assemble.reset();
    if (s.calib) {
        s.report.device_used_peak_bytes = s.calib->device_used_peak();
        for (const auto& [name, secs] : s.calib->detail_seconds()) add_seconds(&s.report.detail_seconds, name, secs);
    }

    s.report.output_path = params.output_path;
    s.report.method      = params.method;
    s.report.bits        = params.bits;
    s.report.group_size  = params.group_size;
    s.report.desc_act    = params.desc_act;
    s.report.sym         = params.sym;
    s.report.format      = gptq_checkpoint_format_name(s.cfg.format);
    s.report.n_layers    = hp.n_layer;
    s.report.bytes_in    = s.model->source().total_bytes();
    s.report.bytes_out   = bytes_out;
    s.report.seconds     = seconds_since(t_start);
    double in_phases     = 0.0;
    for (const auto& [name, secs] : s.report.phase_seconds) in_phases += secs;
    GPTQ_LOG_INFO("time by phase (summed over the layers): {}; other {:.1f} s; total {:.1f} s", phase_summary(s.report),
                  s.report.seconds - in_phases, s.report.seconds);
    if (!s.report.detail_seconds.empty()) {
        std::string d;
        for (const auto& [name, secs] : s.report.detail_seconds)
            d += fmt::format("{}{} {:.1f} s", d.empty() ? "" : ", ", name, secs);
        GPTQ_LOG_INFO("details (parts of the phases, and the overlap threads): {}", d);
    }
    if (!s.bit_plan.is_null()) s.report.bit_plan_json = s.bit_plan.dump();
    if (!params.report_path.empty())
        GPTQ_TRY(file_write_atomic(params.report_path, quantize_report_json(s.report) + "\n"));
    return s.report;
}
}  // namespace

std::string quantize_report_json(const quantize_report& r) {
    nlohmann::ordered_json j;
    j["output"]          = r.output_path;
    j["method"]          = r.method;
    j["bits"]            = r.bits;
    j["group_size"]      = r.group_size;
    j["desc_act"]        = r.desc_act;
    j["sym"]             = r.sym;
    j["format"]          = r.format;
    j["n_calib_tokens"]  = r.n_calib_tokens;
    j["n_layers"]        = r.n_layers;
    j["seconds"]         = r.seconds;
    j["bytes_in"]        = r.bytes_in;
    j["bytes_out"]       = r.bytes_out;
    j["peak_plan_bytes"] = r.peak_plan_bytes;
    if (r.device_used_peak_bytes) j["device_used_peak_bytes"] = r.device_used_peak_bytes;
    nlohmann::ordered_json ph = nlohmann::ordered_json::object();
    for (const auto& [name, secs] : r.phase_seconds) ph[name] = secs;
    j["phase_seconds"] = ph;
    if (!r.detail_seconds.empty()) {
        nlohmann::ordered_json dt = nlohmann::ordered_json::object();
        for (const auto& [name, secs] : r.detail_seconds) dt[name] = secs;
        j["detail_seconds"] = dt;
    }
    nlohmann::ordered_json ls = nlohmann::ordered_json::array();
    for (const auto& l : r.linears) {
        ls.push_back({{"name", l.name},
                      {"n_out", l.n_out},
                      {"n_in", l.n_in},
                      {"bits", l.bits},
                      {"group_size", l.group_size},
                      {"error_gptq", l.error_gptq},
                      {"error_rtn", l.error_rtn},
                      {"damp_percent", l.damp_percent},
                      {"seconds", l.seconds}});
        if (!l.coverage.empty() || l.tokens >= 0) {
            ls.back()["tokens"]   = l.tokens;
            ls.back()["coverage"] = l.coverage;
        }
    }
    j["linears"] = ls;
    if (r.embeddings.quantized) {
        const auto& e   = r.embeddings;
        j["embeddings"] = {{"name", "model.embed_tokens"},
                           {"bits", e.bits},
                           {"group_size", e.group_size},
                           {"clip", e.clip},
                           {"n_vocab", e.n_vocab},
                           {"n_embd", e.n_embd},
                           {"bytes", e.bytes},
                           {"bytes_f16", e.bytes_f16},
                           {"error", e.error},
                           {"error_rtn", e.error_rtn},
                           {"seconds", e.seconds}};
    }
    if (!r.bit_plan_json.empty()) j["bit_plan"] = nlohmann::ordered_json::parse(r.bit_plan_json);
    return j.dump(1);
}

std::string quantize_report_summary(const quantize_report& r) {
    std::string s = fmt::format("wrote {} ({} {}-bit, group size {}, desc_act {}, sym {}, format {})\n", r.output_path,
                                r.method, r.bits, r.group_size, r.desc_act, r.sym, r.format);
    s += fmt::format("time {:.1f} s; safetensors {} -> {} ({:.2f}x smaller)\n", r.seconds, human_bytes(r.bytes_in),
                     human_bytes(r.bytes_out),
                     r.bytes_out ? static_cast<double>(r.bytes_in) / static_cast<double>(r.bytes_out) : 0.0);
    if (r.method == "gptq" && !r.linears.empty()) {
        double      sum_ratio = 0, worst = 0;
        std::string worst_name;
        for (const auto& l : r.linears) {
            const double ratio = l.error_rtn > 0 ? l.error_gptq / l.error_rtn : 0.0;
            sum_ratio += ratio;
            if (ratio >= worst) {
                worst      = ratio;
                worst_name = l.name;
            }
        }
        s += fmt::format(
            "layer error GPTQ/RTN (Hessian-weighted): mean {:.3f}, worst {:.3f} ({}); {} linears, {} "
            "calibration tokens\n",
            sum_ratio / static_cast<double>(r.linears.size()), worst, worst_name, r.linears.size(), r.n_calib_tokens);
        int64_t n_route_all = 0, n_rtn = 0;
        for (const auto& l : r.linears) {
            n_route_all += l.coverage == "route-all";
            n_rtn += l.coverage == "rtn";
        }
        if (n_route_all + n_rtn > 0)
            s += fmt::format(
                "mixture of experts: {} expert linears from every token (route-all), {} round to nearest "
                "(under --moe-min-tokens)\n",
                n_route_all, n_rtn);
    }
    if (r.embeddings.quantized) {
        const auto& e = r.embeddings;
        s += fmt::format(
            "embeddings: {}-bit g{} table (clip {}), {} instead of {} F16; error {:.4g} (plain RTN {:.4g}; squared, "
            "each token weighted by its calibration count + 1)\n",
            e.bits, e.group_size, e.clip, human_bytes(e.bytes), human_bytes(e.bytes_f16), e.error, e.error_rtn);
    }
    if (!r.bit_plan_json.empty()) {
        const auto p = nlohmann::json::parse(r.bit_plan_json);
        s += fmt::format("--target-bpw {}: {:.4f} bits per weight over the quantized linears ({} of {} budget bytes)\n",
                         p.value("target_bpw", 0.0), p.value("bpw", 0.0), p.value("bytes", uint64_t(0)),
                         p.value("budget_bytes", uint64_t(0)));
    }
    return s;
}

}  // namespace gptq
