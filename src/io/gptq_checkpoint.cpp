#include "io/gptq_checkpoint.h"

#include <cstring>

#include "core/dtype.h"
#include "core/error.h"
#include "io/gptq_pack.h"

namespace gptq {

namespace {

constexpr auto E_PARSE = status_code::STATUS_PARSE_ERROR;

std::string shape_str(const std::vector<int64_t>& s) {
    std::string r = "[";
    for (size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
    return r + "]";
}

result<tensor_entry> expect_tensor(const tensor_source& src, const std::string& name, dtype type,
                                   const std::vector<int64_t>& shape) {
    GPTQ_ASSIGN_OR_RETURN(tensor_entry e, src.get(name));
    if (e.info->type != type)
        return make_error(E_PARSE, "{}: tensor '{}' has dtype {}, expected {}", e.file->path(), name,
                          dtype_name(e.info->type), dtype_name(type));
    if (e.info->shape != shape)
        return make_error(E_PARSE, "{}: tensor '{}' has shape {}, expected {}", e.file->path(), name,
                          shape_str(e.info->shape), shape_str(shape));
    return e;
}

}  // namespace

void gptq_linear_data::dequantize(float* w) const {
    std::vector<float> s(scales.size());
    for (size_t i = 0; i < s.size(); ++i) s[i] = f16_to_f32(scales[i]);
    for (int64_t n = 0; n < n_out; ++n)
        for (int64_t k = 0; k < n_in; ++k) {
            const size_t gi = static_cast<size_t>(g_idx[static_cast<size_t>(k)] * n_out + n);
            w[n * n_in + k] =
                s[gi] * static_cast<float>(static_cast<int>(codes[static_cast<size_t>(n * n_in + k)]) - zeros[gi]);
        }
}

std::vector<safetensors_decl> gptq_linear_decls(const std::string& module, int64_t n_out, int64_t n_in,
                                                int64_t n_groups, int bits, bool has_bias) {
    std::vector<safetensors_decl> d = {
        {module + ".qweight", dtype::DTYPE_I32, {gptq_packed_words(n_in, bits), n_out}},
        {module + ".qzeros", dtype::DTYPE_I32, {n_groups, gptq_packed_words(n_out, bits)}},
        {module + ".scales", dtype::DTYPE_F16, {n_groups, n_out}},
        {module + ".g_idx", dtype::DTYPE_I32, {n_in}},
    };
    if (has_bias) d.push_back({module + ".bias", dtype::DTYPE_F16, {n_out}});
    return d;
}

status gptq_linear_write(safetensors_writer& w, const std::string& module, const gptq_linear_data& d,
                         gptq_checkpoint_format format) {
    GPTQ_TRY(gptq_check_packable(d.n_in, d.n_out, d.bits, module));
    std::vector<int32_t> qweight(static_cast<size_t>(gptq_packed_words(d.n_in, d.bits) * d.n_out));
    gptq_pack_qweight(d.codes.data(), d.n_out, d.n_in, d.bits, qweight.data());
    GPTQ_TRY(w.write(module + ".qweight", qweight.data(), qweight.size() * 4));
    std::vector<int32_t> qzeros(static_cast<size_t>(d.n_groups * gptq_packed_words(d.n_out, d.bits)));
    GPTQ_TRY(gptq_pack_qzeros(d.zeros.data(), d.n_groups, d.n_out, d.bits, format, qzeros.data()).with_context(module));
    GPTQ_TRY(w.write(module + ".qzeros", qzeros.data(), qzeros.size() * 4));
    GPTQ_TRY(w.write(module + ".scales", d.scales.data(), d.scales.size() * 2));
    GPTQ_TRY(w.write(module + ".g_idx", d.g_idx.data(), d.g_idx.size() * 4));
    if (!d.bias.empty()) GPTQ_TRY(w.write(module + ".bias", d.bias.data(), d.bias.size() * 2));
    return status::ok();
}

bool gptq_linear_present(const tensor_source& src, const std::string& module) {
    return src.has(module + ".qweight");
}

result<gptq_linear_data> gptq_linear_read(const tensor_source& src, const std::string& module, int64_t n_out,
                                          int64_t n_in, const gptq_config& cfg, bool keep_packed) {
    if (cfg.format == gptq_checkpoint_format::GPTQ_FORMAT_MARLIN)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "{}: checkpoint_format 'marlin' is not supported for loading", cfg.source);
    const int bits = cfg.bits;
    GPTQ_TRY(gptq_check_packable(n_in, n_out, bits, module));
    gptq_linear_data d;
    d.n_out = n_out;
    d.n_in  = n_in;
    d.bits  = bits;

