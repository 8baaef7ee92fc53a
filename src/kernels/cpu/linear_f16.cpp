// linear_f16 (kernels/cpu/linear.h): a linear whose weights stay F16 in memory.
// - Decode rows (m <= k_f16_gemv_max_rows): a GEMV that converts the weights in registers (F16C
//   vcvtph2ps, AVX-512F or AVX2) and accumulates in F32 with FMA; 4 output rows at a time, so
//   their weights (4 x k x 2 bytes) stay in L1 while each of the m activation rows reads them.
// - More rows (prefill, perplexity): tiles of k_f16_tile output rows converted to F32 into a
//   per-thread buffer, then the same OpenBLAS sgemm as the F32 linear on that tile (every output
//   is the same sum as linear_blas computes on the F32 matrix; the conversion is exact).
// Runtime dispatch (__builtin_cpu_supports); the portable code converts with core/dtype.h.
#include <cblas.h>
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <vector>

#include "core/dtype.h"
#include "core/thread_pool.h"
#include "kernels/cpu/f16_isa.h"
#include "kernels/cpu/linear.h"

namespace gptq::cpu {

namespace {
// F16C from CPUID leaf 1 (clang's __builtin_cpu_supports does not know "f16c").
bool cpu_has_f16c() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
}
}  // namespace

bool f16_isa_supported(f16_isa i) {
    switch (i) {
        case f16_isa::AVX512:
            return __builtin_cpu_supports("avx512f");
        case f16_isa::AVX2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c();
        default:
            return true;
    }
}

f16_isa f16_best_isa() {
    static const f16_isa isa = [] {
        for (f16_isa i : {f16_isa::AVX512, f16_isa::AVX2})
            if (f16_isa_supported(i)) return i;
        return f16_isa::PORTABLE;
    }();
    return isa;
}

const char* f16_isa_name(f16_isa i) {
    return i == f16_isa::AVX512 ? "avx512" : i == f16_isa::AVX2 ? "avx2" : "portable";
}

namespace {
__attribute__((target("avx2,f16c"))) void convert_f16c(const uint16_t* src, float* dst, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i))));
    for (; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}
}  // namespace

void f16_convert(f16_isa isa, const uint16_t* src, float* dst, int64_t n) {
    if (isa == f16_isa::PORTABLE)
        f16_to_f32_row(src, dst, static_cast<size_t>(n));
    else
        convert_f16c(src, dst, n);
}

namespace {

constexpr int64_t k_f16_gemv_max_rows = 4;   // as linear_blas's sgemv rows (linear.cpp)
constexpr int64_t k_f16_tile          = 64;  // output rows converted per sgemm (a multiple of 16)
constexpr int64_t k_f16_gemv_block    = 16;  // output rows per work item of the GEMV

// y[r] = dot(w + r * k, x) for r < R (rows k apart). Two accumulators per row (2 R independent
// FMA chains hide the FMA latency); the k % 16 tail in scalar F32.
template <int R>
__attribute__((target("avx512f"))) void dot_rows_avx512(const uint16_t* w, const float* x, int64_t k, float* y) {
    __m512  acc[R], acc2[R];
    int64_t j = 0;
    for (int r = 0; r < R; ++r) acc[r] = acc2[r] = _mm512_setzero_ps();
    for (; j + 32 <= k; j += 32) {
        const __m512 xv = _mm512_loadu_ps(x + j), xv2 = _mm512_loadu_ps(x + j + 16);
        for (int r = 0; r < R; ++r) {
            const __m256i h  = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * k + j));
            const __m256i h2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * k + j + 16));
            acc[r]           = _mm512_fmadd_ps(_mm512_cvtph_ps(h), xv, acc[r]);
            acc2[r]          = _mm512_fmadd_ps(_mm512_cvtph_ps(h2), xv2, acc2[r]);
        }
    }
    for (; j + 16 <= k; j += 16) {
        const __m512 xv = _mm512_loadu_ps(x + j);
        for (int r = 0; r < R; ++r) {
            const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * k + j));
            acc[r]          = _mm512_fmadd_ps(_mm512_cvtph_ps(h), xv, acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(acc[r], acc2[r]));
        for (int64_t t = j; t < k; ++t) s += f16_to_f32(w[r * k + t]) * x[t];
        y[r] = s;
    }
}

