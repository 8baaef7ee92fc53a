// The Llama family on one GPU (llama_cuda.h): weights uploaded layer by layer from the tensor table
// of llama.h, each layer run by the one GPU decoder layer (llama_cuda_layer.h: cuda_layer_forward),
// a paged KV cache per layer (a pool of pages and a page table per sequence slot, docs/cuda.md
// "KV pages"), and the decode step replayed as a CUDA graph. Every pointer a
// kernel sees is fixed once the buffers are sized (the activations and step inputs live at the same
// addresses for every call of a given size class); what changes from step to step (token id,
// position, key count, RoPE rows, the page table entries a sequence took) is uploaded into device
// memory before the launch or replay.
// Offloaded modules (CPU offload) are staged through two fixed device buffers, so their addresses
// are fixed too.
#include "model/llama_cuda.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"
#include "core/log.h"
#include "io/gptq_checkpoint.h"
#include "io/gptq_pack.h"

namespace gptq {

namespace {
constexpr status_code E_ARG     = status_code::STATUS_INVALID_ARGUMENT;
constexpr float       k_f16_max = 65504.0f;

size_t align_up(size_t n, size_t a) {
    return (n + a - 1) / a * a;
}

// Round F32 values to F16 bits; a value beyond the F16 range is an error naming the tensor (a BF16
// or F32 checkpoint can hold such values; the GPU runtime computes in F16).
status to_f16(const std::vector<float>& src, std::vector<uint16_t>* dst, const std::string& name) {
    dst->resize(src.size());
    for (size_t i = 0; i < src.size(); ++i) {
        if (!(std::fabs(src[i]) <= k_f16_max))
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "tensor '{}' element {} is {}, outside the F16 range the GPU runtime uses", name, i,
                              src[i]);
        (*dst)[i] = f32_to_f16(src[i]);
    }
    return status::ok();
}
}  // namespace

llama_cuda_model::~llama_cuda_model() {
    if (ctx_) (void)ctx_->synchronize();  // nothing queued may outlive the buffers
    (void)copy_stream_.synchronize();
}

result<std::unique_ptr<llama_cuda_model>> llama_cuda_model::open(const std::string& path, const llama_cuda_options& o) {
    std::unique_ptr<llama_cuda_model> m(new llama_cuda_model());
    m->opts_ = o;
    GPTQ_ASSIGN_OR_RETURN(m->host_, llama_model::open(path));
    const llama_hparams& hp = m->hparams();
    // Family options the GPU has not run (or no device has checked) are refused by name, never
    // skipped (docs/architectures.md).
    GPTQ_TRY(llama_gpu_options_check(hp, path));
    if (!o.loras.empty()) {
        if (hp.fused_qkv || hp.fused_gate_up)
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "{}: LoRA on the GPU adds to each linear's own output, and this checkpoint stores fused "
                              "ones (qkv_proj / gate_up_proj); use --device cpu",
                              path);
        m->opts_.fuse = false;
    }
    if (const char* e = std::getenv("GPTQ_DECODE_FUSE"); e && std::strcmp(e, "0") == 0) m->opts_.decode_fuse = false;
    if (const char* e = std::getenv("GPTQ_DECODE_FUSE_GEMV"); e && std::strcmp(e, "1") == 0)
        m->opts_.decode_fuse_gemv = true;
    if (const char* e = std::getenv("GPTQ_DECODE_FUSE_EPI"); e && (e[0] == '0' || e[0] == '1'))
        m->opts_.decode_fuse_epi = e[0] == '1';
    if (const char* e = std::getenv("GPTQ_LM_HEAD_INT4"); e && (e[0] == '0' || e[0] == '1'))
        m->opts_.lm_head_int4 = e[0] == '1';
    if (const char* e = std::getenv("GPTQ_DEQUANT_AHEAD"); e && std::strcmp(e, "1") == 0) m->opts_.dequant_ahead = true;
    GPTQ_ASSIGN_OR_RETURN(m->ctx_, cuda_context::create(o.device));
    if (hp.head_dim % 2 != 0 || hp.head_dim > 256)
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: head_dim {} (the GPU attention needs even, <= 256)",
                          path, hp.head_dim);
    if (o.page_size < 1 || (o.page_size & (o.page_size - 1)) != 0 || o.page_size > (int64_t(1) << 20))
        return make_error(E_ARG, "{}: KV page size {}: expected a power of two from 1 to 2^20", path, o.page_size);
    const auto& off = o.offload.layers;
    for (size_t i = 0; i < off.size(); ++i)
        if (off[i] < 0 || off[i] >= hp.n_layer || (i > 0 && off[i] <= off[i - 1]))
            return make_error(E_ARG, "{}: offloaded layers must be ascending indices in [0, {}); got {} at position {}",
                              path, hp.n_layer, off[i], i);
    for (int64_t l : off)
        if (hp.is_moe(l))
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "{}: CPU offload of MoE layer {} is not supported on the GPU yet (all of a MoE model's "
                              "layers must fit the GPU)",
                              path, l);
    auto st = m->load_weights();
    if (st.is_ok()) st = m->loras_upload();
    if (!st.is_ok()) return st.with_context(path);
    if (hp.n_expert > 0 && o.moe_grouped && !m->moe_grouped_)
        GPTQ_LOG_WARN(
            "{}: the experts cannot run grouped ({}): decode steps run them one by one, without the CUDA "
            "graph (docs/cuda.md \"Mixture of experts\")",
            path, m->moe_why_not_grouped_);
    int64_t n_ctx = o.n_ctx;
    if (n_ctx <= 0)
        n_ctx = hp.max_position_embeddings > 0 ? std::min(hp.max_position_embeddings, k_llama_cuda_default_ctx)
                                               : k_llama_cuda_default_ctx;
    GPTQ_TRY(m->context_reserve(n_ctx).with_context(path));
    return m;
}

status llama_cuda_model::tensor_upload_f16(const tensor_spec& t, cuda_buffer* out) {
    int64_t n = 1;
    for (int64_t d : t.shape) n *= d;
    // Stored as F16 with the expected shape: the bytes as they are (checked finite), without the
    // F32 round trip below (a 13.5 GB F16 checkpoint took ~80 s through it on the H100 host).
    if (const tensor_entry* e = host_->source().find(t.name);
        e && e->info->type == dtype::DTYPE_F16 && e->info->shape == t.shape) {
        GPTQ_TRY(e->file->check_finite(*e->info));
        std::vector<uint16_t> h(static_cast<size_t>(n));
        e->file->copy_to(*e->info, h.data());
        GPTQ_ASSIGN_OR_RETURN(*out, cuda_buffer::from_host(h.data(), h.size() * 2));
        weight_bytes_ += out->bytes();
        return status::ok();
    }
    std::vector<float> f(static_cast<size_t>(n));
    GPTQ_TRY(host_->source().read_f32(t.name, f.data(), t.shape));
    std::vector<uint16_t> h;
    GPTQ_TRY(to_f16(f, &h, t.name));
    GPTQ_ASSIGN_OR_RETURN(*out, cuda_buffer::from_host(h.data(), h.size() * 2));
    weight_bytes_ += out->bytes();
    return status::ok();
}

status llama_cuda_model::norm_upload(const std::string& name, int64_t len, cuda_buffer* out) {
    if (!hparams().norm_plus_one) return tensor_upload_f16({name, {len}, false}, out);
    // (1 + w) in F32 as the CPU folds it (llama_model::layer_load), then one rounding to F16.
    std::vector<float> f(static_cast<size_t>(len));
    GPTQ_TRY(host_->source().read_f32(name, f.data(), {len}));
    for (float& w : f) w = 1.0f + w;
    std::vector<uint16_t> h;
    GPTQ_TRY(to_f16(f, &h, name + " (1 + w)"));
    GPTQ_ASSIGN_OR_RETURN(*out, cuda_buffer::from_host(h.data(), h.size() * 2));
    weight_bytes_ += out->bytes();
    return status::ok();
}

status llama_cuda_model::fused_module_load(int64_t i_layer, linear_role first, linear* out) {
    // The checkpoint's module as stored (Phi-3 qkv_proj / gate_up_proj): its output rows are the
    // roles' rows one after the other (llama_linear_slot), which is the runtime's fused layout.
    const llama_hparams& hp   = hparams();
    const linear_slot    slot = llama_linear_slot(hp, i_layer, first);
    const int64_t        n_in = hp.linear_shape(first)[1];
    out->n_out                = slot.n_out_module;
    out->n_in                 = n_in;
    if (const gptq_config* qc = host_->quantization_of(slot.module)) {
        GPTQ_ASSIGN_OR_RETURN(gptq_linear_data d, gptq_linear_read(host_->source(), slot.module, slot.n_out_module,
                                                                   n_in, *qc, /*keep_packed=*/true));
        if (d.bias.empty() && llama_linear_has_bias(hp, first))
            return make_error(status_code::STATUS_UNSUPPORTED, "{}: GPTQ layer without its bias tensor", slot.module);
        GPTQ_TRY(gptq_upload(d, qc->group_size, slot.module, out));
    } else {
        GPTQ_TRY(tensor_upload_f16({slot.module + ".weight", {slot.n_out_module, n_in}, false}, &out->w));
        if (llama_linear_has_bias(hp, first))
            GPTQ_TRY(tensor_upload_f16({slot.module + ".bias", {slot.n_out_module}, false}, &out->bias));
    }
    ++n_fused_;
    return status::ok();
}

status llama_cuda_model::linear_load(int64_t i_layer, linear_role r, linear* out) {
    const auto shape = hparams().linear_shape(r);
    return module_load(llama_linear_name(i_layer, r), shape[0], shape[1], llama_linear_has_bias(hparams(), r),
                       /*dense_only=*/false, out);
}

