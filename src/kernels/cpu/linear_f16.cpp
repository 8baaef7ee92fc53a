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
#include "core/error.h"
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

// One row, four accumulators (64 values per step): the decode GEMV walks W row after row, one
// sequential stream, which the hardware prefetchers follow far better than 4 interleaved rows of a
// few KB each once W is out of cache (bench_gptq_cpu "f16 cold": 1.5-1.9x, perf-notes session 10).
__attribute__((target("avx512f"))) inline __m512 load_h16(const uint16_t* w) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w)));
}
__attribute__((target("avx512f"))) void dot_row_avx512(const uint16_t* w, const float* x, int64_t k, float* y) {
    __m512  a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j + 64 <= k; j += 64) {
        a0 = _mm512_fmadd_ps(load_h16(w + j), _mm512_loadu_ps(x + j), a0);
        a1 = _mm512_fmadd_ps(load_h16(w + j + 16), _mm512_loadu_ps(x + j + 16), a1);
        a2 = _mm512_fmadd_ps(load_h16(w + j + 32), _mm512_loadu_ps(x + j + 32), a2);
        a3 = _mm512_fmadd_ps(load_h16(w + j + 48), _mm512_loadu_ps(x + j + 48), a3);
    }
    for (; j + 16 <= k; j += 16) a0 = _mm512_fmadd_ps(load_h16(w + j), _mm512_loadu_ps(x + j), a0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
    for (; j < k; ++j) s += f16_to_f32(w[j]) * x[j];
    *y = s;
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

// Output rows [j0, j1) for the m activation rows. AVX-512: row after row (dot_row_avx512), each
// weight row read from memory once and from L1 by the other activation rows; elsewhere 4 rows at
// a time.
void gemv_rows(f16_isa isa, const float* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k, int64_t j0,
               int64_t j1) {
    if (isa == f16_isa::AVX512) {
        for (int64_t j = j0; j < j1; ++j)
            for (int64_t i = 0; i < m; ++i) dot_row_avx512(w + j * k, x + i * k, k, y + i * n + j);
        return;
    }
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

// ---- Prompt rows on AVX-512F: packed F32 panels and an 8 x 32 register tile ----
// OpenBLAS 0.3.21 runs its Haswell (AVX2) sgemm on CPUs it does not know (the development VM's
// Zen 5), half of what AVX-512 FMA can do, and the tile path above converts every weight tile
// and lets sgemm copy it again. Here each 32-output panel of a k-block of 256 is converted from
// F16 and transposed once into panel[kk][32] (32 KB, L1), and every 8 activation rows run 16
// accumulators (8 rows x 2 vectors of 16 outputs): per k, two panel loads, eight broadcasts, 16
// FMAs. Each output is one sequential FMA chain over k (y = fma(x_k, w_k, y), k-blocks continuing
// from the stored partial sum), so a row's result does not depend on m, the tile or the thread.
constexpr int64_t k_pk_kb = 256;  // k per packed block
constexpr int64_t k_pk_nr = 32;   // outputs per panel
constexpr int64_t k_pk_np = 2;    // panels per tile (k_f16_tile outputs)
static_assert(k_pk_nr * k_pk_np == k_f16_tile);

// panel[kk * 32 + j] = W[j0 + j, kb0 + kk] for j < nr; columns nr..31 zero.
// 16 rows x 16 values, W rows [j, j + 16) at columns [c0, c0 + 16) (rows k apart), converted and
// transposed in registers into panel[(c0 + c) * 32 + jb + r] (jb: the panel column of row j).
__attribute__((target("avx512f"))) void pack_16x16(const uint16_t* w, int64_t k, float* panel, int64_t c0, int64_t jb) {
    __m512 r[16], t[16];
    for (int i = 0; i < 16; ++i)
        r[i] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + i * k + c0)));
    for (int i = 0; i < 16; i += 2) {  // t[i]: r_i[0] r_i+1[0] r_i[1] r_i+1[1] per 128-bit lane; t[i+1]: [2], [3]
        t[i]     = _mm512_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  // r[i + c]: rows i..i+3 of columns c, 4 + c, 8 + c, 12 + c (one per lane)
        r[i]     = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
        r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xEE);
        r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int c = 0; c < 4; ++c) {
        // rows 0-7: lanes (col c, col 8 + c) of rows 0-3 then of rows 4-7; (col 4 + c, col 12 + c) alike
        const __m512 a0 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0x88), a1 = _mm512_shuffle_f32x4(r[c], r[4 + c], 0xDD);
        const __m512 b0 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0x88);
        const __m512 b1 = _mm512_shuffle_f32x4(r[8 + c], r[12 + c], 0xDD);
        _mm512_storeu_ps(panel + (c0 + c) * k_pk_nr + jb, _mm512_shuffle_f32x4(a0, b0, 0x88));
        _mm512_storeu_ps(panel + (c0 + 8 + c) * k_pk_nr + jb, _mm512_shuffle_f32x4(a0, b0, 0xDD));
        _mm512_storeu_ps(panel + (c0 + 4 + c) * k_pk_nr + jb, _mm512_shuffle_f32x4(a1, b1, 0x88));
        _mm512_storeu_ps(panel + (c0 + 12 + c) * k_pk_nr + jb, _mm512_shuffle_f32x4(a1, b1, 0xDD));
    }
}