    GPTQ_ASSIGN_OR_RETURN(tensor_entry g_idx, expect_tensor(src, module + ".g_idx", dtype::DTYPE_I32, {n_in}));
    d.g_idx.resize(static_cast<size_t>(n_in));
    g_idx.file->copy_to(*g_idx.info, d.g_idx.data());

    GPTQ_ASSIGN_OR_RETURN(tensor_entry scales, src.get(module + ".scales"));
    if (scales.info->shape.size() != 2 || scales.info->shape[1] != n_out || scales.info->shape[0] <= 0)
        return make_error(E_PARSE, "{}: tensor '{}.scales' has shape {}, expected [n_groups, {}]", scales.file->path(),
                          module, shape_str(scales.info->shape), n_out);
    d.n_groups = scales.info->shape[0];
    for (int64_t k = 0; k < n_in; ++k) {
        const int32_t g = d.g_idx[static_cast<size_t>(k)];
        if (g < 0 || g >= d.n_groups)
            return make_error(E_PARSE, "{}: {}.g_idx[{}] = {} is outside the {} groups of its scales",
                              g_idx.file->path(), module, k, g, d.n_groups);
    }
    GPTQ_TRY(scales.file->check_finite(*scales.info));  // a NaN scale would put NaN in every weight of its group
    d.scales.resize(static_cast<size_t>(d.n_groups * n_out));
    if (scales.info->type == dtype::DTYPE_F16) {
        scales.file->copy_to(*scales.info, d.scales.data());
    } else if (scales.info->type == dtype::DTYPE_BF16 || scales.info->type == dtype::DTYPE_F32) {
        std::vector<float> f(d.scales.size());  // AutoGPTQ's cuda kernel may store bf16 scales
        GPTQ_TRY(scales.file->read_f32(*scales.info, f.data()));
        for (size_t i = 0; i < f.size(); ++i) {
            d.scales[i] = f32_to_f16(f[i]);
            if ((d.scales[i] & 0x7c00) == 0x7c00)
                return make_error(E_PARSE, "{}: {}.scales[{}] = {} does not fit in F16", scales.file->path(), module, i,
                                  f[i]);
        }
    } else {
        return make_error(E_PARSE, "{}: tensor '{}.scales' has dtype {}, expected F16", scales.file->path(), module,
                          dtype_name(scales.info->type));
    }

    GPTQ_ASSIGN_OR_RETURN(tensor_entry qw, expect_tensor(src, module + ".qweight", dtype::DTYPE_I32,
                                                         {gptq_packed_words(n_in, bits), n_out}));
    std::vector<int32_t> words(static_cast<size_t>(qw.info->numel()));
    qw.file->copy_to(*qw.info, words.data());
    if (keep_packed) {
        d.qweight = std::move(words);
    } else {
        d.codes.resize(static_cast<size_t>(n_out * n_in));
        gptq_unpack_qweight(words.data(), n_out, n_in, bits, d.codes.data());
    }