status llama_cuda_model::module_load(const std::string& name, int64_t n_out, int64_t n_in, bool bias, bool dense_only,
                                     linear* out) {
    out->n_out = n_out;
    out->n_in  = n_in;
    if (const gptq_config* qc = host_->quantization_of(name)) {
        if (dense_only) {  // dequantized to F16 once (format.md 1.5), then a dense linear
            GPTQ_ASSIGN_OR_RETURN(gptq_linear_data d, gptq_linear_read(host_->source(), name, n_out, n_in, *qc));
            std::vector<float> w(static_cast<size_t>(n_out * n_in));
            d.dequantize(w.data());
            std::vector<uint16_t> h;
            GPTQ_TRY(to_f16(w, &h, name + " (dequantized)"));
            GPTQ_ASSIGN_OR_RETURN(out->w, cuda_buffer::from_host(h.data(), h.size() * 2));
            weight_bytes_ += out->w.bytes();
            if (!d.bias.empty()) {  // F16 bits already
                GPTQ_ASSIGN_OR_RETURN(out->bias, cuda_buffer::from_host(d.bias.data(), d.bias.size() * 2));
                weight_bytes_ += out->bias.bytes();
            }
            return status::ok();
        }
        GPTQ_ASSIGN_OR_RETURN(gptq_linear_data d,
                              gptq_linear_read(host_->source(), name, n_out, n_in, *qc, /*keep_packed=*/true));
        // A dense bias of a quantized layer that the checkpoint keeps outside the GPTQ tensors.
        if (d.bias.empty() && bias)
            return make_error(status_code::STATUS_UNSUPPORTED, "{}: GPTQ layer without its bias tensor", name);
        return gptq_upload(d, qc->group_size, name, out);
    }
    GPTQ_TRY(tensor_upload_f16({name + ".weight", {n_out, n_in}, false}, &out->w));
    if (bias) GPTQ_TRY(tensor_upload_f16({name + ".bias", {n_out}, false}, &out->bias));
    return status::ok();
}

// Read (and check) through io's reader, then pack again for the device: codes as qweight, zeros as
// v1 (zero - 1, generic kernel adds 1) when every zero is >= 1, else as v2.
status llama_cuda_model::gptq_upload(const gptq_linear_data& d, int group_size, const std::string& name, linear* out) {
    out->n_out = d.n_out;
    out->n_in  = d.n_in;
    GPTQ_ASSIGN_OR_RETURN(out->q, gptq_device_load(d, group_size, name));
    out->quantized = true;
    (out->q.fast ? n_gptq_fast_ : n_gptq_generic_) += 1;
    for (const cuda_buffer* b : {&out->q.weights, &out->q.sz, &out->q.perm, &out->q.perm_inv, &out->q.qweight,
                                 &out->q.qzeros, &out->q.scales, &out->q.g_idx, &out->q.bias})
        weight_bytes_ += b->bytes();
    return status::ok();
}

result<cuda_gptq_linear> llama_cuda_model::gptq_device_load(const gptq_linear_data& d, int group_size,
                                                            const std::string& name) {
    const int bits = d.bits;
    // The file's packed words when read with keep_packed (the same stream packing the codes gives).
    std::vector<int32_t> packed;
    if (d.qweight.empty()) {
        packed.resize(static_cast<size_t>(gptq_packed_words(d.n_in, bits) * d.n_out));
        gptq_pack_qweight(d.codes.data(), d.n_out, d.n_in, bits, packed.data());
    }
    const std::vector<int32_t>& qweight = d.qweight.empty() ? packed : d.qweight;
    const bool                  v1      = std::all_of(d.zeros.begin(), d.zeros.end(), [](int32_t z) { return z >= 1; });
    std::vector<int32_t>        qzeros(static_cast<size_t>(d.n_groups * gptq_packed_words(d.n_out, bits)));
    GPTQ_TRY(gptq_pack_qzeros(d.zeros.data(), d.n_groups, d.n_out, bits,
                              v1 ? gptq_checkpoint_format::GPTQ_FORMAT_V1 : gptq_checkpoint_format::GPTQ_FORMAT_V2,
                              qzeros.data())
                 .with_context(name));
    gptq_host_tensors t;
    t.qweight    = qweight.data();
    t.qzeros     = qzeros.data();
    t.scales     = d.scales.data();
    t.g_idx      = d.g_idx.data();
    t.bias       = d.bias.empty() ? nullptr : d.bias.data();
    t.n_out      = d.n_out;
    t.n_in       = d.n_in;
    t.n_groups   = d.n_groups;
    t.bits       = bits;
    t.group_size = group_size;
    t.zero_add   = v1 ? 1 : 0;
    auto q       = cuda_gptq_linear_load(*ctx_, t, opts_.gptq_fast);
    if (!q) return q.error().with_context(name);
    return q;
}

status llama_cuda_model::linear_group_load(int64_t i_layer, const std::vector<linear_role>& roles, linear* fused,
                                           std::array<linear, k_n_linear_roles>* lin,
                                           const std::vector<int32_t>* out_perm, bool* permuted, int64_t interleave,
                                           int64_t* interleaved) {
    if (permuted) *permuted = false;
    if (interleaved) *interleaved = 0;
    const llama_hparams& hp   = hparams();
    auto                 each = [&]() -> status {
        for (linear_role r : roles) GPTQ_TRY(linear_load(i_layer, r, &(*lin)[static_cast<size_t>(r)]));
        return status::ok();
    };
    if (!opts_.fuse || roles.size() < 2) return each();
    size_t n_quant = 0, n_bias = 0;
    for (linear_role r : roles) {
        n_quant += host_->quantization_of(llama_linear_name(i_layer, r)) ? 1 : 0;
        n_bias += llama_linear_has_bias(hp, r) ? 1 : 0;
    }
    if ((n_quant != 0 && n_quant != roles.size()) || (n_bias != 0 && n_bias != roles.size())) return each();
    const std::string fused_name = fmt::format("{} (fused)", llama_linear_name(i_layer, roles[0]));  // for messages
    if (n_quant == 0) {
        // Dense: the weight rows (and biases) one part after the other, uploaded once.
        std::vector<uint16_t> w, b;
        int64_t               n_out = 0, n_in = 0;
        for (linear_role r : roles) {
            const auto         shape = hp.linear_shape(r);
            const std::string  name  = llama_linear_name(i_layer, r);
            std::vector<float> f(static_cast<size_t>(shape[0] * shape[1]));
            GPTQ_TRY(host_->source().read_f32(name + ".weight", f.data(), {shape[0], shape[1]}));
            std::vector<uint16_t> h;
            GPTQ_TRY(to_f16(f, &h, name + ".weight"));
            w.insert(w.end(), h.begin(), h.end());
            if (n_bias) {
                f.resize(static_cast<size_t>(shape[0]));
                GPTQ_TRY(host_->source().read_f32(name + ".bias", f.data(), {shape[0]}));
                GPTQ_TRY(to_f16(f, &h, name + ".bias"));
                b.insert(b.end(), h.begin(), h.end());
            }
            n_out += shape[0];
            n_in = shape[1];
        }
        fused->n_out = n_out;
        fused->n_in  = n_in;
        GPTQ_ASSIGN_OR_RETURN(fused->w, cuda_buffer::from_host(w.data(), w.size() * 2));
        weight_bytes_ += fused->w.bytes();
        if (n_bias) {
            GPTQ_ASSIGN_OR_RETURN(fused->bias, cuda_buffer::from_host(b.data(), b.size() * 2));
            weight_bytes_ += fused->bias.bytes();
        }
        ++n_fused_;
        return status::ok();
    }
    // GPTQ: read every part; fuse along n_out when the parts agree on bits, groups and g_idx (the
    // same act-order permutation), else upload them one by one.
    std::vector<gptq_linear_data> parts;
    std::vector<int>              group_sizes;  // each part's own (GPTQModel `dynamic` may differ)
    for (linear_role r : roles) {
        const auto         shape = hp.linear_shape(r);
        const std::string  name  = llama_linear_name(i_layer, r);
        const gptq_config* qc    = host_->quantization_of(name);
        GPTQ_ASSIGN_OR_RETURN(gptq_linear_data d,
                              gptq_linear_read(host_->source(), name, shape[0], shape[1], *qc, /*keep_packed=*/true));
        if (d.bias.empty() && llama_linear_has_bias(hp, r))
            return make_error(status_code::STATUS_UNSUPPORTED, "{}: GPTQ layer without its bias tensor", name);
        parts.push_back(std::move(d));
        group_sizes.push_back(qc->group_size);
    }
    bool compatible = true;
    for (size_t j = 0; j < parts.size(); ++j) {
        const auto& d = parts[j];
        compatible    = compatible && d.bits == parts[0].bits && d.n_in == parts[0].n_in &&
                     d.n_groups == parts[0].n_groups && d.g_idx == parts[0].g_idx &&
                     d.bias.empty() == parts[0].bias.empty() && group_sizes[j] == group_sizes[0];
    }
    if (!compatible) {
        for (size_t j = 0; j < roles.size(); ++j)
            GPTQ_TRY(gptq_upload(parts[j], group_sizes[j], llama_linear_name(i_layer, roles[j]),
                                 &(*lin)[static_cast<size_t>(roles[j])]));
        return status::ok();
    }
    // Output features reordered within each part (the consumer's act-order order): columns of
    // qweight, zeros and scales, and the bias, all indexed by the output feature.
    const bool reorder = out_perm && std::all_of(parts.begin(), parts.end(), [&](const gptq_linear_data& d) {
                             return d.n_out == int64_t(out_perm->size());
                         });
    if (reorder) {
        const std::vector<int32_t>& P = *out_perm;
        for (auto& d : parts) {
            const int64_t N = d.n_out, rows = gptq_packed_words(d.n_in, d.bits);
            auto          cols = [&](auto& v, int64_t n_rows) {
                auto tmp = v;
                for (int64_t r = 0; r < n_rows; ++r)
                    for (int64_t i = 0; i < N; ++i) v[size_t(r * N + i)] = tmp[size_t(r * N + P[size_t(i)])];
            };
            cols(d.qweight, rows);
            cols(d.zeros, d.n_groups);
            cols(d.scales, d.n_groups);
            if (!d.bias.empty()) cols(d.bias, 1);
        }
        if (permuted) *permuted = true;
    }
    // The concatenation along n_out: packed qweight [n_in * bits / 32, n_out] column blocks (codes are
    // packed along k, so a column is one output feature); zeros and scales [n_groups, n_out] column
    // blocks; biases one after the other. Packing the zeros again (gptq_upload) keeps the qzeros bit
    // stream right whatever each part's n_out.
    gptq_linear_data f;
    f.n_in     = parts[0].n_in;
    f.n_groups = parts[0].n_groups;
    f.bits     = parts[0].bits;
    f.g_idx    = parts[0].g_idx;
    for (const auto& d : parts) {
        f.n_out += d.n_out;
        f.bias.insert(f.bias.end(), d.bias.begin(), d.bias.end());
    }
    const int64_t rows = gptq_packed_words(f.n_in, f.bits);
    f.qweight.reserve(static_cast<size_t>(rows * f.n_out));
    for (int64_t r = 0; r < rows; ++r)
        for (const auto& d : parts) {
            const size_t o = static_cast<size_t>(r * d.n_out);
            f.qweight.insert(f.qweight.end(), d.qweight.begin() + o, d.qweight.begin() + o + size_t(d.n_out));
        }
    f.zeros.reserve(static_cast<size_t>(f.n_groups * f.n_out));
    f.scales.reserve(static_cast<size_t>(f.n_groups * f.n_out));
    for (int64_t g = 0; g < f.n_groups; ++g)
        for (const auto& d : parts) {
            const size_t o = static_cast<size_t>(g * d.n_out);
            f.zeros.insert(f.zeros.end(), d.zeros.begin() + o, d.zeros.begin() + o + size_t(d.n_out));
            f.scales.insert(f.scales.end(), d.scales.begin() + o, d.scales.begin() + o + size_t(d.n_out));
        }
    parts.clear();
    // Two parts interleaved in blocks of `interleave` output features (the fused decode layout of
    // gate/up, docs/cuda.md "The fused decode step"): row 2 B b + j is part 0's feature B b + j,
    // row 2 B b + B + j part 1's, so that one 32-row tile of the int4 GEMV holds both halves.
    const int64_t half = f.n_out / 2;
    if (interleave > 0 && roles.size() == 2 && half * 2 == f.n_out && half % interleave == 0) {
        const int64_t B   = interleave;
        auto          col = [&](int64_t c) {  // the fused column that new column c takes
            const int64_t b = c / (2 * B), j = c % (2 * B);
            return j < B ? b * B + j : half + b * B + (j - B);
        };
        auto cols = [&](auto& v, int64_t n_rows) {
            const auto tmp = v;
            for (int64_t r = 0; r < n_rows; ++r)
                for (int64_t c = 0; c < f.n_out; ++c) v[size_t(r * f.n_out + c)] = tmp[size_t(r * f.n_out + col(c))];
        };
        cols(f.qweight, rows);
        cols(f.zeros, f.n_groups);
        cols(f.scales, f.n_groups);
        if (!f.bias.empty()) cols(f.bias, 1);
        if (interleaved) *interleaved = B;
    }
    GPTQ_TRY(gptq_upload(f, group_sizes[0], fused_name, fused));
    ++n_fused_;
    return status::ok();
}

