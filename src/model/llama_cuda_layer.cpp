// One decoder layer on the GPU (llama_cuda_layer.h): the attention and MLP blocks and the layer that
// calls them, used by llama_cuda_model::forward_queued (the runtime) and by the calibration runner
// below. Linears run once over all rows of a pass; RoPE and attention see either the runtime's KV
// cache (rope_kv_store, attention over the cache) or local windows (calibration: every window holds
// positions 0 .. seqlen-1, so one RoPE table serves all; RoPE and attention run per window).
#include "model/llama_cuda_layer.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <string>

#include "core/dtype.h"
#include "core/error.h"
#include "model/llama_cuda_moe.h"
#include "ops/ops.h"

namespace gptq {

status cuda_linear_forward(cuda_context& c, const cuda_linear& l, const uint16_t* x, uint16_t* y, int64_t n,
                           bool x_permuted) {
    if (l.quantized) return op_cuda_gptq_linear(c, l.q, x, y, n, x_permuted);
    GPTQ_TRY(op_cuda_linear_dense(c, x, l.w.as<uint16_t>(), y, n, l.n_out, l.n_in));
    if (l.bias.bytes()) GPTQ_TRY(op_cuda_add_bias(c, y, l.bias.as<uint16_t>(), n, l.n_out));
    return status::ok();
}

namespace {
constexpr status_code E_ARG     = status_code::STATUS_INVALID_ARGUMENT;
constexpr float       k_f16_max = 65504.0f;

// The act-order column order of a GPTQ linear on the int4 kernel, when the op producing its input
// can write it in that order (saves the linear's own permutation launch); nullptr otherwise.
const int32_t* perm_of(const cuda_linear& l) {
    return l.quantized && l.q.fast && l.q.perm.bytes() ? l.q.perm.as<int32_t>() : nullptr;
}

status mark(const cuda_layer_pass& p, const char* op) {
    return p.mark && *p.mark ? (*p.mark)(op) : status::ok();
}

// A linear of the layer (unfused), then each row's LoRA adapter when the pass has adapters and one
// of them adapts the role (one more launch).
status linear_run(cuda_context& c, const cuda_layer_weights& w, linear_role r, const uint16_t* x, uint16_t* y,
                  const cuda_layer_pass& p, bool x_permuted = false) {
    const cuda_linear& l = w.linear(r);
    GPTQ_TRY(cuda_linear_forward(c, l, x, y, p.n, x_permuted));
    const cuda_buffer& slots = w.lora[static_cast<size_t>(r)];
    if (!p.lora_rows || !slots.bytes()) return status::ok();
    if (x_permuted)
        return make_error(status_code::STATUS_INTERNAL, "LoRA on {}: its input is in act-order column order",
                          linear_role_name(r));
    return op_cuda_lora_add(c, x, y, p.n, l.n_in, l.n_out, p.lora_rows, slots.as<cuda_lora_slot>(), w.lora_max_r);
}

status capture(const cuda_layer_pass& p, linear_input which, const uint16_t* x, int64_t n_in) {
    return p.hook && *p.hook ? (*p.hook)(which, x, p.n, n_in) : status::ok();
}

// hidden += add (nullptr: none), then the RMSNorm of hidden into y (in `perm` order when set): the
// one place a family's norm variant goes.
status norm(cuda_context& c, const llama_hparams& hp, uint16_t* hidden, const uint16_t* add, const cuda_buffer& w,
            uint16_t* y, const cuda_layer_pass& p, const int32_t* perm = nullptr) {
    GPTQ_TRY(op_cuda_add_rms_norm(c, hidden, add, w.as<uint16_t>(), y, p.n, hp.n_embd, hp.rms_eps, perm));
    return mark(p, add ? "add_rms_norm" : "rms_norm");
}

// RMSNorm of a block's output in place (sandwich norms, hp.attn_out_norm / mlp_out_norm): y [n, n_embd].
status out_norm(cuda_context& c, const llama_hparams& hp, const cuda_buffer& w, uint16_t* y, const cuda_layer_pass& p) {
    GPTQ_TRY(op_cuda_rms_norm(c, y, w.as<uint16_t>(), y, p.n, hp.n_embd, hp.rms_eps));
    return mark(p, "rms_norm");
}

// act(gate) * up (hp.act) into y, with the strides and permutation of op_cuda_silu_mul.
// block: gate/up interleaved in blocks of that many features (cuda_layer_weights::gate_up_block).
status act_mul(cuda_context& c, const llama_hparams& hp, const uint16_t* gate, const uint16_t* up, uint16_t* y,
               int64_t n, int64_t gate_stride, int64_t up_stride, int64_t y_stride, const int32_t* perm = nullptr,
               int64_t block = 0) {
    const int64_t n_ff = hp.n_ff;
    switch (hp.act) {
        case mlp_activation::ACT_SILU:
            return op_cuda_silu_mul(c, gate, up, y, n, n_ff, gate_stride, up_stride, y_stride, perm, block);
        case mlp_activation::ACT_GELU_TANH:
            return op_cuda_gelu_tanh_mul(c, gate, up, y, n, n_ff, gate_stride, up_stride, y_stride, perm, block);
    }
    return make_error(status_code::STATUS_INTERNAL, "activation {}", static_cast<int>(hp.act));
}

// The RoPE rows of layer i (hp.rope_of: the local ones on a sliding-window layer when they differ).
void rope_rows(const llama_hparams& hp, int64_t i_layer, const cuda_layer_pass& p, const float** cos,
               const float** sin) {
    const bool local = &hp.rope_of(i_layer) != &hp.rope;
    *cos             = local ? p.cos_local : p.cos;
    *sin             = local ? p.sin_local : p.sin;
}

cuda_attention_args attention_args_base(const llama_hparams& hp, int64_t i_layer) {
    cuda_attention_args a;
    a.n_head    = hp.n_head;
    a.n_head_kv = hp.n_head_kv;
    a.head_dim  = hp.head_dim;
    a.window    = hp.window[static_cast<size_t>(i_layer)];
    a.scale     = hp.attn_scale;  // 1/sqrt(head_dim), or query_pre_attn_scalar^-0.5
    a.softcap   = hp.attn_softcap;
    return a;
}

// RoPE, the keys/values into the cache and attention over it (the runtime). q, k, v: row slices of
// stride q_stride / kv_stride; the output [n, q_dim] goes to out.
// out_col: the inverse act-order permutation of the linear reading the output (written in its column
// order; every launch of the pass must be the decode kernel: attention_all_decode), or nullptr.
// in_attention: RoPE and the cache append inside the decode attention (every launch of the pass is the
// decode kernel: attention_all_decode).
status attention_cached(cuda_context& c, const llama_hparams& hp, int64_t i_layer, uint16_t* q, const uint16_t* k,
                        const uint16_t* v, int64_t q_stride, int64_t kv_stride, uint16_t* out, const cuda_layer_pass& p,
                        const int32_t* out_col = nullptr, bool in_attention = false) {
    // RoPE on q (in place) and k, k and v into the cache: one launch. Ragged: token t into sequence
    // seq_dev[t] at pos_dev[t]; a plain pass: the one sequence of p.pages, positions pos_dev[t].
    const float *cos = nullptr, *sin = nullptr;
    rope_rows(hp, i_layer, p, &cos, &sin);
    if (!in_attention) {
        GPTQ_TRY(op_cuda_rope_kv_store(c, q, k, v, q_stride, kv_stride, cos, sin, p.n, hp.n_head, hp.n_head_kv,
                                       hp.head_dim, p.k_cache, p.v_cache, p.pos_dev, p.ragged ? p.seq_dev : nullptr,
                                       p.pages, p.n_ctx));
        GPTQ_TRY(mark(p, "rope_kv_store"));
    }
    const int64_t half = hp.head_dim / 2;
    // Queries of rows [row0, row0 + n_q) over one sequence's pages from n_past (a prefill, or a chunk
    // of a mixed pass: the pages row of that sequence), or ragged (seq < 0: each row's own position
    // and sequence, read when the kernel runs; the bound n_ctx sizes grid and workspace).
    auto run = [&](int64_t row0, int64_t n_q, int64_t seq, int64_t n_past) -> status {
        cuda_attention_args a = attention_args_base(hp, i_layer);
        a.q                   = q + row0 * q_stride;
        a.k                   = p.k_cache;
        a.v                   = p.v_cache;
        a.out                 = out + row0 * hp.q_dim();
        a.n_q                 = n_q;
        a.q_stride            = q_stride;
        a.out_stride          = hp.q_dim();
        a.kv_stride           = hp.kv_dim();
        a.kv_pages            = p.pages;
        a.out_col             = out_col;
        if (in_attention) {  // rows row0 .. of q/k/v and of the RoPE tables are this launch's queries
            a.k_new      = k + row0 * kv_stride;
            a.v_new      = v + row0 * kv_stride;
            a.new_stride = kv_stride;
            a.rope_cos   = cos + row0 * half;
            a.rope_sin   = sin + row0 * half;
            a.n_ctx      = p.n_ctx;
        }
        if (seq < 0) {
            a.n_kv      = p.n_ctx;
            a.q_pos0    = 0;
            a.q_pos_dev = p.pos_dev + row0;
            a.q_seq_dev = p.seq_dev + row0;
        } else {
            a.n_kv           = n_past + n_q;
            a.q_pos0         = n_past;
            a.kv_pages.pages = p.pages.pages + seq * p.pages.pages_stride;
        }
        return op_cuda_attention(c, a);
    };
    if (!p.ragged) {
        GPTQ_TRY(run(0, p.n, 0, p.n_past));  // p.pages is the sequence's row already
    } else {
        for (int64_t j = 0; j < p.n_chunks; ++j) {
            const cuda_attention_chunk& ch = p.chunks[j];
            GPTQ_TRY(run(ch.row0, ch.n, ch.seq, ch.n_past));
        }
        if (p.decode_row0 < p.n) GPTQ_TRY(run(p.decode_row0, p.n - p.decode_row0, -1, 0));
    }
    return mark(p, in_attention ? "attention+rope" : "attention");
}

// Whether every attention launch of a cached pass (attention_cached) runs the decode kernel, so that
// its output may be written in the next linear's column order (cuda_attention_args::out_col).
bool attention_all_decode(const llama_hparams& hp, const cuda_layer_pass& p, int64_t q_stride, int64_t kv_stride) {
    cuda_attention_args a;
    a.q_stride = q_stride, a.kv_stride = kv_stride;
    auto decode = [&](int64_t n_q, bool ragged) {
        a.n_q       = n_q;
        a.q_pos_dev = ragged ? p.pos_dev : nullptr;
        return op_cuda_attention_is_decode(a);
    };
    if (!p.ragged) return decode(p.n, false);
    for (int64_t j = 0; j < p.n_chunks; ++j)
        if (!decode(p.chunks[j].n, false)) return false;
    return p.decode_row0 >= p.n || decode(p.n - p.decode_row0, true);
}

// Local K/V (calibration): per window of p.seqlen rows, RoPE on q and k in place and attention over
// the window's own keys. q: [n, q_dim], k/v: [n, kv_dim]; the output [n, q_dim] goes to out.
status attention_local(cuda_context& c, const llama_hparams& hp, int64_t i_layer, uint16_t* q, uint16_t* k, uint16_t* v,
                       uint16_t* out, const cuda_layer_pass& p) {
    const int64_t q_dim = hp.q_dim(), kv_dim = hp.kv_dim(), seqlen = p.seqlen;
    if (seqlen <= 0 || p.n % seqlen != 0)
        return make_error(E_ARG, "layer pass of {} rows in local windows of {} tokens", p.n, seqlen);
    const float *cos = nullptr, *sin = nullptr;
    rope_rows(hp, i_layer, p, &cos, &sin);
    for (int64_t s = 0; s < p.n / seqlen; ++s) {
        uint16_t* qs = q + s * seqlen * q_dim;
        uint16_t* ks = k + s * seqlen * kv_dim;
        uint16_t* vs = v + s * seqlen * kv_dim;
        GPTQ_TRY(op_cuda_rope(c, qs, cos, sin, seqlen, hp.n_head, hp.head_dim, q_dim));
        GPTQ_TRY(op_cuda_rope(c, ks, cos, sin, seqlen, hp.n_head_kv, hp.head_dim, kv_dim));
        cuda_attention_args a = attention_args_base(hp, i_layer);
        a.q                   = qs;
        a.k                   = ks;
        a.v                   = vs;
        a.out                 = out + s * seqlen * q_dim;
        a.n_q                 = seqlen;
        a.n_kv                = seqlen;
        a.q_pos0              = 0;
        a.q_stride = a.out_stride = q_dim;
        a.kv_stride               = kv_dim;
        GPTQ_TRY(op_cuda_attention(c, a));
    }
    return mark(p, "attention");
}

bool fast_gptq(const cuda_linear& l) {
    return l.n_out > 0 && l.quantized && l.q.fast;
}

// Queues `next`'s dequantization ahead (p.dequant_ahead), before the linear it follows runs.
status ahead(cuda_context& c, const cuda_layer_pass& p, const cuda_linear* next) {
    if (!p.dequant_ahead || !next || !fast_gptq(*next)) return status::ok();
    return op_cuda_gptq_dequant_ahead(c, next->q, p.n);
}

// A layer's first linear (q/k/v fused, or q) and the MLP's (gate/up fused, or gate; none on a MoE layer).
const cuda_linear* first_attention_linear(const cuda_layer_weights* w) {
    if (!w) return nullptr;
    return w->qkv.n_out > 0 ? &w->qkv : &w->linear(linear_role::LINEAR_Q);
}
const cuda_linear* first_mlp_linear(const cuda_layer_weights& w) {
    if (w.moe) return nullptr;
    return w.gate_up.n_out > 0 ? &w.gate_up : &w.linear(linear_role::LINEAR_GATE);
}

// The residual add and the next RMSNorm in a GEMV's epilogue (x_out: where the normalised rows go):
// after o, the MLP norm in gate/up's column order; after down, the next layer's attention norm in its
// fused q/k/v's order. The same values for the check (cuda_layer_fusion_of) and the launch.
cuda_gptq_fusion mlp_norm_fusion(const llama_hparams& hp, const cuda_layer_weights& w, uint16_t* x_out) {
    return {nullptr, 0.0f, true, false, w.mlp_norm.as<uint16_t>(), hp.rms_eps, perm_of(w.gate_up), x_out};
}
cuda_gptq_fusion attn_norm_fusion(const llama_hparams& hp, const cuda_layer_weights& next, uint16_t* x_out) {
    const int32_t* perm = next.qkv.n_out > 0 ? perm_of(next.qkv) : nullptr;
    return {nullptr, 0.0f, true, false, next.attn_norm.as<uint16_t>(), hp.rms_eps, perm, x_out};
}

// The epilogue fusions of a decode pass of at most 8 rows (where the fused kernels are the ones the
// plain table picks): each where its linears are on the int4 layout and the layer has no sandwich
// norms (they act on o's / down's output before the add) and is not MoE.
cuda_layer_fusion with_epilogue_fusions(const llama_hparams& hp, const cuda_layer_weights& w, const cuda_layer_pass& p,
                                        cuda_layer_fusion f) {
    if (p.n > 8 || w.moe || hp.attn_out_norm || hp.mlp_out_norm || w.gate_up.n_out == 0) return f;
    const cuda_linear &o = w.linear(linear_role::LINEAR_O), &down = w.linear(linear_role::LINEAR_DOWN);
    f.o_norm   = fast_gptq(o) && op_cuda_gptq_fused_ok(o.q, p.n, mlp_norm_fusion(hp, w, nullptr));
    f.silu_epi = fast_gptq(w.gate_up) && w.gate_up_block == 16 && hp.act == mlp_activation::ACT_SILU &&
                 (w.gate_up_in_down_order || !perm_of(down)) &&
                 op_cuda_gptq_fused_ok(w.gate_up.q, p.n, {nullptr, 0.0f, false, true});
    f.down_norm = p.next_norm && fast_gptq(down) &&
                  op_cuda_gptq_fused_ok(down.q, p.n, attn_norm_fusion(hp, *p.next_norm, nullptr));
    return f;
}
}  // namespace

cuda_layer_fusion cuda_layer_fusion_of(const llama_hparams& hp, const cuda_layer_weights& w, const cuda_layer_pass& p) {
    cuda_layer_fusion f;
    // The runtime's decode passes only: no hooks (they see the plain ops' inputs), no LoRA (it adds
    // to each linear's own output), the cache, at most int4_gemv_fused_max_m rows (checked per linear).
    if (!p.decode_fuse || p.hook || p.moe_hook || p.lora_rows || !p.k_cache || p.attn_out || p.attn_reuse ||
        p.stop_after != linear_input::LINEAR_INPUT_COUNT)
        return f;
    f.attn_rope = true;  // where every attention launch is the decode kernel (attention_cached checks)
    if (p.decode_fuse_epi && !p.decode_fuse_gemv) return with_epilogue_fusions(hp, w, p, f);
    if (!p.decode_fuse_gemv) return f;
    const float eps = hp.rms_eps;
    if (fast_gptq(w.qkv) && !hp.qk_norm)
        f.qkv_norm = op_cuda_gptq_fused_ok(w.qkv.q, p.n, {w.attn_norm.as<uint16_t>(), eps, false, false});
    const cuda_linear &o = w.linear(linear_role::LINEAR_O), &down = w.linear(linear_role::LINEAR_DOWN);
    // Sandwich norms act on o's / down's output before the residual add: not fused.
    if (!w.moe && !hp.attn_out_norm && !hp.mlp_out_norm && fast_gptq(w.gate_up) && fast_gptq(o) && fast_gptq(down)) {
        const cuda_gptq_fusion res{nullptr, 0.0f, true, false};
        // SiLU in gate/up's epilogue: the interleaved rows, already in down's act-order order when
        // down has one (silu_mul could not permute its output then).
        const bool silu =
            w.gate_up_block == 16 && hp.act == mlp_activation::ACT_SILU && (w.gate_up_in_down_order || !perm_of(down));
        f.mlp = op_cuda_gptq_fused_ok(o.q, p.n, res) && op_cuda_gptq_fused_ok(down.q, p.n, res) &&
                op_cuda_gptq_fused_ok(w.gate_up.q, p.n, {w.mlp_norm.as<uint16_t>(), eps, false, silu});
        f.silu = f.mlp && silu;
    }
    return f;
}

result<bool> cuda_attention_block(cuda_context& c, const llama_hparams& hp, int64_t i_layer,
                                  const cuda_layer_weights& w, uint16_t* hidden, const uint16_t* pending,
                                  const cuda_layer_buffers& b, const cuda_layer_pass& p, const cuda_layer_fusion& f) {
    const int64_t  q_dim = hp.q_dim(), kv_dim = hp.kv_dim(), n = p.n;
    const bool     fused = w.qkv.n_out > 0;
    const int32_t* p_qkv = fused ? perm_of(w.qkv) : nullptr;
    if (p.x_ready) {  // the previous layer's down GEMV wrote the norm (nothing pending then)
        if (pending || f.qkv_norm)
            return make_error(status_code::STATUS_INTERNAL, "layer {}: a normalised input with a pending add", i_layer);
    } else if (!f.qkv_norm) {
        GPTQ_TRY(norm(c, hp, hidden, pending, w.attn_norm, b.x, p, p_qkv));
    } else if (pending) {  // the norm is in q/k/v's GEMV; the add is not (a plain layer before)
        GPTQ_TRY(op_cuda_add(c, hidden, pending, n * hp.n_embd));
        GPTQ_TRY(mark(p, "add"));
    }
    GPTQ_TRY(capture(p, linear_input::LINEAR_INPUT_QKV, b.x, hp.n_embd));
    if (p.stop_after == linear_input::LINEAR_INPUT_QKV) return false;
    // The attention output [n, q_dim]: in x (free again once q/k/v are computed) or where asked.
    uint16_t* att = p.attn_out ? p.attn_out : b.x;
    // The fused step with an act-order o: attention writes its output in o's column order (no
    // permutation launch before o) when all its launches are the decode kernel.
    const cuda_linear& o          = w.linear(linear_role::LINEAR_O);
    const int32_t*     o_col      = nullptr;
    bool               o_in_order = false;
    if (!p.attn_reuse) {
        // q, k, v: three buffers, or row slices of the fused projection's output (stride qkv_dim).
        uint16_t *q = b.q, *k = b.k, *v = b.v;
        int64_t   q_stride = q_dim, kv_stride = kv_dim;
        if (f.qkv_norm) {  // rms_norm(hidden) * attn_norm inside the GEMV
            GPTQ_TRY(op_cuda_gptq_linear_fused(c, w.qkv.q, hidden, b.q, n,
                                               {w.attn_norm.as<uint16_t>(), hp.rms_eps, false, false}));
            GPTQ_TRY(mark(p, "linear_qkv+norm"));
        } else if (fused) {
            GPTQ_TRY(ahead(c, p, &o));
            GPTQ_TRY(cuda_linear_forward(c, w.qkv, b.x, b.q, n, p_qkv != nullptr));
            GPTQ_TRY(mark(p, "linear_qkv"));
        }
        if (fused) {
            k        = b.q + q_dim;
            v        = b.q + q_dim + kv_dim;
            q_stride = kv_stride = q_dim + 2 * kv_dim;
        } else {
            GPTQ_TRY(ahead(c, p, &w.linear(linear_role::LINEAR_K)));
            GPTQ_TRY(linear_run(c, w, linear_role::LINEAR_Q, b.x, q, p));
            GPTQ_TRY(mark(p, "linear_q"));
            GPTQ_TRY(ahead(c, p, &w.linear(linear_role::LINEAR_V)));
            GPTQ_TRY(linear_run(c, w, linear_role::LINEAR_K, b.x, k, p));
            GPTQ_TRY(mark(p, "linear_k"));
            GPTQ_TRY(ahead(c, p, &o));
            GPTQ_TRY(linear_run(c, w, linear_role::LINEAR_V, b.x, v, p));
            GPTQ_TRY(mark(p, "linear_v"));
        }
        if (hp.qk_norm) {  // Qwen3, Gemma 3: RMSNorm over each head's head_dim values, before RoPE
            // Rows of head_dim: q and k must be contiguous [n, heads * head_dim] (not fused at load).
            if (fused) return make_error(status_code::STATUS_INTERNAL, "layer {}: q/k norms with fused q/k/v", i_layer);
            GPTQ_TRY(op_cuda_rms_norm(c, q, w.q_norm.as<uint16_t>(), q, n * hp.n_head, hp.head_dim, hp.rms_eps));
            GPTQ_TRY(op_cuda_rms_norm(c, k, w.k_norm.as<uint16_t>(), k, n * hp.n_head_kv, hp.head_dim, hp.rms_eps));
            GPTQ_TRY(mark(p, "qk_norm"));
        }
        const bool all_decode = p.k_cache && attention_all_decode(hp, p, q_stride, kv_stride);
        // Only the decode kernel writes through out_col; o then skips its permutation launch, with
        // or without the GEMV fusions (f.attn_rope excludes hooks and LoRA, which need o's plain x).
        if (f.attn_rope && perm_of(o) && all_decode) {
            o_col      = o.q.perm_inv.as<int32_t>();
            o_in_order = true;
        }
        if (p.k_cache) {
            GPTQ_TRY(attention_cached(c, hp, i_layer, q, k, v, q_stride, kv_stride, att, p, o_col,
                                      f.attn_rope && all_decode));
        } else {
            if (fused) return make_error(status_code::STATUS_INTERNAL, "layer {}: local K/V with fused q/k/v", i_layer);
            GPTQ_TRY(attention_local(c, hp, i_layer, q, k, v, att, p));
        }
    }
    GPTQ_TRY(capture(p, linear_input::LINEAR_INPUT_O, att, q_dim));
    if (p.stop_after == linear_input::LINEAR_INPUT_O) return false;
    if (f.mlp) {  // hidden += o's output, in o's GEMV
        GPTQ_TRY(op_cuda_gptq_linear_fused(c, o.q, att, hidden, n, {nullptr, 0.0f, true, false}, o_in_order));
        GPTQ_TRY(mark(p, "linear_o+add"));
        return true;
    }
    if (f.o_norm) {  // hidden += o's output and the MLP norm into x (free once o has read att), in o's GEMV
        GPTQ_TRY(op_cuda_gptq_linear_fused(c, o.q, att, hidden, n, mlp_norm_fusion(hp, w, b.x), o_in_order));
        GPTQ_TRY(mark(p, "linear_o+add+norm"));
        return true;
    }
    GPTQ_TRY(ahead(c, p, first_mlp_linear(w)));
    GPTQ_TRY(linear_run(c, w, linear_role::LINEAR_O, att, b.y, p, o_in_order));
    GPTQ_TRY(mark(p, "linear_o"));
    if (hp.attn_out_norm) GPTQ_TRY(out_norm(c, hp, w.attn_out_norm, b.y, p));  // sandwich (Gemma)
    return true;
}

namespace {
// The MLP block of the fused decode step (f.mlp): o's output is in hidden already; the norm goes into
// gate/up's GEMV (with SiLU * up when f.silu), down's output into hidden.
status mlp_block_fused(cuda_context& c, const llama_hparams& hp, const cuda_layer_weights& w, uint16_t* hidden,
                       const cuda_layer_buffers& b, const cuda_layer_pass& p, const cuda_layer_fusion& f) {
    const int64_t      n = p.n, n_ff = hp.n_ff;
    const cuda_linear& down   = w.linear(linear_role::LINEAR_DOWN);
    const int32_t*     p_down = perm_of(down);
    // The act-order order down reads: gate/up's rows are in it, or silu_mul permutes (not with f.silu).
    const int32_t*  p_silu = w.gate_up_in_down_order ? nullptr : p_down;
    const uint16_t* norm_w = w.mlp_norm.as<uint16_t>();
    if (f.silu) {
        GPTQ_TRY(op_cuda_gptq_linear_fused(c, w.gate_up.q, hidden, b.up, n, {norm_w, hp.rms_eps, false, true}));
        GPTQ_TRY(mark(p, "linear_gate_up+norm+silu"));
    } else {
        GPTQ_TRY(op_cuda_gptq_linear_fused(c, w.gate_up.q, hidden, b.gate, n, {norm_w, hp.rms_eps, false, false}));
        GPTQ_TRY(mark(p, "linear_gate_up+norm"));
        const int64_t B = w.gate_up_block;
        GPTQ_TRY(act_mul(c, hp, b.gate, b.gate + (B ? B : n_ff), b.up, n, 2 * n_ff, 2 * n_ff, n_ff, p_silu, B));
        GPTQ_TRY(mark(p, "silu_mul"));
    }
    GPTQ_TRY(op_cuda_gptq_linear_fused(c, down.q, b.up, hidden, n, {nullptr, 0.0f, true, false}, p_down != nullptr));
    return mark(p, "linear_down+add");
}
}  // namespace

result<bool> cuda_mlp_block(cuda_context& c, const llama_hparams& hp, const cuda_layer_weights& w, uint16_t* hidden,
                            const cuda_layer_buffers& b, const cuda_layer_pass& p, const cuda_layer_fusion& f) {
    if (f.mlp) {
        GPTQ_TRY(mlp_block_fused(c, hp, w, hidden, b, p, f));
        return true;
    }
    const int64_t  n = p.n, n_ff = hp.n_ff;
    const bool     fused = w.gate_up.n_out > 0;
    const int32_t* p_gu  = fused ? perm_of(w.gate_up) : nullptr;
    // hidden += o's output, then the norm into x (x is free after o); with f.o_norm o's GEMV did both.
    if (!f.o_norm) GPTQ_TRY(norm(c, hp, hidden, b.y, w.mlp_norm, b.x, p, p_gu));
    GPTQ_TRY(capture(p, linear_input::LINEAR_INPUT_GATE_UP, b.x, hp.n_embd));
    if (p.stop_after == linear_input::LINEAR_INPUT_GATE_UP) return false;
    const cuda_linear& down   = w.linear(linear_role::LINEAR_DOWN);
    const uint16_t*    act    = b.gate;  // silu(gate) * up, [n, n_ff] contiguous
    const int32_t*     p_down = nullptr;
    if (f.silu_epi) {  // silu(gate) * up straight into up, in down's order (gate_up_in_down_order or none)
        GPTQ_TRY(
            op_cuda_gptq_linear_fused(c, w.gate_up.q, b.x, b.up, n, {nullptr, 0.0f, false, true}, p_gu != nullptr));
        GPTQ_TRY(mark(p, "linear_gate_up+silu"));
        p_down = perm_of(down);
        act    = b.up;
    } else if (fused) {
        GPTQ_TRY(ahead(c, p, &down));
        GPTQ_TRY(cuda_linear_forward(c, w.gate_up, b.x, b.gate, n, p_gu != nullptr));  // [n, 2 n_ff]: gate | up
        GPTQ_TRY(mark(p, "linear_gate_up"));
        // Down's act-order order: already that of gate_up's outputs (permuted at load), else
        // written by silu_mul (its output up does not alias its input, so it may permute).
        const int32_t* p_silu = nullptr;
        if (w.gate_up_in_down_order)
            p_down = perm_of(down);
        else
            p_down = p_silu = perm_of(down);
        const int64_t B = w.gate_up_block;  // interleaved rows: up = gate + B (block B), else gate + n_ff
        GPTQ_TRY(act_mul(c, hp, b.gate, b.gate + (B ? B : n_ff), b.up, n, 2 * n_ff, 2 * n_ff, n_ff, p_silu, B));
        act = b.up;
    } else {
        GPTQ_TRY(ahead(c, p, &w.linear(linear_role::LINEAR_UP)));
        GPTQ_TRY(linear_run(c, w, linear_role::LINEAR_GATE, b.x, b.gate, p));
        GPTQ_TRY(mark(p, "linear_gate"));
        GPTQ_TRY(ahead(c, p, &down));
        GPTQ_TRY(linear_run(c, w, linear_role::LINEAR_UP, b.x, b.up, p));
        GPTQ_TRY(mark(p, "linear_up"));
        GPTQ_TRY(act_mul(c, hp, b.gate, b.up, b.gate, n, n_ff, n_ff, n_ff));
    }
    if (!f.silu_epi) GPTQ_TRY(mark(p, "silu_mul"));
    GPTQ_TRY(capture(p, linear_input::LINEAR_INPUT_DOWN, act, n_ff));
    if (p.stop_after == linear_input::LINEAR_INPUT_DOWN) return false;
    if (f.down_norm) {  // hidden += down's output and the next layer's attention norm into x, in down's GEMV
        GPTQ_TRY(op_cuda_gptq_linear_fused(c, down.q, act, hidden, n, attn_norm_fusion(hp, *p.next_norm, b.x),
                                           p_down != nullptr));
        GPTQ_TRY(mark(p, "linear_down+add+norm"));
        return true;
    }
    GPTQ_TRY(ahead(c, p, first_attention_linear(p.next_layer)));
    GPTQ_TRY(linear_run(c, w, linear_role::LINEAR_DOWN, act, b.y, p, p_down != nullptr));
    GPTQ_TRY(mark(p, "linear_down"));
    if (hp.mlp_out_norm) GPTQ_TRY(out_norm(c, hp, w.mlp_out_norm, b.y, p));  // sandwich (Gemma)
    return true;
}

result<bool> cuda_layer_forward(cuda_context& c, const llama_hparams& hp, int64_t i_layer, const cuda_layer_weights& w,
                                uint16_t* hidden, const uint16_t* pending, const cuda_layer_buffers& b,
                                const cuda_layer_pass& p, bool* output_added, bool* x_out_ready) {
    if (output_added) *output_added = false;
    if (x_out_ready) *x_out_ready = false;
    const cuda_layer_fusion f = cuda_layer_fusion_of(hp, w, p);
    GPTQ_ASSIGN_OR_RETURN(const bool attention_done, cuda_attention_block(c, hp, i_layer, w, hidden, pending, b, p, f));
    if (!attention_done) return false;
    if (w.moe) return cuda_moe_block(c, hp, w, hidden, b, p);  // the sparse block (llama_cuda_moe.cpp)
    GPTQ_ASSIGN_OR_RETURN(const bool done, cuda_mlp_block(c, hp, w, hidden, b, p, f));
    if (output_added) *output_added = done && (f.mlp || f.down_norm);
    if (x_out_ready) *x_out_ready = done && f.down_norm;
    return done;
}

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
    // RoPE rows of positions 0 .. seqlen-1, exactly as the CPU computes them for a window (LongRoPE:
    // the factors of a seqlen-token sequence, the attention factor in the rows); the local layers'
    // own rows when their RoPE differs.
    const int64_t half   = hp.head_dim / 2;
    auto          tables = [&](const rope_config& rope, cuda_buffer* c, cuda_buffer* s) -> status {
        const std::vector<float> inv_freq = llama_rope_inv_freq(hp, rope, seqlen);
        std::vector<float>       cos(size_t(seqlen * half)), sin(cos.size());
        op_rope_tables(inv_freq.data(), half, 0, seqlen, llama_rope_attention_factor(rope), cos.data(), sin.data());
        GPTQ_ASSIGN_OR_RETURN(*c, cuda_buffer::from_host(cos.data(), cos.size() * 4));
        GPTQ_ASSIGN_OR_RETURN(*s, cuda_buffer::from_host(sin.data(), sin.size() * 4));
        return status::ok();
    };
    GPTQ_TRY(tables(hp.rope, &r->cos_, &r->sin_));
    if (hp.rope_local_differs) GPTQ_TRY(tables(hp.rope_local, &r->cos_local_, &r->sin_local_));
    return r;
}

