#include "kernels/cpu/backward.h"

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
constexpr int64_t k_min_parallel_elems = 1 << 14;

void run_rows(int64_t n, thread_pool* pool, const std::function<void(int64_t, int64_t)>& fn) {
    if (!pool || n < 2)
        fn(0, n);
    else
        pool->parallel_for(n, fn);
}

int64_t first_key(int64_t p, int64_t window) {
    return window > 0 ? std::max<int64_t>(0, p - window + 1) : 0;
}

void check_shape(const attention_shape& s) {
    GPTQ_ASSERT(s.n_head_kv > 0 && s.n_head % s.n_head_kv == 0);
    GPTQ_ASSERT(s.q_pos0 >= 0 && s.q_pos0 + s.n_q <= s.n_kv);
    GPTQ_ASSERT(s.q_stride >= s.n_head * s.head_dim && s.out_stride >= s.n_head * s.head_dim);
    GPTQ_ASSERT(s.kv_stride >= s.n_head_kv * s.head_dim);
    GPTQ_ASSERT(s.softcap == 0.0f);  // no backward of soft-capping (finetune refuses such models)
}
}  // namespace

void rms_norm_backward(const float* x, const float* w, const float* dy, float* dx, int64_t n_rows, int64_t dim,
                       float eps, thread_pool* pool) {
    run_rows(n_rows, pool, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr  = x + r * dim;
            const float* dyr = dy + r * dim;
            float*       dxr = dx + r * dim;
            double       ss = 0.0, gx = 0.0;
            for (int64_t j = 0; j < dim; ++j) {
                ss += static_cast<double>(xr[j]) * xr[j];
                gx += static_cast<double>(w[j]) * dyr[j] * xr[j];
            }
            const double rs = 1.0 / std::sqrt(ss / static_cast<double>(dim) + static_cast<double>(eps));
            const double c  = rs * rs * rs * gx / static_cast<double>(dim);
            for (int64_t j = 0; j < dim; ++j)
                dxr[j] = static_cast<float>(rs * static_cast<double>(w[j]) * dyr[j] - c * xr[j]);
        }
    });
}

void silu_mul_backward(const float* gate, const float* up, const float* dy, float* dgate, float* dup, int64_t n,
                       thread_pool* pool) {
    auto range = [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            const float g = gate[i], u = up[i], d = dy[i];
            const float s = 1.0f / (1.0f + std::exp(-g));
            dup[i]        = d * g * s;
            dgate[i]      = d * u * s * (1.0f + g * (1.0f - s));
        }
    };
    if (!pool || n < k_min_parallel_elems)
        range(0, n);
    else
        pool->parallel_for(n, range);
}

void attention_backward_ref(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk,
                            float* dv, const attention_shape& s) {
    check_shape(s);
    const int64_t hd = s.head_dim, group = s.n_head / s.n_head_kv;
    for (int64_t j = 0; j < s.n_kv; ++j)
        for (int64_t c = 0; c < s.n_head_kv * hd; ++c) dk[j * s.kv_stride + c] = dv[j * s.kv_stride + c] = 0.0f;
    std::vector<double> p(static_cast<size_t>(s.n_kv)), dp(p.size());
    std::vector<double> dkd(static_cast<size_t>(s.n_kv * s.n_head_kv * hd), 0.0), dvd(dkd.size(), 0.0);
    for (int64_t h = 0; h < s.n_head; ++h) {
        const int64_t hk = h / group;
        for (int64_t i = 0; i < s.n_q; ++i) {
            const int64_t pos = s.q_pos0 + i;
            const int64_t j0  = first_key(pos, s.window);
            const float*  qh  = q + i * s.q_stride + h * hd;
            const float*  doh = dout + i * s.out_stride + h * hd;
            double        m   = -INFINITY;
            for (int64_t j = j0; j <= pos; ++j) {
                double dot = 0.0;
                for (int64_t d = 0; d < hd; ++d) dot += static_cast<double>(qh[d]) * k[j * s.kv_stride + hk * hd + d];
                p[j] = dot * s.scale;
                m    = std::max(m, p[j]);
            }
            double sum = 0.0;
            for (int64_t j = j0; j <= pos; ++j) sum += (p[j] = std::exp(p[j] - m));
            double rowdot = 0.0;
            for (int64_t j = j0; j <= pos; ++j) {
                p[j] /= sum;
                double dot = 0.0;
                for (int64_t d = 0; d < hd; ++d) dot += static_cast<double>(doh[d]) * v[j * s.kv_stride + hk * hd + d];
                dp[j] = dot;
                rowdot += p[j] * dot;
            }
            std::vector<double> dqh(static_cast<size_t>(hd), 0.0);
            for (int64_t j = j0; j <= pos; ++j) {
                const double ds = p[j] * (dp[j] - rowdot) * s.scale;
                for (int64_t d = 0; d < hd; ++d) {
                    const size_t kd = static_cast<size_t>((j * s.n_head_kv + hk) * hd + d);
                    dqh[static_cast<size_t>(d)] += ds * k[j * s.kv_stride + hk * hd + d];
                    dkd[kd] += ds * qh[d];
                    dvd[kd] += p[j] * doh[d];
                }
            }
            for (int64_t d = 0; d < hd; ++d)
                dq[i * s.q_stride + h * hd + d] = static_cast<float>(dqh[static_cast<size_t>(d)]);
        }
    }
    for (int64_t j = 0; j < s.n_kv; ++j)
        for (int64_t c = 0; c < s.n_head_kv * hd; ++c) {
            dk[j * s.kv_stride + c] = static_cast<float>(dkd[static_cast<size_t>(j * s.n_head_kv * hd + c)]);
            dv[j * s.kv_stride + c] = static_cast<float>(dvd[static_cast<size_t>(j * s.n_head_kv * hd + c)]);
        }
}

