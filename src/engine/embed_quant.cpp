#include "embed_quant.h"

#include <algorithm>

#include "core/dtype.h"
#include "core/error.h"
#include "io/gptq_pack.h"

namespace gptq {

namespace {
constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;

// sum_v wt_v ||E_v - Q_v||^2 with Q^T [n_embd, n_vocab] dequantized.
double weighted_error(const float* e, const std::vector<float>& qt, int64_t n_vocab, int64_t n_embd,
                      const std::vector<float>& wt) {
    double err = 0.0;
    for (int64_t v = 0; v < n_vocab; ++v) {
        double row = 0.0;
        for (int64_t d = 0; d < n_embd; ++d) {
            const double diff = double(e[v * n_embd + d]) - double(qt[size_t(d * n_vocab + v)]);
            row += diff * diff;
        }
        err += double(wt[size_t(v)]) * row;
    }
    return err;
}
}  // namespace

bool embed_group_size_supported(int group_size) {
    for (int g : {-1, 16, 32, 64, 128, 256, 512, 1024})
        if (group_size == g) return true;
    return false;
}

status embed_quant_check(int64_t n_vocab, int64_t n_embd, int bits, int group_size) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        return make_error(E_ARG, "--embed-bits {} is not supported (2, 3, 4 or 8)", bits);
    if ((n_vocab * bits) % 32 != 0) {
        std::string fit;
        for (int b : {2, 3, 4, 8})
            if ((n_vocab * b) % 32 == 0) fit += (fit.empty() ? "--embed-bits " : " or ") + std::to_string(b);
        return make_error(E_ARG,
                          "model.embed_tokens: the vocabulary of {} tokens x {} bits is not a multiple of 32; "
                          "GPTQModel's layout packs token ids along 32-bit words (qweight [vocab x bits / 32, "
                          "hidden]) and a padded table would change the vocabulary: {}",
                          n_vocab, bits,
                          fit.empty() ? "no GPTQ bit width packs it, leave the table unquantized" : "choose " + fit);
    }
    GPTQ_TRY(gptq_check_packable(n_vocab, n_embd, bits, "model.embed_tokens"));
    if (!embed_group_size_supported(group_size))
        return make_error(E_ARG,
                          "model.embed_tokens: group size {} is not one GPTQModel's quantized embeddings take (-1, "
                          "16, 32, 64, 128, 256, 512, 1024): set --embed-group-size",
                          group_size);
    if (group_size > n_vocab)
        return make_error(E_ARG, "model.embed_tokens: group size {} exceeds the vocabulary ({} tokens); use -1",
                          group_size, n_vocab);
    return status::ok();
}

std::vector<float> embed_token_weights(int64_t n_vocab, const std::vector<int32_t>& calib_ids) {
    std::vector<float> wt(static_cast<size_t>(n_vocab), 1.0f);
    for (int32_t id : calib_ids)
        if (id >= 0 && id < n_vocab) wt[size_t(id)] += 1.0f;
    return wt;
}

result<embed_quantized> embed_table_quantize(const ops_context& ctx, const float* e, int64_t n_vocab, int64_t n_embd,
                                             const gptq_options& opt, const std::string& clip,
                                             const std::vector<float>& wt) {
    if (clip != "none" && clip != "uniform" && clip != "frequency")
        return make_error(E_ARG, "--embed-clip '{}' is not supported (none, uniform or frequency)", clip);
    if (static_cast<int64_t>(wt.size()) != n_vocab)
        return make_error(E_ARG, "embedding token weights: {} for a vocabulary of {}", wt.size(), n_vocab);
    std::vector<float> et(static_cast<size_t>(n_vocab * n_embd));  // E^T [n_embd, n_vocab]
    for (int64_t v = 0; v < n_vocab; ++v)
        for (int64_t d = 0; d < n_embd; ++d) et[size_t(d * n_vocab + v)] = e[v * n_embd + d];
    gptq_options o = opt;
    o.mse = o.mse_hessian = o.desc_act = o.gar = o.static_groups = false;
    auto rtn                                                     = rtn_quantize(ctx, et.data(), n_embd, n_vocab, o);
    if (!rtn) return rtn.error().with_context("model.embed_tokens");
    quantized_linear q;
    if (clip == "none") {
        q = *rtn;
    } else {
        const std::vector<float> ones(static_cast<size_t>(n_vocab), 1.0f);
        auto                     r =
            rtn_quantize_weighted(ctx, et.data(), n_embd, n_vocab, clip == "frequency" ? wt.data() : ones.data(), o);
        if (!r) return r.error().with_context("model.embed_tokens");
        q = std::move(r).value();
    }
    embed_quantized    out;
    std::vector<float> qt(et.size());
    quantized_linear_dequantize(ctx, *rtn, qt.data());
    out.error_rtn = weighted_error(e, qt, n_vocab, n_embd, wt);
    // The table as the readers see it: the checkpoint's F16 scales (exact: grid.h rounds them).
    out.data.n_out    = n_embd;
    out.data.n_in     = n_vocab;
    out.data.n_groups = q.n_groups;
    out.data.bits     = q.bits;
    out.data.scales.resize(q.scales.size());
    for (size_t i = 0; i < q.scales.size(); ++i) out.data.scales[i] = f32_to_f16(q.scales[i]);
    out.data.codes = std::move(q.codes);
    out.data.zeros = std::move(q.zeros);
    out.data.g_idx = std::move(q.g_idx);
    out.data.dequantize(qt.data());
    out.error = weighted_error(e, qt, n_vocab, n_embd, wt);
    out.table.resize(et.size());
    for (int64_t d = 0; d < n_embd; ++d)
        for (int64_t v = 0; v < n_vocab; ++v) out.table[size_t(v * n_embd + d)] = qt[size_t(d * n_vocab + v)];
    return out;
}

status embed_rows(const std::vector<float>& table, int64_t n_embd, float scale, const std::vector<int32_t>& ids,
                  float* x) {
    const int64_t n_vocab = static_cast<int64_t>(table.size()) / n_embd;
    for (size_t t = 0; t < ids.size(); ++t) {
        const int32_t id = ids[t];
        if (id < 0 || id >= n_vocab)
            return make_error(E_ARG, "token id {} at position {} is outside the vocabulary [0, {})", id, t, n_vocab);
        for (int64_t d = 0; d < n_embd; ++d) x[int64_t(t) * n_embd + d] = scale * table[size_t(id * n_embd + d)];
    }
    return status::ok();
}

}  // namespace gptq
