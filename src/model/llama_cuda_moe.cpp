// The sparse MoE block on the GPU (llama_cuda_moe.h): loading a layer's router and experts, the
// grouped kernels' tables, the activations, and the forward pass (per expert or grouped).
#include "model/llama_cuda_moe.h"

#include <fmt/format.h>

#include <algorithm>

#include "core/error.h"
#include "ops/ops.h"

namespace gptq {

namespace {
constexpr status_code E_INTERNAL = status_code::STATUS_INTERNAL;

const cuda_linear& proj_of(const cuda_moe_expert& e, int p) {
    return p == 0 ? e.gate : p == 1 ? e.up : e.down;
}
cuda_linear& proj_of(cuda_moe_expert& e, int p) {
    return p == 0 ? e.gate : p == 1 ? e.up : e.down;
}
constexpr moe_proj k_projs[3] = {moe_proj::MOE_GATE, moe_proj::MOE_UP, moe_proj::MOE_DOWN};

uint64_t linear_bytes(const cuda_linear& l) {
    uint64_t n = l.w.bytes() + l.bias.bytes();
    for (const cuda_buffer* b : {&l.q.weights, &l.q.sz, &l.q.perm, &l.q.perm_inv, &l.q.qweight, &l.q.qzeros,
                                 &l.q.scales, &l.q.g_idx, &l.q.bias})
        n += b->bytes();
    return n;
}

// Projection p of every expert as the grouped kernels read it, or "" and *args / *table filled;
// otherwise the reason the projection cannot run grouped.
result<std::string> grouped_build(const cuda_moe_weights& m, int p, cuda_moe_grouped_args* args, cuda_buffer* table) {
    const cuda_linear&                first = proj_of(m.experts[0], p);
    const char*                       name  = moe_proj_name(k_projs[p]);
    std::vector<cuda_moe_expert_ptrs> h(m.experts.size());
    *args            = cuda_moe_grouped_args();
    args->n_out      = first.n_out;
    args->n_in       = first.n_in;
    args->int4       = first.quantized;
    args->group_size = first.quantized ? first.q.group_size : 0;
    for (size_t e = 0; e < m.experts.size(); ++e) {
        const cuda_linear& l = proj_of(m.experts[e], p);
        if (l.n_out != first.n_out || l.n_in != first.n_in)
            return fmt::format("expert {} {}: {} x {}, expert 0's {} x {}", e, name, l.n_out, l.n_in, first.n_out,
                               first.n_in);
        if (l.quantized != first.quantized) return fmt::format("{}: dense and GPTQ experts mixed", name);
        cuda_moe_expert_ptrs& t = h[e];
        if (l.quantized) {
            if (!l.q.fast)
                return fmt::format("expert {} {}: GPTQ on the generic kernel (not 4-bit int4 layout)", e, name);
            if (l.q.group_size != first.q.group_size)
                return fmt::format("{}: group sizes {} and {} differ between experts", name, first.q.group_size,
                                   l.q.group_size);
            t.w            = l.q.weights.data();
            t.sz           = l.q.sz.data();
            t.perm         = l.q.perm.bytes() ? l.q.perm.as<int32_t>() : nullptr;
            t.bias         = l.q.bias.bytes() ? l.q.bias.as<uint16_t>() : nullptr;
            args->any_perm = args->any_perm || t.perm != nullptr;
        } else {
            t.w    = l.w.data();
            t.bias = l.bias.bytes() ? l.bias.as<uint16_t>() : nullptr;
        }
    }
    GPTQ_ASSIGN_OR_RETURN(*table, cuda_buffer::from_host(h.data(), h.size() * sizeof(cuda_moe_expert_ptrs)));
    args->table = table->as<cuda_moe_expert_ptrs>();
    return std::string();
}

status mark(const cuda_layer_pass& p, const char* op) {
    return p.mark && *p.mark ? (*p.mark)(op) : status::ok();
}

// act(gate) * up into gate over n rows of ff (hp.act: SiLU for every MoE family so far).
status act_mul(cuda_context& c, const llama_hparams& hp, uint16_t* gate, const uint16_t* up, int64_t n, int64_t ff) {
    if (hp.act == mlp_activation::ACT_GELU_TANH) return op_cuda_gelu_tanh_mul(c, gate, up, gate, n, ff, ff, ff, ff);
    return op_cuda_silu_mul(c, gate, up, gate, n, ff, ff, ff, ff);
}

// An expert's gate and up over n contiguous rows x [n, n_embd] into gate, up [n, ff], then
// act(gate) * up into gate (the input of its down).
status expert_hidden(cuda_context& c, const llama_hparams& hp, const cuda_moe_expert& ex, const uint16_t* x, int64_t n,
                     uint16_t* gate, uint16_t* up) {
    GPTQ_TRY(cuda_linear_forward(c, ex.gate, x, gate, n));
    GPTQ_TRY(cuda_linear_forward(c, ex.up, x, up, n));
    return act_mul(c, hp, gate, up, n, ex.gate.n_out);
}

status hook_call(const cuda_layer_pass& p, int64_t expert, linear_input which, const uint16_t* x, int64_t n,
                 int64_t n_in) {
    return p.moe_hook && *p.moe_hook && n > 0 ? (*p.moe_hook)(expert, which, x, n, n_in) : status::ok();
}

bool route_all_of(const cuda_layer_pass& p, int64_t e) {
    return p.moe_route_all && size_t(e) < p.moe_route_all->size() && (*p.moe_route_all)[size_t(e)];
}

// The experts per expert: routing to the host, tokens grouped by expert (counting sort, rows
// ascending), gathered, each active expert over its rows; mb.pos: each pair's gathered row. The
// calibration hooks see each expert's inputs; false when stopped at p.stop_after (GATE_UP: before
// any expert runs; DOWN: before the down projections).
result<bool> experts_per_expert(cuda_context& c, const llama_hparams& hp, const cuda_moe_weights& w,
                                cuda_moe_buffers& mb, const uint16_t* x, int64_t n, const cuda_layer_pass& p) {
    const int64_t k = hp.n_expert_used, n_pairs = n * k, n_embd = hp.n_embd, ff = hp.n_ff_expert;
    mb.host_ids.resize(size_t(n_pairs));
    GPTQ_TRY(cuda_copy_to_host(c, mb.host_ids.data(), mb.ids.data(), size_t(n_pairs) * 4));  // waits
    std::vector<int64_t> offset(size_t(hp.n_expert + 1), 0);
    for (int32_t e : mb.host_ids) {
        if (e < 0 || e >= hp.n_expert)
            return make_error(E_INTERNAL, "MoE routing chose expert {} of {}", e, hp.n_expert);
        ++offset[size_t(e) + 1];
    }
    for (int64_t e = 0; e < hp.n_expert; ++e) offset[size_t(e + 1)] += offset[size_t(e)];
    mb.host_rows.resize(size_t(n_pairs));
    mb.host_pos.resize(size_t(n_pairs));
    std::vector<int64_t> fill(offset.begin(), offset.end() - 1);
    for (int64_t q = 0; q < n_pairs; ++q) {
        const int64_t a         = fill[size_t(mb.host_ids[size_t(q)])]++;
        mb.host_rows[size_t(a)] = int32_t(q / k);
        mb.host_pos[size_t(q)]  = int32_t(a);
    }
    // Host vectors read by the copies before they return (pageable memory: staged synchronously).
    GPTQ_TRY(cuda_copy_to_device_async(c, mb.rows.data(), mb.host_rows.data(), size_t(n_pairs) * 4));
    GPTQ_TRY(cuda_copy_to_device_async(c, mb.pos.data(), mb.host_pos.data(), size_t(n_pairs) * 4));
    uint16_t* xg   = mb.xg.as<uint16_t>();
    uint16_t* gate = mb.gate.as<uint16_t>();
    uint16_t* up   = mb.up.as<uint16_t>();
    GPTQ_TRY(op_cuda_moe_gather_rows(c, x, n_embd, mb.rows.as<int32_t>(), n_pairs, n_embd, xg));
    for (int64_t e = 0; e < hp.n_expert; ++e) {
        const int64_t off = offset[size_t(e)];
        GPTQ_TRY(hook_call(p, e, linear_input::LINEAR_INPUT_GATE_UP, xg + off * n_embd, offset[size_t(e + 1)] - off,
                           n_embd));
    }
    if (p.stop_after == linear_input::LINEAR_INPUT_GATE_UP) return false;
    const bool stop_down = p.stop_after == linear_input::LINEAR_INPUT_DOWN;
    for (int64_t e = 0; e < hp.n_expert; ++e) {
        const int64_t off = offset[size_t(e)], cnt = offset[size_t(e + 1)] - off;
        if (cnt == 0) continue;
        const cuda_moe_expert& ex = w.experts[size_t(e)];
        GPTQ_TRY(expert_hidden(c, hp, ex, xg + off * n_embd, cnt, gate + off * ff, up + off * ff));
        if (!route_all_of(p, e)) GPTQ_TRY(hook_call(p, e, linear_input::LINEAR_INPUT_DOWN, gate + off * ff, cnt, ff));
        if (!stop_down)
            GPTQ_TRY(cuda_linear_forward(c, ex.down, gate + off * ff, mb.out.as<uint16_t>() + off * n_embd, cnt));
    }
    // Route-all experts (calibration): their down input over every row, for their Hessians only.
    for (int64_t e = 0; e < hp.n_expert && p.moe_route_all; ++e) {
        if (!route_all_of(p, e)) continue;
        if (!mb.ra_gate.bytes()) return make_error(E_INTERNAL, "MoE route-all without its buffers");
        GPTQ_TRY(expert_hidden(c, hp, w.experts[size_t(e)], x, n, mb.ra_gate.as<uint16_t>(), mb.ra_up.as<uint16_t>()));
        GPTQ_TRY(hook_call(p, e, linear_input::LINEAR_INPUT_DOWN, mb.ra_gate.as<uint16_t>(), n, ff));
    }
    return !stop_down;
}

// The experts grouped: gate and up of every pair in one launch each, the activation, down; each
// pair's output at row p = t * k + j of out. With more than one token the pairs' blocks are
// launched grouped by expert (mb.rows holds that order: unused by this path otherwise), so that an
// expert several tokens chose is read from memory about once. Nothing leaves the device.
status experts_grouped(cuda_context& c, const llama_hparams& hp, const cuda_moe_weights& w, cuda_moe_buffers& mb,
                       const uint16_t* x, int64_t n) {
    const int64_t  k = hp.n_expert_used, n_pairs = n * k, ff = hp.n_ff_expert;
    const int32_t* ids   = mb.ids.as<int32_t>();
    uint16_t*      gate  = mb.gate.as<uint16_t>();
    uint16_t*      up    = mb.up.as<uint16_t>();
    const int32_t* order = nullptr;  // one token: its k experts are distinct
    if (n > 1) {
        GPTQ_TRY(op_cuda_moe_sort_pairs(c, ids, n_pairs, hp.n_expert, mb.rows.as<int32_t>()));
        order = mb.rows.as<int32_t>();
    }
    uint16_t* xg = mb.xg.as<uint16_t>();
    GPTQ_TRY(op_cuda_moe_grouped_linear(c, w.proj[0], ids, x, hp.n_embd, k, n_pairs, gate, xg, order));
    GPTQ_TRY(op_cuda_moe_grouped_linear(c, w.proj[1], ids, x, hp.n_embd, k, n_pairs, up, xg, order));
    GPTQ_TRY(act_mul(c, hp, gate, up, n_pairs, ff));
    // up is free again: the work buffer of down's permuted inputs.
    return op_cuda_moe_grouped_linear(c, w.proj[2], ids, gate, ff, 1, n_pairs, mb.out.as<uint16_t>(), up, order);
}

// Qwen2-MoE's shared expert over all n rows and its gate's logit (F32); the calibration hooks see
// its inputs (the block input as GATE_UP, act(gate) * up as DOWN). false when stopped.
result<bool> shared_run(cuda_context& c, const llama_hparams& hp, const cuda_moe_weights& w, cuda_moe_buffers& mb,
                        const uint16_t* x, int64_t n, const cuda_layer_pass& p) {
    GPTQ_TRY(expert_hidden(c, hp, w.shared, x, n, mb.sh_gate.as<uint16_t>(), mb.sh_up.as<uint16_t>()));
    GPTQ_TRY(hook_call(p, k_moe_shared, linear_input::LINEAR_INPUT_DOWN, mb.sh_gate.as<uint16_t>(), n, hp.n_ff_shared));
    if (p.stop_after == linear_input::LINEAR_INPUT_DOWN) return false;
    GPTQ_TRY(cuda_linear_forward(c, w.shared.down, mb.sh_gate.as<uint16_t>(), mb.sh_out.as<uint16_t>(), n));
    GPTQ_TRY(
        op_cuda_linear_dense_f32_out(c, x, w.shared_gate.w.as<uint16_t>(), mb.sh_logit.as<float>(), n, 1, hp.n_embd));
    return true;
}

// A host linear (dense F32) as a dense F16 device linear.
status dense_upload(const linear_weights& lw, const std::string& name, const cuda_f16_upload& upload,
                    cuda_linear* out) {
    if (lw.q || (lw.w.empty() && lw.n_out * lw.n_in > 0))
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "{}: the GPU calibration runner takes dense F32 weights (this one is GPTQ-packed or F16)",
                          name);
    out->n_out     = lw.n_out;
    out->n_in      = lw.n_in;
    out->quantized = false;
    GPTQ_TRY(upload(lw.w, name + ".weight", &out->w));
    if (lw.bias.empty()) {
        out->bias = cuda_buffer();
        return status::ok();
    }
    return upload(lw.bias, name + ".bias", &out->bias);
}
}  // namespace

