#include "kernels/cpu/gptq_linear.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "core/thread_pool.h"

namespace gptq::cpu {

namespace {

constexpr int64_t k_cols_per_task = 64;  // output columns per work item (a multiple of 8)

// x gathered into sorted row order, and the per-group sums of x: xs [m, n_in], xg [m, n_groups].
void gather(const float* x, const gptq_cpu_layout& w, int64_t m, std::vector<float>* xs, std::vector<float>* xg) {
    xs->resize(static_cast<size_t>(m * w.n_in));
    xg->assign(static_cast<size_t>(m * w.n_groups), 0.0f);
    for (int64_t i = 0; i < m; ++i) {
        const float* xi = x + i * w.n_in;
        float*       si = xs->data() + i * w.n_in;
        for (int64_t k = 0; k < w.n_in; ++k) si[k] = w.perm ? xi[w.perm[k]] : xi[k];
        for (int64_t g = 0; g < w.n_groups; ++g) {
            float s = 0.0f;
            for (int32_t k = w.group_start[g]; k < w.group_start[g + 1]; ++k) s += si[k];
            (*xg)[static_cast<size_t>(i * w.n_groups + g)] = s;
        }
    }
}

// Columns [n0, n1) of one row: y[n] = sum_g s (acc_q - z * xg).
void gemv_cols_portable(const float* xs, const float* xg, const gptq_cpu_layout& w, float* y, int64_t n0, int64_t n1) {
    float         acc[k_cols_per_task], out[k_cols_per_task];
    const int64_t nc = n1 - n0;
    std::fill(out, out + nc, 0.0f);
    for (int64_t g = 0; g < w.n_groups; ++g) {
        std::fill(acc, acc + nc, 0.0f);
        for (int32_t k = w.group_start[g]; k < w.group_start[g + 1]; ++k) {
            const float    xv = xs[k];
            const uint8_t* q  = w.codes + static_cast<int64_t>(k) * w.n_out + n0;
            for (int64_t j = 0; j < nc; ++j) acc[j] += xv * static_cast<float>(q[j]);
        }
        const float* s = w.scales + g * w.n_out + n0;
        const float* z = w.zeros + g * w.n_out + n0;
        for (int64_t j = 0; j < nc; ++j) out[j] += s[j] * (acc[j] - z[j] * xg[g]);
    }
    std::copy(out, out + nc, y + n0);
}

__attribute__((target("avx2,fma"))) void gemv_cols_avx2(const float* xs, const float* xg, const gptq_cpu_layout& w,
                                                        float* y, int64_t n0, int64_t n1) {
    const int64_t nc = n1 - n0;
    if (nc % 8 != 0) return gemv_cols_portable(xs, xg, w, y, n0, n1);
    __m256        out[k_cols_per_task / 8], acc[k_cols_per_task / 8];
    const int64_t nv = nc / 8;
    for (int64_t v = 0; v < nv; ++v) out[v] = _mm256_setzero_ps();
    for (int64_t g = 0; g < w.n_groups; ++g) {
        for (int64_t v = 0; v < nv; ++v) acc[v] = _mm256_setzero_ps();
        for (int32_t k = w.group_start[g]; k < w.group_start[g + 1]; ++k) {
            const __m256   xv = _mm256_set1_ps(xs[k]);
            const uint8_t* q  = w.codes + static_cast<int64_t>(k) * w.n_out + n0;
            for (int64_t v = 0; v < nv; ++v) {
                const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8 * v));
                const __m256  f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b));
                acc[v]          = _mm256_fmadd_ps(xv, f, acc[v]);
            }
        }
        const __m256 xgv = _mm256_set1_ps(xg[g]);
        for (int64_t v = 0; v < nv; ++v) {
            const __m256 s = _mm256_loadu_ps(w.scales + g * w.n_out + n0 + 8 * v);
            const __m256 z = _mm256_loadu_ps(w.zeros + g * w.n_out + n0 + 8 * v);
            out[v]         = _mm256_fmadd_ps(s, _mm256_fnmadd_ps(z, xgv, acc[v]), out[v]);
        }
    }
    for (int64_t v = 0; v < nv; ++v) _mm256_storeu_ps(y + n0 + 8 * v, out[v]);
}

