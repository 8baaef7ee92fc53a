// LoRA training on the GPU (issue 21 Part 2, docs/lora.md "Fine-tuning on the GPU"): the loss of a
// batch and its gradients with respect to one adapter's A and B, the base frozen as the inference
// path holds it. The GPU mirror of model/llama_train.cpp, step for step:
//
// Forward: embedding, then per layer (its input kept: gradient checkpointing, n_layer x rows x
// n_embd F32) the layer over F32 activations; the loss over the target rows in chunks (final norm,
// lm_head, cross-entropy in double). Backward, last layer first: the layer recomputed from its kept
// input with its intermediates, then every op's backward in reverse (ops/ops_cuda_train.h). A
// linear's weight is made F32 in a scratch buffer for each product (GPTQ: dequantized from the
// generic layout, bit for bit the CPU's values; F16: converted), so
//     y = x W^T + s (x A^T) B^T,  t = x A^T:   dB += s dy^T t,  dA += s (dy B)^T x,  dx = dy W + s (dy B) A
// are cuBLAS products: the base's in set_train_math's arithmetic (TF32 tensor cores by default, BF16
// operands, or plain F32), LoRA's in plain F32. The adapter's A and B are uploaded per call, and the gradients
// downloaded and added to the host's (AdamW stays on the host: engine/finetune.cpp's lora_trainer).
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <map>

#include "core/error.h"
#include "core/log.h"
#include "core/thread_pool.h"
#include "model/llama_cuda.h"
#include "ops/ops.h"
#include "ops/ops_cuda_train.h"

namespace gptq {

namespace {
constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;
// Logits held at once by the loss: rows x n_vocab F32 values at most (256 MiB), at least one row.
constexpr int64_t k_loss_values = int64_t(64) << 20;

// One adapted linear on the device: A [r, n_in], B [n_out, r] and their gradients (r 0: none).
struct lora_dev {
    const float *a = nullptr, *b = nullptr;
    float *      ga = nullptr, *gb = nullptr;
    int64_t      r     = 0;
    float        scale = 0.0f;
    int64_t      layer = 0;  // the dropout mask's module
    int          role  = 0;
};

status grow(cuda_buffer& b, size_t bytes) {
    if (b.bytes() >= bytes) return status::ok();
    b = cuda_buffer();  // the old one first
    GPTQ_ASSIGN_OR_RETURN(b, cuda_buffer::alloc(std::max<size_t>(bytes, 256)));
    return status::ok();
}
}  // namespace

struct cuda_train_state;
namespace {
status mark(cuda_context& c, cuda_train_state& st, const char* what);
}  // namespace

struct cuda_train_state {
    cuda_train_math math = cuda_train_math::TF32;
    bool            tf32() const { return math != cuda_train_math::F32; }  // attention's products
    // Profiling (set_train_profile): a timing event after each op, the GPU time summed per kind.
    bool                     prof = false;
    cuda_timeline            tl;
    std::vector<const char*> labels;  // the op each mark after the first ends
    int64_t                  n = 0;   // rows of the current batch
    // Activations [n, features] F32 (llama_train.cpp's names), the kept inputs [n_layer, n, n_embd].
    cuda_buffer       inputs, hidden, dh, dx, xn, q, k, v, att, h1, yn, y, g, u, da, act, datt, dq, dk, dv;
    cuda_buffer       cos, sin;  // [n, head_dim / 2]: each sequence's positions 0 .. n_tokens - 1
    cuda_buffer       t, dt;     // [n, max r]: LoRA's x A^T and dy B
    cuda_buffer       w32;       // one linear's (or the lm_head's) weight, F32 (BF16 mode: BF16 in its first half)
    cuda_buffer       xb;        // BF16 mode: a product's activation operand
    lora_dropout_spec dropout;   // this call's
    cuda_buffer       xd;        // with dropout: a LoRA branch's dropped input [n, n_in] (then (dy B) A)
    cuda_buffer       ids, rows, targets, nll;
    cuda_buffer       ce_h, ce_dx, logits;  // the loss's chunk
    cuda_buffer       factors, grads;       // every A and B, F32 (the adapter's layout), and their gradients
    std::vector<std::array<lora_dev, k_n_linear_roles>> lora;  // [n_layer]
    std::vector<int64_t>                                seq_tokens;
    cuda_host_buffer host;  // staging of factors / gradients, pinned (direct DMA both ways)

