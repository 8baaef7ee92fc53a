// include/gptq/lora.h: the --lora argument, the adapters a model_session loads, and merge-lora.
// docs/lora.md.
#include "gptq/lora.h"

#include <fmt/format.h>
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <map>

#include "core/error.h"
#include "core/log.h"
#include "io/json_file.h"
#include "io/tensor_source.h"
#include "lora_load.h"
#include "model/llama.h"
#include "model/lora.h"

namespace gptq {

namespace {
namespace fs         = std::filesystem;
constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;
constexpr auto E_IO  = status_code::STATUS_IO_ERROR;
}  // namespace

result<lora_spec> lora_spec_parse(const std::string& arg) {
    if (arg.empty()) return make_error(E_ARG, "--lora: empty value, expected DIR or DIR:SCALE");
    lora_spec    s;
    const size_t colon = arg.rfind(':');
    s.path             = arg;
    if (colon != std::string::npos) {
        const std::string tail = arg.substr(colon + 1);
        char*             end  = nullptr;
        const double      v    = tail.empty() ? 0.0 : std::strtod(tail.c_str(), &end);
        if (!tail.empty() && end && *end == '\0') {
            if (!std::isfinite(v)) return make_error(E_ARG, "--lora '{}': the scale {} is not finite", arg, tail);
            s.path  = arg.substr(0, colon);
            s.scale = v;
        }
    }
    if (s.path.empty()) return make_error(E_ARG, "--lora '{}': no adapter folder before ':'", arg);
    return s;
}

result<std::vector<std::shared_ptr<const lora_adapter>>> lora_adapters_open(const std::vector<lora_spec>& specs,
                                                                            const llama_hparams& hp, bool stack) {
    std::vector<lora_adapter> loaded;
    for (const lora_spec& s : specs) {
        GPTQ_ASSIGN_OR_RETURN(lora_adapter a, lora_adapter_load(s.path, hp, static_cast<float>(s.scale)));
        GPTQ_LOG_INFO("LoRA adapter {} ({}): {} linears, scale x{}, {:.1f} MiB", a.name, s.path, a.n_modules(), s.scale,
                      a.bytes() / 1048576.0);
        for (const lora_adapter& b : loaded)
            if (!stack && b.name == a.name)
                return make_error(E_ARG,
                                  "--lora {} and {}: two adapters named {} (the folder name is the model "
                                  "name clients choose it by)",
                                  b.path, a.path, a.name);
        loaded.push_back(std::move(a));
    }
    std::vector<std::shared_ptr<const lora_adapter>> out;
    if (stack && loaded.size() > 1) {
        out.push_back(std::make_shared<const lora_adapter>(lora_adapters_stack(loaded)));
    } else {
        for (lora_adapter& a : loaded) out.push_back(std::make_shared<const lora_adapter>(std::move(a)));
    }
    return out;
}

namespace {

status merge_check(const merge_lora_params& p) {
    if (p.base_path.empty()) return make_error(E_ARG, "merge-lora: no base model given");
    if (p.loras.empty()) return make_error(E_ARG, "merge-lora: no adapter given");
    if (p.out_path.empty()) return make_error(E_ARG, "merge-lora: no output folder given (-o)");
    std::error_code ec;
    if (fs::exists(p.out_path, ec))
        return make_error(E_ARG, "merge-lora: {} already exists; choose another output folder", p.out_path);
    return status::ok();
}

// One shard of the base written again under the same name: adapted linears' weights merged
// (each role's rows of a fused module), every other tensor copied byte for byte.
status merge_shard(const safetensors_file& f, const std::string& out_path, const llama_hparams& hp,
                   const lora_adapter&                                                        a,
                   const std::map<std::string, std::vector<std::pair<int64_t, linear_role>>>& mods) {
    std::vector<safetensors_decl> decls;
    for (const safetensors_tensor_info& t : f.tensors()) decls.push_back({t.name, t.type, t.shape});
    GPTQ_ASSIGN_OR_RETURN(auto w, safetensors_writer::create(out_path, decls, f.metadata()));
    for (const safetensors_tensor_info& t : f.tensors()) {
        const std::string suffix = ".weight";
        const std::string module = t.name.size() > suffix.size() ? t.name.substr(0, t.name.size() - suffix.size()) : "";
        const auto        it     = t.name.ends_with(suffix) ? mods.find(module) : mods.end();
        bool              adapted = false;
        if (it != mods.end())
            for (const auto& [layer, role] : it->second) adapted = adapted || a.module(layer, role);
        if (!adapted) {
            GPTQ_TRY(w->write(t.name, f.bytes(t), t.nbytes()));
            continue;
        }
        std::vector<float> m(static_cast<size_t>(t.numel()));  // [n_out_module, n_in]
        GPTQ_TRY(f.read_f32(t, m.data()));
        for (const auto& [layer, role] : it->second) {
            const lora_module* lm = a.module(layer, role);
            if (!lm) continue;
            const linear_slot s      = llama_linear_slot(hp, layer, role);
            const auto [n_out, n_in] = hp.linear_shape(role);
            lora_merge_into(*lm, m.data() + s.row0 * n_in, n_out, n_in);
        }
        std::vector<uint16_t> half;
        const void*           bytes = m.data();
        if (t.type == dtype::DTYPE_F16 || t.type == dtype::DTYPE_BF16) {
            half.resize(m.size());
            if (t.type == dtype::DTYPE_F16)
                f32_to_f16_row(m.data(), half.data(), m.size());
            else
                f32_to_bf16_row(m.data(), half.data(), m.size());
            bytes = half.data();
        } else if (t.type != dtype::DTYPE_F32) {
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "{}: tensor {} has dtype {}; merge-lora writes F16, "
                              "BF16 or F32 weights",
                              f.path(), t.name, dtype_name(t.type));
        }
        GPTQ_TRY(w->write(t.name, bytes, t.nbytes()));
    }
    return w->finish();
}

}  // namespace