// panel[kk * 32 + j] = W[j0 + j, kb0 + kk] for j < nr; columns nr..31 zero. Full 16 x 16 blocks
// through pack_16x16, the rest (rows past the last 16, columns past the last 16) one by one.
void pack_panel(f16_isa isa, const uint16_t* w, int64_t k, int64_t j0, int64_t nr, int64_t kb0, int64_t kbn,
                float* panel, float* row) {
    const int64_t kv = kbn / 16 * 16;
    for (int64_t jb = 0; jb < k_pk_nr; jb += 16) {
        const bool full = jb + 16 <= nr;
        if (full)
            for (int64_t c0 = 0; c0 < kv; c0 += 16) pack_16x16(w + (j0 + jb) * k + kb0, k, panel, c0, jb);
        for (int64_t j = jb; j < jb + 16; ++j) {
            const int64_t from = full ? kv : 0;  // columns still to write for row j
            if (from == kbn) continue;
            if (j < nr)
                f16_convert(isa, w + (j0 + j) * k + kb0 + from, row, kbn - from);
            else
                std::fill(row, row + (kbn - from), 0.0f);
            for (int64_t kk = from; kk < kbn; ++kk) panel[kk * k_pk_nr + j] = row[kk - from];
        }
    }
}

// y[i, 0..nr) (+)= x[i, 0..kbn) panel for i < MR (x rows ldx apart, y rows ldy apart).
template <int MR>
__attribute__((target("avx512f"))) void tile_f32(const float* x, int64_t ldx, const float* panel, int64_t kbn, float* y,
                                                 int64_t ldy, int64_t nr, bool accumulate) {
    const __mmask16 m0 = nr >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nr) - 1);
    const __mmask16 m1 = nr >= 32 ? __mmask16(0xFFFF) : nr <= 16 ? __mmask16(0) : __mmask16((1u << (nr - 16)) - 1);
    __m512          c[MR][2];
    for (int i = 0; i < MR; ++i) {
        c[i][0] = accumulate ? _mm512_maskz_loadu_ps(m0, y + i * ldy) : _mm512_setzero_ps();
        c[i][1] = accumulate ? _mm512_maskz_loadu_ps(m1, y + i * ldy + 16) : _mm512_setzero_ps();
    }
    for (int64_t kk = 0; kk < kbn; ++kk) {
        const __m512 b0 = _mm512_loadu_ps(panel + kk * k_pk_nr), b1 = _mm512_loadu_ps(panel + kk * k_pk_nr + 16);
        for (int i = 0; i < MR; ++i) {
            const __m512 a = _mm512_set1_ps(x[i * ldx + kk]);
            c[i][0]        = _mm512_fmadd_ps(a, b0, c[i][0]);
            c[i][1]        = _mm512_fmadd_ps(a, b1, c[i][1]);
        }
    }
    for (int i = 0; i < MR; ++i) {
        _mm512_mask_storeu_ps(y + i * ldy, m0, c[i][0]);
        _mm512_mask_storeu_ps(y + i * ldy + 16, m1, c[i][1]);
    }
}

void tile_rows(int64_t mr, const float* x, int64_t ldx, const float* panel, int64_t kbn, float* y, int64_t ldy,
               int64_t nr, bool accumulate) {
    switch (mr) {
        case 8:
            return tile_f32<8>(x, ldx, panel, kbn, y, ldy, nr, accumulate);
        case 7:
            return tile_f32<7>(x, ldx, panel, kbn, y, ldy, nr, accumulate);
        case 6:
            return tile_f32<6>(x, ldx, panel, kbn, y, ldy, nr, accumulate);
        case 5:
            return tile_f32<5>(x, ldx, panel, kbn, y, ldy, nr, accumulate);
        case 4:
            return tile_f32<4>(x, ldx, panel, kbn, y, ldy, nr, accumulate);
        case 3:
            return tile_f32<3>(x, ldx, panel, kbn, y, ldy, nr, accumulate);
        case 2:
            return tile_f32<2>(x, ldx, panel, kbn, y, ldy, nr, accumulate);
        default:
            return tile_f32<1>(x, ldx, panel, kbn, y, ldy, nr, accumulate);
    }
}