uint64_t cuda_moe_weights::bytes() const {
    uint64_t n = linear_bytes(router) + linear_bytes(shared_gate);
    for (const auto* e : {&shared}) n += linear_bytes(e->gate) + linear_bytes(e->up) + linear_bytes(e->down);
    for (const auto& e : experts) n += linear_bytes(e.gate) + linear_bytes(e.up) + linear_bytes(e.down);
    for (const auto& t : tables) n += t.bytes();
    return n;
}

result<std::unique_ptr<cuda_moe_weights>> cuda_moe_load(const llama_hparams& hp, int64_t i_layer,
                                                        const cuda_module_loader& load) {
    auto m = std::make_unique<cuda_moe_weights>();
    GPTQ_TRY(load(llama_moe_router_name(hp, i_layer), hp.n_expert, hp.n_embd, /*dense_only=*/true, &m->router));
    m->experts.resize(size_t(hp.n_expert));
    const int64_t first = hp.n_ff_shared > 0 ? k_moe_shared : 0;
    for (int64_t e = first; e < hp.n_expert; ++e) {
        cuda_moe_expert& ex = e == k_moe_shared ? m->shared : m->experts[size_t(e)];
        for (int p = 0; p < 3; ++p) {
            const auto shp = llama_moe_shape(hp, e, k_projs[p]);
            GPTQ_TRY(load(llama_moe_expert_name(hp, i_layer, e, k_projs[p]), shp[0], shp[1], false, &proj_of(ex, p)));
        }
    }
    if (hp.n_ff_shared > 0)
        GPTQ_TRY(load(llama_moe_shared_gate_name(hp, i_layer), 1, hp.n_embd, /*dense_only=*/true, &m->shared_gate));
    m->grouped = true;
    for (int p = 0; p < 3 && m->grouped; ++p) {
        GPTQ_ASSIGN_OR_RETURN(std::string why, grouped_build(*m, p, &m->proj[size_t(p)], &m->tables[size_t(p)]));
        if (!why.empty()) {
            m->grouped         = false;
            m->why_not_grouped = fmt::format("model.layers.{}: {}", i_layer, why);
            m->tables          = {};
        }
    }
    return m;
}