status merge_lora_run(const merge_lora_params& p) {
    GPTQ_TRY(merge_check(p));
    GPTQ_ASSIGN_OR_RETURN(auto model, llama_model::open(p.base_path));
    if (model->quantization())
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "merge-lora: {} is a GPTQ checkpoint; merging into quantized weights would need "
                          "requantizing them. Merge into the FP16/BF16 original, then `gptq quantize` the result "
                          "(or serve the adapter unmerged: --lora on ppl, generate, bench, serve)",
                          p.base_path);
    const llama_hparams& hp = model->hparams();
    GPTQ_ASSIGN_OR_RETURN(auto adapters, lora_adapters_open(p.loras, hp, /*stack=*/true));
    const lora_adapter&                                                 a = *adapters[0];
    std::map<std::string, std::vector<std::pair<int64_t, linear_role>>> mods;  // module -> its roles
    for (int64_t i = 0; i < hp.n_layer; ++i)
        for (const linear_module& m : llama_linear_modules(hp, i))
            for (linear_role r : m.roles) mods[m.module].push_back({i, r});

    const tensor_source& src  = model->source();
    const std::string    work = p.out_path + ".tmp-merge-" + std::to_string(getpid());
    std::error_code      ec;
    fs::create_directories(work, ec);
    if (ec) return make_error(E_IO, "creating {}: {}", work, ec.message());
    auto fail = [&](status st) {
        fs::remove_all(work, ec);
        return st;
    };
    // Every other regular file of the base (config, tokenizer, generation config, the shard index,
    // which still holds: same names in the same shards) is copied.
    std::map<std::string, const safetensors_file*> shards;
    for (size_t i = 0; i < src.n_files(); ++i) shards[fs::path(src.file(i).path()).filename().string()] = &src.file(i);
    for (const auto& entry : fs::directory_iterator(src.folder(), ec)) {
        const std::string name = entry.path().filename().string();
        if (!entry.is_regular_file(ec) || shards.count(name)) continue;
        fs::copy_file(entry.path(), path_join(work, name), ec);
        if (ec) return fail(make_error(E_IO, "copying {}: {}", entry.path().string(), ec.message()));
    }
    for (const auto& [name, f] : shards) {
        status st = merge_shard(*f, path_join(work, name), hp, a, mods);
        if (!st.is_ok()) return fail(st);
    }
    fs::rename(work, p.out_path, ec);
    if (ec) return fail(make_error(E_IO, "renaming {} to {}: {}", work, p.out_path, ec.message()));
    GPTQ_LOG_INFO("merged {} ({} linears) into {} -> {}", a.name, a.n_modules(), p.base_path, p.out_path);
    return status::ok();
}

}  // namespace gptq