status llama_cuda_layer_runner::upload_f16(const std::vector<float>& v, const std::string& name, cuda_buffer* out,
                                           bool* exact) {
    std::vector<uint16_t> h(v.size());
    const int64_t         n = static_cast<int64_t>(v.size());
    std::atomic<int64_t>  bad{n};  // the first element out of range, or n
    std::atomic<bool>     inexact{false};
    auto                  convert = [&](int64_t i0, int64_t i1) {
        bool lossy = false;
        for (int64_t i = i0; i < i1; ++i) {
            if (!(std::fabs(v[size_t(i)]) <= k_f16_max)) {
                int64_t cur = bad.load();
                while (i < cur && !bad.compare_exchange_weak(cur, i)) {
                }
                return;
            }
            h[size_t(i)] = f32_to_f16(v[size_t(i)]);
            if (exact)
                lossy |= std::bit_cast<uint32_t>(f16_to_f32(h[size_t(i)])) != std::bit_cast<uint32_t>(v[size_t(i)]);
        }
        if (lossy) inexact = true;
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
    if (exact) *exact = !inexact.load();
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

status llama_cuda_layer_runner::load(const llama_layer& layer, const std::vector<std::vector<uint16_t>>* w16) {
    layer_index_ = layer.index;
    attn_valid_  = false;
    GPTQ_TRY(upload_f16(layer.attn_norm, "model.layers." + std::to_string(layer.index) + ".input_layernorm.weight",
                        &w_.attn_norm));
    GPTQ_TRY(upload_f16(layer.mlp_norm,
                        "model.layers." + std::to_string(layer.index) + ".post_attention_layernorm.weight",
                        &w_.mlp_norm));
    // The options' norms (host F32, norm_plus_one already folded by layer_load); empty when off.
    const std::string prefix  = "model.layers." + std::to_string(layer.index) + ".";
    auto              options = [&](const std::vector<float>& v, const char* what, cuda_buffer* out) -> status {
        if (v.empty()) {
            *out = cuda_buffer();
            return status::ok();
        }
        return upload_f16(v, prefix + what, out);
    };
    GPTQ_TRY(options(layer.attn_out_norm, "attention output norm", &w_.attn_out_norm));
    GPTQ_TRY(options(layer.mlp_out_norm, "MLP output norm", &w_.mlp_out_norm));
    GPTQ_TRY(options(layer.q_norm, "self_attn.q_norm.weight", &w_.q_norm));
    GPTQ_TRY(options(layer.k_norm, "self_attn.k_norm.weight", &w_.k_norm));
    for (int r = 0; r < k_n_linear_roles; ++r) {
        const auto            role = static_cast<linear_role>(r);
        const linear_weights& lw   = layer.linear(role);
        const std::string     name = llama_linear_name(layer.index, role);
        if (lw.q)
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "{}: the GPU calibration runner takes dense weights (this one is GPTQ-packed)", name);
        cuda_linear& l                   = w_.lin[size_t(r)];
        l.n_out                          = lw.n_out;
        l.n_in                           = lw.n_in;
        exact_[size_t(r)]                = false;
        const std::vector<uint16_t>* pre = w16 && size_t(r) < w16->size() ? &(*w16)[size_t(r)] : nullptr;
        if (pre && !lw.w.empty() && pre->size() == lw.w.size()) {  // made ahead: in range and exact
            const size_t bytes = pre->size() * 2;
            GPTQ_TRY(ctx_->synchronize());  // the previous forward may still read the old bytes
            if (l.w.bytes() != bytes) {
                l.w = cuda_buffer();
                GPTQ_ASSIGN_OR_RETURN(l.w, cuda_buffer::alloc(bytes));
            }
            GPTQ_TRY(l.w.upload(pre->data(), bytes));
            exact_[size_t(r)] = true;
        } else {
            GPTQ_TRY(upload_f16(lw.w, name + ".weight", &l.w, &exact_[size_t(r)]));
        }
        if (!lw.bias.empty()) {
            GPTQ_TRY(upload_f16(lw.bias, name + ".bias", &l.bias));
        } else {
            l.bias = cuda_buffer();
        }
    }
    if (layer.moe) return moe_load(layer);
    w_.moe.reset();
    return status::ok();
}

status llama_cuda_layer_runner::moe_load(const llama_layer& layer) {
    if (!layer.moe) return make_error(E_ARG, "layer {} has no MoE block", layer.index);
    if (!w_.moe) w_.moe = std::make_shared<cuda_moe_weights>();
    const cuda_f16_upload up = [this](const std::vector<float>& v, const std::string& name, cuda_buffer* out) {
        return upload_f16(v, name, out);
    };
    GPTQ_TRY(cuda_moe_upload_dense(hp_, layer, up, w_.moe.get()));
    if (!moe_buf_) {  // one chunk's MoE activations, with the route-all buffers
        moe_buf_ = std::make_shared<cuda_moe_buffers>();
        GPTQ_TRY(moe_buf_->reserve(hp_, chunk_windows_ * seqlen_, /*route_all=*/true));
    }
    return status::ok();
}

const uint16_t* llama_cuda_layer_runner::linear_f16_if_exact(linear_role r) const {
    const cuda_linear& l = w_.lin[size_t(r)];
    return exact_[size_t(r)] && l.w.bytes() == size_t(l.n_out * l.n_in) * 2 ? l.w.as<uint16_t>() : nullptr;
}

status llama_cuda_layer_runner::linear_update(linear_role r, const std::vector<float>& w) {
    cuda_linear& l    = w_.lin[size_t(r)];
    exact_[size_t(r)] = false;
    if (r == linear_role::LINEAR_Q || r == linear_role::LINEAR_K || r == linear_role::LINEAR_V) attn_valid_ = false;
    if (int64_t(w.size()) != l.n_out * l.n_in)
        return make_error(E_ARG, "{}: weight of {} values, expected {} x {}", llama_linear_name(layer_index_, r),
                          w.size(), l.n_out, l.n_in);
    return upload_f16(w, llama_linear_name(layer_index_, r) + ".weight", &l.w);
}

status llama_cuda_layer_runner::linear_update(linear_role r, const cuda_gptq_codes& q) {
    cuda_linear& l    = w_.lin[size_t(r)];
    exact_[size_t(r)] = false;
    if (r == linear_role::LINEAR_Q || r == linear_role::LINEAR_K || r == linear_role::LINEAR_V) attn_valid_ = false;
    if (q.n_out != l.n_out || q.n_in != l.n_in)
        return make_error(E_ARG, "{}: GPTQ codes of {} x {}, expected {} x {}", llama_linear_name(layer_index_, r),
                          q.n_out, q.n_in, l.n_out, l.n_in);
    const size_t bytes = size_t(l.n_out * l.n_in) * 2;
    if (l.w.bytes() != bytes) {
        GPTQ_TRY(ctx_->synchronize());  // the previous forward may still read the old buffer
        l.w = cuda_buffer();
        GPTQ_ASSIGN_OR_RETURN(l.w, cuda_buffer::alloc(bytes));
    }
    // Queued after the passes that read the old weight (one stream).
    GPTQ_ASSIGN_OR_RETURN(const int64_t bad, op_cuda_gptq_dequant_f16(*ctx_, q, l.w.as<uint16_t>()));
    if (bad >= 0)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "tensor '{}.weight' element {} dequantizes outside the F16 range the GPU calibration uses",
                          llama_linear_name(layer_index_, r), bad);
    return status::ok();
}

