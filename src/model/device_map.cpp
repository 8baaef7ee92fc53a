// The device-map planner: --max-memory parsing, module costs, sequential auto placement, map files.
#include "model/device_map.h"

#include <fmt/format.h>

#include <algorithm>
#include <cctype>
#include <map>
#include <set>

#include "core/error.h"
#include "io/json_file.h"

namespace gptq {

namespace {

constexpr status_code E_ARG   = status_code::STATUS_INVALID_ARGUMENT;
constexpr status_code E_UNSUP = status_code::STATUS_UNSUPPORTED;
constexpr status_code E_OOM   = status_code::STATUS_OUT_OF_MEMORY;

// cuBLAS workspace, the decode-attention workspace and split-K counters, with room to spare.
constexpr uint64_t k_gpu_workspace_bytes = 64ull << 20;

std::string trim(const std::string& s) {
    size_t b = 0, e = s.size();
    while (b < e && std::isspace(static_cast<unsigned char>(s[b]))) ++b;
    while (e > b && std::isspace(static_cast<unsigned char>(s[e - 1]))) --e;
    return s.substr(b, e - b);
}

std::string lower(std::string s) {
    for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
}

// "N" with only digits and a value that fits an int; -1 otherwise.
int parse_index(const std::string& s) {
    if (s.empty() || s.size() > 6) return -1;
    for (char c : s)
        if (!std::isdigit(static_cast<unsigned char>(c))) return -1;
    return std::stoi(s);
}

// "cpu" -> k_device_cpu, "N" / "cuda:N" / "cuda" -> N; -2 when it is none of them.
int parse_device_name(const std::string& raw) {
    const std::string s = lower(trim(raw));
    if (s == "cpu") return k_device_cpu;
    if (s == "cuda") return 0;
    if (s.rfind("cuda:", 0) == 0) {
        const int i = parse_index(s.substr(5));
        return i >= 0 ? i : -2;
    }
    const int i = parse_index(s);
    return i >= 0 ? i : -2;
}

// Bytes of SIZE ("40GiB", "1.5gb", "123"); false when malformed.
bool parse_size(const std::string& raw, uint64_t* out) {
    const std::string s      = trim(raw);
    size_t            i      = 0;
    bool              digits = false, dot = false;
    while (i < s.size() && (std::isdigit(static_cast<unsigned char>(s[i])) || (s[i] == '.' && !dot))) {
        if (s[i] == '.')
            dot = true;
        else
            digits = true;
        ++i;
    }
    if (!digits || i > 32) return false;  // 32 characters: std::stod cannot overflow
    const double      v    = std::stod(s.substr(0, i));
    const std::string unit = lower(trim(s.substr(i)));
    double            mult = 0;
    if (unit.empty() || unit == "b") mult = 1;
    if (unit == "kb") mult = 1e3;
    if (unit == "mb") mult = 1e6;
    if (unit == "gb") mult = 1e9;
    if (unit == "tb") mult = 1e12;
    if (unit == "kib") mult = 1024.0;
    if (unit == "mib") mult = 1024.0 * 1024;
    if (unit == "gib") mult = 1024.0 * 1024 * 1024;
    if (unit == "tib") mult = 1024.0 * 1024 * 1024 * 1024;
    if (mult == 0) return false;
    const double bytes = v * mult;
    if (!(bytes < 4.6e18)) return false;  // beyond int64 (4 EiB), which the planner's arithmetic uses
    *out = static_cast<uint64_t>(bytes);
    return true;
}

uint64_t ceil_div(uint64_t a, uint64_t b) {
    return (a + b - 1) / b;
}

uint64_t elems(const tensor_spec& t) {
    uint64_t n = 1;
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    return n;
}

// Whether the fast int4 layout's conditions hold (gptq_int4.cuh int4_layout_for, 4 bits).
bool int4_layout_fits(uint64_t n_out, uint64_t n_in, const gptq_config& q) {
    const uint64_t gs = q.group_size > 0 ? static_cast<uint64_t>(q.group_size) : n_in;
    return q.bits == 4 && n_in % 32 == 0 && gs % 32 == 0 && n_in % gs == 0 && n_out % 8 == 0;
}

// The larger of the two forms a GPTQ linear takes on the GPU (docs/multi-gpu.md):
// - checkpoint tensors (the generic kernel): qweight [ceil(n_in*bits/32), n_out] I32, qzeros
//   [n_groups, ceil(n_out*bits/32)] I32, scales [n_groups, n_out] F16, g_idx [n_in] I32 (docs/io.md);
// - the fast int4 layout (docs/cuda.md), when its conditions hold: codes of 32-row tiles at 4 bits,
//   (scale, zero) F16 pairs per row and group, the act-order permutation [n_in] I32.
uint64_t gptq_linear_bytes(uint64_t n_out, uint64_t n_in, const gptq_config& q) {
    const uint64_t bits     = static_cast<uint64_t>(q.bits);
    const uint64_t n_groups = q.group_size > 0 ? ceil_div(n_in, static_cast<uint64_t>(q.group_size)) : 1;
    const uint64_t ckpt     = ceil_div(n_in * bits, 32) * n_out * 4 + n_groups * ceil_div(n_out * bits, 32) * 4 +
                          n_groups * n_out * 2 + n_in * 4;
    if (!int4_layout_fits(n_out, n_in, q)) return ckpt;
    const uint64_t n_out_pad = ceil_div(n_out, 32) * 32;
    const uint64_t fast_b    = n_out_pad * n_in / 2 + n_out_pad * n_groups * 4 + (q.desc_act ? n_in * 4 : 0);
    return std::max(ckpt, fast_b);
}

bool is_layer_name(const std::string& name, int64_t* index) {
    static const std::string p = "model.layers.";
    if (name.rfind(p, 0) != 0) return false;
    const int i = parse_index(name.substr(p.size()));
    if (i < 0) return false;
    if (index) *index = i;
    return true;
}

std::string join_limited(const std::vector<std::string>& names, size_t max_shown) {
    std::string s;
    for (size_t i = 0; i < names.size() && i < max_shown; ++i) s += (i ? ", " : "") + names[i];
    if (names.size() > max_shown) s += fmt::format(" and {} more", names.size() - max_shown);
    return s;
}

// Consecutive modules as "model.layers.3-17" ranges; other names as they are.
std::vector<std::string> module_ranges(const std::vector<std::string>& names) {
    std::vector<std::string> out;
    for (size_t i = 0; i < names.size();) {
        int64_t a = 0;
        if (!is_layer_name(names[i], &a)) {
            out.push_back(names[i++]);
            continue;
        }
        int64_t b = a;
        size_t  j = i + 1;
        for (int64_t n = 0; j < names.size() && is_layer_name(names[j], &n) && n == b + 1; ++j) b = n;
        out.push_back(a == b ? names[i] : fmt::format("model.layers.{}-{}", a, b));
        i = j;
    }
    return out;
}

// Per-device usage of an assignment (plan.modules with devices set): the rules of
// docs/multi-gpu.md ("Per-device totals").
void plan_usage_compute(const device_map_costs& costs, const max_memory& mem, device_plan* plan) {
    std::set<int> gpus;
    for (const auto& e : mem.entries)
        if (e.device != k_device_cpu) gpus.insert(e.device);
    bool any_cpu = false, any_gpu_module = false;
    for (const auto& m : plan->modules) {
        if (m.device == k_device_cpu)
            any_cpu = true;
        else {
            gpus.insert(m.device);
            any_gpu_module = true;
        }
    }
    // Offloaded modules run on the last GPU of the pipeline; with no GPU at all, on the CPU runtime.
    plan->exec_device = k_device_cpu;
    if (any_cpu && !gpus.empty()) plan->exec_device = *gpus.rbegin();
    (void)any_gpu_module;

    // A tied lm_head on the embeddings' device shares the table.
    if (costs.tie_embeddings && plan->modules.size() >= 2 && plan->modules.front().name == "model.embed_tokens" &&
        plan->modules.back().name == "lm_head") {
        const auto& c = costs.modules.back();
        plan->modules.back().weight_bytes =
            plan->modules.back().device == plan->modules.front().device ? 0 : c.weight_bytes;
    }

    std::map<int, device_plan_usage> u;
    auto                             at = [&](int d) -> device_plan_usage& {
        auto& x  = u[d];
        x.device = d;
        return x;
    };
    uint64_t max_offloaded = 0;
    for (const auto& m : plan->modules) {
        auto& d = at(m.device);
        d.n_modules += 1;
        d.weight_bytes += m.weight_bytes;
        if (m.device == k_device_cpu) {
            at(plan->exec_device).cache_bytes += m.cache_bytes;
            max_offloaded = std::max(max_offloaded, m.weight_bytes);
        } else {
            d.cache_bytes += m.cache_bytes;
        }
    }
    if (plan->exec_device != k_device_cpu && any_cpu) at(plan->exec_device).staging_bytes = 2 * max_offloaded;
    for (auto& [d, x] : u)
        if (d != k_device_cpu) x.reserve_bytes = costs.gpu_reserve_bytes;
    for (const auto& e : mem.entries) {
        auto& x       = at(e.device);
        x.has_limit   = true;
        x.limit_bytes = e.bytes;
    }
    plan->devices.clear();
    for (auto& [d, x] : u)
        if (d != k_device_cpu) plan->devices.push_back(x);
    if (u.count(k_device_cpu)) plan->devices.push_back(u[k_device_cpu]);
}

// The refusal when some device of a plan is over its limit.
status plan_check(const device_plan& plan, const std::string& what) {
    uint64_t                 excess = 0;
    std::vector<std::string> over;
    for (const auto& d : plan.devices) {
        if (!d.over()) continue;
        excess += d.total() - d.limit_bytes;
        over.push_back(fmt::format("{} needs {} of {} (weights {}, KV cache/logits {}, reserve {}, staging {})",
                                   device_map_device_name(d.device), device_map_bytes_str(d.total()),
                                   device_map_bytes_str(d.limit_bytes), device_map_bytes_str(d.weight_bytes),
                                   device_map_bytes_str(d.cache_bytes), device_map_bytes_str(d.reserve_bytes),
                                   device_map_bytes_str(d.staging_bytes)));
    }
    if (over.empty()) return status::ok();
    return make_error(E_OOM, "{} needs {} more than --max-memory allows: {}", what, device_map_bytes_str(excess),
                      join_limited(over, 8));
}

}  // namespace

std::string device_map_device_name(int device) {
    return device == k_device_cpu ? std::string("cpu") : fmt::format("cuda:{}", device);
}

std::string device_map_bytes_str(uint64_t b) {
    const double x = static_cast<double>(b);
    if (b >= (1ull << 30)) return fmt::format("{:.1f} GiB", x / (1ull << 30));
    if (b >= (1ull << 20)) return fmt::format("{:.1f} MiB", x / (1ull << 20));
    if (b >= (1ull << 10)) return fmt::format("{:.1f} KiB", x / (1ull << 10));
    return fmt::format("{} B", b);
}

// ---- --max-memory -----------------------------------------------------------------------------------

const max_memory_entry* max_memory::find(int device) const {
    for (const auto& e : entries)
        if (e.device == device) return &e;
    return nullptr;
}

std::vector<int> max_memory::gpus() const {
    std::vector<int> g;
    for (const auto& e : entries)
        if (e.device != k_device_cpu) g.push_back(e.device);
    return g;
}

result<max_memory> max_memory_parse(const std::string& s) {
    if (trim(s).empty()) return make_error(E_ARG, "--max-memory is empty (expected e.g. 0=40GiB,1=40GiB,cpu=200GiB)");
    max_memory m;
    size_t     start = 0;
    while (start <= s.size()) {
        const size_t      comma = std::min(s.find(',', start), s.size());
        const std::string item  = trim(s.substr(start, comma - start));
        start                   = comma + 1;
        if (item.empty()) return make_error(E_ARG, "--max-memory '{}': empty item (items are DEVICE=SIZE)", s);
        const size_t eq = item.find('=');
        if (eq == std::string::npos)
            return make_error(E_ARG, "--max-memory item '{}' is not DEVICE=SIZE (e.g. 0=40GiB or cpu=200GiB)", item);
        const int device = parse_device_name(item.substr(0, eq));
        if (device == -2)
            return make_error(E_ARG, "--max-memory item '{}': unknown device '{}' (a GPU index, cuda:N or cpu)", item,
                              trim(item.substr(0, eq)));
        uint64_t bytes = 0;
        if (!parse_size(item.substr(eq + 1), &bytes))
            return make_error(E_ARG,
                              "--max-memory item '{}': malformed size '{}' (a number with B, KB, MB, GB, TB, KiB, "
                              "MiB, GiB or TiB)",
                              item, trim(item.substr(eq + 1)));
        if (m.find(device))
            return make_error(E_ARG, "--max-memory item '{}': device {} is given twice", item,
                              device_map_device_name(device));
        m.entries.push_back({device, bytes});
    }
    std::stable_sort(m.entries.begin(), m.entries.end(), [](const max_memory_entry& a, const max_memory_entry& b) {
        const int ka = a.device == k_device_cpu ? 1 << 30 : a.device;
        const int kb = b.device == k_device_cpu ? 1 << 30 : b.device;
        return ka < kb;
    });
    return m;
}

std::string max_memory_format(const max_memory& m) {
    std::string s;
    for (const auto& e : m.entries) {
        const std::string dev = e.device == k_device_cpu ? "cpu" : std::to_string(e.device);
        std::string       size;
        if (e.bytes % (1ull << 30) == 0)
            size = fmt::format("{}GiB", e.bytes >> 30);
        else if (e.bytes % (1ull << 20) == 0)
            size = fmt::format("{}MiB", e.bytes >> 20);
        else
            size = fmt::format("{}B", e.bytes);
        s += (s.empty() ? "" : ",") + dev + "=" + size;
    }
    return s;
}

// ---- costs --------------------------------------------------------------------------------------------

device_map_costs device_map_costs_llama(const llama_hparams& hp, const gptq_config* gptq, const device_map_options& o) {
    device_map_costs c;
    c.options            = o;
    c.tie_embeddings     = hp.tie_embeddings && !(gptq && gptq->lm_head);  // a GPTQ lm_head is its own copy
    const uint64_t n_tok = static_cast<uint64_t>(std::max<int64_t>(o.batch, 1) * std::max<int64_t>(o.n_ctx, 1));
    const uint64_t E = uint64_t(hp.n_embd), Q = uint64_t(hp.q_dim()), KV = uint64_t(hp.kv_dim()), F = uint64_t(hp.n_ff),
                   V = uint64_t(hp.n_vocab), HD = uint64_t(hp.head_dim);

    auto dense = [](const tensor_spec& t) { return 2 * elems(t); };  // F16 on the GPU
    for (const auto& t : llama_global_tensors(hp)) {
        std::string module = t.name.substr(0, t.name.rfind('.'));  // "model.embed_tokens", "model.norm", "lm_head"
        uint64_t    w      = dense(t);
        uint64_t    cache  = 0;
        if (module == "lm_head") {
            cache = n_tok * V * 4;  // F32 logits of every position (ppl)
            // A GPTQ lm_head stays on the int4 layout when it fits it (4 bits; llama_cuda.cpp
            // lm_head_upload_quantized), else it is dequantized to F16 at load.
            const auto q = gptq && gptq->lm_head ? gptq->for_module("lm_head") : std::optional<gptq_config>();
            if (q && int4_layout_fits(V, E, *q)) w = gptq_linear_bytes(V, E, *q);
        }
        c.modules.push_back({module, w, cache});
    }
    // Execution order: embeddings, layers, norm, lm_head.
    std::vector<module_cost> ordered = {c.modules[0]};
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        uint64_t w = 0;
        for (const auto& t : llama_layer_tensors(hp, i)) {
            // A linear's own settings (GPTQModel `dynamic` may give it other bits or leave it dense).
            const auto q = gptq && t.shape.size() == 2 ? gptq->for_module(t.name.substr(0, t.name.rfind('.')))
                                                       : std::optional<gptq_config>();
            w += q ? gptq_linear_bytes(uint64_t(t.shape[0]), uint64_t(t.shape[1]), *q) : dense(t);
        }
        const uint64_t kv = 2 * n_tok * KV * 2;  // K and V, F16
        ordered.push_back({"model.layers." + std::to_string(i), w, kv});
    }
    ordered.push_back(c.modules[1]);
    ordered.push_back(c.modules[2]);
    c.modules = std::move(ordered);