status llama_cuda_model::load_weights() {
    const llama_hparams&     hp      = hparams();
    const auto               globals = llama_global_tensors(hp);
    const offload_placement& off     = opts_.offload;
    moe_grouped_                     = hp.n_expert > 0 && opts_.moe_grouped;
    if (hp.n_expert > 0 && !opts_.moe_grouped) moe_why_not_grouped_ = "off (llama_cuda_options::moe_grouped)";
    // Modules in execution order (the order of the offload units): embeddings, layers, norm, lm_head.
    GPTQ_TRY(embed_table_upload(&embed_));
    if (off.embed) GPTQ_TRY(offload_module("model.embed_tokens", {&embed_}, &embed_unit_));
    layers_.resize(static_cast<size_t>(hp.n_layer));
    layer_unit_.assign(static_cast<size_t>(hp.n_layer), -1);
    size_t next_off = 0;
    for (int64_t i = 0; i < hp.n_layer; ++i) {  // one layer's host copies alive at a time
        layer&            L    = layers_[static_cast<size_t>(i)];
        const std::string pre  = fmt::format("model.layers.{}.", i);
        const auto&       nm   = hp.arch->norms;  // names relative to the layer (io/arch.h)
        auto              norm = [&](const char* rel, int64_t len, cuda_buffer* out) -> status {
            return norm_upload(pre + rel + ".weight", len, out);
        };
        GPTQ_TRY(norm(nm.attn_in, hp.n_embd, &L.attn_norm));
        GPTQ_TRY(norm(nm.mlp_in, hp.n_embd, &L.mlp_norm));
        if (hp.attn_out_norm) GPTQ_TRY(norm(nm.attn_out, hp.n_embd, &L.attn_out_norm));
        if (hp.mlp_out_norm) GPTQ_TRY(norm(nm.mlp_out, hp.n_embd, &L.mlp_out_norm));
        if (hp.qk_norm) {
            GPTQ_TRY(norm("self_attn.q_norm", hp.head_dim, &L.q_norm));
            GPTQ_TRY(norm("self_attn.k_norm", hp.head_dim, &L.k_norm));
        }
        using R = linear_role;
        if (hp.fused_qkv) {  // stored fused (Phi-3): kept as the fused linear
            GPTQ_TRY(fused_module_load(i, R::LINEAR_Q, &L.qkv));
        } else if (hp.qk_norm) {  // the q/k norms run over contiguous [n, heads * head_dim]: not fused
            for (R r : {R::LINEAR_Q, R::LINEAR_K, R::LINEAR_V})
                GPTQ_TRY(linear_load(i, r, &L.lin[static_cast<size_t>(r)]));
        } else {
            GPTQ_TRY(linear_group_load(i, {R::LINEAR_Q, R::LINEAR_K, R::LINEAR_V}, &L.qkv, &L.lin));
        }
        // Before the MoE branch's `continue`: sizes q_ (a fused q/k/v writes [n, q_dim + 2 kv_dim]).
        any_qkv_fused_ = any_qkv_fused_ || L.qkv.n_out > 0;
        GPTQ_TRY(linear_load(i, R::LINEAR_O, &L.lin[static_cast<size_t>(R::LINEAR_O)]));
        if (hp.is_moe(i)) {  // the sparse block in place of the MLP (llama_cuda_moe.h)
            const cuda_module_loader load = [this](const std::string& name, int64_t n_out, int64_t n_in,
                                                   bool dense_only, linear* out) {
                return module_load(name, n_out, n_in, /*bias=*/false, dense_only, out);
            };
            GPTQ_ASSIGN_OR_RETURN(auto moe, cuda_moe_load(hp, i, load));
            if (!moe->grouped && moe_why_not_grouped_.empty()) moe_why_not_grouped_ = moe->why_not_grouped;
            moe_grouped_ = moe_grouped_ && moe->grouped;
            L.moe        = std::move(moe);
            continue;  // MoE layers are never offloaded (checked at open)
        }
        // down before gate/up: with act-order on the int4 kernel, gate/up's output features are laid
        // out in down's column order at load, so the activation between them needs no permutation.
        linear& down = L.lin[static_cast<size_t>(R::LINEAR_DOWN)];
        GPTQ_TRY(linear_load(i, R::LINEAR_DOWN, &down));
        std::vector<int32_t> down_perm;
        if (down.quantized && down.q.fast && down.q.perm.bytes()) {
            down_perm.resize(down.q.perm.bytes() / 4);
            GPTQ_TRY(cuda_copy_to_host(*ctx_, down_perm.data(), down.q.perm.data(), down.q.perm.bytes()));
        }
        if (hp.fused_gate_up)  // stored fused (Phi-3): kept as it is; the activation permutes for down
            GPTQ_TRY(fused_module_load(i, R::LINEAR_GATE, &L.gate_up));
        else
            GPTQ_TRY(linear_group_load(i, {R::LINEAR_GATE, R::LINEAR_UP}, &L.gate_up, &L.lin,
                                       down_perm.empty() ? nullptr : &down_perm, &L.gate_up_in_down_order,
                                       opts_.decode_fuse && (opts_.decode_fuse_gemv || opts_.decode_fuse_epi) &&
                                               hp.act == mlp_activation::ACT_SILU
                                           ? 16
                                           : 0,
                                       &L.gate_up_block));
        any_gate_up_fused_ = any_gate_up_fused_ || L.gate_up.n_out > 0;
        if (next_off < off.layers.size() && off.layers[next_off] == i) {
            ++next_off;
            std::vector<cuda_buffer*> bufs = {&L.attn_norm,    &L.mlp_norm, &L.attn_out_norm,
                                              &L.mlp_out_norm, &L.q_norm,   &L.k_norm};
            auto                      add  = [&](linear& l) {
                for (cuda_buffer* b : {&l.w, &l.bias, &l.q.weights, &l.q.sz, &l.q.perm, &l.q.perm_inv, &l.q.qweight,
                                       &l.q.qzeros, &l.q.scales, &l.q.g_idx, &l.q.bias})
                    bufs.push_back(b);
            };
            for (linear& l : L.lin) add(l);
            add(L.qkv);
            add(L.gate_up);
            GPTQ_TRY(offload_module(fmt::format("model.layers.{}", i), bufs, &layer_unit_[static_cast<size_t>(i)]));
        }
    }
    GPTQ_TRY(norm_upload(globals[1].name, hp.n_embd, &norm_));
    if (off.norm) GPTQ_TRY(offload_module("model.norm", {&norm_}, &norm_unit_));
    // A tied lm_head shares the embeddings' table when both are resident; otherwise it is a module
    // of its own (an offloaded table is staged through a slot that later modules reuse).
    // A GPTQ lm_head (tied or not: the checkpoint's own quantized copy, as the CPU model reads it)
    // stays on the int4 layout when it loads there (lm_head_q_, docs/cuda.md "Quantized lm_head on
    // the GPU"), else it is dequantized to F16 here and used as a dense one.
    const gptq_config* lm_head_q = host_->quantization_of("lm_head");
    if (lm_head_q || !hp.tie_embeddings || off.embed || off.lm_head) {
        if (lm_head_q)
            GPTQ_TRY(lm_head_upload_quantized(*lm_head_q));
        else if (hp.tie_embeddings)
            GPTQ_TRY(embed_table_upload(&lm_head_));
        else
            GPTQ_TRY(tensor_upload_f16(globals[2], &lm_head_));
        if (off.lm_head) {
            cuda_gptq_linear&         q    = lm_head_q_.q;
            std::vector<cuda_buffer*> bufs = {&lm_head_};
            if (lm_head_q_.quantized) bufs = {&q.weights, &q.sz, &q.perm, &q.perm_inv, &q.bias};
            GPTQ_TRY(offload_module("lm_head", bufs, &lm_head_unit_));
        }
    }
    return offload_finish();
}