status cuda_moe_upload_dense(const llama_hparams& hp, const llama_layer& layer, const cuda_f16_upload& upload,
                             cuda_moe_weights* out) {
    if (!layer.moe) return make_error(E_INTERNAL, "layer {} has no MoE block", layer.index);
    const llama_moe& h = *layer.moe;
    const int64_t    i = layer.index;
    if (int64_t(h.experts.size()) != hp.n_expert)
        return make_error(E_INTERNAL, "layer {}: {} experts for {}", i, h.experts.size(), hp.n_expert);
    GPTQ_TRY(dense_upload(h.router, llama_moe_router_name(hp, i), upload, &out->router));
    out->experts.resize(size_t(hp.n_expert));
    const int64_t first = hp.n_ff_shared > 0 ? k_moe_shared : 0;
    for (int64_t e = first; e < hp.n_expert; ++e) {
        cuda_moe_expert& ex = e == k_moe_shared ? out->shared : out->experts[size_t(e)];
        for (int p = 0; p < 3; ++p)
            GPTQ_TRY(dense_upload(h.expert(e).linear(k_projs[p]), llama_moe_expert_name(hp, i, e, k_projs[p]), upload,
                                  &proj_of(ex, p)));
    }
    if (hp.n_ff_shared > 0)
        GPTQ_TRY(dense_upload(h.shared_gate, llama_moe_shared_gate_name(hp, i), upload, &out->shared_gate));
    out->grouped         = false;
    out->why_not_grouped = "calibration";
    return status::ok();
}