    // Activations of one call over n_tok tokens, F16: hidden, x, q, k, v, y, gate, up and the
    // landing buffer of the hidden state copied from the previous stage; the dequantize/permute
    // scratch of a GPTQ linear; the step inputs (ids, positions, RoPE rows); the fixed workspace.
    const uint64_t act  = n_tok * (E + std::max(E, Q) + Q + 2 * KV + E + 2 * F + E) * 2;
    const uint64_t scr  = n_tok * std::max(E, F) * 2;
    const uint64_t stp  = n_tok * (8 + HD * 4);
    c.gpu_reserve_bytes = act + scr + stp + k_gpu_workspace_bytes;
    return c;
}

// ---- plans --------------------------------------------------------------------------------------------

const device_plan_usage* device_plan::usage(int device) const {
    for (const auto& d : devices)
        if (d.device == device) return &d;
    return nullptr;
}

int64_t device_plan::n_offloaded() const {
    int64_t n = 0;
    for (const auto& m : modules) n += m.device == k_device_cpu;
    return n;
}

result<device_plan> device_map_auto(const device_map_costs& costs, const max_memory& mem) {
    if (mem.entries.empty()) return make_error(E_ARG, "--max-memory gives no device");
    const std::vector<int> gpus    = mem.gpus();
    const bool             has_cpu = mem.find(k_device_cpu) != nullptr;
    const size_t           n_mod   = costs.modules.size();

    device_plan plan;
    plan.source  = "auto";
    plan.options = costs.options;
    for (const auto& m : costs.modules) plan.modules.push_back({m.name, k_device_cpu, m.weight_bytes, m.cache_bytes});

    // Fill the GPUs in order; the last one keeps `extra` free for the offloaded modules it runs.
    // Returns the index of the first module left over (n_mod: all placed) and the free bytes of
    // the last GPU at that point.
    auto fill = [&](uint64_t extra, int64_t* last_free) {
        size_t  i    = 0;
        int64_t free = 0;
        for (size_t g = 0; g < gpus.size(); ++g) {
            free = int64_t(mem.find(gpus[g])->bytes) - int64_t(costs.gpu_reserve_bytes) -
                   (g + 1 == gpus.size() ? int64_t(extra) : 0);
            for (; i < n_mod; ++i) {
                const auto& m    = costs.modules[i];
                const auto  cost = int64_t(m.weight_bytes + m.cache_bytes);
                if (cost > free) break;
                plan.modules[i].device = gpus[g];
                free -= cost;
            }
        }
        for (size_t j = i; j < n_mod; ++j) plan.modules[j].device = k_device_cpu;
        *last_free = std::max<int64_t>(free, 0);
        return i;
    };

    int64_t  last_free = 0;
    uint64_t extra     = 0;
    size_t   first_cpu = fill(0, &last_free);
    if (first_cpu < n_mod && !gpus.empty() && !has_cpu) {
        uint64_t rest = 0;
        for (size_t j = first_cpu; j < n_mod; ++j) rest += costs.modules[j].weight_bytes + costs.modules[j].cache_bytes;
        uint64_t need_w = 0, need_c = 0, give = 0;
        for (const auto& m : costs.modules) {
            need_w += m.weight_bytes;
            need_c += m.cache_bytes;
        }
        for (const auto& e : mem.entries) give += e.bytes;
        return make_error(
            E_OOM,
            "needs {} more than --max-memory allows: {} of {} modules fit ({} not); the model needs {} of "
            "weights + {} of KV cache and logits (n_ctx {}, batch {}) + {} of activations and workspace per GPU, and "
            "--max-memory {} gives {}. Give the GPUs more, add cpu=SIZE to offload the rest, lower --ctx/--batch, or "
            "use a GPTQ checkpoint",
            device_map_bytes_str(rest - uint64_t(last_free)), first_cpu, n_mod,
            first_cpu + 1 == n_mod ? costs.modules.back().name + " does"
                                   : costs.modules[first_cpu].name + " .. " + costs.modules.back().name + " do",
            device_map_bytes_str(need_w), device_map_bytes_str(need_c), costs.options.n_ctx, costs.options.batch,
            device_map_bytes_str(costs.gpu_reserve_bytes), max_memory_format(mem), device_map_bytes_str(give));
    }
    // Offloading: the last GPU also holds two staging buffers of the largest offloaded module and
    // the KV cache / logits of the offloaded modules. Reserving that pushes more modules to cpu,
    // which can only raise it, so this converges (at most one module more per round).
    while (first_cpu < n_mod && !gpus.empty()) {
        uint64_t max_w = 0, cache = 0;
        for (size_t j = first_cpu; j < n_mod; ++j) {
            max_w = std::max(max_w, costs.modules[j].weight_bytes);
            cache += costs.modules[j].cache_bytes;
        }
        const uint64_t need = 2 * max_w + cache;
        if (need <= extra) break;
        extra     = need;
        first_cpu = fill(extra, &last_free);
    }
    plan_usage_compute(costs, mem, &plan);
    GPTQ_TRY(plan_check(plan, "the model"));
    return plan;
}