bool cpu_has_avx2() {
    static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    return has;
}

// m >= 4: dequantize a slice of W's columns into [nc, n_in] (PyTorch layout, sorted rows) and
// multiply with sgemm; the activations are already gathered into sorted order.
void gemm_slice(const float* xs, const gptq_cpu_layout& w, float* y, int64_t m, int64_t n0, int64_t n1,
                std::vector<float>* wbuf) {
    const int64_t nc = n1 - n0;
    wbuf->resize(static_cast<size_t>(nc * w.n_in));
    for (int64_t g = 0; g < w.n_groups; ++g)
        for (int32_t k = w.group_start[g]; k < w.group_start[g + 1]; ++k) {
            const uint8_t* q = w.codes + static_cast<int64_t>(k) * w.n_out + n0;
            const float*   s = w.scales + g * w.n_out + n0;
            const float*   z = w.zeros + g * w.n_out + n0;
            for (int64_t j = 0; j < nc; ++j)
                (*wbuf)[static_cast<size_t>(j * w.n_in + k)] = s[j] * (static_cast<float>(q[j]) - z[j]);
        }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(nc),
                static_cast<int>(w.n_in), 1.0f, xs, static_cast<int>(w.n_in), wbuf->data(), static_cast<int>(w.n_in),
                0.0f, y + n0, static_cast<int>(w.n_out));
}

void run(const float* x, const gptq_cpu_layout& w, const float* bias, float* y, int64_t m, thread_pool* pool,
         bool allow_avx2) {
    std::vector<float> xs, xg;
    gather(x, w, m, &xs, &xg);
    const int64_t n_tasks = (w.n_out + k_cols_per_task - 1) / k_cols_per_task;
    const bool    avx2    = allow_avx2 && cpu_has_avx2();
    auto          task    = [&](int64_t t0, int64_t t1) {
        std::vector<float> wbuf;
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t n0 = t * k_cols_per_task, n1 = std::min(w.n_out, n0 + k_cols_per_task);
            if (m >= 4) {
                gemm_slice(xs.data(), w, y, m, n0, n1, &wbuf);
                continue;
            }
            for (int64_t i = 0; i < m; ++i) {
                const float* xsi = xs.data() + i * w.n_in;
                const float* xgi = xg.data() + i * w.n_groups;
                if (avx2)
                    gemv_cols_avx2(xsi, xgi, w, y + i * w.n_out, n0, n1);
                else
                    gemv_cols_portable(xsi, xgi, w, y + i * w.n_out, n0, n1);
            }
        }
    };
    if (pool)
        pool->parallel_for(n_tasks, task);
    else
        task(0, n_tasks);
    if (bias)
        for (int64_t i = 0; i < m; ++i)
            for (int64_t n = 0; n < w.n_out; ++n) y[i * w.n_out + n] += bias[n];
}

}  // namespace

void gptq_linear_ref(const float* x, const uint8_t* codes_orig, const float* scales, const float* zeros,
                     const int32_t* g_idx, const float* bias, float* y, int64_t m, int64_t n_out, int64_t n_in) {
    for (int64_t i = 0; i < m; ++i)
        for (int64_t n = 0; n < n_out; ++n) {
            double s = bias ? bias[n] : 0.0;
            for (int64_t k = 0; k < n_in; ++k) {
                const int64_t g = g_idx[k];
                const float   wv =
                    scales[g * n_out + n] * (static_cast<float>(codes_orig[n * n_in + k]) - zeros[g * n_out + n]);
                s += static_cast<double>(x[i * n_in + k]) * wv;
            }
            y[i * n_out + n] = static_cast<float>(s);
        }
}

void gptq_linear(const float* x, const gptq_cpu_layout& w, const float* bias, float* y, int64_t m, thread_pool* pool) {
    run(x, w, bias, y, m, pool, true);
}

void gptq_linear_portable(const float* x, const gptq_cpu_layout& w, const float* bias, float* y, int64_t m,
                          thread_pool* pool) {
    run(x, w, bias, y, m, pool, false);
}

}  // namespace gptq::cpu