status cuda_moe_buffers::reserve(const llama_hparams& hp, int64_t n_tokens, bool route_all) {
    if (hp.n_expert <= 0) return status::ok();
    if (n_tokens <= n) {
        if (!route_all || ra_gate.bytes()) return status::ok();
        n = 0;  // the route-all buffers too: allocate again
    }
    const size_t N = size_t(n_tokens), P = N * size_t(hp.n_expert_used);
    auto         a = [](cuda_buffer* b, size_t bytes) -> status {
        *b = cuda_buffer();
        GPTQ_ASSIGN_OR_RETURN(*b, cuda_buffer::alloc(bytes));
        return status::ok();
    };
    GPTQ_TRY(a(&logits, N * size_t(hp.n_expert) * 4));
    GPTQ_TRY(a(&ids, P * 4));
    GPTQ_TRY(a(&weights, P * 4));
    GPTQ_TRY(a(&rows, P * 4));
    GPTQ_TRY(a(&pos, P * 4));
    GPTQ_TRY(a(&xg, P * size_t(hp.n_embd) * 2));
    // up also holds down's permuted inputs (grouped): [n k, ff] either way.
    GPTQ_TRY(a(&gate, P * size_t(hp.n_ff_expert) * 2));
    GPTQ_TRY(a(&up, P * size_t(hp.n_ff_expert) * 2));
    GPTQ_TRY(a(&out, P * size_t(hp.n_embd) * 2));
    if (hp.n_ff_shared > 0) {
        GPTQ_TRY(a(&sh_gate, N * size_t(hp.n_ff_shared) * 2));
        GPTQ_TRY(a(&sh_up, N * size_t(hp.n_ff_shared) * 2));
        GPTQ_TRY(a(&sh_out, N * size_t(hp.n_embd) * 2));
        GPTQ_TRY(a(&sh_logit, N * 4));
    }
    if (route_all) {
        GPTQ_TRY(a(&ra_gate, N * size_t(hp.n_ff_expert) * 2));
        GPTQ_TRY(a(&ra_up, N * size_t(hp.n_ff_expert) * 2));
    }
    n = n_tokens;
    return status::ok();
}

