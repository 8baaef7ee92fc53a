// One decoder layer on the GPU for GPTQ's calibration passes (llama_cuda_layer.h): the ops of
// llama_cuda_model::forward_queued without the KV cache, chunk by chunk over the windows. Linears
// run once over a chunk's rows (cuBLAS GEMMs of chunk_windows * seqlen rows); RoPE and attention
// run per window (every window holds positions 0 .. seqlen-1, so one RoPE table serves all).
#include "model/llama_cuda_layer.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "core/dtype.h"
#include "core/error.h"
#include "ops/ops.h"

namespace gptq {

namespace {
constexpr status_code E_ARG     = status_code::STATUS_INVALID_ARGUMENT;
constexpr float       k_f16_max = 65504.0f;
}  // namespace

result<std::unique_ptr<llama_cuda_layer_runner>> llama_cuda_layer_runner::create(cuda_context&        ctx,
                                                                                 const llama_hparams& hp,
                                                                                 int64_t              seqlen,
                                                                                 int64_t max_chunk_tokens) {
    if (seqlen <= 0) return make_error(E_ARG, "layer runner for windows of {} tokens", seqlen);
    if (hp.head_dim % 2 != 0 || hp.head_dim > 256)
        return make_error(status_code::STATUS_UNSUPPORTED, "head_dim {} (the GPU attention needs even, <= 256)",
                          hp.head_dim);
    if (max_chunk_tokens <= 0) max_chunk_tokens = 16384;
    std::unique_ptr<llama_cuda_layer_runner> r(new llama_cuda_layer_runner());
    r->ctx_           = &ctx;
    r->hp_            = hp;
    r->seqlen_        = seqlen;
    r->chunk_windows_ = std::max<int64_t>(1, max_chunk_tokens / seqlen);
    const size_t T    = size_t(r->chunk_windows_ * seqlen);
    auto         a    = [&](cuda_buffer* b, int64_t width) -> status {
        GPTQ_ASSIGN_OR_RETURN(*b, cuda_buffer::alloc(T * size_t(width) * 2));
        return status::ok();
    };
    GPTQ_TRY(a(&r->h_, hp.n_embd));
    GPTQ_TRY(a(&r->x_, std::max(hp.n_embd, hp.q_dim())));
    GPTQ_TRY(a(&r->q_, hp.q_dim()));
    GPTQ_TRY(a(&r->k_, hp.kv_dim()));
    GPTQ_TRY(a(&r->v_, hp.kv_dim()));
    GPTQ_TRY(a(&r->y_, hp.n_embd));
    GPTQ_TRY(a(&r->gate_, hp.n_ff));
    GPTQ_TRY(a(&r->up_, hp.n_ff));
    // RoPE rows of positions 0 .. seqlen-1, exactly as the CPU computes them for a window.
    const int64_t            half     = hp.head_dim / 2;
    const std::vector<float> inv_freq = llama_rope_inv_freq(hp, seqlen);
    std::vector<float>       cos(size_t(seqlen * half)), sin(cos.size());
    op_rope_tables(inv_freq.data(), half, 0, seqlen, 1.0f, cos.data(), sin.data());
    GPTQ_ASSIGN_OR_RETURN(r->cos_, cuda_buffer::from_host(cos.data(), cos.size() * 4));
    GPTQ_ASSIGN_OR_RETURN(r->sin_, cuda_buffer::from_host(sin.data(), sin.size() * 4));
    return r;
}

status llama_cuda_layer_runner::upload_f16(const std::vector<float>& v, const std::string& name, cuda_buffer* out) {
    std::vector<uint16_t> h(v.size());
    const int64_t         n = static_cast<int64_t>(v.size());
    std::atomic<int64_t>  bad{n};  // the first element out of range, or n
    auto                  convert = [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            if (!(std::fabs(v[size_t(i)]) <= k_f16_max)) {
                int64_t cur = bad.load();
                while (i < cur && !bad.compare_exchange_weak(cur, i)) {
                }
                return;
            }
            h[size_t(i)] = f32_to_f16(v[size_t(i)]);
        }
    };
    if (pool_ && n >= (int64_t(1) << 16)) {
        pool_->parallel_for(n, convert);
    } else {
        convert(0, n);
    }
    if (bad.load() < n)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "tensor '{}' element {} is {}, outside the F16 range the GPU calibration uses", name,
                          bad.load(), v[size_t(bad.load())]);
    if (out->bytes() != h.size() * 2) {
        *out = cuda_buffer();
        GPTQ_ASSIGN_OR_RETURN(*out, cuda_buffer::alloc(h.size() * 2));
    }
    // Synchronous: the host copy dies here, and the previous forward may still read the old bytes.
    GPTQ_TRY(ctx_->synchronize());
    return out->upload(h.data(), h.size() * 2);
}

