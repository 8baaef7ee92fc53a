#include "kernels/cpu/activation.h"

#include <immintrin.h>

#include <algorithm>
#include <cmath>

#include "core/thread_pool.h"
#include "kernels/cpu/vec_exp.h"

namespace gptq::cpu {

namespace {
// Below this many elements a pool dispatch costs more than the work.
constexpr int64_t k_min_parallel_elems = 1 << 14;

void silu_mul_range(const float* gate, const float* up, float* y, int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
        const float g = gate[i];
        y[i]          = g / (1.0f + std::exp(-g)) * up[i];
    }
}

// silu(g) * up = g / (1 + e^-g) * up with the vector exp (vec_exp.h), the tail in libm's expf.
__attribute__((target("avx512f"))) void silu_mul_range_512(const float* gate, const float* up, float* y, int64_t i0,
                                                           int64_t i1) {
    int64_t i = i0;
    for (; i + 16 <= i1; i += 16) {
        const __m512 g = _mm512_loadu_ps(gate + i);
        const __m512 e = vec_exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
        _mm512_storeu_ps(
            y + i, _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_loadu_ps(up + i)));
    }
    silu_mul_range(gate, up, y, i, i1);
}
__attribute__((target("avx2,fma"))) void silu_mul_range_256(const float* gate, const float* up, float* y, int64_t i0,
                                                            int64_t i1) {
    int64_t i = i0;
    for (; i + 8 <= i1; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = vec_exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
        _mm256_storeu_ps(
            y + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), _mm256_loadu_ps(up + i)));
    }
    silu_mul_range(gate, up, y, i, i1);
}
void silu_mul_range_fast(const float* gate, const float* up, float* y, int64_t i0, int64_t i1) {
    static const int isa = __builtin_cpu_supports("avx512f")                                 ? 2
                           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1
                                                                                             : 0;
    if (isa == 2)
        silu_mul_range_512(gate, up, y, i0, i1);
    else if (isa == 1)
        silu_mul_range_256(gate, up, y, i0, i1);
    else
        silu_mul_range(gate, up, y, i0, i1);
}

// torch's constants for the tanh GELU: beta = sqrt(2) * (2 / sqrt(pi)) * 0.5 = sqrt(2 / pi).
constexpr double k_gelu_beta  = M_SQRT2 * M_2_SQRTPI * 0.5;
constexpr double k_gelu_kappa = 0.044715;

void gelu_tanh_mul_range(const float* gate, const float* up, float* y, int64_t i0, int64_t i1) {
    constexpr float beta = static_cast<float>(k_gelu_beta), kappa = static_cast<float>(k_gelu_kappa);
    for (int64_t i = i0; i < i1; ++i) {
        const float x      = gate[i];
        const float x_cube = x * x * x;
        const float inner  = beta * (x + kappa * x_cube);
        y[i]               = 0.5f * x * (1.0f + std::tanh(inner)) * up[i];
    }
}

void softcap_range(float* x, int64_t i0, int64_t i1, float cap) {
    for (int64_t i = i0; i < i1; ++i) x[i] = std::tanh(x[i] / cap) * cap;
}

void softmax_row(const float* x, float* y, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
    if (m == -INFINITY) {  // every entry masked: cannot happen in causal attention; give zeros, not NaN
        for (int64_t i = 0; i < n; ++i) y[i] = 0.0f;
        return;
    }
    double sum = 0.0;  // a double sum costs nothing next to expf and keeps 8192-wide rows exact
    for (int64_t i = 0; i < n; ++i) {
        y[i] = std::exp(x[i] - m);
        sum += y[i];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int64_t i = 0; i < n; ++i) y[i] *= inv;
}

void log_softmax_row(const float* x, float* y, int64_t n) {
    float m = -INFINITY;
    for (int64_t i = 0; i < n; ++i) m = std::max(m, x[i]);
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += std::exp(x[i] - m);
    const float lse = static_cast<float>(m + std::log(sum));
    for (int64_t j = 0; j < n; ++j) y[j] = x[j] - lse;
}
}  // namespace

void silu_mul_ref(const float* gate, const float* up, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const double g = gate[i];
        y[i]           = static_cast<float>(g / (1.0 + std::exp(-g)) * up[i]);
    }
}