    uint64_t bytes() const {
        uint64_t s = 0;
        for (const cuda_buffer* b :
             {&inputs, &hidden, &dh, &dx,  &xn,   &q,       &k,   &v,    &att,   &h1,     &yn,      &y,
              &g,      &u,      &da, &act, &datt, &dq,      &dk,  &dv,   &cos,   &sin,    &t,       &dt,
              &w32,    &xb,     &xd, &ids, &rows, &targets, &nll, &ce_h, &ce_dx, &logits, &factors, &grads})
            s += b->bytes();
        return s;
    }
};

namespace {
status mark(cuda_context& c, cuda_train_state& st, const char* what) {
    if (!st.prof) return status::ok();
    st.labels.push_back(what);
    return st.tl.mark(c.stream());
}
}  // namespace

llama_cuda_options llama_cuda_train_options(int device) {
    llama_cuda_options o;
    o.device    = device;
    o.n_ctx     = 16;
    o.graph     = false;
    o.gptq_fast = false;
    o.fuse      = false;
    return o;
}

void llama_cuda_model::set_train_math(cuda_train_math m) {
    if (!train_) train_ = std::make_shared<cuda_train_state>();
    train_->math = m;
}

void llama_cuda_model::set_train_profile(bool on) {
    if (!train_) train_ = std::make_shared<cuda_train_state>();
    train_->prof = on;
}

uint64_t llama_cuda_model::train_bytes() const {
    return train_ ? train_->bytes() : 0;
}

status llama_cuda_model::train_check() const {
    const llama_hparams& hp = hparams();
    GPTQ_TRY(llama_train_check(hp, host_->source().folder()));
    if (!units_.empty())
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "{}: LoRA training on the GPU with CPU offload is not supported (the model must fit the GPU)",
                          host_->source().folder());
    if (lm_head_q_.quantized)  // the loss multiplies by lm_head_, the F16 table the generic layout loads
        return make_error(E_ARG,
                          "{}: lm_head on the int4 layout: LoRA training needs the model opened with "
                          "llama_cuda_train_options() (GPTQ in the generic layout)",
                          host_->source().folder());
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        const layer& L = layers_[static_cast<size_t>(i)];
        if (&hp.rope_of(i) != &hp.rope_of(0))
            return make_error(status_code::STATUS_UNSUPPORTED, "{}: layers with different RoPE settings",
                              host_->source().folder());
        for (int r = 0; r < k_n_linear_roles; ++r) {
            const cuda_linear& l = L.lin[static_cast<size_t>(r)];
            if (l.n_out == 0 || (l.quantized && l.q.fast))
                return make_error(E_ARG,
                                  "{}: layer {} {}: LoRA training needs the model opened with "
                                  "llama_cuda_train_options() (linears unfused, GPTQ in the generic layout)",
                                  host_->source().folder(), i, linear_role_name(static_cast<linear_role>(r)));
        }
    }
    return status::ok();
}