result<device_map_spec> device_map_spec_parse(const std::string& json_text, const std::string& where) {
    GPTQ_ASSIGN_OR_RETURN(json j, json_parse(json_text, where));
    if (!j.is_object())
        return make_error(E_ARG, "{}: a device map is a JSON object {{\"module\": device, ...}}, got {}", where,
                          json_fields::quote(j));
    device_map_spec spec;
    for (auto it = j.begin(); it != j.end(); ++it) {
        const json& v      = it.value();
        int         device = -2;
        if (v.is_number_integer()) {
            const int64_t x = v.get<int64_t>();
            device          = x >= 0 && x < (1 << 20) ? int(x) : -2;
        } else if (v.is_string()) {
            const std::string s = lower(trim(v.get<std::string>()));
            if (s == "disk")
                return make_error(E_UNSUP,
                                  "{}: '{}' is mapped to \"disk\": disk offload is not supported (use \"cpu\" to keep "
                                  "it in host memory and stream it to the GPU)",
                                  where, it.key());
            if (s == "cpu" || s == "cuda" || s.rfind("cuda:", 0) == 0) device = parse_device_name(s);
        }
        if (device == -2)
            return make_error(E_ARG,
                              "{}: '{}' is mapped to {}; a device is a GPU index (0, 1, ...), \"cuda:N\" or "
                              "\"cpu\"",
                              where, it.key(), json_fields::quote(v));
        spec.entries.push_back({it.key(), device});
    }
    return spec;
}