uint64_t cuda_moe_buffers::bytes() const {
    uint64_t s = 0;
    for (const cuda_buffer* b : {&logits, &ids, &weights, &rows, &pos, &xg, &gate, &up, &out, &sh_gate, &sh_up, &sh_out,
                                 &sh_logit, &ra_gate, &ra_up})
        s += b->bytes();
    return s;
}

result<bool> cuda_moe_block(cuda_context& c, const llama_hparams& hp, const cuda_layer_weights& w, uint16_t* hidden,
                            const cuda_layer_buffers& b, const cuda_layer_pass& p) {
    if (!w.moe || !b.moe) return make_error(E_INTERNAL, "MoE block without its weights or buffers");
    if (p.lora_rows) return make_error(status_code::STATUS_UNSUPPORTED, "LoRA adapters on a MoE layer");
    const cuda_moe_weights& m  = *w.moe;
    cuda_moe_buffers&       mb = *b.moe;
    const int64_t           n = p.n, k = hp.n_expert_used;
    if (n > mb.n) return make_error(E_INTERNAL, "MoE block over {} rows with buffers for {}", n, mb.n);
    // hidden += o's output, then the post-attention norm into x (as the dense MLP block).
    GPTQ_TRY(op_cuda_add_rms_norm(c, hidden, b.y, w.mlp_norm.as<uint16_t>(), b.x, n, hp.n_embd, hp.rms_eps));
    GPTQ_TRY(mark(p, "add_rms_norm"));
    if (p.hook && *p.hook) GPTQ_TRY((*p.hook)(linear_input::LINEAR_INPUT_GATE_UP, b.x, n, hp.n_embd));
    GPTQ_TRY(op_cuda_linear_dense_f32_out(c, b.x, m.router.w.as<uint16_t>(), mb.logits.as<float>(), n, hp.n_expert,
                                          hp.n_embd));
    GPTQ_TRY(op_cuda_moe_topk(c, mb.logits.as<float>(), n, hp.n_expert, k, hp.moe_renorm, mb.ids.as<int32_t>(),
                              mb.weights.as<float>()));
    GPTQ_TRY(mark(p, "moe_router"));
    const bool shared      = hp.n_ff_shared > 0;
    const bool calibrating = (p.moe_hook && *p.moe_hook) || p.stop_after != linear_input::LINEAR_INPUT_COUNT;
    if (shared) GPTQ_TRY(hook_call(p, k_moe_shared, linear_input::LINEAR_INPUT_GATE_UP, b.x, n, hp.n_embd));
    const bool grouped = p.moe_grouped && m.grouped && !calibrating;
    if (grouped) {
        GPTQ_TRY(experts_grouped(c, hp, m, mb, b.x, n));
    } else {
        GPTQ_ASSIGN_OR_RETURN(const bool all, experts_per_expert(c, hp, m, mb, b.x, n, p));
        // Stopped after the experts' GATE_UP inputs: the shared expert's was seen above.
        if (!all && p.stop_after == linear_input::LINEAR_INPUT_GATE_UP) return false;
    }
    GPTQ_TRY(mark(p, grouped ? "moe_experts_grouped" : "moe_experts"));
    if (shared) {
        GPTQ_ASSIGN_OR_RETURN(const bool done, shared_run(c, hp, m, mb, b.x, n, p));
        if (!done) return false;
        GPTQ_TRY(mark(p, "moe_shared_expert"));
    }
    if (p.stop_after == linear_input::LINEAR_INPUT_DOWN) return false;
    GPTQ_TRY(op_cuda_moe_combine(c, mb.out.as<uint16_t>(), grouped ? nullptr : mb.pos.as<int32_t>(),
                                 mb.ids.as<int32_t>(), mb.weights.as<float>(), n, k, hp.n_embd,
                                 shared ? mb.sh_out.as<uint16_t>() : nullptr,
                                 shared ? mb.sh_logit.as<float>() : nullptr, b.y));
    GPTQ_TRY(mark(p, "moe_combine"));
    if (hp.mlp_out_norm)  // sandwich norms: no MoE family has them, kept for the layer's contract
        GPTQ_TRY(op_cuda_rms_norm(c, b.y, w.mlp_out_norm.as<uint16_t>(), b.y, n, hp.n_embd, hp.rms_eps));
    return true;
}

}  // namespace gptq