status llama_cuda_layer_runner::forward(uint16_t* hidden, int64_t n_windows, const cuda_linear_input_hook* hook,
                                        linear_input stop_after, const cuda_moe_input_hook* moe_hook,
                                        const std::vector<bool>* route_all) {
    if (layer_index_ < 0) return make_error(E_ARG, "layer runner: forward before load");
    const int64_t            n_embd = hp_.n_embd, q_dim = hp_.q_dim();
    cuda_context&            c       = *ctx_;
    uint16_t*                h       = h_.as<uint16_t>();
    const bool               full    = stop_after == linear_input::LINEAR_INPUT_COUNT;
    const bool               caching = attn_.bytes() && n_windows == attn_windows_;
    const cuda_layer_buffers b{x_.as<uint16_t>(), q_.as<uint16_t>(),    k_.as<uint16_t>(),  v_.as<uint16_t>(),
                               y_.as<uint16_t>(), gate_.as<uint16_t>(), up_.as<uint16_t>(), moe_buf_.get()};
    cuda_layer_pass          p;
    p.cos           = cos_.as<float>();
    p.sin           = sin_.as<float>();
    p.cos_local     = cos_local_.as<float>();
    p.sin_local     = sin_local_.as<float>();
    p.seqlen        = seqlen_;
    p.attn_reuse    = caching && attn_valid_;
    p.hook          = hook;
    p.stop_after    = stop_after;
    p.moe_hook      = moe_hook;
    p.moe_route_all = route_all;
    for (int64_t w0 = 0; w0 < n_windows; w0 += chunk_windows_) {
        const int64_t nw = std::min(chunk_windows_, n_windows - w0);
        p.n              = nw * seqlen_;
        p.attn_out       = caching ? attn_.as<uint16_t>() + w0 * seqlen_ * q_dim : nullptr;
        uint16_t* hw     = hidden + w0 * seqlen_ * n_embd;
        GPTQ_TRY(cuda_copy_device_async(c, h, hw, size_t(p.n * n_embd) * 2));
        GPTQ_ASSIGN_OR_RETURN(const bool done, cuda_layer_forward(c, hp_, layer_index_, w_, h, nullptr, b, p));
        if (!done || !full) continue;
        GPTQ_TRY(op_cuda_add(c, h, b.y, p.n * n_embd));  // the residual add of down's output
        GPTQ_TRY(cuda_copy_device_async(c, hw, h, size_t(p.n * n_embd) * 2));
    }
    // Computed for every window now; a full pass has replaced the inputs it came from.
    if (caching && stop_after != linear_input::LINEAR_INPUT_QKV) attn_valid_ = !full;
    return status::ok();
}

uint64_t llama_cuda_layer_runner::device_bytes() const {
    uint64_t n = w_.attn_norm.bytes() + w_.mlp_norm.bytes() + cos_.bytes() + sin_.bytes() + attn_.bytes();
    n += cos_local_.bytes() + sin_local_.bytes();
    for (const cuda_buffer* b : {&w_.attn_out_norm, &w_.mlp_out_norm, &w_.q_norm, &w_.k_norm}) n += b->bytes();
    for (const auto& l : w_.lin) n += l.w.bytes() + l.bias.bytes();
    for (const cuda_buffer* b : {&h_, &x_, &q_, &k_, &v_, &y_, &gate_, &up_}) n += b->bytes();
    if (w_.moe) n += w_.moe->bytes();
    if (moe_buf_) n += moe_buf_->bytes();
    return n;
}

}  // namespace gptq