namespace {

// The base's product of a linear in the state's arithmetic: forward y[n, n_out] = x[n, n_in] W^T,
// backward dx[n, n_in] (+)= dy[n, n_out] W (beta 1: accumulate). The weight is made F32 (or BF16)
// in w32 first; in BF16 mode the activation operand is rounded into xb.
status base_product(cuda_context& c, cuda_train_state& st, const cuda_linear& l, bool backward, const float* in,
                    float* out, int64_t n, float beta) {
    const int64_t k = backward ? l.n_out : l.n_in, n_res = backward ? l.n_in : l.n_out;
    if (st.math == cuda_train_math::BF16) {
        uint16_t* w = st.w32.as<uint16_t>();
        GPTQ_TRY(l.quantized ? op_cuda_gptq_dequant_bf16(c, l.q, w)
                             : op_cuda_f16_to_bf16(c, l.w.as<uint16_t>(), w, l.n_out * l.n_in));
        GPTQ_TRY(mark(c, st, "weight_convert"));
        uint16_t* ib = st.xb.as<uint16_t>();
        GPTQ_TRY(op_cuda_f32_to_bf16(c, in, ib, n * k));
        return op_cuda_gemm_bf16(c, false, !backward, n, n_res, k, 1.0f, ib, k, w, l.n_in, beta, out, n_res);
    }
    float* w = st.w32.as<float>();
    GPTQ_TRY(l.quantized ? op_cuda_gptq_dequant_f32(c, l.q, w)
                         : op_cuda_f16_to_f32(c, l.w.as<uint16_t>(), w, l.n_out * l.n_in));
    GPTQ_TRY(mark(c, st, "weight_convert"));
    return op_cuda_sgemm(c, false, !backward, n, n_res, k, 1.0f, in, k, w, l.n_in, beta, out, n_res, st.tf32());
}

const uint16_t* bias_of(const cuda_linear& l) {
    const cuda_buffer& b = l.quantized ? l.q.bias : l.bias;
    return b.bytes() ? b.as<uint16_t>() : nullptr;
}

// y[n, n_out] = x W^T (+ bias) + s (x A^T) B^T.
status linear_fwd(cuda_context& c, cuda_train_state& st, const cuda_linear& l, const lora_dev& lo, const float* x,
                  float* y, int64_t n) {
    GPTQ_TRY(base_product(c, st, l, false, x, y, n, 0.0f));
    if (const uint16_t* b = bias_of(l)) GPTQ_TRY(op_cuda_add_bias_f32(c, y, b, n, l.n_out));
    GPTQ_TRY(mark(c, st, "linear"));
    if (lo.r == 0) return status::ok();
    float* t = st.t.as<float>();
    if (st.dropout.p > 0) {  // the branch's input dropped (training)
        GPTQ_TRY(op_cuda_lora_dropout_f32(c, x, st.xd.as<float>(), n, l.n_in, st.dropout.seed, lo.layer, lo.role,
                                          st.dropout.p, false));
        x = st.xd.as<float>();
    }
    GPTQ_TRY(op_cuda_sgemm(c, false, true, n, lo.r, l.n_in, 1.0f, x, l.n_in, lo.a, l.n_in, 0.0f, t, lo.r, false));
    GPTQ_TRY(op_cuda_sgemm(c, false, true, n, l.n_out, lo.r, lo.scale, t, lo.r, lo.b, lo.r, 1.0f, y, l.n_out, false));
    return mark(c, st, "lora");
}

// dx (+)= dy W + s (dy B) A; dB += s dy^T (x A^T); dA += s (dy B)^T x (llama_model::lora_linear_backward).
status linear_bwd(cuda_context& c, cuda_train_state& st, const cuda_linear& l, const lora_dev& lo, const float* x,
                  const float* dy, float* dx, int64_t n, bool accumulate) {
    GPTQ_TRY(base_product(c, st, l, true, dy, dx, n, accumulate ? 1.0f : 0.0f));
    GPTQ_TRY(mark(c, st, "linear_backward"));
    if (lo.r == 0) return status::ok();
    const int64_t r = lo.r, n_in = l.n_in, n_out = l.n_out;
    float *       t = st.t.as<float>(), *dt = st.dt.as<float>();
    const bool    drop = st.dropout.p > 0;
    float*        xd   = st.xd.as<float>();
    if (drop) {  // the forward's mask again
        GPTQ_TRY(op_cuda_lora_dropout_f32(c, x, xd, n, n_in, st.dropout.seed, lo.layer, lo.role, st.dropout.p, false));
        x = xd;
    }
    GPTQ_TRY(op_cuda_sgemm(c, false, true, n, r, n_in, 1.0f, x, n_in, lo.a, n_in, 0.0f, t, r, false));
    GPTQ_TRY(op_cuda_sgemm(c, true, false, n_out, r, n, lo.scale, dy, n_out, t, r, 1.0f, lo.gb, r, false));
    GPTQ_TRY(op_cuda_sgemm(c, false, false, n, r, n_out, lo.scale, dy, n_out, lo.b, r, 0.0f, dt, r, false));
    GPTQ_TRY(op_cuda_sgemm(c, true, false, r, n_in, n, 1.0f, dt, r, x, n_in, 1.0f, lo.ga, n_in, false));
    if (!drop) {
        GPTQ_TRY(op_cuda_sgemm(c, false, false, n, n_in, r, 1.0f, dt, r, lo.a, n_in, 1.0f, dx, n_in, false));
    } else {  // dx += dropout's backward of (dy B) A: the same mask and scale
        GPTQ_TRY(op_cuda_sgemm(c, false, false, n, n_in, r, 1.0f, dt, r, lo.a, n_in, 0.0f, xd, n_in, false));
        GPTQ_TRY(op_cuda_lora_dropout_f32(c, xd, dx, n, n_in, st.dropout.seed, lo.layer, lo.role, st.dropout.p, true));
    }
    return mark(c, st, "lora_backward");
}

}  // namespace