// The input embedding table [n_vocab, n_embd] in F16: the checkpoint's tensor, or GPTQModel's
// quantized model.embed_tokens dequantized on the host (llama_read_quantized_embedding, the table
// the CPU model uses) and rounded to F16 (docs/quantize.md "Quantized embeddings"). A tied lm_head
// stored apart (offload) takes the same table.
status llama_cuda_model::embed_table_upload(cuda_buffer* out) {
    const llama_hparams& hp = hparams();
    const gptq_config*   qe = host_->quantization_of("model.embed_tokens");
    if (!qe) return tensor_upload_f16(llama_global_tensors(hp)[0], out);
    std::vector<float> table;
    GPTQ_TRY(llama_read_quantized_embedding(host_->source(), hp, *qe, &table).with_context(host_->source().folder()));
    std::vector<uint16_t> h;
    GPTQ_TRY(to_f16(table, &h, "model.embed_tokens (dequantized)"));
    GPTQ_ASSIGN_OR_RETURN(*out, cuda_buffer::from_host(h.data(), h.size() * 2));
    weight_bytes_ += out->bytes();
    return status::ok();
}

status llama_cuda_model::lm_head_upload_quantized(const gptq_config& qc) {
    const llama_hparams& hp = hparams();
    if (!opts_.gptq_fast || !opts_.lm_head_int4 || qc.bits != 4) return lm_head_upload_dequantized(qc);
    GPTQ_ASSIGN_OR_RETURN(gptq_linear_data d, gptq_linear_read(host_->source(), "lm_head", hp.n_vocab, hp.n_embd, qc,
                                                               /*keep_packed=*/true));
    GPTQ_ASSIGN_OR_RETURN(cuda_gptq_linear q, gptq_device_load(d, qc.group_size, "lm_head"));
    if (!q.fast) return lm_head_upload_dequantized(qc);  // e.g. act-order groups of unequal sizes
    lm_head_q_.n_out     = hp.n_vocab;
    lm_head_q_.n_in      = hp.n_embd;
    lm_head_q_.q         = std::move(q);
    lm_head_q_.quantized = true;
    n_gptq_fast_ += 1;
    for (const cuda_buffer* b :
         {&lm_head_q_.q.weights, &lm_head_q_.q.sz, &lm_head_q_.q.perm, &lm_head_q_.q.perm_inv, &lm_head_q_.q.bias})
        weight_bytes_ += b->bytes();
    return status::ok();
}

status llama_cuda_model::lm_head_upload_dequantized(const gptq_config& qc) {
    const llama_hparams& hp = hparams();
    GPTQ_ASSIGN_OR_RETURN(gptq_linear_data d, gptq_linear_read(host_->source(), "lm_head", hp.n_vocab, hp.n_embd, qc));
    std::vector<float> w(static_cast<size_t>(hp.n_vocab * hp.n_embd));  // [n_vocab, n_embd] F32, format.md 1.5
    d.dequantize(w.data());
    std::vector<uint16_t> h;
    GPTQ_TRY(to_f16(w, &h, "lm_head (dequantized)"));
    GPTQ_ASSIGN_OR_RETURN(lm_head_, cuda_buffer::from_host(h.data(), h.size() * 2));
    weight_bytes_ += lm_head_.bytes();
    return status::ok();
}

status llama_cuda_model::offload_module(const std::string& name, const std::vector<cuda_buffer*>& bufs, int* unit) {
    GPTQ_TRY(ctx_->synchronize());  // the module's repacking kernels ran on the context's stream
    offload_unit u;
    u.name       = name;
    size_t bytes = 0;
    for (cuda_buffer* b : bufs) {
        if (!b->bytes()) continue;
        u.targets.push_back(b);
        u.offsets.push_back(bytes);
        u.sizes.push_back(b->bytes());
        bytes = align_up(bytes + b->bytes(), 256);  // cudaMalloc's alignment: the kernels see the same
    }
    auto host = cuda_host_buffer::alloc(bytes);
    if (!host) return host.error().with_context(fmt::format("offloading {} to host memory", name));
    u.host = std::move(*host);
    for (size_t i = 0; i < u.targets.size(); ++i) {
        GPTQ_TRY(u.targets[i]->download(u.host.as<uint8_t>() + u.offsets[i], u.sizes[i]));
        *u.targets[i] = cuda_buffer();  // frees the device copy
        weight_bytes_ -= u.sizes[i];
        offload_bytes_ += u.sizes[i];
    }
    *unit = static_cast<int>(units_.size());
    units_.push_back(std::move(u));
    return status::ok();
}

status llama_cuda_model::offload_finish() {
    if (units_.empty()) return status::ok();
    size_t slot = 0;
    for (const auto& u : units_) slot = std::max(slot, u.host.bytes());
    const size_t n_slots = std::min<size_t>(2, units_.size());
    for (size_t s = 0; s < n_slots; ++s) {
        auto b = cuda_buffer::alloc(slot);
        if (!b) return b.error().with_context("the staging buffers of the offloaded modules");
        slots_[s] = std::move(*b);
    }
    for (size_t j = 0; j < units_.size(); ++j) {
        offload_unit& u    = units_[j];
        uint8_t*      base = slots_[j % 2].as<uint8_t>();
        for (size_t i = 0; i < u.targets.size(); ++i)
            *u.targets[i] = cuda_buffer::borrow(base + u.offsets[i], u.sizes[i]);
    }
    GPTQ_ASSIGN_OR_RETURN(copy_stream_, cuda_stream::create(*ctx_));
    GPTQ_ASSIGN_OR_RETURN(start_, cuda_event::create());
    for (size_t s = 0; s < 2; ++s) {
        GPTQ_ASSIGN_OR_RETURN(copied_[s], cuda_event::create());
        GPTQ_ASSIGN_OR_RETURN(freed_[s], cuda_event::create());
    }
    return status::ok();
}

// The copy stream's work is always joined back into the compute stream (the last copy is waited on
// before the last offloaded module runs), so synchronizing the context's stream covers it, and a
// capture of the decode step forks and joins the copy stream within the graph.
status llama_cuda_model::stage_begin() {
    if (units_.empty()) return status::ok();
    GPTQ_TRY(start_.record(ctx_->stream()));  // the previous pass (or graph replay) is done with the slots
    GPTQ_TRY(start_.wait_on(copy_stream_.get()));
    for (int u = 0; u < std::min<int>(2, static_cast<int>(units_.size())); ++u) GPTQ_TRY(stage_copy(u));
    return status::ok();
}

status llama_cuda_model::stage_copy(int u) {
    const offload_unit& x = units_[static_cast<size_t>(u)];
    GPTQ_TRY(cuda_copy_to_device_on(copy_stream_.get(), slots_[u % 2].data(), x.host.data(), x.host.bytes()));
    return copied_[u % 2].record(copy_stream_.get());
}

status llama_cuda_model::stage_wait(int u) {
    if (u < 0) return status::ok();
    return copied_[u % 2].wait_on(ctx_->stream());
}

status llama_cuda_model::stage_done(int u) {
    if (u < 0 || u + 2 >= static_cast<int>(units_.size())) return status::ok();
    GPTQ_TRY(freed_[u % 2].record(ctx_->stream()));
    GPTQ_TRY(freed_[u % 2].wait_on(copy_stream_.get()));
    return stage_copy(u + 2);
}

status llama_cuda_model::context_reserve(int64_t n_ctx) {
    if (n_ctx <= 0) return make_error(E_ARG, "context of {} positions, expected at least 1", n_ctx);
    if (n_ctx <= n_ctx_) return status::ok();
    return kv_reserve(n_seq_, n_ctx, pages_explicit_ ? pages_.n_pages() : 0);
}

status llama_cuda_model::kv_reserve(int64_t n_seq, int64_t n_ctx, int64_t n_pages) {
    if (n_seq < 1 || n_seq > k_llama_cuda_max_seq)
        return make_error(E_ARG, "{} sequences on the GPU: 1 to {} are supported", n_seq, k_llama_cuda_max_seq);
    if (n_ctx <= 0) return make_error(E_ARG, "context of {} positions, expected at least 1", n_ctx);
    if (n_pages < 0) return make_error(E_ARG, "a KV pool of {} pages", n_pages);
    const int64_t P = opts_.page_size, max_pages = (n_ctx + P - 1) / P;
    const int64_t pages = n_pages > 0 ? n_pages : n_seq * max_pages;
    if (n_seq == n_seq_ && n_ctx == n_ctx_ && pages == pages_.n_pages() && pages_.max_pages() == max_pages &&
        page_table_.bytes()) {  // the same layout: the graphs stay valid (bench reserves every iteration)
        pages_explicit_ = n_pages > 0;
        reset();
        return status::ok();
    }
    GPTQ_TRY(ctx_->synchronize());
    graphs_.clear();  // they read the old pools, tables and bounds
    // Until the new layout stands: no pages, so no step can run on a half-made cache.
    const int64_t old_pages = pages_.n_pages();
    GPTQ_TRY(pages_.layout(n_seq_, 0, 0, P));
    seq_pos_.assign(size_t(n_seq_), 0);
    seq_ids_.assign(size_t(n_seq_), {});
    if (pages != old_pages || layers_.empty() || !layers_[0].k_cache.bytes()) {
        const size_t bytes = size_t(pages) * size_t(P) * size_t(hparams().kv_dim()) * 2;
        for (auto& L : layers_) {  // the old pools first
            L.k_cache = cuda_buffer();
            L.v_cache = cuda_buffer();
        }
        for (auto& L : layers_) {
            GPTQ_ASSIGN_OR_RETURN(L.k_cache, cuda_buffer::alloc(bytes));
            GPTQ_ASSIGN_OR_RETURN(L.v_cache, cuda_buffer::alloc(bytes));
        }
    }
    const size_t table_bytes = size_t(n_seq * max_pages) * 4;
    if (page_table_.bytes() != table_bytes) {
        page_table_ = cuda_buffer();
        GPTQ_ASSIGN_OR_RETURN(page_table_, cuda_buffer::alloc(table_bytes));
    }
    GPTQ_TRY(pages_.layout(n_seq, max_pages, pages, P));
    GPTQ_TRY(page_table_.upload(pages_.table(), table_bytes));  // every entry "no page"
    n_seq_          = n_seq;
    n_ctx_          = n_ctx;
    pages_explicit_ = n_pages > 0;
    reset();
    return status::ok();
}