status llama_cuda_layer_runner::attention_cache_enable(int64_t n_windows) {
    if (n_windows <= 0) return make_error(E_ARG, "attention cache for {} windows", n_windows);
    attn_valid_ = false;
    attn_       = cuda_buffer();
    GPTQ_ASSIGN_OR_RETURN(attn_, cuda_buffer::alloc(size_t(n_windows * seqlen_ * hp_.q_dim()) * 2));
    attn_windows_ = n_windows;
    return status::ok();
}

status llama_cuda_layer_runner::load(const llama_layer& layer) {
    layer_index_ = layer.index;
    attn_valid_  = false;
    GPTQ_TRY(upload_f16(layer.attn_norm, "model.layers." + std::to_string(layer.index) + ".input_layernorm.weight",
                        &attn_norm_));
    GPTQ_TRY(upload_f16(layer.mlp_norm,
                        "model.layers." + std::to_string(layer.index) + ".post_attention_layernorm.weight",
                        &mlp_norm_));
    for (int r = 0; r < k_n_linear_roles; ++r) {
        const auto            role = static_cast<linear_role>(r);
        const linear_weights& lw   = layer.linear(role);
        const std::string     name = llama_linear_name(layer.index, role);
        if (lw.q)
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "{}: the GPU calibration runner takes dense weights (this one is GPTQ-packed)", name);
        linear& l = lin_[size_t(r)];
        l.n_out   = lw.n_out;
        l.n_in    = lw.n_in;
        GPTQ_TRY(upload_f16(lw.w, name + ".weight", &l.w));
        if (!lw.bias.empty()) {
            GPTQ_TRY(upload_f16(lw.bias, name + ".bias", &l.bias));
        } else {
            l.bias = cuda_buffer();
        }
    }
    return status::ok();
}

status llama_cuda_layer_runner::linear_update(linear_role r, const std::vector<float>& w) {
    linear& l = lin_[size_t(r)];
    if (r == linear_role::LINEAR_Q || r == linear_role::LINEAR_K || r == linear_role::LINEAR_V) attn_valid_ = false;
    if (int64_t(w.size()) != l.n_out * l.n_in)
        return make_error(E_ARG, "{}: weight of {} values, expected {} x {}", llama_linear_name(layer_index_, r),
                          w.size(), l.n_out, l.n_in);
    return upload_f16(w, llama_linear_name(layer_index_, r) + ".weight", &l.w);
}

status llama_cuda_layer_runner::linear_run(linear_role r, const uint16_t* x, uint16_t* y, int64_t n) {
    const linear& l = lin_[size_t(r)];
    GPTQ_TRY(op_cuda_linear_dense(*ctx_, x, l.w.as<uint16_t>(), y, n, l.n_out, l.n_in));
    if (l.bias.bytes()) GPTQ_TRY(op_cuda_add_bias(*ctx_, y, l.bias.as<uint16_t>(), n, l.n_out));
    return status::ok();
}