// The layer from its input x0: with dh nullptr its output into `out`; otherwise (recomputed) the
// backward, dh = dL/d(output) -> dL/d(x0) in place, and the adapter's gradients added.
status llama_cuda_model::train_layer(int64_t il, const float* x0, float* out, float* dh) {
    cuda_train_state&    st = *train_;
    cuda_context&        c  = *ctx_;
    const llama_hparams& hp = hparams();
    const layer&         L  = layers_[static_cast<size_t>(il)];
    const auto&          lo = st.lora[static_cast<size_t>(il)];
    const int64_t        n = st.n, E = hp.n_embd, qd = hp.q_dim(), kvd = hp.kv_dim(), hd = hp.head_dim, F = hp.n_ff;
    using R  = linear_role;
    auto lin = [&](R r, const float* x, float* y) {
        return linear_fwd(c, st, L.linear(r), lo[static_cast<size_t>(r)], x, y, n);
    };
    auto back = [&](R r, const float* x, const float* dy, float* dx, bool acc) {
        return linear_bwd(c, st, L.linear(r), lo[static_cast<size_t>(r)], x, dy, dx, n, acc);
    };
    float *      xn = st.xn.as<float>(), *q = st.q.as<float>(), *k = st.k.as<float>(), *v = st.v.as<float>();
    float *      att = st.att.as<float>(), *h1 = st.h1.as<float>(), *yn = st.yn.as<float>(), *y = st.y.as<float>();
    float *      g = st.g.as<float>(), *u = st.u.as<float>(), *act = st.act.as<float>();
    const float *cs = st.cos.as<float>(), *sn = st.sin.as<float>();
    const float  eps = hp.rms_eps;

    // Attention's forward, keeping what its backward reads.
    auto mk = [&](const char* what) { return mark(c, st, what); };
    GPTQ_TRY(op_cuda_rms_norm_f32(c, x0, L.attn_norm.as<uint16_t>(), xn, n, E, eps));
    GPTQ_TRY(mk("rms_norm"));
    GPTQ_TRY(lin(R::LINEAR_Q, xn, q));
    GPTQ_TRY(lin(R::LINEAR_K, xn, k));
    GPTQ_TRY(lin(R::LINEAR_V, xn, v));
    GPTQ_TRY(op_cuda_rope_f32(c, q, cs, sn, n, hp.n_head, hd, qd, false));
    GPTQ_TRY(op_cuda_rope_f32(c, k, cs, sn, n, hp.n_head_kv, hd, kvd, false));
    GPTQ_TRY(mk("rope"));
    auto args_of = [&](int64_t row0, int64_t nt) {
        cuda_attention_f32_args a;
        a.q = q + row0 * qd, a.k = k + row0 * kvd, a.v = v + row0 * kvd, a.out = att + row0 * qd;
        a.n_q = a.n_kv = nt;
        a.n_head = hp.n_head, a.n_head_kv = hp.n_head_kv, a.head_dim = hd;
        a.window   = hp.window[static_cast<size_t>(il)];
        a.scale    = hp.attn_scale;
        a.q_stride = a.out_stride = qd;
        a.kv_stride               = kvd;
        a.tf32                    = st.tf32();
        return a;
    };
    int64_t row0 = 0;
    for (int64_t nt : st.seq_tokens) {
        GPTQ_TRY(op_cuda_attention_f32(c, args_of(row0, nt)));
        row0 += nt;
    }
    GPTQ_TRY(mk("attention"));
    GPTQ_TRY(cuda_copy_device_async(c, h1, x0, size_t(n * E) * 4));
    GPTQ_TRY(lin(R::LINEAR_O, att, y));
    GPTQ_TRY(op_cuda_add_f32(c, h1, y, n * E));
    GPTQ_TRY(mk("add"));
    // The MLP's forward.
    GPTQ_TRY(op_cuda_rms_norm_f32(c, h1, L.mlp_norm.as<uint16_t>(), yn, n, E, eps));
    GPTQ_TRY(mk("rms_norm"));
    GPTQ_TRY(lin(R::LINEAR_GATE, yn, g));
    GPTQ_TRY(lin(R::LINEAR_UP, yn, u));
    GPTQ_TRY(op_cuda_silu_mul_f32(c, g, u, act, n * F));
    GPTQ_TRY(mk("silu_mul"));
    if (!dh) {
        GPTQ_TRY(lin(R::LINEAR_DOWN, act, y));
        GPTQ_TRY(cuda_copy_device_async(c, out, h1, size_t(n * E) * 4));
        GPTQ_TRY(op_cuda_add_f32(c, out, y, n * E));
        return mk("add");
    }

    // MLP backward: dh = dL/dh2 -> dL/dh1.
    float *da = st.da.as<float>(), *dx = st.dx.as<float>();
    GPTQ_TRY(back(R::LINEAR_DOWN, act, dh, da, false));
    GPTQ_TRY(op_cuda_silu_mul_backward_f32(c, g, u, da, da, u, n * F));  // da <- dgate, u <- dup
    GPTQ_TRY(mk("silu_mul_backward"));
    GPTQ_TRY(back(R::LINEAR_GATE, yn, da, dx, false));
    GPTQ_TRY(back(R::LINEAR_UP, yn, u, dx, true));
    GPTQ_TRY(op_cuda_rms_norm_backward_f32(c, h1, L.mlp_norm.as<uint16_t>(), dx, dx, n, E, eps));
    GPTQ_TRY(op_cuda_add_f32(c, dh, dx, n * E));
    GPTQ_TRY(mk("rms_norm_backward"));

    // Attention backward: dL/dh1 -> dL/dx0.
    float *datt = st.datt.as<float>(), *dq = st.dq.as<float>(), *dk = st.dk.as<float>(), *dv = st.dv.as<float>();
    GPTQ_TRY(back(R::LINEAR_O, att, dh, datt, false));
    row0 = 0;
    for (int64_t nt : st.seq_tokens) {
        GPTQ_TRY(op_cuda_attention_backward_f32(c, args_of(row0, nt), datt + row0 * qd, dq + row0 * qd, dk + row0 * kvd,
                                                dv + row0 * kvd));
        row0 += nt;
    }
    GPTQ_TRY(mk("attention_backward"));
    GPTQ_TRY(op_cuda_rope_f32(c, dq, cs, sn, n, hp.n_head, hd, qd, true));
    GPTQ_TRY(op_cuda_rope_f32(c, dk, cs, sn, n, hp.n_head_kv, hd, kvd, true));
    GPTQ_TRY(mk("rope_backward"));
    GPTQ_TRY(back(R::LINEAR_Q, xn, dq, dx, false));
    GPTQ_TRY(back(R::LINEAR_K, xn, dk, dx, true));
    GPTQ_TRY(back(R::LINEAR_V, xn, dv, dx, true));
    GPTQ_TRY(op_cuda_rms_norm_backward_f32(c, x0, L.attn_norm.as<uint16_t>(), dx, dx, n, E, eps));
    GPTQ_TRY(op_cuda_add_f32(c, dh, dx, n * E));
    return mk("rms_norm_backward");
}