namespace {
// Query head h over all its queries: dq's head columns, and this head's share of dk/dv into
// dkh/dvh [n_kv, hd] (keys 0 .. n_kv-1; rows no query sees stay 0).
void attention_backward_head(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dkh,
                             float* dvh, const attention_shape& s, int64_t h, std::vector<float>& pm,
                             std::vector<float>& dpm) {
    const int64_t hd = s.head_dim, hk = h / (s.n_head / s.n_head_kv);
    const int64_t jlo = first_key(s.q_pos0, s.window);  // first key any query sees
    const int64_t nk  = s.q_pos0 + s.n_q - jlo;         // keys [jlo, jlo + nk)
    const int64_t nq  = s.n_q;
    const auto    bi  = [](int64_t x) { return static_cast<blasint>(x); };
    pm.assign(static_cast<size_t>(nq * nk), 0.0f);
    dpm.assign(pm.size(), 0.0f);
    const float* qh  = q + h * hd;
    const float* doh = dout + h * hd;
    const float* kg  = k + jlo * s.kv_stride + hk * hd;
    const float* vg  = v + jlo * s.kv_stride + hk * hd;
    // P[nq, nk] = softmax(scale * q k^T) over each query's visible keys
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, bi(nq), bi(nk), bi(hd), s.scale, qh, bi(s.q_stride), kg,
                bi(s.kv_stride), 0.0f, pm.data(), bi(nk));
    for (int64_t i = 0; i < nq; ++i) {
        const int64_t pos = s.q_pos0 + i;
        float*        row = pm.data() + i * nk;
        std::fill(row, row + (first_key(pos, s.window) - jlo), -INFINITY);
        std::fill(row + (pos + 1 - jlo), row + nk, -INFINITY);
    }
    softmax_rows(pm.data(), pm.data(), nq, nk, nullptr);
    // dP[nq, nk] = dout v^T; dS = P * (dP - rowsum(P * dP)) (scale folded into the products below)
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, bi(nq), bi(nk), bi(hd), 1.0f, doh, bi(s.out_stride), vg,
                bi(s.kv_stride), 0.0f, dpm.data(), bi(nk));
    for (int64_t i = 0; i < nq; ++i) {
        const float* pr = pm.data() + i * nk;
        float*       dr = dpm.data() + i * nk;
        double       rd = 0.0;
        for (int64_t j = 0; j < nk; ++j) rd += static_cast<double>(pr[j]) * dr[j];
        const float rdf = static_cast<float>(rd);
        for (int64_t j = 0; j < nk; ++j) dr[j] = pr[j] * (dr[j] - rdf);
    }
    // dq = scale dS k;  dk = scale dS^T q;  dv = P^T dout
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, bi(nq), bi(hd), bi(nk), s.scale, dpm.data(), bi(nk), kg,
                bi(s.kv_stride), 0.0f, dq + h * hd, bi(s.q_stride));
    std::fill(dkh, dkh + s.n_kv * hd, 0.0f);
    std::fill(dvh, dvh + s.n_kv * hd, 0.0f);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, bi(nk), bi(hd), bi(nq), s.scale, dpm.data(), bi(nk), qh,
                bi(s.q_stride), 0.0f, dkh + jlo * hd, bi(hd));
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, bi(nk), bi(hd), bi(nq), 1.0f, pm.data(), bi(nk), doh,
                bi(s.out_stride), 0.0f, dvh + jlo * hd, bi(hd));
}
}  // namespace

void attention_backward(const float* q, const float* k, const float* v, const float* dout, float* dq, float* dk,
                        float* dv, const attention_shape& s, thread_pool* pool) {
    check_shape(s);
    const int64_t hd = s.head_dim, group = s.n_head / s.n_head_kv;
    for (int64_t j = 0; j < s.n_kv; ++j)
        for (int64_t c = 0; c < s.n_head_kv * hd; ++c) dk[j * s.kv_stride + c] = dv[j * s.kv_stride + c] = 0.0f;
    if (s.n_q == 0) return;
    blas_init_single_threaded();
    const size_t       per_head = static_cast<size_t>(s.n_kv * hd);
    std::vector<float> dkh(per_head * static_cast<size_t>(s.n_head)), dvh(dkh.size());
    auto               run = [&](int64_t h0, int64_t h1) {
        std::vector<float> pm, dpm;
        for (int64_t h = h0; h < h1; ++h)
            attention_backward_head(q, k, v, dout, dq, dkh.data() + static_cast<size_t>(h) * per_head,
                                                  dvh.data() + static_cast<size_t>(h) * per_head, s, h, pm, dpm);
    };
    run_rows(s.n_head, pool, run);
    for (int64_t h = 0; h < s.n_head; ++h) {
        const int64_t hk  = h / group;
        const float*  dkp = dkh.data() + static_cast<size_t>(h) * per_head;
        const float*  dvp = dvh.data() + static_cast<size_t>(h) * per_head;
        for (int64_t j = 0; j < s.n_kv; ++j)
            for (int64_t d = 0; d < hd; ++d) {
                dk[j * s.kv_stride + hk * hd + d] += dkp[j * hd + d];
                dv[j * s.kv_stride + hk * hd + d] += dvp[j * hd + d];
            }
    }
}

}  // namespace gptq::cpu