status llama_cuda_layer_runner::forward(uint16_t* hidden, int64_t n_windows, const cuda_linear_input_hook* hook,
                                        linear_input stop_after) {
    if (layer_index_ < 0) return make_error(E_ARG, "layer runner: forward before load");
    const llama_hparams& hp     = hp_;
    const int64_t        n_embd = hp.n_embd, q_dim = hp.q_dim(), kv_dim = hp.kv_dim(), hd = hp.head_dim;
    cuda_context&        c = *ctx_;
    uint16_t *           h = h_.as<uint16_t>(), *x = x_.as<uint16_t>(), *q = q_.as<uint16_t>();
    uint16_t *           k = k_.as<uint16_t>(), *v = v_.as<uint16_t>(), *y = y_.as<uint16_t>();
    uint16_t *           gate = gate_.as<uint16_t>(), *up = up_.as<uint16_t>();
    const bool           full    = stop_after == linear_input::LINEAR_INPUT_COUNT;
    const bool           caching = attn_.bytes() && n_windows == attn_windows_;
    const bool           reuse   = caching && attn_valid_;
    auto                 capture = [&](linear_input which, const uint16_t* xin, int64_t n, int64_t n_in) -> status {
        if (hook && *hook) return (*hook)(which, xin, n, n_in);
        return status::ok();
    };
    for (int64_t w0 = 0; w0 < n_windows; w0 += chunk_windows_) {
        const int64_t nw = std::min(chunk_windows_, n_windows - w0);
        const int64_t n  = nw * seqlen_;
        uint16_t*     hw = hidden + w0 * seqlen_ * n_embd;
        GPTQ_TRY(cuda_copy_device_async(c, h, hw, size_t(n * n_embd) * 2));
        // ---- attention ----
        GPTQ_TRY(op_cuda_rms_norm(c, h, attn_norm_.as<uint16_t>(), x, n, n_embd, hp.rms_eps));
        GPTQ_TRY(capture(linear_input::LINEAR_INPUT_QKV, x, n, n_embd));
        if (stop_after == linear_input::LINEAR_INPUT_QKV) continue;
        // The attention output of this chunk: [n, q_dim], in x or in the cache.
        uint16_t* att = caching ? attn_.as<uint16_t>() + w0 * seqlen_ * q_dim : x;
        if (!reuse) {
            GPTQ_TRY(linear_run(linear_role::LINEAR_Q, x, q, n));
            GPTQ_TRY(linear_run(linear_role::LINEAR_K, x, k, n));
            GPTQ_TRY(linear_run(linear_role::LINEAR_V, x, v, n));
            for (int64_t s = 0; s < nw; ++s) {
                uint16_t* qs = q + s * seqlen_ * q_dim;
                uint16_t* ks = k + s * seqlen_ * kv_dim;
                uint16_t* vs = v + s * seqlen_ * kv_dim;
                GPTQ_TRY(op_cuda_rope(c, qs, cos_.as<float>(), sin_.as<float>(), seqlen_, hp.n_head, hd, q_dim));
                GPTQ_TRY(op_cuda_rope(c, ks, cos_.as<float>(), sin_.as<float>(), seqlen_, hp.n_head_kv, hd, kv_dim));
                cuda_attention_args a;
                a.q         = qs;
                a.k         = ks;
                a.v         = vs;
                a.out       = att + s * seqlen_ * q_dim;  // x is free again: [n, q_dim]
                a.n_q       = seqlen_;
                a.n_kv      = seqlen_;
                a.q_pos0    = 0;
                a.n_head    = hp.n_head;
                a.n_head_kv = hp.n_head_kv;
                a.head_dim  = hd;
                a.window    = hp.window[size_t(layer_index_)];
                a.scale     = 1.0f / std::sqrt(static_cast<float>(hd));
                a.q_stride = a.out_stride = q_dim;
                a.kv_stride               = kv_dim;
                GPTQ_TRY(op_cuda_attention(c, a));
            }
        }
        GPTQ_TRY(capture(linear_input::LINEAR_INPUT_O, att, n, q_dim));
        if (stop_after == linear_input::LINEAR_INPUT_O) continue;
        GPTQ_TRY(linear_run(linear_role::LINEAR_O, att, y, n));
        GPTQ_TRY(op_cuda_add(c, h, y, n * n_embd));
        // ---- MLP ----
        GPTQ_TRY(op_cuda_rms_norm(c, h, mlp_norm_.as<uint16_t>(), y, n, n_embd, hp.rms_eps));
        GPTQ_TRY(capture(linear_input::LINEAR_INPUT_GATE_UP, y, n, n_embd));
        if (stop_after == linear_input::LINEAR_INPUT_GATE_UP) continue;
        GPTQ_TRY(linear_run(linear_role::LINEAR_GATE, y, gate, n));
        GPTQ_TRY(linear_run(linear_role::LINEAR_UP, y, up, n));
        GPTQ_TRY(op_cuda_silu_mul(c, gate, up, gate, n, hp.n_ff, hp.n_ff, hp.n_ff, hp.n_ff));
        GPTQ_TRY(capture(linear_input::LINEAR_INPUT_DOWN, gate, n, hp.n_ff));
        if (stop_after == linear_input::LINEAR_INPUT_DOWN) continue;
        GPTQ_TRY(linear_run(linear_role::LINEAR_DOWN, gate, y, n));
        GPTQ_TRY(op_cuda_add(c, h, y, n * n_embd));
        if (full) GPTQ_TRY(cuda_copy_device_async(c, hw, h, size_t(n * n_embd) * 2));
    }
    // Computed for every window now; a full pass has replaced the inputs it came from.
    if (caching && stop_after != linear_input::LINEAR_INPUT_QKV) attn_valid_ = !full;
    return status::ok();
}

uint64_t llama_cuda_layer_runner::device_bytes() const {
    uint64_t n = attn_norm_.bytes() + mlp_norm_.bytes() + cos_.bytes() + sin_.bytes() + attn_.bytes();
    for (const auto& l : lin_) n += l.w.bytes() + l.bias.bytes();
    for (const cuda_buffer* b : {&h_, &x_, &q_, &k_, &v_, &y_, &gate_, &up_}) n += b->bytes();
    return n;
}

}  // namespace gptq