// llama_model::output_loss_grad on the device: the rows with a target in chunks (final norm,
// lm_head, cross-entropy), their dL/dhidden scattered into dh (zero elsewhere) when grad.
status llama_cuda_model::train_loss(int64_t n, const std::vector<int32_t>& targets, float grad_scale, bool grad,
                                    double* loss) {
    cuda_train_state&    st = *train_;
    cuda_context&        c  = *ctx_;
    const llama_hparams& hp = hparams();
    const int64_t        E = hp.n_embd, V = hp.n_vocab;
    std::vector<int32_t> rows, tg;
    for (int64_t i = 0; i < n; ++i)
        if (targets[static_cast<size_t>(i)] >= 0) {
            rows.push_back(static_cast<int32_t>(i));
            tg.push_back(targets[static_cast<size_t>(i)]);
        }
    const int64_t n_t = static_cast<int64_t>(rows.size());
    *loss             = 0.0;
    if (grad) GPTQ_TRY(cuda_zero_async(c, st.dh.data(), size_t(n * E) * 4));
    if (n_t == 0) return status::ok();
    const int64_t chunk = std::clamp<int64_t>(k_loss_values / V, 1, n_t);
    GPTQ_TRY(grow(st.rows, size_t(n_t) * 4));
    GPTQ_TRY(grow(st.targets, size_t(n_t) * 4));
    GPTQ_TRY(grow(st.nll, size_t(n_t) * 8));
    GPTQ_TRY(grow(st.ce_h, size_t(chunk * E) * 4));
    GPTQ_TRY(grow(st.ce_dx, size_t(chunk * E) * 4));
    GPTQ_TRY(grow(st.logits, size_t(chunk * V) * 4));
    GPTQ_TRY(st.rows.upload(rows.data(), rows.size() * 4));
    GPTQ_TRY(st.targets.upload(tg.data(), tg.size() * 4));
    // The lm_head (or the tied embeddings), F16 [V, E], as F32 once for every chunk.
    const cuda_buffer& head = lm_head_.bytes() ? lm_head_ : embed_;
    const bool         bf16 = st.math == cuda_train_math::BF16;
    float*             w    = st.w32.as<float>();
    uint16_t *         wb = st.w32.as<uint16_t>(), *ib = st.xb.as<uint16_t>();
    GPTQ_TRY(bf16 ? op_cuda_f16_to_bf16(c, head.as<uint16_t>(), wb, V * E)
                  : op_cuda_f16_to_f32(c, head.as<uint16_t>(), w, V * E));
    GPTQ_TRY(mark(c, st, "weight_convert"));
    // logits[nc, V] = x[nc, E] head^T; dx[nc, E] = dlogits[nc, V] head.
    auto product = [&](bool backward, const float* x, float* y, int64_t nc) -> status {
        const int64_t k = backward ? V : E, nr = backward ? E : V;
        if (!bf16) return op_cuda_sgemm(c, false, !backward, nc, nr, k, 1.0f, x, k, w, E, 0.0f, y, nr, st.tf32());
        GPTQ_TRY(op_cuda_f32_to_bf16(c, x, ib, nc * k));
        return op_cuda_gemm_bf16(c, false, !backward, nc, nr, k, 1.0f, ib, k, wb, E, 0.0f, y, nr);
    };
    float *h = st.ce_h.as<float>(), *dxc = st.ce_dx.as<float>(), *logits = st.logits.as<float>();
    for (int64_t c0 = 0; c0 < n_t; c0 += chunk) {
        const int64_t  nc = std::min(chunk, n_t - c0);
        const int32_t* rw = st.rows.as<int32_t>() + c0;
        GPTQ_TRY(op_cuda_rows_gather_f32(c, st.hidden.as<float>(), rw, h, nc, E));
        GPTQ_TRY(op_cuda_rms_norm_f32(c, h, norm_.as<uint16_t>(), dxc, nc, E, hp.rms_eps));
        GPTQ_TRY(product(false, dxc, logits, nc));
        GPTQ_TRY(op_cuda_cross_entropy_f32(c, logits, st.targets.as<int32_t>() + c0, st.nll.as<double>() + c0, nc, V,
                                           grad_scale, grad));
        GPTQ_TRY(mark(c, st, "loss"));
        if (!grad) continue;
        GPTQ_TRY(product(true, logits, dxc, nc));
        GPTQ_TRY(op_cuda_rms_norm_backward_f32(c, h, norm_.as<uint16_t>(), dxc, dxc, nc, E, hp.rms_eps));
        GPTQ_TRY(op_cuda_rows_scatter_f32(c, dxc, rw, st.dh.as<float>(), nc, E));
        GPTQ_TRY(mark(c, st, "loss_backward"));
    }
    std::vector<double> nll(static_cast<size_t>(n_t));
    GPTQ_TRY(cuda_copy_to_host(c, nll.data(), st.nll.data(), nll.size() * 8));
    for (double x : nll) *loss += x;  // in row order, as the CPU sums
    return status::ok();
}