uint64_t llama_cuda_model::cache_bytes() const {
    uint64_t n = page_table_.bytes();
    for (const auto& L : layers_) n += L.k_cache.bytes() + L.v_cache.bytes();
    return n;
}

uint64_t llama_cuda_model::activation_bytes() const {
    uint64_t n = 0;
    for (const cuda_buffer* b : {&hidden_, &x_, &q_, &k_, &v_, &y_, &gate_, &up_, &logits_, &step_}) n += b->bytes();
    return n + moe_buf_.bytes();
}

status llama_cuda_model::activations_reserve(int64_t n) {
    if (n <= n_act_) return status::ok();
    GPTQ_TRY(ctx_->synchronize());
    graphs_.clear();  // their pointers are about to be freed
    const llama_hparams& hp    = hparams();
    const size_t         N     = size_t(n);
    auto                 alloc = [&](cuda_buffer* b, size_t bytes) -> status {
        *b = cuda_buffer();
        GPTQ_ASSIGN_OR_RETURN(*b, cuda_buffer::alloc(bytes));
        return status::ok();
    };
    GPTQ_TRY(alloc(&hidden_, N * size_t(hp.n_embd) * 2));
    GPTQ_TRY(alloc(&x_, N * size_t(std::max(hp.n_embd, hp.q_dim())) * 2));
    // Fused q/k/v writes [n, q_dim + 2 kv_dim] into q_; fused gate/up [n, 2 n_ff] into gate_, and
    // silu_mul then writes its contiguous [n, n_ff] into up_ (the down projection's input).
    GPTQ_TRY(alloc(&q_, N * size_t(hp.q_dim() + (any_qkv_fused_ ? 2 * hp.kv_dim() : 0)) * 2));
    GPTQ_TRY(alloc(&k_, N * size_t(hp.kv_dim()) * 2));
    GPTQ_TRY(alloc(&v_, N * size_t(hp.kv_dim()) * 2));
    GPTQ_TRY(alloc(&y_, N * size_t(hp.n_embd) * 2));
    GPTQ_TRY(alloc(&gate_, N * size_t(hp.n_ff) * (any_gate_up_fused_ ? 2 : 1) * 2));
    GPTQ_TRY(alloc(&up_, N * size_t(hp.n_ff) * 2));
    GPTQ_TRY(alloc(&logits_, N * size_t(hp.n_vocab) * 4));
    GPTQ_TRY(moe_buf_.reserve(hp, n));
    const size_t half  = size_t(hp.head_dim / 2);
    step_rope_offset_  = align_up(5 * N * 4, 256);  // ids, positions, slots, adapters, out rows
    const size_t bytes = step_rope_offset_ + size_t(2 * rope_tables()) * N * half * 4;
    GPTQ_TRY(alloc(&step_, bytes));
    step_host_.assign(bytes, 0);
    n_act_ = n;
    return status::ok();
}

// The step's tokens: token t of slot tok_seq_[t] at position tok_pos_[t], its RoPE rows for a
// sequence of tok_len_[t] positions (the CPU's rule: a step's tokens use the length after it).
status llama_cuda_model::step_inputs_upload(const int32_t* ids, int64_t n) {
    const llama_hparams& hp   = hparams();
    const int64_t        half = hp.head_dim / 2;
    // The page table entries the step's sequences took (pageable copies: the driver has the bytes
    // when the call returns, and the addresses the kernels and graphs hold stay the same). Ranges
    // less than 4 KiB apart go as one copy: any span of the host table may be uploaded, since the
    // entries between them are either already on the device or not read by any kernel.
    const auto dirty = pages_.dirty_take();
    for (size_t i = 0; i < dirty.size();) {
        const int64_t b = dirty[i].first;
        int64_t       e = dirty[i].second;
        for (++i; i < dirty.size() && dirty[i].first - e < 1024; ++i) e = dirty[i].second;
        GPTQ_TRY(
            cuda_copy_to_device_async(*ctx_, page_table_.as<int32_t>() + b, pages_.table() + b, size_t(e - b) * 4));
    }
    for (int64_t t = 0; t < n; ++t)
        if (ids[t] < 0 || ids[t] >= hp.n_vocab)
            return make_error(E_ARG, "token id {} at position {} is outside the vocabulary [0, {})", ids[t], t,
                              hp.n_vocab);
    // [n_act_] ids, [n_act_] positions, [n_act_] slots: one copy.
    int32_t* hi = reinterpret_cast<int32_t*>(step_host_.data());
    std::memcpy(hi, ids, size_t(n) * 4);
    for (int64_t t = 0; t < n; ++t) {
        hi[n_act_ + t]     = static_cast<int32_t>(tok_pos_[size_t(t)]);
        hi[2 * n_act_ + t] = static_cast<int32_t>(tok_seq_[size_t(t)]);
        hi[3 * n_act_ + t] = seq_lora_[size_t(tok_seq_[size_t(t)])];
    }
    GPTQ_TRY(cuda_copy_to_device_async(*ctx_, step_.data(), step_host_.data(), size_t(4 * n_act_) * 4));
    // RoPE rows, exactly as the CPU computes them (dynamic scaling and LongRoPE's factors for the
    // sequence's length, its attention factor). Table 0: hp.rope; table 1 (when they differ):
    // hp.rope_local. The inverse frequencies once per run of tokens of one length.
    for (int64_t tab = 0; tab < rope_tables(); ++tab) {
        const rope_config& rope    = tab == 0 ? hp.rope : hp.rope_local;
        const size_t       off_cos = step_rope_offset_ + size_t(2 * tab * n_act_ * half) * 4;
        const size_t       off_sin = off_cos + size_t(n_act_ * half) * 4;
        float*             cos     = reinterpret_cast<float*>(step_host_.data() + off_cos);
        float*             sin     = reinterpret_cast<float*>(step_host_.data() + off_sin);
        // Only dynamic NTK and LongRoPE frequencies depend on the length (llama_rope_inv_freq).
        const bool         by_len = rope.type == rope_type::ROPE_DYNAMIC || rope.type == rope_type::ROPE_LONGROPE;
        std::vector<float> inv_freq;
        for (int64_t t = 0; t < n; ++t) {
            if (t == 0 || (by_len && tok_len_[size_t(t)] != tok_len_[size_t(t - 1)]))
                inv_freq = llama_rope_inv_freq(hp, rope, tok_len_[size_t(t)]);
            op_rope_tables(inv_freq.data(), half, tok_pos_[size_t(t)], 1, llama_rope_attention_factor(rope),
                           cos + t * half, sin + t * half);
        }
        GPTQ_TRY(cuda_copy_to_device_async(*ctx_, step_.as<uint8_t>() + off_cos, cos, size_t(n * half) * 4));
        GPTQ_TRY(cuda_copy_to_device_async(*ctx_, step_.as<uint8_t>() + off_sin, sin, size_t(n * half) * 4));
    }
    return status::ok();
}

