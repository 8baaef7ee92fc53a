// Fuzz entry points for io/ (safetensors, tensor_source, configs, GPTQ modules) and the model's
// hparams check. Each one does what the tool does with a file from the internet, then checks the
// promises of a successful load (every view in bounds, sizes consistent, config round trips).
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"
#include "fuzz_common.h"
#include "fuzz_targets.h"
#include "io/gptq_checkpoint.h"
#include "io/gptq_config.h"
#include "io/gptq_zero_format.h"
#include "io/hf_config.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/tensor_source.h"
#include "model/llama.h"

namespace gptq::fuzz {

namespace {

// Touch every byte of every tensor the file declares, through each accessor the tool uses.
void touch_tensors(const safetensors_file& f) {
    std::vector<uint8_t> buf;
    std::vector<float>   fl;
    for (const auto& t : f.tensors()) {
        GPTQ_ASSERT(t.begin <= t.end && t.end + 8 <= f.file_size());
        GPTQ_ASSERT(static_cast<uint64_t>(t.numel()) * dtype_size(t.type) == t.nbytes());
        GPTQ_ASSERT(f.find(t.name) == &t);
        const tensor_view v = f.view(t);
        GPTQ_ASSERT(v.nbytes() == t.nbytes());
        buf.resize(t.nbytes());
        f.copy_to(t, buf.data());
        fl.resize(static_cast<size_t>(t.numel()));
        (void)f.read_f32(t, fl.data());
    }
}

}  // namespace

int fuzz_safetensors(const uint8_t* data, size_t size) {
    // The header parser on the image alone, then the real open (mmap) of the same bytes.
    auto              h    = safetensors_parse_header(data, size, size, "fuzz");
    const std::string path = scratch_file("fuzz.safetensors");
    write_bytes(path, std::string_view(reinterpret_cast<const char*>(data), size));
    auto f = safetensors_file::open(path);
    GPTQ_ASSERT(f.is_ok() == h.is_ok());
    if (f.is_ok()) touch_tensors(**f);
    return 0;
}

int fuzz_tensor_source(const uint8_t* data, size_t size) {
    scratch_clear();
    const std::string dir = scratch_file("model");
    std::filesystem::create_directories(dir);
    for (const auto& p : split_parts(data, size)) write_bytes(dir + "/" + p.name, p.bytes);
    auto src = tensor_source::open(dir);
    if (!src) return 0;
    const tensor_source& s = **src;
    for (size_t i = 0; i < s.n_files(); ++i) touch_tensors(s.file(i));
    for (const auto& name : s.names()) {
        auto e = s.get(name);
        GPTQ_ASSERT(e.is_ok() && e->info->name == name);
        if (e->info->type == dtype::DTYPE_F32 || e->info->type == dtype::DTYPE_F16 ||
            e->info->type == dtype::DTYPE_BF16) {
            std::vector<float> f(static_cast<size_t>(e->info->numel()));
            // read_f32 refuses NaN/Inf (docs/reliability.md): it fails exactly when check_finite does.
            const status st = s.read_f32(name, f.data(), e->info->shape);
            GPTQ_ASSERT(st.is_ok() == e->file->check_finite(*e->info).is_ok());
        }
    }
    (void)s.total_bytes();
    (void)s.total_params();
    return 0;
}

int fuzz_config(const uint8_t* data, size_t size) {
    const std::string_view text(reinterpret_cast<const char*>(data), size);
    scratch_clear();
    // Files, as the loaders see them in a model folder.
    write_bytes(scratch_file("config.json"), text);
    write_bytes(scratch_file("generation_config.json"), text);
    write_bytes(scratch_file("quantize_config.json"), text);
    (void)generation_config_load(scratch_dir());
    (void)gptq_config_find(scratch_dir());

    auto j = json_parse(text, "fuzz");
    if (!j) return 0;
    if (auto cfg = model_config_parse(*j, "fuzz")) {
        if (cfg->has_quantization_config) (void)gptq_config_parse(cfg->quantization_config, "fuzz:quantization_config");
        if (auto hp = llama_hparams_from_config(*cfg)) {
            // Everything the loader derives from the hparams must be well defined.
            for (int r = 0; r < k_n_linear_roles; ++r) {
                const auto shp = hp->linear_shape(static_cast<linear_role>(r));
                GPTQ_ASSERT(shp[0] > 0 && shp[1] > 0);
            }
            for (const auto& t : llama_global_tensors(*hp))
                for (int64_t d : t.shape) GPTQ_ASSERT(d > 0);
            for (const auto& t : llama_layer_tensors(*hp, hp->n_layer - 1))
                for (int64_t d : t.shape) GPTQ_ASSERT(d > 0);
            const auto inv = llama_rope_inv_freq(*hp, 1);
            GPTQ_ASSERT(static_cast<int64_t>(inv.size()) == hp->head_dim / 2);
        }
    }
    if (auto q = gptq_config_parse(*j, "fuzz")) {
        // What we write must read back as the same settings.
        auto back = gptq_config_parse(q->to_json(), "fuzz:to_json");
        GPTQ_ASSERT(back.is_ok());
        GPTQ_ASSERT(back->bits == q->bits && back->group_size == q->group_size && back->desc_act == q->desc_act &&
                    back->sym == q->sym && back->format == q->format);
    }
    return 0;
}

int fuzz_gptq_module(const uint8_t* data, size_t size) {
    constexpr size_t k_prefix = 12;
    if (size < k_prefix) return 0;
    // Prefix: bits, format/sym, n_out (i16 LE), n_in (i16 LE), 6 spare bytes.
    gptq_config      cfg;
    static const int k_bits[] = {2, 3, 4, 8};
    cfg.bits                  = data[0] < 240 ? k_bits[data[0] % 4] : data[0] - 240;  // 0..15 too
    cfg.format                = static_cast<gptq_checkpoint_format>(data[1] % 3);
    cfg.sym                   = (data[1] & 0x80) == 0;
    const auto i16            = [&](size_t at) {
        return static_cast<int64_t>(static_cast<int16_t>(data[at] | (data[at + 1] << 8)));
    };
    const int64_t     n_out = i16(2), n_in = i16(4);
    const std::string path = scratch_file("module.safetensors");
    write_bytes(path, std::string_view(reinterpret_cast<const char*>(data) + k_prefix, size - k_prefix));
    auto src = tensor_source::open(path);
    if (!src) return 0;
    (void)gptq_linear_present(**src, "m");
    // The zero-format detector reads every module it finds: a verdict (or the label) or an error.
    if (auto ev = gptq_zero_format_detect(**src, cfg)) GPTQ_ASSERT(ev->decided || ev->format == cfg.format);
    auto d = gptq_linear_read(**src, "m", n_out, n_in, cfg);
    if (!d) return 0;
    // A successful read promises consistent sizes, codes and zeros on the grid, g_idx in range.
    GPTQ_ASSERT(d->n_out == n_out && d->n_in == n_in && d->n_groups > 0);
    GPTQ_ASSERT(d->codes.size() == static_cast<size_t>(n_out * n_in));
    GPTQ_ASSERT(d->zeros.size() == static_cast<size_t>(d->n_groups * n_out) && d->scales.size() == d->zeros.size());
    GPTQ_ASSERT(d->g_idx.size() == static_cast<size_t>(n_in));
    for (uint8_t c : d->codes) GPTQ_ASSERT(c < (1 << cfg.bits));
    for (int32_t z : d->zeros) GPTQ_ASSERT(z >= 0 && z <= (1 << cfg.bits));
    for (int32_t g : d->g_idx) GPTQ_ASSERT(g >= 0 && g < d->n_groups);
    std::vector<float> w(static_cast<size_t>(n_out * n_in));
    d->dequantize(w.data());
    for (float x : w) GPTQ_ASSERT(std::isfinite(x));
    return 0;
}

}  // namespace gptq::fuzz
