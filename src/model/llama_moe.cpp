// The sparse MoE block of the one decoder layer on the CPU (llama.h moe_block; Mixtral,
// Qwen2-MoE, Qwen3-MoE): post-attention norm, router logits, F32 softmax, top-k (renormalised when
// hp.moe_renorm), every expert's SwiGLU over the tokens routed to it (gathered rows, one linear
// call per expert over all of them: the ragged batch grouped by expert), the weighted sum in
// ascending expert order as transformers' index_add_, the shared expert times
// sigmoid(shared_expert_gate), residual. docs/architectures.md "Mixture of experts".
#include <algorithm>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "model/llama.h"

namespace gptq {

moe_routing moe_route(const ops_context& ctx, const llama_hparams& hp, const llama_moe& moe, const float* x,
                      int64_t n_rows) {
    const int64_t n_exp = hp.n_expert, k = hp.n_expert_used;
    moe_routing   r;
    r.n_rows = n_rows;
    r.k      = k;
    r.expert.resize(static_cast<size_t>(n_rows * k));
    r.weight.resize(r.expert.size());
    std::vector<float> logits(static_cast<size_t>(n_rows * n_exp));  // [n_rows, n_expert]
    linear_forward(ctx, moe.router, x, logits.data(), n_rows);
    std::vector<int32_t> order(static_cast<size_t>(n_exp));
    for (int64_t t = 0; t < n_rows; ++t) {
        float* p  = logits.data() + t * n_exp;  // softmax in F32 (torch: softmax(logits.float()))
        float  mx = p[0];
        for (int64_t e = 1; e < n_exp; ++e) mx = std::max(mx, p[e]);
        float sum = 0.0f;
        for (int64_t e = 0; e < n_exp; ++e) sum += (p[e] = std::exp(p[e] - mx));
        for (int64_t e = 0; e < n_exp; ++e) p[e] /= sum;
        // torch.topk: the k largest, descending; equal values keep the lower index first.
        std::iota(order.begin(), order.end(), 0);
        std::partial_sort(order.begin(), order.begin() + k, order.end(),
                          [&](int32_t a, int32_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
        float top = 0.0f;
        for (int64_t j = 0; j < k; ++j) top += p[order[static_cast<size_t>(j)]];
        for (int64_t j = 0; j < k; ++j) {
            const int32_t e                          = order[static_cast<size_t>(j)];
            r.expert[static_cast<size_t>(t * k + j)] = e;
            r.weight[static_cast<size_t>(t * k + j)] = hp.moe_renorm ? p[e] / top : p[e];
        }
    }
    // Group by expert (counting sort; rows ascending within an expert).
    r.offset.assign(static_cast<size_t>(n_exp + 1), 0);
    for (int32_t e : r.expert) ++r.offset[static_cast<size_t>(e) + 1];
    for (int64_t e = 0; e < n_exp; ++e) r.offset[static_cast<size_t>(e + 1)] += r.offset[static_cast<size_t>(e)];
    r.rows.resize(r.expert.size());
    r.slot.resize(r.expert.size());
    std::vector<int64_t> fill(r.offset.begin(), r.offset.end() - 1);
    for (int64_t t = 0; t < n_rows; ++t)
        for (int64_t j = 0; j < k; ++j) {
            const size_t at =
                static_cast<size_t>(fill[static_cast<size_t>(r.expert[static_cast<size_t>(t * k + j)])]++);
            r.rows[at] = t;
            r.slot[at] = static_cast<int32_t>(j);
        }
    return r;
}

void moe_expert_hidden(const ops_context& ctx, const llama_hparams& hp, const moe_expert& ex, const float* x, int64_t n,
                       std::vector<float>* h) {
    const int64_t      ff = ex.linear(moe_proj::MOE_GATE).n_out;
    std::vector<float> up(static_cast<size_t>(n * ff));
    h->resize(up.size());
    linear_forward(ctx, ex.linear(moe_proj::MOE_GATE), x, h->data(), n);
    linear_forward(ctx, ex.linear(moe_proj::MOE_UP), x, up.data(), n);
    if (hp.act == mlp_activation::ACT_GELU_TANH)
        op_gelu_tanh_mul(ctx, h->data(), up.data(), h->data(), n * ff);
    else
        op_silu_mul(ctx, h->data(), up.data(), h->data(), n * ff);
}

bool llama_model::moe_block(const ops_context& ctx, const llama_layer& layer, float* hidden, int64_t n_rows,
                            const linear_input_hook* hook, linear_input stop_after,
                            const moe_input_hook* moe_hook) const {
    GPTQ_ASSERT(layer.moe);
    const llama_moe&   moe    = *layer.moe;
    const int64_t      n_embd = hp_.n_embd, i_layer = layer.index;
    const bool         shared = hp_.n_ff_shared > 0;
    std::vector<float> x(static_cast<size_t>(n_rows * n_embd));  // [n_rows, n_embd] the block's input
    op_rms_norm(ctx, hidden, layer.mlp_norm.data(), x.data(), n_rows, n_embd, hp_.rms_eps);
    if (hook && *hook) (*hook)(i_layer, linear_input::LINEAR_INPUT_GATE_UP, x.data(), n_rows, n_embd);
    const moe_routing r = moe_route(ctx, hp_, moe, x.data(), n_rows);

    std::vector<int64_t> all_rows;
    if (shared && moe_hook && *moe_hook) {
        all_rows.resize(static_cast<size_t>(n_rows));
        std::iota(all_rows.begin(), all_rows.end(), int64_t(0));
        (*moe_hook)(i_layer, k_moe_shared, linear_input::LINEAR_INPUT_GATE_UP, x.data(), all_rows.data(), n_rows,
                    n_embd);
    }
    // Each expert's tokens gathered: xe[offset[e] ..] rows of x.
    std::vector<float> xe(r.rows.size() * static_cast<size_t>(n_embd));
    for (size_t a = 0; a < r.rows.size(); ++a)
        std::copy_n(x.data() + r.rows[a] * n_embd, n_embd, xe.data() + a * static_cast<size_t>(n_embd));
    auto expert_x    = [&](int64_t e) { return xe.data() + r.offset[static_cast<size_t>(e)] * n_embd; };
    auto expert_rows = [&](int64_t e) { return r.rows.data() + r.offset[static_cast<size_t>(e)]; };
    if (moe_hook && *moe_hook)
        for (int64_t e = 0; e < hp_.n_expert; ++e)
            if (r.count(e) > 0)
                (*moe_hook)(i_layer, e, linear_input::LINEAR_INPUT_GATE_UP, expert_x(e), expert_rows(e), r.count(e),
                            n_embd);
    if (stop_after == linear_input::LINEAR_INPUT_GATE_UP) return false;

    const bool         stop_at_down = stop_after == linear_input::LINEAR_INPUT_DOWN;
    std::vector<float> y(static_cast<size_t>(n_rows * n_embd), 0.0f);  // the experts' weighted sum
    std::vector<float> h, out;
    for (int64_t e = 0; e < hp_.n_expert; ++e) {
        const int64_t n = r.count(e);
        if (n == 0) continue;
        moe_expert_hidden(ctx, hp_, moe.expert(e), expert_x(e), n, &h);
        const int64_t ff = moe.expert(e).linear(moe_proj::MOE_GATE).n_out;
        if (moe_hook && *moe_hook)
            (*moe_hook)(i_layer, e, linear_input::LINEAR_INPUT_DOWN, h.data(), expert_rows(e), n, ff);
        if (stop_at_down) continue;
        out.resize(static_cast<size_t>(n * n_embd));
        linear_forward(ctx, moe.expert(e).linear(moe_proj::MOE_DOWN), h.data(), out.data(), n);
        const int64_t off = r.offset[static_cast<size_t>(e)];
        for (int64_t a = 0; a < n; ++a) {
            const int64_t t  = r.rows[static_cast<size_t>(off + a)];
            const float   w  = r.weight[static_cast<size_t>(t * r.k + r.slot[static_cast<size_t>(off + a)])];
            float*        yt = y.data() + t * n_embd;
            const float*  ot = out.data() + a * n_embd;
            for (int64_t c = 0; c < n_embd; ++c) yt[c] += ot[c] * w;
        }
    }
    if (shared) {  // Qwen2-MoE: + sigmoid(shared_expert_gate(x)) * shared_expert(x)
        moe_expert_hidden(ctx, hp_, moe.shared, x.data(), n_rows, &h);
        if (moe_hook && *moe_hook)
            (*moe_hook)(i_layer, k_moe_shared, linear_input::LINEAR_INPUT_DOWN, h.data(), all_rows.data(), n_rows,
                        hp_.n_ff_shared);
        if (!stop_at_down) {
            out.resize(static_cast<size_t>(n_rows * n_embd));
            linear_forward(ctx, moe.shared.linear(moe_proj::MOE_DOWN), h.data(), out.data(), n_rows);
            std::vector<float> g(static_cast<size_t>(n_rows));
            linear_forward(ctx, moe.shared_gate, x.data(), g.data(), n_rows);
            for (int64_t t = 0; t < n_rows; ++t) {
                const float s = 1.0f / (1.0f + std::exp(-g[static_cast<size_t>(t)]));
                for (int64_t c = 0; c < n_embd; ++c) y[static_cast<size_t>(t * n_embd + c)] += s * out[t * n_embd + c];
            }
        }
    }
    if (stop_at_down) return false;
    op_add(ctx, hidden, y.data(), n_rows * n_embd);
    return true;
}

}  // namespace gptq