status llama_cuda_model::forward_queued(int64_t n, int64_t n_out_rows, int64_t seq, bool ragged,
                                        const mixed_rows* mixed) {
    const llama_hparams&     hp     = hparams();
    const int64_t            n_embd = hp.n_embd, half = hp.head_dim / 2;
    cuda_context&            c      = *ctx_;
    const int32_t*           ids    = step_.as<int32_t>();
    uint16_t*                hidden = hidden_.as<uint16_t>();
    uint16_t*                x      = x_.as<uint16_t>();
    const cuda_layer_buffers b{x,
                               q_.as<uint16_t>(),
                               k_.as<uint16_t>(),
                               v_.as<uint16_t>(),
                               y_.as<uint16_t>(),
                               gate_.as<uint16_t>(),
                               up_.as<uint16_t>(),
                               &moe_buf_};
    const cuda_op_mark       marker = [this](const char* op) { return prof_mark(op); };

    // The pass every layer runs: the step inputs' positions, slots and RoPE rows; a plain pass in
    // slot seq's pages from its position, a ragged one in every slot's (cuda_layer_pass).
    cuda_layer_pass p;
    p.n   = n;
    p.cos = reinterpret_cast<const float*>(step_.as<uint8_t>() + step_rope_offset_);
    p.sin = p.cos + n_act_ * half;
    if (rope_tables() > 1) {  // the local layers' rows (table 1)
        p.cos_local = p.cos + 2 * n_act_ * half;
        p.sin_local = p.cos + 3 * n_act_ * half;
    }
    p.n_ctx                    = n_ctx_;
    p.n_past                   = ragged ? 0 : seq_pos_[size_t(seq)];
    p.pos_dev                  = ids + n_act_;
    p.seq_dev                  = ids + 2 * n_act_;
    p.lora_rows                = opts_.loras.empty() ? nullptr : ids + 3 * n_act_;
    p.ragged                   = ragged;
    p.mark                     = prof_on_ ? &marker : nullptr;
    p.decode_fuse              = opts_.decode_fuse;
    p.decode_fuse_gemv         = opts_.decode_fuse && opts_.decode_fuse_gemv;
    p.decode_fuse_epi          = opts_.decode_fuse && !opts_.decode_fuse_gemv && opts_.decode_fuse_epi;
    const int64_t table_offset = ragged ? 0 : seq * pages_.max_pages();  // a plain pass: slot seq's table row
    p.pages                    = {page_table_.as<int32_t>() + table_offset, pages_.page_size(), pages_.max_pages()};
    // Prefill and mixed passes: the experts per expert (llama_cuda_moe.h); the grouped kernels are
    // written for one token per sequence.
    p.moe_grouped = ragged && !mixed && moe_grouped_;
    if (mixed) {
        p.chunks      = mixed->chunks.data();
        p.n_chunks    = static_cast<int64_t>(mixed->chunks.size());
        p.decode_row0 = mixed->decode_row0;
    }

    auto wait = [&](int unit) -> status {  // a staged module's copy, timed on its own when profiling
        GPTQ_TRY(stage_wait(unit));
        return unit >= 0 ? prof_mark("stage_wait") : status::ok();
    };

    GPTQ_TRY(stage_begin());
    op_cuda_dequant_forget(c);  // nothing queued ahead by an earlier pass is taken in this one
    GPTQ_TRY(wait(embed_unit_));
    GPTQ_TRY(op_cuda_embedding(c, embed_.as<uint16_t>(), ids, hidden, n, hp.n_vocab, n_embd, hp.embed_scale));
    GPTQ_TRY(prof_mark("embedding"));
    GPTQ_TRY(stage_done(embed_unit_));
    // Each residual add is folded into the RMSNorm after it (op_cuda_add_rms_norm): the output of a
    // layer's down projection waits in y until the next layer (or the final norm) adds it; in the
    // fused decode step down's GEMV adds it (cuda_layer_fusion).
    const uint16_t* pending = nullptr;
    bool            x_ready = false;  // the previous layer's down GEMV wrote this layer's normalised input
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        const layer& ly   = layers_[static_cast<size_t>(i)];
        const int    unit = layer_unit_[static_cast<size_t>(i)];
        GPTQ_TRY(wait(unit));
        p.k_cache = ly.k_cache.as<uint16_t>();
        p.v_cache = ly.v_cache.as<uint16_t>();
        // Dequantize ahead only over resident layers: a staged (offloaded) layer's weights arrive on
        // the stream, which the side stream does not wait for.
        const bool next_resident = i + 1 < hp.n_layer && layer_unit_[static_cast<size_t>(i + 1)] < 0;
        p.dequant_ahead          = opts_.dequant_ahead && unit < 0 && n > 16;
        p.next_layer             = p.dequant_ahead && next_resident ? &layers_[static_cast<size_t>(i + 1)] : nullptr;
        // Down's GEMV may write the next layer's normalised input (its norm weights on the device now).
        p.next_norm = p.decode_fuse_epi && next_resident ? &layers_[static_cast<size_t>(i + 1)] : nullptr;
        p.x_ready   = x_ready;
        bool added  = false;  // the fused decode step added down's output to hidden itself
        GPTQ_ASSIGN_OR_RETURN(const bool done,
                              cuda_layer_forward(c, hp, i, ly, hidden, pending, b, p, &added, &x_ready));
        if (!done) return make_error(status_code::STATUS_INTERNAL, "layer {} stopped early", i);
        pending = added ? nullptr : b.y;
        GPTQ_TRY(stage_done(unit));
    }
    // Final norm (with the last residual add) and lm_head over the rows whose logits are wanted: the
    // last n_out_rows, or (mixed) every row's norm and then the wanted rows gathered into y (free
    // once the add has read it) by the out-row indices (the embedding gather over the rows of x: a
    // row copy), so that the lm_head runs on those rows only.
    const int64_t r0 = mixed ? 0 : n - n_out_rows, n_norm = mixed ? n : n_out_rows;
    GPTQ_TRY(wait(norm_unit_));
    GPTQ_TRY(op_cuda_add_rms_norm(c, hidden + r0 * n_embd, pending ? pending + r0 * n_embd : nullptr,
                                  norm_.as<uint16_t>(), x, n_norm, n_embd, hp.rms_eps));
    GPTQ_TRY(prof_mark(pending ? "add_rms_norm" : "rms_norm"));
    GPTQ_TRY(stage_done(norm_unit_));
    const uint16_t* head_in = x;
    if (mixed) {
        GPTQ_TRY(op_cuda_embedding(c, x, ids + 4 * n_act_, b.y, n_out_rows, n, n_embd));
        GPTQ_TRY(prof_mark("gather_rows"));
        head_in = b.y;
    }
    GPTQ_TRY(wait(lm_head_unit_));
    if (lm_head_q_.quantized) {  // the int4 layout, F32 logits (docs/cuda.md "Quantized lm_head on the GPU")
        GPTQ_TRY(op_cuda_gptq_linear_f32_out(c, lm_head_q_.q, head_in, logits_.as<float>(), n_out_rows));
    } else {
        const uint16_t* w = lm_head_.bytes() ? lm_head_.as<uint16_t>() : embed_.as<uint16_t>();  // empty: tied, shared
        GPTQ_TRY(op_cuda_linear_dense_f32_out(c, head_in, w, logits_.as<float>(), n_out_rows, hp.n_vocab, n_embd));
    }
    GPTQ_TRY(prof_mark("lm_head"));
    if (hp.final_softcap > 0.0f) {  // Gemma: logits = cap * tanh(logits / cap), F32
        GPTQ_TRY(op_cuda_softcap(c, logits_.as<float>(), n_out_rows * hp.n_vocab, hp.final_softcap));
        GPTQ_TRY(prof_mark("softcap"));
    }
    return stage_done(lm_head_unit_);
}

status llama_cuda_model::prof_begin() {
    if (!prof_on_) return status::ok();
    prof_tl_.clear();
    prof_ops_.clear();
    return prof_tl_.mark(ctx_->stream());
}

status llama_cuda_model::prof_mark(const char* op) {
    if (!prof_on_) return status::ok();
    prof_ops_.push_back(op);
    return prof_tl_.mark(ctx_->stream());
}

status llama_cuda_model::prof_end(llama_op_profile* p, int64_t n_tokens) {
    if (!prof_on_) return status::ok();
    GPTQ_ASSIGN_OR_RETURN(const std::vector<float> ms, prof_tl_.intervals_ms());
    if (ms.size() != prof_ops_.size())
        return make_error(status_code::STATUS_INTERNAL, "op profile: {} intervals for {} ops", ms.size(),
                          prof_ops_.size());
    for (size_t i = 0; i < ms.size(); ++i) {
        auto it =
            std::find_if(p->ops.begin(), p->ops.end(), [&](const llama_op_time& t) { return t.op == prof_ops_[i]; });
        if (it == p->ops.end()) it = p->ops.insert(p->ops.end(), llama_op_time{prof_ops_[i], 0, 0.0});
        it->calls += 1;
        it->ms += ms[i];
        p->pass_ms += ms[i];
    }
    p->passes += 1;
    p->tokens += n_tokens;
    return status::ok();
}

status llama_cuda_model::logits_download(int64_t n_rows, float* logits) {
    logits_rows_ = n_rows;
    if (!logits) return status::ok();  // left on the device (logits_top_download, logits_row_download)
    return cuda_copy_to_host(*ctx_, logits, logits_.data(), size_t(n_rows * hparams().n_vocab) * 4);
}

status llama_cuda_model::logits_row_download(int64_t row, float* logits) {
    const int64_t V = hparams().n_vocab;
    if (row < 0 || row >= logits_rows_)
        return make_error(E_ARG, "logits row {} of a pass that left {} rows on the GPU", row, logits_rows_);
    return cuda_copy_to_host(*ctx_, logits, logits_.as<float>() + row * V, size_t(V) * 4);
}

// One kernel over the rows, one download of [sums | values | ids] into top_host_.
status llama_cuda_model::logits_top_download(int64_t n_rows, int64_t k, const float* inv_temp, logits_top* out) {
    const int64_t V = hparams().n_vocab;
    if (n_rows < 1 || n_rows > logits_rows_)
        return make_error(E_ARG, "candidates of {} logits rows of a pass that left {} on the GPU", n_rows,
                          logits_rows_);
    if (k < 1 || k > k_logits_top_max)
        return make_error(E_ARG, "{} candidates per row; 1 to {} are supported", k, k_logits_top_max);
    k                 = std::min(k, V);
    const size_t sums = size_t(n_rows) * 16, vals = size_t(n_rows * k) * 4, ids = vals, temps = size_t(n_rows) * 4;
    const size_t download = sums + vals + ids;
    if (top_dev_.bytes() < download + temps) {
        top_dev_ = cuda_buffer();
        GPTQ_ASSIGN_OR_RETURN(top_dev_, cuda_buffer::alloc(download + temps));
    }
    uint8_t*     base = top_dev_.as<uint8_t>();
    const float* it   = nullptr;
    if (inv_temp) {
        GPTQ_TRY(cuda_copy_to_device_async(*ctx_, base + download, inv_temp, temps));
        it = reinterpret_cast<const float*>(base + download);
    }
    GPTQ_TRY(op_cuda_logits_top(*ctx_, logits_.as<float>(), n_rows, V, k, it,
                                reinterpret_cast<int32_t*>(base + sums + vals), reinterpret_cast<float*>(base + sums),
                                reinterpret_cast<double*>(base)));
    top_host_.resize(download);
    GPTQ_TRY(cuda_copy_to_host(*ctx_, top_host_.data(), base, download));
    out->resize(n_rows, k);
    const double* s = reinterpret_cast<const double*>(top_host_.data());
    for (int64_t r = 0; r < n_rows; ++r) {
        out->sum_exp[size_t(r)]   = s[2 * r];
        out->sum_exp_t[size_t(r)] = s[2 * r + 1];
    }
    std::memcpy(out->logits.data(), top_host_.data() + sums, vals);
    std::memcpy(out->ids.data(), top_host_.data() + sums + vals, ids);
    return status::ok();
}

void llama_cuda_model::reset() {
    pages_.release_all();
    seq_pos_.assign(size_t(n_seq_), 0);
    seq_ids_.assign(size_t(n_seq_), {});
    seq_lora_.assign(size_t(n_seq_), -1);
}

void llama_cuda_model::seq_reset(int64_t seq) {
    if (seq < 0 || seq >= n_seq_) return;
    pages_.release(seq);
    seq_pos_[size_t(seq)] = 0;
    seq_ids_[size_t(seq)].clear();
    seq_lora_[size_t(seq)] = -1;
}