result<device_map_spec> device_map_spec_load(const std::string& path) {
    GPTQ_ASSIGN_OR_RETURN(std::string text, file_read_all(path));
    return device_map_spec_parse(text, path);
}

result<device_plan> device_map_apply(const device_map_costs& costs, const device_map_spec& spec, const max_memory& mem,
                                     const std::string& source) {
    const std::string where = source.empty() ? std::string("--device-map") : source;
    // A key names a module, or a prefix of modules ("model", "model.layers", "" for everything).
    auto covers = [](const std::string& key, const std::string& module) {
        return key.empty() || key == module ||
               (module.size() > key.size() && module.compare(0, key.size(), key) == 0 && module[key.size()] == '.');
    };
    std::vector<std::string> unknown;
    for (const auto& [key, dev] : spec.entries) {
        bool used = false;
        for (const auto& m : costs.modules) used = used || covers(key, m.name);
        if (used) continue;
        for (const auto& m : costs.modules)
            if (covers(m.name, key))
                return make_error(E_UNSUP,
                                  "{}: '{}' places a part of module '{}'; the planner places whole modules "
                                  "(model.embed_tokens, model.layers.N, model.norm, lm_head)",
                                  where, key, m.name);
        unknown.push_back(key);
    }
    if (!unknown.empty())
        return make_error(E_ARG,
                          "{}: unknown module names {} (this model has model.embed_tokens, model.layers.0-{}, "
                          "model.norm, lm_head)",
                          where, join_limited(unknown, 8), costs.modules.size() - 4);

    device_plan plan;
    plan.source  = source;
    plan.options = costs.options;
    std::vector<std::string> missing;
    for (const auto& m : costs.modules) {
        int    best     = -2;
        size_t best_len = 0;
        bool   found    = false;
        for (const auto& [key, dev] : spec.entries) {
            if (!covers(key, m.name) || (found && key.size() < best_len)) continue;
            best     = dev;
            best_len = key.size();
            found    = true;
        }
        if (!found) missing.push_back(m.name);
        plan.modules.push_back({m.name, best, m.weight_bytes, m.cache_bytes});
    }
    if (!missing.empty())
        return make_error(E_ARG, "{}: no device given for {}", where, join_limited(module_ranges(missing), 8));
    plan_usage_compute(costs, mem, &plan);
    GPTQ_TRY(plan_check(plan, "the device map " + where));
    return plan;
}