template <int R>
__attribute__((target("avx2,fma,f16c"))) void dot_rows_avx2(const uint16_t* w, const float* x, int64_t k, float* y) {
    __m256  acc[R];
    int64_t j = 0;
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    for (; j + 8 <= k; j += 8) {
        const __m256 xv = _mm256_loadu_ps(x + j);
        for (int r = 0; r < R; ++r) {
            const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + r * k + j));
            acc[r]          = _mm256_fmadd_ps(_mm256_cvtph_ps(h), xv, acc[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        s4        = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        s4        = _mm_add_ss(s4, _mm_movehdup_ps(s4));
        float s   = _mm_cvtss_f32(s4);
        for (int64_t t = j; t < k; ++t) s += f16_to_f32(w[r * k + t]) * x[t];
        y[r] = s;
    }
}

template <int R>
void dot_rows_portable(const uint16_t* w, const float* x, int64_t k, float* y) {
    for (int r = 0; r < R; ++r) {
        float s = 0.0f;
        for (int64_t t = 0; t < k; ++t) s += f16_to_f32(w[r * k + t]) * x[t];
        y[r] = s;
    }
}

template <int R>
void dot_rows(f16_isa isa, const uint16_t* w, const float* x, int64_t k, float* y) {
    switch (isa) {
        case f16_isa::AVX512:
            return dot_rows_avx512<R>(w, x, k, y);
        case f16_isa::AVX2:
            return dot_rows_avx2<R>(w, x, k, y);
        default:
            return dot_rows_portable<R>(w, x, k, y);
    }
}

// Output rows [j0, j1) for the m activation rows.
void gemv_rows(f16_isa isa, const float* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k, int64_t j0,
               int64_t j1) {
    float   t[4];
    int64_t j = j0;
    for (; j + 4 <= j1; j += 4)
        for (int64_t i = 0; i < m; ++i) {
            dot_rows<4>(isa, w + j * k, x + i * k, k, t);
            std::copy(t, t + 4, y + i * n + j);
        }
    for (; j < j1; ++j)
        for (int64_t i = 0; i < m; ++i) dot_rows<1>(isa, w + j * k, x + i * k, k, y + i * n + j);
}

// Rows [j0, j1) in tiles: convert, sgemm (beta 0: y's tile is written, not read).
void gemm_rows(f16_isa isa, const float* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k, int64_t j0,
               int64_t j1) {
    thread_local std::vector<float> tile;
    if (static_cast<int64_t>(tile.size()) < k_f16_tile * k) tile.resize(static_cast<size_t>(k_f16_tile * k));
    for (int64_t t0 = j0; t0 < j1; t0 += k_f16_tile) {
        const int64_t nt = std::min(k_f16_tile, j1 - t0);
        f16_convert(isa, w + t0 * k, tile.data(), nt * k);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), static_cast<blasint>(nt),
                    static_cast<blasint>(k), 1.0f, x, static_cast<blasint>(k), tile.data(), static_cast<blasint>(k),
                    0.0f, y + t0, static_cast<blasint>(n));
    }
}

}  // namespace

void linear_f16_ref(const float* x, const uint16_t* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k) {
    std::vector<float> wf(static_cast<size_t>(n * k));
    f16_to_f32_row(w, wf.data(), wf.size());
    linear_ref(x, wf.data(), bias, y, m, n, k);
}

void linear_f16(const float* x, const uint16_t* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k,
                thread_pool* pool) {
    if (m == 0 || n == 0) return;
    blas_init_single_threaded();
    const f16_isa isa  = f16_best_isa();
    const bool    gemv = m <= k_f16_gemv_max_rows || k == 0;
    const int64_t unit = gemv ? k_f16_gemv_block : k_f16_tile;
    auto          task = [&](int64_t b0, int64_t b1) {
        const int64_t j0 = b0 * unit, j1 = std::min(n, b1 * unit);
        if (gemv)
            gemv_rows(isa, x, w, y, m, n, k, j0, j1);
        else
            gemm_rows(isa, x, w, y, m, n, k, j0, j1);
    };
    const int64_t n_units = (n + unit - 1) / unit;
    if (pool)
        pool->parallel_for(n_units, task);
    else
        task(0, n_units);
    if (bias)
        for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) y[i * n + j] += bias[j];
}

}  // namespace gptq::cpu