status llama_cuda_model::seq_lora_set(int64_t seq, int32_t lora) {
    GPTQ_TRY(seq_check(seq));
    if (lora < -1 || lora >= n_loras())
        return make_error(E_ARG, "sequence {}: LoRA adapter {} is not loaded ({} are)", seq, lora, n_loras());
    seq_lora_[size_t(seq)] = lora;
    return status::ok();
}

// Per layer and linear role: a device table [n_adapters] of cuda_lora_slot {A, B, r, scale}, the
// slots of adapters without that module empty (r 0); the layer's largest r sizes the kernel.
status llama_cuda_model::loras_upload() {
    const auto& loras = opts_.loras;
    if (loras.empty()) return status::ok();
    const llama_hparams& hp = hparams();
    for (const auto& a : loras)
        if (!a || static_cast<int64_t>(a->layers.size()) != hp.n_layer)
            return make_error(E_ARG, "LoRA adapter {} does not have this model's {} layers", a ? a->name : "(null)",
                              hp.n_layer);
    auto upload = [&](const std::vector<float>& v) -> result<const float*> {
        GPTQ_ASSIGN_OR_RETURN(cuda_buffer b, cuda_buffer::from_host(v.data(), v.size() * sizeof(float)));
        lora_bytes_ += b.bytes();
        lora_factors_.push_back(std::move(b));
        return lora_factors_.back().as<const float>();
    };
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        layer& L = layers_[size_t(i)];
        for (int r = 0; r < k_n_linear_roles; ++r) {
            std::vector<cuda_lora_slot> slots(loras.size());
            bool                        any = false;
            for (size_t k = 0; k < loras.size(); ++k) {
                const lora_module* m = loras[k]->module(i, static_cast<linear_role>(r));
                if (!m) continue;
                if (m->r > 1024)
                    return make_error(status_code::STATUS_UNSUPPORTED, "LoRA adapter {}: r {} (the GPU takes <= 1024)",
                                      loras[k]->name, m->r);
                GPTQ_ASSIGN_OR_RETURN(slots[k].a, upload(m->a));
                GPTQ_ASSIGN_OR_RETURN(slots[k].b, upload(m->b));
                slots[k].r     = static_cast<int32_t>(m->r);
                slots[k].scale = m->scale;
                L.lora_max_r   = std::max(L.lora_max_r, slots[k].r);
                any            = true;
            }
            if (!any) continue;
            GPTQ_ASSIGN_OR_RETURN(L.lora[size_t(r)],
                                  cuda_buffer::from_host(slots.data(), slots.size() * sizeof(cuda_lora_slot)));
            lora_bytes_ += L.lora[size_t(r)].bytes();
        }
    }
    weight_bytes_ += lora_bytes_;
    return status::ok();
}

status llama_cuda_model::seq_check(int64_t seq) const {
    if (seq < 0 || seq >= n_seq_)
        return make_error(E_ARG, "sequence slot {} on the GPU: slots 0 .. {} are reserved (sequences_reserve)", seq,
                          n_seq_ - 1);
    return status::ok();
}

// LongRoPE: slot seq's cached tokens and then ids[n] again from position 0 (transformers drops its
// cache here), with the logits the call that asked would give (all_logits: of the n new tokens).
status llama_cuda_model::reprefill(int64_t seq, const int32_t* ids, int64_t n, float* logits, bool all_logits) {
    const int64_t        n_held = seq_pos_[size_t(seq)], n_all = n_held + n, n_vocab = hparams().n_vocab;
    std::vector<int32_t> all = seq_ids_[size_t(seq)];
    if (static_cast<int64_t>(all.size()) != n_held)
        return make_error(status_code::STATUS_INTERNAL, "LongRoPE: sequence {} holds {} token ids for {} positions",
                          seq, all.size(), n_held);
    all.insert(all.end(), ids, ids + n);
    if (!logits && all_logits)
        return make_error(E_ARG, "LongRoPE re-prefill of sequence {} with every row's logits left on the GPU", seq);
    const int32_t lora = seq_lora_[size_t(seq)];
    seq_reset(seq);
    seq_lora_[size_t(seq)] = lora;
    if (!all_logits) return prefill_seq(seq, all.data(), n_all, logits, false);
    std::vector<float> tmp(size_t(n_all * n_vocab));
    GPTQ_TRY(prefill_seq(seq, all.data(), n_all, tmp.data(), true));
    std::copy_n(tmp.data() + (n_all - n) * n_vocab, n * n_vocab, logits);
    return status::ok();
}

status llama_cuda_model::prefill_seq(int64_t seq, const int32_t* ids, int64_t n, float* logits, bool all_logits) {
    GPTQ_TRY(seq_check(seq));
    if (n <= 0) return make_error(E_ARG, "prefill of {} tokens, expected at least 1", n);
    const int64_t pos0 = seq_pos_[size_t(seq)];
    if (pos0 + n > n_ctx_)
        return make_error(E_ARG, "{} tokens after {} cached ones exceed the GPU cache's {} positions", n, pos0, n_ctx_);
    if (host_->rope_needs_reprefill(pos0, n)) return reprefill(seq, ids, n, logits, all_logits);
    GPTQ_TRY(pages_.grow(seq, pos0 + n).with_context(fmt::format("prefill of {} tokens in sequence slot {}", n, seq)));
    const status st = prefill_run(seq, ids, n, logits, all_logits);
    if (!st.is_ok()) pages_.shrink(seq, seq_pos_[size_t(seq)]);  // nothing advanced
    return st;
}

status llama_cuda_model::prefill_run(int64_t seq, const int32_t* ids, int64_t n, float* logits, bool all_logits) {
    const int64_t pos0 = seq_pos_[size_t(seq)];
    GPTQ_TRY(activations_reserve(n));
    tok_pos_.resize(size_t(n));
    tok_seq_.assign(size_t(n), static_cast<int32_t>(seq));
    tok_len_.assign(size_t(n), pos0 + n);
    for (int64_t t = 0; t < n; ++t) tok_pos_[size_t(t)] = pos0 + t;
    GPTQ_TRY(prof_begin());
    GPTQ_TRY(step_inputs_upload(ids, n));
    GPTQ_TRY(prof_mark("step_inputs"));
    const int64_t rows = all_logits ? n : 1;
    GPTQ_TRY(forward_queued(n, rows, seq, /*ragged=*/false));
    GPTQ_TRY(logits_download(rows, logits));
    GPTQ_TRY(prof_mark("logits_copy"));
    GPTQ_TRY(prof_end(&prof_prefill_, n));
    seq_pos_[size_t(seq)] += n;
    ids_append(seq, ids, n);
    return status::ok();
}

status llama_cuda_model::prefill(const int32_t* ids, int64_t n, float* logits, bool all_logits) {
    return prefill_seq(0, ids, n, logits, all_logits);
}

status llama_cuda_model::decode(int32_t id, float* logits) {
    const int64_t seq = 0;
    return decode_seqs(&id, &seq, 1, logits);
}

status llama_cuda_model::sequences_reserve(int64_t n_seq) {
    if (n_seq < 1 || n_seq > k_llama_cuda_max_seq)
        return make_error(E_ARG, "{} sequences on the GPU: 1 to {} are supported", n_seq, k_llama_cuda_max_seq);
    if (n_seq <= n_seq_) return status::ok();
    return kv_reserve(n_seq, n_ctx_, pages_explicit_ ? pages_.n_pages() : 0);
}

status llama_cuda_model::prefill_batch(const int32_t* ids, int64_t n_seq, int64_t n, float* logits) {
    if (n_seq < 1 || n_seq > n_seq_)
        return make_error(E_ARG, "prefill of {} sequences with room for {} (sequences_reserve)", n_seq, n_seq_);
    const int64_t n_vocab = hparams().n_vocab;
    for (int64_t s = 0; s < n_seq; ++s)  // each prompt through the prefill kernels into its own cache
        GPTQ_TRY(prefill_seq(s, ids + s * n, n, logits + s * n_vocab, false));
    return status::ok();
}

status llama_cuda_model::decode_batch(const int32_t* ids, int64_t n_seq, float* logits) {
    if (n_seq < 1 || n_seq > n_seq_)
        return make_error(E_ARG, "decode of {} sequences with room for {} (sequences_reserve)", n_seq, n_seq_);
    std::vector<int64_t> seqs(static_cast<size_t>(n_seq));
    for (int64_t s = 0; s < n_seq; ++s) seqs[size_t(s)] = s;
    return decode_seqs(ids, seqs.data(), n_seq, logits);
}

status llama_cuda_model::decode_seqs(const int32_t* ids, const int64_t* seqs, int64_t n, float* logits) {
    if (n < 1 || n > n_seq_)
        return make_error(E_ARG, "decode of {} sequences with room for {} (sequences_reserve)", n, n_seq_);
    std::vector<bool> seen(size_t(n_seq_), false);
    for (int64_t t = 0; t < n; ++t) {
        GPTQ_TRY(seq_check(seqs[t]));
        if (seen[size_t(seqs[t])])
            return make_error(E_ARG, "decode step lists sequence slot {} twice (one token per sequence)", seqs[t]);
        seen[size_t(seqs[t])] = true;
        if (seq_pos_[size_t(seqs[t])] + 1 > n_ctx_)
            return make_error(E_ARG, "sequence {}: a token after {} cached ones exceeds the GPU cache's {} positions",
                              seqs[t], seq_pos_[size_t(seqs[t])], n_ctx_);
    }
    // Every page the step needs before anything runs: an error names what was asked and what is
    // free, and nothing advances; the pages go back if the step fails.
    std::vector<std::pair<int64_t, int64_t>> want(static_cast<size_t>(n));
    for (int64_t t = 0; t < n; ++t) want[size_t(t)] = {seqs[t], seq_pos_[size_t(seqs[t])] + 1};
    GPTQ_TRY(pages_.grow_all(want).with_context(fmt::format("decode step of {} sequences", n)));
    const status st = decode_run(ids, seqs, n, logits);
    if (!st.is_ok())
        for (int64_t t = 0; t < n; ++t) pages_.shrink(seqs[t], seq_pos_[size_t(seqs[t])]);
    return st;
}