// ---- a plan on one GPU ------------------------------------------------------------------------------

result<offload_placement> device_plan_offload_placement(const device_plan& plan, int device, int64_t n_layer) {
    if (int64_t(plan.modules.size()) != n_layer + 3)
        return make_error(E_ARG, "device map ({}): {} modules, expected {} for a model of {} layers", plan.source,
                          plan.modules.size(), n_layer + 3, n_layer);
    std::vector<std::string> elsewhere;
    std::set<int>            other_gpus;
    offload_placement        p;
    for (size_t i = 0; i < plan.modules.size(); ++i) {
        const auto& m = plan.modules[i];
        if (m.device != k_device_cpu && m.device != device) {
            elsewhere.push_back(m.name);
            other_gpus.insert(m.device);
            continue;
        }
        if (m.device != k_device_cpu) continue;
        if (i == 0)
            p.embed = true;
        else if (i == plan.modules.size() - 2)
            p.norm = true;
        else if (i == plan.modules.size() - 1)
            p.lm_head = true;
        else
            p.layers.push_back(int64_t(i) - 1);
    }
    if (!elsewhere.empty()) {
        std::vector<std::string> gpus;
        for (int g : other_gpus) gpus.push_back(device_map_device_name(g));
        return make_error(E_UNSUP,
                          "device map ({}) places {} on {}, but this command runs on {} alone: executing a plan "
                          "over several GPUs needs the pipeline runtime, which is not built yet (issue #10). Give "
                          "--max-memory only for {} (and cpu), or a map with only {} and \"cpu\"",
                          plan.source, join_limited(module_ranges(elsewhere), 8), join_limited(gpus, 8),
                          device_map_device_name(device), device, device_map_device_name(device));
    }
    if (p.any() && plan.exec_device != k_device_cpu && plan.exec_device != device)
        return make_error(E_UNSUP,
                          "device map ({}) runs its offloaded modules on {}, but this command runs on {}: executing "
                          "a plan over several GPUs needs the pipeline runtime, which is not built yet (issue #10)",
                          plan.source, device_map_device_name(plan.exec_device), device_map_device_name(device));
    for (size_t i = 1; i + 2 < plan.modules.size(); ++i)
        if (plan.modules[i].name != fmt::format("model.layers.{}", i - 1))
            return make_error(E_ARG, "device map ({}): module {} is '{}', expected 'model.layers.{}'", plan.source, i,
                              plan.modules[i].name, i - 1);
    return p;
}