void silu_mul(const float* gate, const float* up, float* y, int64_t n, thread_pool* pool) {
    if (!pool || n < k_min_parallel_elems) {
        silu_mul_range(gate, up, y, 0, n);
        return;
    }
    pool->parallel_for(n, [&](int64_t i0, int64_t i1) { silu_mul_range(gate, up, y, i0, i1); });
}

void silu_mul_fast(const float* gate, const float* up, float* y, int64_t n, thread_pool* pool) {
    if (!pool || n < k_min_parallel_elems) {
        silu_mul_range_fast(gate, up, y, 0, n);
        return;
    }
    pool->parallel_for(n, [&](int64_t i0, int64_t i1) { silu_mul_range_fast(gate, up, y, i0, i1); });
}

void gelu_tanh_mul_ref(const float* gate, const float* up, float* y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) {
        const double x = gate[i];
        y[i] = static_cast<float>(0.5 * x * (1.0 + std::tanh(k_gelu_beta * (x + k_gelu_kappa * x * x * x))) * up[i]);
    }
}

void gelu_tanh_mul(const float* gate, const float* up, float* y, int64_t n, thread_pool* pool) {
    if (!pool || n < k_min_parallel_elems) {
        gelu_tanh_mul_range(gate, up, y, 0, n);
        return;
    }
    pool->parallel_for(n, [&](int64_t i0, int64_t i1) { gelu_tanh_mul_range(gate, up, y, i0, i1); });
}

void softcap_ref(float* x, int64_t n, float cap) {
    for (int64_t i = 0; i < n; ++i) x[i] = static_cast<float>(std::tanh(static_cast<double>(x[i]) / cap) * cap);
}

void softcap(float* x, int64_t n, float cap, thread_pool* pool) {
    if (!pool || n < k_min_parallel_elems) {
        softcap_range(x, 0, n, cap);
        return;
    }
    pool->parallel_for(n, [&](int64_t i0, int64_t i1) { softcap_range(x, i0, i1, cap); });
}

void softmax_rows_ref(const float* x, float* y, int64_t n_rows, int64_t n_cols) {
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* xr = x + r * n_cols;
        float*       yr = y + r * n_cols;
        double       m  = -INFINITY;
        for (int64_t i = 0; i < n_cols; ++i) m = std::max<double>(m, xr[i]);
        double sum = 0.0;
        for (int64_t i = 0; i < n_cols; ++i) sum += std::exp(xr[i] - m);
        for (int64_t i = 0; i < n_cols; ++i) yr[i] = static_cast<float>(std::exp(xr[i] - m) / sum);
    }
}

void softmax_rows(const float* x, float* y, int64_t n_rows, int64_t n_cols, thread_pool* pool) {
    if (!pool || n_rows * n_cols < k_min_parallel_elems) {
        for (int64_t r = 0; r < n_rows; ++r) softmax_row(x + r * n_cols, y + r * n_cols, n_cols);
        return;
    }
    pool->parallel_for(n_rows, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) softmax_row(x + r * n_cols, y + r * n_cols, n_cols);
    });
}

void log_softmax_rows_ref(const float* x, float* y, int64_t n_rows, int64_t n_cols) {
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* xr = x + r * n_cols;
        float*       yr = y + r * n_cols;
        double       m  = -INFINITY;
        for (int64_t i = 0; i < n_cols; ++i) m = std::max<double>(m, xr[i]);
        double sum = 0.0;
        for (int64_t i = 0; i < n_cols; ++i) sum += std::exp(xr[i] - m);
        const double lse = m + std::log(sum);
        for (int64_t i = 0; i < n_cols; ++i) yr[i] = static_cast<float>(xr[i] - lse);
    }
}

void log_softmax_rows(const float* x, float* y, int64_t n_rows, int64_t n_cols, thread_pool* pool) {
    if (!pool || n_rows * n_cols < k_min_parallel_elems) {
        for (int64_t r = 0; r < n_rows; ++r) log_softmax_row(x + r * n_cols, y + r * n_cols, n_cols);
        return;
    }
    pool->parallel_for(n_rows, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) log_softmax_row(x + r * n_cols, y + r * n_cols, n_cols);
    });
}

}  // namespace gptq::cpu