status llama_cuda_model::decode_run(const int32_t* ids, const int64_t* seqs, int64_t n, float* logits) {
    // LongRoPE: a sequence whose step crosses the switch runs again on its own, the rest together.
    if (!logits)
        for (int64_t t = 0; t < n; ++t)
            if (host_->rope_needs_reprefill(seq_pos_[size_t(seqs[t])], 1))
                return make_error(E_ARG,
                                  "decode with the logits left on the GPU: sequence {} crosses LongRoPE's switch at "
                                  "position {} and runs again on its own; ask for its logits",
                                  seqs[t], seq_pos_[size_t(seqs[t])]);
    std::vector<int64_t> rest;
    const int64_t        n_vocab = hparams().n_vocab;
    for (int64_t t = 0; t < n; ++t) {
        if (host_->rope_needs_reprefill(seq_pos_[size_t(seqs[t])], 1))
            GPTQ_TRY(reprefill(seqs[t], ids + t, 1, logits + t * n_vocab, false));
        else
            rest.push_back(t);
    }
    if (rest.empty()) return status::ok();
    if (static_cast<int64_t>(rest.size()) < n) {
        std::vector<int32_t> ids2;
        std::vector<int64_t> seqs2;
        for (int64_t t : rest) ids2.push_back(ids[t]), seqs2.push_back(seqs[t]);
        std::vector<float> out(rest.size() * size_t(n_vocab));
        GPTQ_TRY(decode_step(ids2.data(), seqs2.data(), int64_t(rest.size()), out.data()));
        for (size_t i = 0; i < rest.size(); ++i)
            std::copy_n(out.data() + i * size_t(n_vocab), n_vocab, logits + rest[i] * n_vocab);
        return status::ok();
    }
    return decode_step(ids, seqs, n, logits);
}

// The graph of an n-token ragged step (captured after one plain step has sized the scratch); a
// graph holds the scratch pointers of its capture, so one made before a reallocation is made again.
status llama_cuda_model::decode_step(const int32_t* ids, const int64_t* seqs, int64_t n, float* logits) {
    GPTQ_TRY(activations_reserve(n));
    tok_pos_.resize(size_t(n));
    tok_seq_.resize(size_t(n));
    tok_len_.resize(size_t(n));
    for (int64_t t = 0; t < n; ++t) {
        const int64_t pos   = seq_pos_[size_t(seqs[t])];
        tok_pos_[size_t(t)] = pos;
        tok_seq_[size_t(t)] = static_cast<int32_t>(seqs[t]);
        tok_len_[size_t(t)] = pos + 1;
    }
    auto advance = [&] {
        for (int64_t t = 0; t < n; ++t) {
            seq_pos_[size_t(seqs[t])] += 1;
            ids_append(seqs[t], ids + t, 1);
        }
    };
    if (prof_on_) {  // uncaptured, with the kernels of the graph
        GPTQ_TRY(prof_begin());
        GPTQ_TRY(step_inputs_upload(ids, n));
        GPTQ_TRY(prof_mark("step_inputs"));
        GPTQ_TRY(forward_queued(n, n, 0, /*ragged=*/true));
        GPTQ_TRY(logits_download(n, logits));
        GPTQ_TRY(prof_mark("logits_copy"));
        GPTQ_TRY(prof_end(&prof_decode_, n));
        advance();
        return status::ok();
    }
    GPTQ_TRY(step_inputs_upload(ids, n));
    // MoE layers whose experts run per expert bring the routing to the host: no graph.
    if (!opts_.graph || (hparams().n_expert > 0 && !moe_grouped_)) {
        GPTQ_TRY(forward_queued(n, n, 0, true));
    } else {
        GPTQ_ASSIGN_OR_RETURN(void* scratch, ctx_->scratch(0));
        GPTQ_ASSIGN_OR_RETURN(void* zeroed, ctx_->zeroed_workspace(0));
        step_graph& g = graphs_[n];
        if ((!g.graph.empty() || g.warm) && (scratch != g.scratch || zeroed != g.zeroed)) g = step_graph();
        if (!g.warm) {
            // Warm-up: the same ops uncaptured, which sizes the scratch (nothing may allocate later).
            GPTQ_TRY(forward_queued(n, n, 0, true));
            g.warm = true;
            GPTQ_ASSIGN_OR_RETURN(g.scratch, ctx_->scratch(0));
            GPTQ_ASSIGN_OR_RETURN(g.zeroed, ctx_->zeroed_workspace(0));
        } else {
            if (g.graph.empty()) {
                GPTQ_TRY(cuda_graph::capture_begin(*ctx_));
                const status st = forward_queued(n, n, 0, true);
                auto         cg = cuda_graph::capture_end(*ctx_, st.is_ok());
                GPTQ_TRY(st);
                if (!cg) return cg.error();
                g.graph = std::move(*cg);
            }
            GPTQ_TRY(g.graph.launch(*ctx_));
            ++graph_replays_;
        }
    }
    GPTQ_TRY(logits_download(n, logits));
    advance();
    return status::ok();
}

status llama_cuda_model::step_mixed(const llama_cuda_segment* segs, int64_t n_seg, float* logits) {
    if (n_seg < 1 || n_seg > n_seq_)
        return make_error(E_ARG, "mixed step of {} sequences with room for {} (sequences_reserve)", n_seg, n_seq_);
    std::vector<bool> seen(size_t(n_seq_), false);
    for (int64_t i = 0; i < n_seg; ++i) {
        const llama_cuda_segment& s = segs[i];
        GPTQ_TRY(seq_check(s.seq));
        if (seen[size_t(s.seq)])
            return make_error(E_ARG, "mixed step lists sequence slot {} twice (one segment per sequence)", s.seq);
        seen[size_t(s.seq)] = true;
        const int64_t pos   = seq_pos_[size_t(s.seq)];
        if (s.n < 1 || !s.ids)
            return make_error(E_ARG, "mixed step: sequence {} with {} tokens, expected at least 1", s.seq, s.n);
        if (pos + s.n > n_ctx_)
            return make_error(E_ARG, "sequence {}: {} tokens after {} cached ones exceed the GPU cache's {} positions",
                              s.seq, s.n, pos, n_ctx_);
        if (host_->rope_needs_reprefill(pos, s.n))
            return make_error(E_ARG,
                              "mixed step: sequence {} crosses LongRoPE's switch at position {} and must run again "
                              "on its own (prefill_seq / decode_seqs)",
                              s.seq, pos);
    }
    std::vector<std::pair<int64_t, int64_t>> want(static_cast<size_t>(n_seg));
    for (int64_t i = 0; i < n_seg; ++i) want[size_t(i)] = {segs[i].seq, seq_pos_[size_t(segs[i].seq)] + segs[i].n};
    GPTQ_TRY(pages_.grow_all(want).with_context(fmt::format("mixed step of {} sequences", n_seg)));
    const status st = mixed_run(segs, n_seg, logits);
    if (!st.is_ok())
        for (int64_t i = 0; i < n_seg; ++i) pages_.shrink(segs[i].seq, seq_pos_[size_t(segs[i].seq)]);
    return st;
}

// The rows: every chunk (n > 1) in the order given, then the one-token segments (one ragged
// decode launch needs its rows together); the logits rows in the segments' order, gathered.
status llama_cuda_model::mixed_run(const llama_cuda_segment* segs, int64_t n_seg, float* logits) {
    mixed_rows           rows;
    std::vector<int32_t> ids;
    std::vector<int32_t> out_row(static_cast<size_t>(n_seg));
    tok_pos_.clear();
    tok_seq_.clear();
    tok_len_.clear();
    auto add = [&](int64_t i) {
        const llama_cuda_segment& s   = segs[i];
        const int64_t             pos = seq_pos_[size_t(s.seq)], row0 = static_cast<int64_t>(ids.size());
        if (s.n > 1) rows.chunks.push_back({row0, s.n, s.seq, pos});
        for (int64_t t = 0; t < s.n; ++t) {
            ids.push_back(s.ids[t]);
            tok_pos_.push_back(pos + t);
            tok_seq_.push_back(static_cast<int32_t>(s.seq));
            tok_len_.push_back(pos + s.n);  // the CPU's rule: a step's tokens use the length after it
        }
        out_row[size_t(i)] = static_cast<int32_t>(row0 + s.n - 1);
    };
    for (int64_t i = 0; i < n_seg; ++i)
        if (segs[i].n > 1) add(i);
    rows.decode_row0 = static_cast<int64_t>(ids.size());
    for (int64_t i = 0; i < n_seg; ++i)
        if (segs[i].n == 1) add(i);
    const int64_t n = static_cast<int64_t>(ids.size());
    GPTQ_TRY(activations_reserve(n));
    GPTQ_TRY(prof_begin());
    GPTQ_TRY(step_inputs_upload(ids.data(), n));
    // The out-row indices after the adapters' (step_inputs_upload wrote ids .. adapters).
    int32_t* hi = reinterpret_cast<int32_t*>(step_host_.data()) + 4 * n_act_;
    std::copy(out_row.begin(), out_row.end(), hi);
    GPTQ_TRY(cuda_copy_to_device_async(*ctx_, step_.as<int32_t>() + 4 * n_act_, hi, size_t(n_seg) * 4));
    GPTQ_TRY(prof_mark("step_inputs"));
    GPTQ_TRY(forward_queued(n, n_seg, 0, /*ragged=*/true, &rows));
    GPTQ_TRY(logits_download(n_seg, logits));
    GPTQ_TRY(prof_mark("logits_copy"));
    GPTQ_TRY(prof_end(&prof_mixed_, n));
    for (int64_t i = 0; i < n_seg; ++i) {
        seq_pos_[size_t(segs[i].seq)] += segs[i].n;
        ids_append(segs[i].seq, segs[i].ids, segs[i].n);
    }
    return status::ok();
}

void llama_cuda_model::ids_append(int64_t seq, const int32_t* ids, int64_t n) {
    auto& v = seq_ids_[size_t(seq)];
    v.insert(v.end(), ids, ids + n);
}

}  // namespace gptq