// ---- printing ------------------------------------------------------------------------------------------

std::string device_plan_table(const device_plan& p) {
    std::string s = fmt::format("device map ({}), n_ctx {}, batch {}: {} modules", p.source, p.options.n_ctx,
                                p.options.batch, p.modules.size());
    if (p.n_offloaded() > 0)
        s +=
            fmt::format(", {} offloaded to cpu (streamed to {})", p.n_offloaded(),
                        p.exec_device == k_device_cpu ? "nothing: CPU runtime" : device_map_device_name(p.exec_device));
    s += "\n";
    // Runs of consecutive modules on one device.
    for (size_t i = 0; i < p.modules.size();) {
        size_t                   j = i;
        std::vector<std::string> names;
        uint64_t                 w = 0;
        for (; j < p.modules.size() && p.modules[j].device == p.modules[i].device; ++j) {
            names.push_back(p.modules[j].name);
            w += p.modules[j].weight_bytes;
        }
        s += fmt::format("  {:<7} {:>10}  {}\n", device_map_device_name(p.modules[i].device), device_map_bytes_str(w),
                         join_limited(module_ranges(names), 100));
        i = j;
    }
    s += fmt::format("{:<8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n", "device", "modules", "weights",
                     "kv/logits", "reserve", "staging", "total", "max-memory");
    for (const auto& d : p.devices) {
        auto b = [](uint64_t x) { return x ? device_map_bytes_str(x) : std::string("-"); };
        s += fmt::format("{:<8} {:>7} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}\n", device_map_device_name(d.device),
                         d.n_modules, b(d.weight_bytes), b(d.cache_bytes), b(d.reserve_bytes), b(d.staging_bytes),
                         b(d.total()), d.has_limit ? device_map_bytes_str(d.limit_bytes) : std::string("no limit"));
    }
    return s;
}

std::string device_plan_json(const device_plan& p) {
    std::string s = "{\n";
    for (size_t i = 0; i < p.modules.size(); ++i) {
        const auto&       m   = p.modules[i];
        const std::string dev = m.device == k_device_cpu ? "\"cpu\"" : std::to_string(m.device);
        s += fmt::format("  \"{}\": {}{}\n", m.name, dev, i + 1 < p.modules.size() ? "," : "");
    }
    return s + "}\n";
}

}  // namespace gptq