// Output rows [j0, j1) of all m activation rows, in tiles of k_f16_tile outputs.
void gemm_rows_avx512(const float* x, const uint16_t* w, float* y, int64_t m, int64_t n, int64_t k, int64_t j0,
                      int64_t j1) {
    thread_local std::vector<float> panels, row;
    panels.resize(static_cast<size_t>(k_pk_np * k_pk_kb * k_pk_nr));
    row.resize(static_cast<size_t>(k_pk_kb));
    for (int64_t t0 = j0; t0 < j1; t0 += k_f16_tile) {
        const int64_t nt = std::min(k_f16_tile, j1 - t0), np = (nt + k_pk_nr - 1) / k_pk_nr;
        for (int64_t kb0 = 0; kb0 < k; kb0 += k_pk_kb) {
            const int64_t kbn = std::min(k_pk_kb, k - kb0);
            for (int64_t p = 0; p < np; ++p)
                pack_panel(f16_isa::AVX512, w, k, t0 + p * k_pk_nr, std::min(k_pk_nr, nt - p * k_pk_nr), kb0, kbn,
                           panels.data() + p * k_pk_kb * k_pk_nr, row.data());
            for (int64_t i0 = 0; i0 < m; i0 += 8)
                for (int64_t p = 0; p < np; ++p)
                    tile_rows(std::min<int64_t>(8, m - i0), x + i0 * k + kb0, k, panels.data() + p * k_pk_kb * k_pk_nr,
                              kbn, y + i0 * n + t0 + p * k_pk_nr, n, std::min(k_pk_nr, nt - p * k_pk_nr), kb0 > 0);
        }
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
    const linear_f16_job job{w, bias, y, n};
    linears_f16(x, &job, 1, m, k, pool);
}

void linears_f16(const float* x, const linear_f16_job* jobs, int n_jobs, int64_t m, int64_t k, thread_pool* pool) {
    if (m == 0 || n_jobs == 0) return;
    blas_init_single_threaded();
    const f16_isa isa  = f16_best_isa();
    const bool    gemv = m <= k_f16_gemv_max_rows || k == 0;
    const int64_t unit = gemv ? k_f16_gemv_block : k_f16_tile;
    // Work units of every job one after another (job j's are [first[j], first[j + 1])): one
    // parallel_for for all, each unit the rows [j0, j1) that linear_f16 would give it alone.
    constexpr int k_max_jobs = 8;
    GPTQ_ASSERT(n_jobs <= k_max_jobs);
    int64_t first[k_max_jobs + 1] = {0};
    for (int j = 0; j < n_jobs; ++j) first[j + 1] = first[j] + (jobs[j].n + unit - 1) / unit;
    auto task = [&](int64_t b0, int64_t b1) {
        for (int j = 0; j < n_jobs; ++j) {
            const int64_t a = std::max(b0, first[j]), b = std::min(b1, first[j + 1]);
            if (a >= b) continue;
            const linear_f16_job& jb = jobs[j];
            const int64_t         j0 = (a - first[j]) * unit, j1 = std::min(jb.n, (b - first[j]) * unit);
            if (gemv)
                gemv_rows(isa, x, jb.w, jb.y, m, jb.n, k, j0, j1);
            else if (isa == f16_isa::AVX512)
                gemm_rows_avx512(x, jb.w, jb.y, m, jb.n, k, j0, j1);
            else
                gemm_rows(isa, x, jb.w, jb.y, m, jb.n, k, j0, j1);
        }
    };
    const int64_t n_units = first[n_jobs];
    if (pool)
        pool->parallel_for(n_units, task);
    else
        task(0, n_units);
    for (int j = 0; j < n_jobs; ++j)
        if (jobs[j].bias)
            for (int64_t i = 0; i < m; ++i)
                for (int64_t c = 0; c < jobs[j].n; ++c) jobs[j].y[i * jobs[j].n + c] += jobs[j].bias[c];
}

}  // namespace gptq::cpu