// The GPU time of the call per op kind (the marks' intervals summed by label), the host's setup
// (the adapter's upload, buffers, RoPE rows) before it, one log line.
status llama_cuda_model::train_profile_log(std::chrono::steady_clock::time_point t0,
                                           std::chrono::steady_clock::time_point t_up) {
    cuda_train_state& st = *train_;
    GPTQ_ASSIGN_OR_RETURN(std::vector<float> ms, st.tl.intervals_ms());
    std::map<std::string, double> sum;
    double                        total = 0;
    for (size_t i = 0; i < ms.size() && i < st.labels.size(); ++i) {
        sum[st.labels[i]] += ms[i];
        total += ms[i];
    }
    std::vector<std::pair<double, std::string>> rows;
    for (const auto& [k, v] : sum) rows.emplace_back(v, k);
    std::sort(rows.rbegin(), rows.rend());
    std::string line;
    for (const auto& [v, k] : rows) line += fmt::format(" {} {:.1f}", k, v);
    const auto   now  = std::chrono::steady_clock::now();
    const double wall = std::chrono::duration<double, std::milli>(now - t0).count();
    const double up   = std::chrono::duration<double, std::milli>(t_up - t0).count();
    GPTQ_LOG_INFO("train profile ({} rows): wall {:.1f} ms, host setup + upload {:.1f} ms, GPU {:.1f} ms:{}", st.n,
                  wall, up, total, line);
    return status::ok();
}

