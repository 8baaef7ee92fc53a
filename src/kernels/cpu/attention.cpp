#include "kernels/cpu/attention.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/error.h"
#include "core/thread_pool.h"
#include "kernels/cpu/activation.h"
#include "kernels/cpu/linear.h"

namespace gptq::cpu {

namespace {
// First visible key of a query at position p.
int64_t first_key(int64_t p, int64_t window) {
    return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
}

void check_shape(const attention_shape& s) {
    GPTQ_ASSERT(s.n_head_kv > 0 && s.n_head % s.n_head_kv == 0);
    GPTQ_ASSERT(s.q_pos0 >= 0 && s.q_pos0 + s.n_q <= s.n_kv);
    GPTQ_ASSERT(s.q_stride >= s.n_head * s.head_dim && s.out_stride >= s.n_head * s.head_dim);
    GPTQ_ASSERT(s.kv_stride >= s.n_head_kv * s.head_dim);
    GPTQ_ASSERT(s.softcap >= 0);
}
}  // namespace

void attention_ref(const float* q, const float* k, const float* v, float* out, const attention_shape& s) {
    check_shape(s);
    const int64_t       group = s.n_head / s.n_head_kv;
    std::vector<double> w(static_cast<size_t>(s.n_kv));
    for (int64_t i = 0; i < s.n_q; ++i) {
        const int64_t p  = s.q_pos0 + i;
        const int64_t j0 = first_key(p, s.window);
        for (int64_t h = 0; h < s.n_head; ++h) {
            const float*  qh = q + i * s.q_stride + h * s.head_dim;
            const int64_t hk = h / group;
            double        m  = -INFINITY;
            for (int64_t j = j0; j <= p; ++j) {
                const float* kj  = k + j * s.kv_stride + hk * s.head_dim;
                double       dot = 0.0;
                for (int64_t d = 0; d < s.head_dim; ++d) dot += static_cast<double>(qh[d]) * kj[d];
                w[j] = dot * s.scale;
                if (s.softcap > 0) w[j] = std::tanh(w[j] / s.softcap) * s.softcap;
                m = std::max(m, w[j]);
            }
            double sum = 0.0;
            for (int64_t j = j0; j <= p; ++j) sum += (w[j] = std::exp(w[j] - m));
            float* oh = out + i * s.out_stride + h * s.head_dim;
            for (int64_t d = 0; d < s.head_dim; ++d) {
                double acc = 0.0;
                for (int64_t j = j0; j <= p; ++j) acc += w[j] * v[j * s.kv_stride + hk * s.head_dim + d];
                oh[d] = static_cast<float>(acc / sum);
            }
        }
    }
}

namespace {
// Queries per work item: enough rows that the sgemms are not degenerate, few enough that causal
// blocks skip most of the masked half and two threads get balanced work at seqlen 128+.
constexpr int64_t k_q_block = 32;

// One query over keys [0, nk) of k/v (rows kv_stride apart), of which [a, nk) are visible.
void attention_row(const float* q, const float* k, const float* v, float* out, const attention_shape& s, int64_t a,
                   int64_t nk, float* scores) {
    const int64_t n = nk - a;
    // Zeroed first: some BLASes scale y by beta = 0 (a -inf or NaN left in it would survive).
    std::fill(scores, scores + n, 0.0f);
    std::fill(out, out + s.head_dim, 0.0f);
    cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<blasint>(n), static_cast<blasint>(s.head_dim), s.scale,
                k + a * s.kv_stride, static_cast<blasint>(s.kv_stride), q, 1, 0.0f, scores, 1);
    if (s.softcap > 0) softcap(scores, n, s.softcap, nullptr);
    softmax_rows(scores, scores, 1, n, nullptr);
    cblas_sgemv(CblasRowMajor, CblasTrans, static_cast<blasint>(n), static_cast<blasint>(s.head_dim), 1.0f,
                v + a * s.kv_stride, static_cast<blasint>(s.kv_stride), scores, 1, 0.0f, out, 1);
}

void attention_block(const float* q, const float* k, const float* v, float* out, const attention_shape& s, int64_t h,
                     int64_t i0, int64_t i1, std::vector<float>& scores) {
    const int64_t hk  = h / (s.n_head / s.n_head_kv);
    const int64_t nq  = i1 - i0;
    const int64_t jlo = first_key(s.q_pos0 + i0, s.window);  // first key any query of the block sees
    const int64_t jhi = s.q_pos0 + i1;                       // one past the last
    const int64_t nk  = jhi - jlo;
    scores.resize(static_cast<size_t>(nq * nk));
    if (nq == 1) {  // a decode row: sgemv reads K and V in place (sgemm would copy them into panels)
        attention_row(q + i0 * s.q_stride + h * s.head_dim, k + jlo * s.kv_stride + hk * s.head_dim,
                      v + jlo * s.kv_stride + hk * s.head_dim, out + i0 * s.out_stride + h * s.head_dim, s,
                      first_key(s.q_pos0 + i0, s.window) - jlo, nk, scores.data());
        return;
    }
    // scores[nq, nk] = scale * q_block[nq, hd] k_range[nk, hd]^T
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(nq), static_cast<blasint>(nk),
                static_cast<blasint>(s.head_dim), s.scale, q + i0 * s.q_stride + h * s.head_dim,
                static_cast<blasint>(s.q_stride), k + jlo * s.kv_stride + hk * s.head_dim,
                static_cast<blasint>(s.kv_stride), 0.0f, scores.data(), static_cast<blasint>(nk));
    if (s.softcap > 0) softcap(scores.data(), nq * nk, s.softcap, nullptr);  // masked entries are overwritten next
    for (int64_t r = 0; r < nq; ++r) {
        const int64_t p   = s.q_pos0 + i0 + r;
        const int64_t a   = first_key(p, s.window) - jlo;  // visible: [a, b) within the range
        const int64_t b   = p + 1 - jlo;
        float*        row = scores.data() + r * nk;
        std::fill(row, row + a, -INFINITY);
        std::fill(row + b, row + nk, -INFINITY);
    }
    softmax_rows(scores.data(), scores.data(), nq, nk, nullptr);
    // out_block[nq, hd] = scores[nq, nk] v_range[nk, hd]
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, static_cast<blasint>(nq), static_cast<blasint>(s.head_dim),
                static_cast<blasint>(nk), 1.0f, scores.data(), static_cast<blasint>(nk),
                v + jlo * s.kv_stride + hk * s.head_dim, static_cast<blasint>(s.kv_stride), 0.0f,
                out + i0 * s.out_stride + h * s.head_dim, static_cast<blasint>(s.out_stride));
}
}  // namespace

void attention_blas(const float* q, const float* k, const float* v, float* out, const attention_shape& s,
                    thread_pool* pool) {
    check_shape(s);
    if (s.n_q == 0) return;
    blas_init_single_threaded();
    const int64_t n_blocks = (s.n_q + k_q_block - 1) / k_q_block;
    const int64_t n_items  = s.n_head * n_blocks;
    auto          run      = [&](int64_t t0, int64_t t1) {
        std::vector<float> scores;
        for (int64_t t = t0; t < t1; ++t) {
            // parallel_for hands out contiguous chunks, and a causal block's cost grows with its
            // index; visiting blocks as 0, B-1, 1, B-2, ... gives every chunk the same mix.
            const int64_t u = t / s.n_head, h = t % s.n_head;
            const int64_t blk = (u % 2 == 0) ? u / 2 : n_blocks - 1 - u / 2;
            attention_block(q, k, v, out, s, h, blk * k_q_block, std::min(s.n_q, (blk + 1) * k_q_block), scores);
        }
    };
    if (!pool || n_items == 1) {
        run(0, n_items);
        return;
    }
    pool->parallel_for(n_items, run);
}

}  // namespace gptq::cpu
