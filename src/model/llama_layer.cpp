// One decoder layer on the CPU (llama.h: layer_forward), written once for every caller: forward
// and forward_batch (generation, ppl), and GPTQ calibration through the hooks. The input is a
// ragged batch of sequences stacked row after row ([sum n_tokens, n_embd], no padding); a single
// sequence is a batch of one. Every linear runs once over all rows; only RoPE (positions differ)
// and attention (each sequence sees its own keys/values) run per sequence. The layer is two
// blocks, each a function: attention_block (norm, q/k/v, [q/k norms], RoPE, cache, attention, o,
// [output norm], residual) and mlp_block (norm, gate/up, act(gate) * up, down, [output norm],
// residual). The bracketed steps and the activation are options of llama_hparams (the family's
// description, io/arch.h), never tests of the family. docs/model-runtime.md describes it.
#include <algorithm>
#include <cmath>

#include "core/dtype.h"
#include "core/error.h"
#include "model/llama.h"
#include "model/lora.h"
#include "ops/gptq_linear.h"

namespace gptq {

namespace {
int64_t rows_of(std::span<const layer_seq> seqs) {
    int64_t n = 0;
    for (const layer_seq& s : seqs) n += s.n_tokens;
    return n;
}

// The blocks' activation buffers, per calling thread and kept between calls: a prompt's buffers
// are megabytes, which malloc serves by mmap and returns by munmap, so every layer of every
// prefill paid fresh zeroed pages (page faults and memset: ~15 % of a 1-thread W4 prefill of
// small-llama on the development VM, issue 22 session 11). Every element is written before it is
// read. Kept up to k_keep_bytes in all (released after a layer past that: a 7B prompt's buffers are
// hundreds of MB, and there the page faults are a small part of the layer's work).
struct block_buffers {
    std::vector<float> x, q, k, v, ay, my, gate, up;
};
constexpr size_t k_keep_bytes = size_t{64} << 20;
block_buffers&   buffers() {
      thread_local block_buffers b;
      return b;
}
float* take(std::vector<float>& v, int64_t n) {
    if (v.size() < static_cast<size_t>(n)) v.resize(static_cast<size_t>(n));
    return v.data();
}
void release_if_large() {
    block_buffers& b   = buffers();
    size_t         cap = 0;
    for (const auto* v : {&b.x, &b.q, &b.k, &b.v, &b.ay, &b.my, &b.gate, &b.up}) cap += v->capacity() * sizeof(float);
    if (cap > k_keep_bytes) b = block_buffers{};
}
}  // namespace

void llama_model::linear_run(const ops_context& ctx, const llama_layer& layer, linear_role r,
                             std::span<const layer_seq> seqs, const float* x, float* y) const {
    linear_forward(ctx, layer.linear(r), x, y, rows_of(seqs));
    lora_run(ctx, layer, r, seqs, x, y);
}

void llama_model::linears_run(const ops_context& ctx, const llama_layer& layer, std::span<const linear_role> roles,
                              std::span<const layer_seq> seqs, const float* x, float* const* ys) const {
    // GPTQ linears share one rounding of x and one pool dispatch (op_gptq_linears), F16 ones one
    // dispatch (op_linears_f16); each output is what linear_forward gives the layer alone.
    constexpr size_t k_max = 4;
    gptq_linear_out  q[k_max];
    linear_f16_out   h[k_max];
    size_t           nq = 0, nh = 0;
    int64_t          n_in = 0;
    for (size_t i = 0; i < roles.size(); ++i) {
        const linear_weights& l    = layer.linear(roles[i]);
        const float*          bias = l.bias.empty() ? nullptr : l.bias.data();
        if (l.q && nq < k_max) {
            q[nq++] = {l.q.get(), bias, ys[i]};
        } else if (!l.q && !l.w16.empty() && nh < k_max) {
            h[nh++] = {l.w16.data(), bias, ys[i], l.n_out};
            n_in    = l.n_in;
        } else {
            linear_forward(ctx, l, x, ys[i], rows_of(seqs));
        }
    }
    op_gptq_linears(ctx, x, std::span<const gptq_linear_out>(q, nq), rows_of(seqs));
    op_linears_f16(ctx, x, h, static_cast<int>(nh), rows_of(seqs), n_in);
    for (size_t i = 0; i < roles.size(); ++i) lora_run(ctx, layer, roles[i], seqs, x, ys[i]);
}

void llama_model::lora_run(const ops_context& ctx, const llama_layer& layer, linear_role r,
                           std::span<const layer_seq> seqs, const float* x, float* y) const {
    if (loras_.empty()) return;
    const linear_weights& l = layer.linear(r);
    // Runs of consecutive sequences with the same adapter get one product each.
    int64_t row0 = 0;
    for (size_t i = 0; i < seqs.size();) {
        const int32_t a = seqs[i].lora;
        int64_t       n = 0;
        size_t        j = i;
        for (; j < seqs.size() && seqs[j].lora == a; ++j) n += seqs[j].n_tokens;
        if (a >= 0) {
            GPTQ_ASSERT(a < static_cast<int32_t>(loras_.size()));
            if (const lora_module* m = loras_[static_cast<size_t>(a)]->module(layer.index, r)) {
                if (dropout_.p > 0) {  // training (lora_loss_grad): the branch's input dropped
                    std::vector<float> xd(static_cast<size_t>(n * l.n_in));
                    lora_dropout_rows(dropout_, layer.index, r, x + row0 * l.n_in, xd.data(), row0, n, l.n_in);
                    lora_forward(ctx, *m, xd.data(), y + row0 * l.n_out, n, l.n_in, l.n_out);
                } else {
                    lora_forward(ctx, *m, x + row0 * l.n_in, y + row0 * l.n_out, n, l.n_in, l.n_out);
                }
            }
        }
        row0 += n;
        i = j;
    }
}

int32_t llama_model::lora_add(std::shared_ptr<const lora_adapter> adapter) {
    GPTQ_ASSERT(adapter && static_cast<int64_t>(adapter->layers.size()) == hp_.n_layer);
    loras_.push_back(std::move(adapter));
    return static_cast<int32_t>(loras_.size() - 1);
}

bool llama_model::attention_block(const ops_context& ctx, const llama_layer& layer, float* hidden,
                                  std::span<const layer_seq> seqs, const linear_input_hook* hook,
                                  linear_input stop_after) const {
    const int64_t n_embd = hp_.n_embd, q_dim = hp_.q_dim(), kv_dim = hp_.kv_dim(), hd = hp_.head_dim;
    const int64_t i_layer = layer.index;
    const int64_t n_rows  = rows_of(seqs);
    auto          lin     = [&](linear_role r, const float* x, float* y) { linear_run(ctx, layer, r, seqs, x, y); };

    block_buffers& buf = buffers();
    float*         x   = take(buf.x, n_rows * std::max(n_embd, q_dim));  // [n_rows, n_embd]
    op_rms_norm(ctx, hidden, layer.attn_norm.data(), x, n_rows, n_embd, hp_.rms_eps);
    if (hook && *hook) (*hook)(i_layer, linear_input::LINEAR_INPUT_QKV, x, n_rows, n_embd);
    if (stop_after == linear_input::LINEAR_INPUT_QKV) return false;

    float* const      q         = take(buf.q, n_rows * q_dim);   // [n_rows, q_dim]
    float* const      k         = take(buf.k, n_rows * kv_dim);  // [n_rows, kv_dim]
    float* const      v         = take(buf.v, n_rows * kv_dim);
    const linear_role qkv[]     = {linear_role::LINEAR_Q, linear_role::LINEAR_K, linear_role::LINEAR_V};
    float* const      qkv_out[] = {q, k, v};
    linears_run(ctx, layer, qkv, seqs, x, qkv_out);
    if (hp_.qk_norm) {  // Qwen3, Gemma 3: RMSNorm over each head's head_dim values, before RoPE
        op_rms_norm(ctx, q, layer.q_norm.data(), q, n_rows * hp_.n_head, hd, hp_.rms_eps);
        op_rms_norm(ctx, k, layer.k_norm.data(), k, n_rows * hp_.n_head_kv, hd, hp_.rms_eps);
    }

    // Per sequence: RoPE at its positions, keys/values into its cache, attention over its keys.
    const int64_t      half = hd / 2;
    std::vector<float> cos, sin;
    int64_t            row0 = 0;
    for (const layer_seq& s : seqs) {
        const int64_t n  = s.n_tokens;
        const int64_t p0 = s.pos0;
        float*        qs = q + row0 * q_dim;
        float*        ks = k + row0 * kv_dim;
        float*        vs = v + row0 * kv_dim;
        // Dynamic RoPE and LongRoPE depend on the sequence's length so far.
        const rope_config&       rope     = hp_.rope_of(i_layer);
        const std::vector<float> inv_freq = llama_rope_inv_freq(hp_, rope, p0 + n);
        cos.resize(static_cast<size_t>(n * half));
        sin.resize(cos.size());
        op_rope_tables(inv_freq.data(), half, p0, n, llama_rope_attention_factor(rope), cos.data(), sin.data());
        op_rope(ctx, qs, cos.data(), sin.data(), n, hp_.n_head, hd, q_dim);
        op_rope(ctx, ks, cos.data(), sin.data(), n, hp_.n_head_kv, hd, kv_dim);

        attention_args a;
        a.q         = qs;
        a.out       = x + row0 * q_dim;  // x is free again: [n_rows, q_dim]
        a.n_q       = n;
        a.n_head    = hp_.n_head;
        a.n_head_kv = hp_.n_head_kv;
        a.head_dim  = hd;
        a.window    = hp_.window[static_cast<size_t>(i_layer)];
        a.scale     = hp_.attn_scale;
        a.softcap   = hp_.attn_softcap;
        a.q_stride = a.out_stride = q_dim;
        a.kv_stride               = kv_dim;
        if (s.cache && s.cache->f16) {  // rounded to F16 when stored; every query reads the rounded values
            uint16_t* ck = s.cache->k16[static_cast<size_t>(i_layer)].data();
            uint16_t* cv = s.cache->v16[static_cast<size_t>(i_layer)].data();
            f32_to_f16_row(ks, ck + p0 * kv_dim, static_cast<size_t>(n * kv_dim));
            f32_to_f16_row(vs, cv + p0 * kv_dim, static_cast<size_t>(n * kv_dim));
            a.k16    = ck;
            a.v16    = cv;
            a.n_kv   = p0 + n;
            a.q_pos0 = p0;
        } else if (s.cache) {  // keys/values stored at their positions; attention over 0 .. p0 + n - 1
            float* ck = s.cache->k[static_cast<size_t>(i_layer)].data();
            float* cv = s.cache->v[static_cast<size_t>(i_layer)].data();
            std::copy_n(ks, n * kv_dim, ck + p0 * kv_dim);
            std::copy_n(vs, n * kv_dim, cv + p0 * kv_dim);
            a.k      = ck;
            a.v      = cv;
            a.n_kv   = p0 + n;
            a.q_pos0 = p0;
        } else {  // local K/V: the mask depends on position differences only, so local indices do
            a.k      = ks;
            a.v      = vs;
            a.n_kv   = n;
            a.q_pos0 = 0;
        }
        op_attention(ctx, a);
        row0 += n;
    }
    if (hook && *hook) (*hook)(i_layer, linear_input::LINEAR_INPUT_O, x, n_rows, q_dim);
    if (stop_after == linear_input::LINEAR_INPUT_O) return false;
    float* const y = take(buf.ay, n_rows * n_embd);  // [n_rows, n_embd]
    lin(linear_role::LINEAR_O, x, y);
    if (hp_.attn_out_norm)  // sandwich norm (Gemma): on attention's output, before the residual add
        op_rms_norm(ctx, y, layer.attn_out_norm.data(), y, n_rows, n_embd, hp_.rms_eps);
    op_add(ctx, hidden, y, n_rows * n_embd);
    return true;
}

bool llama_model::mlp_block(const ops_context& ctx, const llama_layer& layer, float* hidden,
                            std::span<const layer_seq> seqs, const linear_input_hook* hook,
                            linear_input stop_after) const {
    const int64_t  n_embd = hp_.n_embd, n_ff = hp_.n_ff;
    const int64_t  i_layer = layer.index;
    const int64_t  n_rows  = rows_of(seqs);
    auto           lin     = [&](linear_role r, const float* x, float* y) { linear_run(ctx, layer, r, seqs, x, y); };
    block_buffers& buf     = buffers();
    float* const   y       = take(buf.my, n_rows * n_embd);  // [n_rows, n_embd]
    op_rms_norm(ctx, hidden, layer.mlp_norm.data(), y, n_rows, n_embd, hp_.rms_eps);
    if (hook && *hook) (*hook)(i_layer, linear_input::LINEAR_INPUT_GATE_UP, y, n_rows, n_embd);
    if (stop_after == linear_input::LINEAR_INPUT_GATE_UP) return false;
    float* const      gate     = take(buf.gate, n_rows * n_ff);  // [n_rows, n_ff]
    float* const      up       = take(buf.up, n_rows * n_ff);
    const linear_role gu[]     = {linear_role::LINEAR_GATE, linear_role::LINEAR_UP};
    float* const      gu_out[] = {gate, up};
    linears_run(ctx, layer, gu, seqs, y, gu_out);
    switch (hp_.act) {
        case mlp_activation::ACT_SILU:
            op_silu_mul(ctx, gate, up, gate, n_rows * n_ff);
            break;
        case mlp_activation::ACT_GELU_TANH:
            op_gelu_tanh_mul(ctx, gate, up, gate, n_rows * n_ff);
            break;
    }
    if (hook && *hook) (*hook)(i_layer, linear_input::LINEAR_INPUT_DOWN, gate, n_rows, n_ff);
    if (stop_after == linear_input::LINEAR_INPUT_DOWN) return false;
    lin(linear_role::LINEAR_DOWN, gate, y);
    if (hp_.mlp_out_norm)  // sandwich norm (Gemma): on the MLP's output, before the residual add
        op_rms_norm(ctx, y, layer.mlp_out_norm.data(), y, n_rows, n_embd, hp_.rms_eps);
    op_add(ctx, hidden, y, n_rows * n_embd);
    return true;
}

void llama_model::layer_forward(const ops_context& ctx, const llama_layer& layer, float* hidden,
                                std::span<const layer_seq> seqs, const linear_input_hook* hook, linear_input stop_after,
                                const moe_input_hook* moe_hook) const {
    GPTQ_ASSERT(layer.index >= 0 && layer.index < hp_.n_layer);
    for (const layer_seq& s : seqs) {
        GPTQ_ASSERT(s.n_tokens >= 0 && s.pos0 >= 0 && s.lora < static_cast<int32_t>(loras_.size()));
        GPTQ_ASSERT(!s.cache || (s.pos0 == s.cache->n_past && s.pos0 + s.n_tokens <= s.cache->n_ctx &&
                                 s.cache->kv_dim == hp_.kv_dim() && s.cache->n_layer() == hp_.n_layer));
    }
    const int64_t n_rows = rows_of(seqs);
    if (n_rows == 0) return;
    if (attention_block(ctx, layer, hidden, seqs, hook, stop_after)) {
        if (hp_.is_moe(layer.index))  // LoRA adapters are refused on MoE models (lora_add)
            moe_block(ctx, layer, hidden, n_rows, hook, stop_after, moe_hook);
        else
            mlp_block(ctx, layer, hidden, seqs, hook, stop_after);
    }
    release_if_large();
}

void llama_model::layer_forward(const ops_context& ctx, const llama_layer& layer, float* hidden, int64_t n_tokens,
                                int64_t pos0, kv_cache* cache, const linear_input_hook* hook, linear_input stop_after,
                                const moe_input_hook* moe_hook) const {
    const layer_seq seq{n_tokens, pos0, cache};
    layer_forward(ctx, layer, hidden, std::span<const layer_seq>(&seq, 1), hook, stop_after, moe_hook);
}

status llama_model::layers_run(const ops_context& ctx, const int32_t* ids, std::span<const layer_seq> seqs,
                               std::vector<float>* hidden) {
    const int64_t n_rows = rows_of(seqs);
    GPTQ_TRY(layers_load_all());
    hidden->resize(static_cast<size_t>(n_rows * hp_.n_embd));
    GPTQ_TRY(embed(ids, n_rows, hidden->data()));
    for (int64_t i = 0; i < hp_.n_layer; ++i)
        layer_forward(ctx, *layers_[static_cast<size_t>(i)], hidden->data(), seqs);
    return status::ok();
}

}  // namespace gptq