result<double> llama_cuda_model::lora_loss_grad(const train_batch& b, const lora_adapter& adapter, lora_adapter* grads,
                                                float grad_scale, lora_dropout_spec dropout, thread_pool* pool) {
    GPTQ_TRY(train_check());
    if (!(dropout.p >= 0 && dropout.p < 1)) return make_error(E_ARG, "LoRA dropout {}: must be in [0, 1)", dropout.p);
    const llama_hparams& hp  = hparams();
    const int64_t        n   = static_cast<int64_t>(b.ids.size());
    int64_t              sum = 0;
    for (int64_t t : b.n_tokens) {
        if (t < 1) return make_error(E_ARG, "train batch: a sequence of {} tokens", t);
        sum += t;
    }
    if (sum != n || static_cast<int64_t>(b.targets.size()) != n)
        return make_error(E_ARG, "train batch: {} ids, {} targets, sequences of {} tokens in all", n, b.targets.size(),
                          sum);
    for (int64_t i = 0; i < n; ++i)
        if (b.targets[static_cast<size_t>(i)] >= hp.n_vocab)
            return make_error(E_ARG, "train batch: target {} at row {} is outside the vocabulary [0, {})",
                              b.targets[static_cast<size_t>(i)], i, hp.n_vocab);
    if (static_cast<int64_t>(adapter.layers.size()) != hp.n_layer ||
        (grads && grads->layers.size() != adapter.layers.size()))
        return make_error(E_ARG, "LoRA training: the adapter has {} layers (gradients {}), the model {}",
                          adapter.layers.size(), grads ? grads->layers.size() : 0, hp.n_layer);
    if (!train_) train_ = std::make_shared<cuda_train_state>();
    const auto        t0 = std::chrono::steady_clock::now();
    cuda_train_state& st = *train_;
    cuda_context&     c  = *ctx_;
    const int64_t     E = hp.n_embd, qd = hp.q_dim(), kvd = hp.kv_dim(), F = hp.n_ff, half = hp.head_dim / 2;
    st.n          = n;
    st.seq_tokens = b.n_tokens;
    st.dropout    = dropout;
    GPTQ_TRY(c.synchronize());  // the last call's work is done before its buffers are written again

    // The adapter: every A then B per module into one buffer (and the gradients' the same way).
    int64_t total = 0, max_r = 1;
    st.lora.assign(static_cast<size_t>(hp.n_layer), {});
    for (int64_t l = 0; l < hp.n_layer; ++l)
        for (int r = 0; r < k_n_linear_roles; ++r)
            if (const lora_module* m = adapter.module(l, static_cast<linear_role>(r))) {
                const auto shape = hp.linear_shape(static_cast<linear_role>(r));
                if (static_cast<int64_t>(m->a.size()) != m->r * shape[1] ||
                    static_cast<int64_t>(m->b.size()) != shape[0] * m->r)
                    return make_error(E_ARG, "LoRA training: {} has A of {} and B of {} values for r {}",
                                      llama_linear_name(l, static_cast<linear_role>(r)), m->a.size(), m->b.size(),
                                      m->r);
                total += static_cast<int64_t>(m->a.size() + m->b.size());
                max_r = std::max(max_r, m->r);
            }
    GPTQ_TRY(grow(st.factors, size_t(total) * 4));
    GPTQ_TRY(grow(st.grads, size_t(total) * 4));
    if (st.host.bytes() < size_t(total) * 4) {
        st.host = cuda_host_buffer();
        GPTQ_ASSIGN_OR_RETURN(st.host, cuda_host_buffer::alloc(std::max<size_t>(size_t(total) * 4, 256)));
    }
    float* host = st.host.as<float>();
    struct placed {
        const lora_module* m;
        lora_module*       g;    // the host gradients (nullptr: eval)
        int64_t            off;  // A at off, B right after
    };
    std::vector<placed> mods;
    {
        int64_t off = 0;
        for (int64_t l = 0; l < hp.n_layer; ++l)
            for (int r = 0; r < k_n_linear_roles; ++r)
                if (const lora_module* m = adapter.module(l, static_cast<linear_role>(r))) {
                    lora_module* g = grads ? &grads->layers[static_cast<size_t>(l)][static_cast<size_t>(r)] : nullptr;
                    if (g && (g->a.size() != m->a.size() || g->b.size() != m->b.size()))
                        return make_error(E_ARG, "LoRA training: the gradients of {} do not have the adapter's shapes",
                                          llama_linear_name(l, static_cast<linear_role>(r)));
                    lora_dev& d = st.lora[static_cast<size_t>(l)][static_cast<size_t>(r)];
                    d.r         = m->r;
                    d.scale     = m->scale;
                    d.layer     = l;
                    d.role      = r;
                    d.a         = st.factors.as<float>() + off;
                    d.ga        = st.grads.as<float>() + off;
                    d.b         = d.a + m->a.size();
                    d.gb        = d.ga + m->a.size();
                    mods.push_back({m, g, off});
                    off += static_cast<int64_t>(m->a.size() + m->b.size());
                }
    }
    // Host loops over the modules, on the pool when given (element-wise: the same bits).
    auto over_modules = [&](const std::function<void(const placed&)>& fn) {
        auto range = [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) fn(mods[static_cast<size_t>(i)]);
        };
        if (pool && mods.size() > 1)
            pool->parallel_for(static_cast<int64_t>(mods.size()), range);
        else
            range(0, static_cast<int64_t>(mods.size()));
    };
    over_modules([&](const placed& p) {
        std::copy(p.m->a.begin(), p.m->a.end(), host + p.off);
        std::copy(p.m->b.begin(), p.m->b.end(), host + p.off + static_cast<int64_t>(p.m->a.size()));
    });
    if (total > 0) {
        GPTQ_TRY(st.factors.upload(host, size_t(total) * 4));
        GPTQ_TRY(cuda_zero_async(c, st.grads.data(), size_t(total) * 4));
    }

    // Buffers for n rows, the RoPE rows (each sequence from position 0) and the ids.
    int64_t max_w = hp.n_vocab * E;
    for (int r = 0; r < k_n_linear_roles; ++r) {
        const auto shape = hp.linear_shape(static_cast<linear_role>(r));
        max_w            = std::max(max_w, shape[0] * shape[1]);
    }
    const size_t f = 4;
    GPTQ_TRY(grow(st.w32, size_t(max_w) * f));
    if (st.math == cuda_train_math::BF16) {  // the largest activation operand: a layer's or the loss chunk's
        const int64_t chunk = std::clamp<int64_t>(k_loss_values / hp.n_vocab, 1, std::max<int64_t>(1, n));
        const int64_t wide  = std::max({E, qd, kvd, F});
        GPTQ_TRY(grow(st.xb, size_t(std::max(n * wide, chunk * std::max(E, hp.n_vocab))) * 2));
    }
    GPTQ_TRY(grow(st.inputs, size_t(hp.n_layer * n * E) * f));
    for (cuda_buffer* bf : {&st.hidden, &st.dh, &st.dx, &st.xn, &st.h1, &st.yn, &st.y})
        GPTQ_TRY(grow(*bf, size_t(n * E) * f));
    for (cuda_buffer* bf : {&st.q, &st.att, &st.datt, &st.dq}) GPTQ_TRY(grow(*bf, size_t(n * qd) * f));
    for (cuda_buffer* bf : {&st.k, &st.v, &st.dk, &st.dv}) GPTQ_TRY(grow(*bf, size_t(n * kvd) * f));
    for (cuda_buffer* bf : {&st.g, &st.u, &st.da, &st.act}) GPTQ_TRY(grow(*bf, size_t(n * F) * f));
    for (cuda_buffer* bf : {&st.t, &st.dt}) GPTQ_TRY(grow(*bf, size_t(n * max_r) * f));
    if (dropout.p > 0) GPTQ_TRY(grow(st.xd, size_t(n * std::max({E, qd, F})) * f));  // the widest LoRA input
    GPTQ_TRY(grow(st.cos, size_t(n * half) * f));
    GPTQ_TRY(grow(st.sin, size_t(n * half) * f));
    GPTQ_TRY(grow(st.ids, size_t(n) * 4));
    {
        std::vector<float> cs(static_cast<size_t>(n * half)), sn(cs.size());
        const rope_config& rope = hp.rope_of(0);  // every layer's (train_check)
        int64_t            row0 = 0;
        for (int64_t nt : b.n_tokens) {
            const std::vector<float> inv = llama_rope_inv_freq(hp, rope, nt);
            op_rope_tables(inv.data(), half, 0, nt, llama_rope_attention_factor(rope), cs.data() + row0 * half,
                           sn.data() + row0 * half);
            row0 += nt;
        }
        GPTQ_TRY(st.cos.upload(cs.data(), cs.size() * 4));
        GPTQ_TRY(st.sin.upload(sn.data(), sn.size() * 4));
        GPTQ_TRY(st.ids.upload(b.ids.data(), b.ids.size() * 4));
    }

    // Forward, keeping each layer's input.
    const auto t_up = std::chrono::steady_clock::now();
    if (st.prof) {
        st.tl.clear();
        st.labels.clear();
        GPTQ_TRY(st.tl.mark(c.stream()));
    }
    float* hidden = st.hidden.as<float>();
    GPTQ_TRY(op_cuda_embedding_f32(c, embed_.as<uint16_t>(), st.ids.as<int32_t>(), hidden, n, hp.n_vocab, E));
    GPTQ_TRY(mark(c, st, "embedding"));
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        float* in = st.inputs.as<float>() + i * n * E;
        GPTQ_TRY(cuda_copy_device_async(c, in, hidden, size_t(n * E) * 4));
        GPTQ_TRY(train_layer(i, in, hidden, nullptr));
    }
    double loss = 0.0;
    GPTQ_TRY(train_loss(n, b.targets, grad_scale, grads != nullptr, &loss));
    if (grads)
        for (int64_t i = hp.n_layer - 1; i >= 0; --i)
            GPTQ_TRY(train_layer(i, st.inputs.as<float>() + i * n * E, nullptr, st.dh.as<float>()));
    if (st.prof) GPTQ_TRY(train_profile_log(t0, t_up));
    if (!grads) return loss;

    // The gradients, added to the host's.
    if (total > 0) GPTQ_TRY(cuda_copy_to_host(c, host, st.grads.data(), size_t(total) * 4));
    over_modules([&](const placed& p) {
        const float* src = host + p.off;
        for (float& x : p.g->a) x += *src++;
        for (float& x : p.g->b) x += *src++;
    });
    return loss;
}

}  // namespace gptq