    GPTQ_ASSIGN_OR_RETURN(tensor_entry qz, expect_tensor(src, module + ".qzeros", dtype::DTYPE_I32,
                                                         {d.n_groups, gptq_packed_words(n_out, bits)}));
    std::vector<int32_t> zwords(static_cast<size_t>(qz.info->numel()));
    qz.file->copy_to(*qz.info, zwords.data());
    d.zeros.resize(static_cast<size_t>(d.n_groups * n_out));
    // cfg.format is the config's label, or what the data says when the loader resolved it
    // (io/gptq_zero_format.h: one decision per checkpoint).
    gptq_unpack_qzeros(zwords.data(), d.n_groups, n_out, bits, cfg.format, d.zeros.data());

    if (const tensor_entry* b = src.find(module + ".bias")) {
        if (b->info->shape != std::vector<int64_t>{n_out})
            return make_error(E_PARSE, "{}: tensor '{}.bias' has shape {}, expected [{}]", b->file->path(), module,
                              shape_str(b->info->shape), n_out);
        std::vector<float> f(static_cast<size_t>(n_out));
        GPTQ_TRY(b->file->check_finite(*b->info));
        GPTQ_TRY(b->file->read_f32(*b->info, f.data()));
        d.bias.resize(static_cast<size_t>(n_out));
        for (size_t i = 0; i < f.size(); ++i) d.bias[i] = f32_to_f16(f[i]);
    }
    return d;
}

gptq_linear_data gptq_linear_rows(const gptq_linear_data& d, int64_t row0, int64_t n_out) {
    GPTQ_ASSERT(row0 >= 0 && n_out >= 0 && row0 + n_out <= d.n_out && !d.codes.empty());
    gptq_linear_data r;
    r.n_out    = n_out;
    r.n_in     = d.n_in;
    r.n_groups = d.n_groups;
    r.bits     = d.bits;
    r.codes.assign(d.codes.begin() + row0 * d.n_in, d.codes.begin() + (row0 + n_out) * d.n_in);
    r.zeros.resize(static_cast<size_t>(d.n_groups * n_out));
    r.scales.resize(r.zeros.size());
    for (int64_t g = 0; g < d.n_groups; ++g)
        for (int64_t j = 0; j < n_out; ++j) {
            r.zeros[size_t(g * n_out + j)]  = d.zeros[size_t(g * d.n_out + row0 + j)];
            r.scales[size_t(g * n_out + j)] = d.scales[size_t(g * d.n_out + row0 + j)];
        }
    r.g_idx = d.g_idx;
    if (!d.bias.empty()) r.bias.assign(d.bias.begin() + row0, d.bias.begin() + row0 + n_out);
    return r;
}

result<gptq_linear_data> gptq_linear_join_rows(const std::vector<const gptq_linear_data*>& parts,
                                               const std::string&                          module) {
    GPTQ_ASSERT(!parts.empty());
    const gptq_linear_data& a = *parts[0];
    gptq_linear_data        r;
    r.n_in     = a.n_in;
    r.n_groups = a.n_groups;
    r.bits     = a.bits;
    r.g_idx    = a.g_idx;
    for (const auto* p : parts) {
        if (p->n_in != a.n_in || p->bits != a.bits || p->n_groups != a.n_groups || p->g_idx != a.g_idx ||
            p->bias.empty() != a.bias.empty())
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "{}: the parts of a fused linear differ in in_features, bits, groups, g_idx or bias",
                              module);
        r.n_out += p->n_out;
    }
    r.zeros.resize(static_cast<size_t>(r.n_groups * r.n_out));
    r.scales.resize(r.zeros.size());
    int64_t row0 = 0;
    for (const auto* p : parts) {
        r.codes.insert(r.codes.end(), p->codes.begin(), p->codes.end());
        r.bias.insert(r.bias.end(), p->bias.begin(), p->bias.end());
        for (int64_t g = 0; g < r.n_groups; ++g)
            for (int64_t j = 0; j < p->n_out; ++j) {
                r.zeros[size_t(g * r.n_out + row0 + j)]  = p->zeros[size_t(g * p->n_out + j)];
                r.scales[size_t(g * r.n_out + row0 + j)] = p->scales[size_t(g * p->n_out + j)];
            }
        row0 += p->n_out;
    }
    return r;
}

}  // namespace gptq
