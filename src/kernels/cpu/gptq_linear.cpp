#include "kernels/cpu/gptq_linear.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/thread_pool.h"

namespace gptq::cpu {

// ---- The int8-activation GEMV, one copy per instruction set (gptq_gemv_body.inc) ----
namespace {
namespace avx2 {
#define GPTQ_KT __attribute__((target("avx2,fma")))
// maddubs: pairs of u8 x s8 products summed to int16 (|.| <= 2 * 15 * 127, no saturation for
// nibble codes); madd with ones sums the pairs to int32.
GPTQ_KT inline __m256i dot_u8s8(__m256i acc, __m256i q, __m256i x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(q, x), _mm256_set1_epi16(1)));
}
#include "kernels/cpu/gptq_gemv_body.inc"
#undef GPTQ_KT
}  // namespace avx2

namespace vnni {
#define GPTQ_KT __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
// vpdpbusd on 256-bit registers (AVX512-VNNI + VL): four u8 x s8 products summed into each int32.
GPTQ_KT inline __m256i dot_u8s8(__m256i acc, __m256i q, __m256i x) {
    return _mm256_dpbusd_epi32(acc, q, x);
}
#include "kernels/cpu/gptq_gemv_body.inc"

// The same on 512-bit registers: one vpdpbusd per two chunks (64 codes). A nibble row's 32 bytes
// of two chunks unpack to 16-byte lanes [c0 rows 0-15, c1 rows 0-15, c0 rows 16-31, c1 rows 16-31];
// the activations are permuted to that order once per chunk pair (shared by the R rows). A
// block's odd last chunk takes the 256-bit path.
template <bool B8>
GPTQ_KT inline __m512i pair_dot(__m512i acc, const uint8_t* row, int64_t c, __m512i xv) {
    const __m512i m4 = _mm512_set1_epi8(15);
    if constexpr (!B8) {
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * 16));
        const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
        return _mm512_dpbusd_epi32(acc, _mm512_and_si512(v, m4), xv);
    } else {
        const __m512i q = _mm512_loadu_si512(row + c * 32);
        const __m512i hi =
            _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(q, 4), m4), xv);
        return _mm512_dpbusd_epi32(_mm512_add_epi32(acc, _mm512_slli_epi32(hi, 4)), _mm512_and_si512(q, m4), xv);
    }
}

template <int R, bool B8>
GPTQ_KT void rows_q8_512(const gptq_cpu_layout& w, const gptq_q8_row& xr, float* y, int64_t n0) {
    const int64_t  rb = w.row_bytes(), G = w.n_groups;
    const uint8_t* rows[R];
    __m256         acc[R];
    float          corr[R];
    for (int r = 0; r < R; ++r) {
        rows[r] = w.codes + (n0 + r) * rb;
        acc[r]  = _mm256_setzero_ps();
        corr[r] = 0.0f;
    }
    for (int64_t g = 0; g < G; ++g) {
        __m256 gacc[R];
        for (int r = 0; r < R; ++r) gacc[r] = _mm256_setzero_ps();
        const int64_t c1 = w.pad_start[g + 1] / k_gptq_chunk;
        for (int64_t cb = w.pad_start[g] / k_gptq_chunk; cb < c1; cb += k_gptq_act_chunks) {
            const int64_t ce = std::min(c1, cb + k_gptq_act_chunks);
            __m512i       wide[R];
            for (int r = 0; r < R; ++r) wide[r] = _mm512_setzero_si512();
            int64_t c = cb;
            for (; c + 2 <= ce; c += 2) {
                __m512i xv = _mm512_loadu_si512(xr.xq + c * k_gptq_chunk);
                if constexpr (!B8) xv = _mm512_shuffle_i64x2(xv, xv, _MM_SHUFFLE(3, 1, 2, 0));
                for (int r = 0; r < R; ++r) wide[r] = pair_dot<B8>(wide[r], rows[r], c, xv);
            }
            __m256i iacc[R];
            for (int r = 0; r < R; ++r)
                iacc[r] = _mm256_add_epi32(_mm512_castsi512_si256(wide[r]), _mm512_extracti64x4_epi64(wide[r], 1));
            if (c < ce) {
                const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr.xq + c * k_gptq_chunk));
                for (int r = 0; r < R; ++r) iacc[r] = chunk_dot<B8>(iacc[r], rows[r], c, xv);
            }
            const __m256 dv = _mm256_set1_ps(xr.d[cb]);
            for (int r = 0; r < R; ++r) gacc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r]), dv, gacc[r]);
        }
        for (int r = 0; r < R; ++r) {
            const float s = w.scales[(n0 + r) * G + g];
            acc[r]        = _mm256_fmadd_ps(gacc[r], _mm256_set1_ps(s), acc[r]);
            // Explicit fma: bit for bit the same in tile_q8_512 whatever the compiler contracts.
            corr[r] = std::fma(s * w.zeros[(n0 + r) * G + g], xr.xsum[g], corr[r]);
        }
    }
    for (int r = 0; r < R; ++r) y[n0 + r] = hsum(acc[r]) - corr[r];
}

template <bool B8>
GPTQ_KT void gemv_512(const gptq_cpu_layout& w, const gptq_q8_row& xr, float* y, int64_t n0, int64_t n1) {
    constexpr int R = 4;
    int64_t       n = n0;
    for (; n + R <= n1; n += R) rows_q8_512<R, B8>(w, xr, y, n);
    for (; n < n1; ++n) rows_q8_512<1, B8>(w, xr, y, n);
}

GPTQ_KT void gemv_q8_512(const gptq_cpu_layout& w, const gptq_q8_row& xr, float* y, int64_t n0, int64_t n1) {
    if (w.bits == 8)
        gemv_512<true>(w, xr, y, n0, n1);
    else
        gemv_512<false>(w, xr, y, n0, n1);
}

// The int8 GEMM of prompt rows: M activation rows x R output rows per tile, each weight chunk pair
// unpacked once for the M rows (the GEMV unpacks it per activation row), every (row, output) the
// same operations in the same order as rows_q8_512, so a row's result is bit for bit the GEMV's
// (a row computes the same function whatever the batch holds; test_cpu_int4_gemv checks it).
template <int R, int M, bool B8>
GPTQ_KT void tile_q8_512(const gptq_cpu_layout& w, const gptq_q8_row* xr, float* const* y, int64_t n0) {
    const int64_t  rb = w.row_bytes(), G = w.n_groups;
    const __m512i  m4 = _mm512_set1_epi8(15);
    const uint8_t* rows[R];
    __m256         acc[R][M];
    float          corr[R][M];
    for (int r = 0; r < R; ++r) {
        rows[r] = w.codes + (n0 + r) * rb;
        for (int i = 0; i < M; ++i) {
            acc[r][i]  = _mm256_setzero_ps();
            corr[r][i] = 0.0f;
        }
    }
    for (int64_t g = 0; g < G; ++g) {
        __m256 gacc[R][M];
        for (int r = 0; r < R; ++r)
            for (int i = 0; i < M; ++i) gacc[r][i] = _mm256_setzero_ps();
        const int64_t c1 = w.pad_start[g + 1] / k_gptq_chunk;
        for (int64_t cb = w.pad_start[g] / k_gptq_chunk; cb < c1; cb += k_gptq_act_chunks) {
            const int64_t ce = std::min(c1, cb + k_gptq_act_chunks);
            __m512i       wide[R][M];
            for (int r = 0; r < R; ++r)
                for (int i = 0; i < M; ++i) wide[r][i] = _mm512_setzero_si512();
            int64_t c = cb;
            for (; c + 2 <= ce; c += 2) {
                __m512i xv[M];
                for (int i = 0; i < M; ++i) {
                    xv[i] = _mm512_loadu_si512(xr[i].xq + c * k_gptq_chunk);
                    if constexpr (!B8) xv[i] = _mm512_shuffle_i64x2(xv[i], xv[i], _MM_SHUFFLE(3, 1, 2, 0));
                }
                for (int r = 0; r < R; ++r) {
                    if constexpr (!B8) {  // pair_dot's unpacking, once for the M rows
                        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows[r] + c * 16));
                        const __m512i v = _mm512_and_si512(
                            _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1), m4);
                        for (int i = 0; i < M; ++i) wide[r][i] = _mm512_dpbusd_epi32(wide[r][i], v, xv[i]);
                    } else {
                        for (int i = 0; i < M; ++i) wide[r][i] = pair_dot<true>(wide[r][i], rows[r], c, xv[i]);
                    }
                }
            }
            __m256i iacc[R][M];
            for (int r = 0; r < R; ++r)
                for (int i = 0; i < M; ++i)
                    iacc[r][i] =
                        _mm256_add_epi32(_mm512_castsi512_si256(wide[r][i]), _mm512_extracti64x4_epi64(wide[r][i], 1));
            if (c < ce)
                for (int i = 0; i < M; ++i) {
                    const __m256i xv =
                        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr[i].xq + c * k_gptq_chunk));
                    for (int r = 0; r < R; ++r) iacc[r][i] = chunk_dot<B8>(iacc[r][i], rows[r], c, xv);
                }
            for (int i = 0; i < M; ++i) {
                const __m256 dv = _mm256_set1_ps(xr[i].d[cb]);
                for (int r = 0; r < R; ++r)
                    gacc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][i]), dv, gacc[r][i]);
            }
        }
        for (int r = 0; r < R; ++r) {
            const float s = w.scales[(n0 + r) * G + g];
            const float z = w.zeros[(n0 + r) * G + g];
            for (int i = 0; i < M; ++i) {
                acc[r][i]  = _mm256_fmadd_ps(gacc[r][i], _mm256_set1_ps(s), acc[r][i]);
                corr[r][i] = std::fma(s * z, xr[i].xsum[g], corr[r][i]);  // as rows_q8_512
            }
        }
    }
    for (int r = 0; r < R; ++r)
        for (int i = 0; i < M; ++i) y[i][n0 + r] = hsum(acc[r][i]) - corr[r][i];
}

// y[i, n] for activation rows i < m (y rows ldy apart) and outputs [n0, n1): tiles of 4 rows x 2
// outputs, the last m % 4 rows through the GEMV.
template <bool B8>
GPTQ_KT void gemm_512(const gptq_cpu_layout& w, const gptq_q8_row* xr, int64_t m, float* y, int64_t ldy, int64_t n0,
                      int64_t n1) {
    constexpr int M = 4, R = 2;
    int64_t       i0 = 0;
    for (; i0 + M <= m; i0 += M) {
        float* yr[M];
        for (int i = 0; i < M; ++i) yr[i] = y + (i0 + i) * ldy;
        int64_t n = n0;
        for (; n + R <= n1; n += R) tile_q8_512<R, M, B8>(w, xr + i0, yr, n);
        for (; n < n1; ++n) tile_q8_512<1, M, B8>(w, xr + i0, yr, n);
    }
    for (; i0 < m; ++i0) gemv_512<B8>(w, xr[i0], y + i0 * ldy, n0, n1);
}

GPTQ_KT void gemm_q8_512(const gptq_cpu_layout& w, const gptq_q8_row* xr, int64_t m, float* y, int64_t ldy, int64_t n0,
                         int64_t n1) {
    if (w.bits == 8)
        gemm_512<true>(w, xr, m, y, ldy, n0, n1);
    else
        gemm_512<false>(w, xr, m, y, ldy, n0, n1);
}
#undef GPTQ_KT
}  // namespace vnni

// The portable kernel: the same sums in the same grouping (integer chunk dots, then F32).
void gemv_q8_scalar(const gptq_cpu_layout& w, const gptq_q8_row& xr, float* y, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
        float acc = 0.0f, corr = 0.0f;
        for (int64_t g = 0; g < w.n_groups; ++g) {
            float         gacc = 0.0f;
            const int64_t p1   = w.pad_start[g + 1];
            for (int64_t pb = w.pad_start[g]; pb < p1; pb += k_gptq_act_block) {
                int32_t dot = 0;
                for (int64_t p = pb; p < std::min(p1, pb + k_gptq_act_block); ++p)
                    dot += gptq_code_at(w, n, p) * xr.xq[p];
                gacc += static_cast<float>(dot) * xr.d[pb / k_gptq_chunk];
            }
            const float s = w.scales[n * w.n_groups + g];
            acc += gacc * s;
            corr += s * w.zeros[n * w.n_groups + g] * xr.xsum[g];
        }
        y[n] = acc - corr;
    }
}

gptq_isa resolve(gptq_isa isa) {
    if (isa != gptq_isa::GPTQ_ISA_BEST) return isa;
    static const gptq_isa best = gptq_isa_available(gptq_isa::GPTQ_ISA_AVX512) ? gptq_isa::GPTQ_ISA_AVX512
                                 : gptq_isa_available(gptq_isa::GPTQ_ISA_VNNI) ? gptq_isa::GPTQ_ISA_VNNI
                                 : gptq_isa_available(gptq_isa::GPTQ_ISA_AVX2) ? gptq_isa::GPTQ_ISA_AVX2
                                                                               : gptq_isa::GPTQ_ISA_SCALAR;
    return best;
}
}  // namespace

bool gptq_isa_available(gptq_isa isa) {
    switch (isa) {
        case gptq_isa::GPTQ_ISA_BEST:
        case gptq_isa::GPTQ_ISA_SCALAR:
            return true;
        case gptq_isa::GPTQ_ISA_AVX2:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
        case gptq_isa::GPTQ_ISA_VNNI:
        case gptq_isa::GPTQ_ISA_AVX512:
            return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                   __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    }
    return false;
}

const char* gptq_isa_name(gptq_isa isa) {
    switch (isa) {
        case gptq_isa::GPTQ_ISA_BEST:
            return gptq_isa_name(resolve(isa));
        case gptq_isa::GPTQ_ISA_SCALAR:
            return "scalar";
        case gptq_isa::GPTQ_ISA_AVX2:
            return "avx2";
        case gptq_isa::GPTQ_ISA_VNNI:
            return "avx512-vnni-256";
        case gptq_isa::GPTQ_ISA_AVX512:
            return "avx512-vnni-512";
    }
    return "?";
}

void gptq_quantize_activations(const float* x, const gptq_cpu_layout& w, const gptq_q8_row& out) {
    std::fill(out.xq, out.xq + w.k_pad, int8_t{0});
    std::fill(out.d, out.d + w.k_pad / k_gptq_chunk, 0.0f);
    for (int64_t g = 0; g < w.n_groups; ++g) {
        const int64_t len = w.group_start[g + 1] - w.group_start[g];
        float         xs  = 0.0f;
        // The group's rows in blocks of k_gptq_act_block (the last one may end in padding, xq 0).
        for (int64_t j0 = 0; j0 < len; j0 += k_gptq_act_block) {
            const int64_t j1   = std::min(len, j0 + k_gptq_act_block);
            const int64_t p0   = w.pad_start[g] + j0;
            auto          in_x = [&](int64_t j) {
                const int64_t i = w.group_start[g] + j;
                return x[w.perm ? w.perm[i] : i];
            };
            float amax = 0.0f;
            for (int64_t j = j0; j < j1; ++j) amax = std::max(amax, std::fabs(in_x(j)));
            const float d   = amax / 127.0f;
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int32_t     sum = 0;
            for (int64_t j = j0; j < j1; ++j) {
                // Round to nearest even without a libm call: adding 1.5 * 2^23 leaves the integer
                // part in the mantissa (|x * inv| <= 127 here, inv = 0 for an all-zero block).
                const float   r       = (in_x(j) * inv + 12582912.0f) - 12582912.0f;
                const int32_t q       = std::clamp(static_cast<int32_t>(r), -127, 127);
                out.xq[p0 + (j - j0)] = static_cast<int8_t>(q);
                sum += q;
            }
            for (int64_t c = p0 / k_gptq_chunk; c < (p0 + (j1 - j0) + k_gptq_chunk - 1) / k_gptq_chunk; ++c)
                out.d[c] = d;
            xs += d * static_cast<float>(sum);
        }
        out.xsum[g] = xs;
    }
}

void gptq_gemv_q8(const gptq_cpu_layout& w, const gptq_q8_row& xr, float* y, int64_t n0, int64_t n1, gptq_isa isa) {
    switch (resolve(isa)) {
        case gptq_isa::GPTQ_ISA_AVX512:
            return vnni::gemv_q8_512(w, xr, y, n0, n1);
        case gptq_isa::GPTQ_ISA_VNNI:
            return vnni::gemv_q8(w, xr, y, n0, n1);
        case gptq_isa::GPTQ_ISA_AVX2:
            return avx2::gemv_q8(w, xr, y, n0, n1);
        default:
            return gemv_q8_scalar(w, xr, y, n0, n1);
    }
}

namespace {

constexpr int64_t k_rows_per_task = 64;  // output rows per work item of the F32 path
constexpr int64_t k_gemv_block    = 16;  // output rows per work item of the int8 GEMV (a multiple of 4)

// Per-thread scratch, grown as needed and kept: no allocation per call once warm.
struct scratch {
    std::vector<float>       xs;    // [m, n_in] gathered activations (F32 path)
    std::vector<float>       wbuf;  // [k_rows_per_task, n_in] dequantized weights (F32 path)
    std::vector<int8_t>      xq;    // [m, k_pad]
    std::vector<float>       d;     // [m, k_pad / 32]
    std::vector<float>       xsum;  // [m, n_groups]
    std::vector<gptq_q8_row> rows;  // [m] views of xq/d/xsum (the int8 GEMM)
};
scratch& thread_scratch() {
    thread_local scratch s;
    return s;
}
template <typename T>
T* grow(std::vector<T>& v, int64_t n) {
    if (static_cast<int64_t>(v.size()) < n) v.resize(static_cast<size_t>(n));
    return v.data();
}

// Rows [n0, n1) of W, dequantized into wbuf [n1 - n0, n_in] in sorted row order.
void dequantize_rows(const gptq_cpu_layout& w, int64_t n0, int64_t n1, float* wbuf) {
    for (int64_t n = n0; n < n1; ++n) {
        float* out = wbuf + (n - n0) * w.n_in;
        for (int64_t g = 0; g < w.n_groups; ++g) {
            const float s = w.scales[n * w.n_groups + g], z = w.zeros[n * w.n_groups + g];
            for (int64_t i = w.group_start[g]; i < w.group_start[g + 1]; ++i)
                out[i] = s * (static_cast<float>(gptq_code_at(w, n, w.pad_start[g] + i - w.group_start[g])) - z);
        }
    }
}

// xs[i, sorted row] = d_b * xq (the int8-rounded activations the GEMV multiplies, dequantized).
void gather_rounded(const float* x, const gptq_cpu_layout& w, int64_t m, float* xs) {
    scratch&      s   = thread_scratch();
    const int64_t nch = w.k_pad / k_gptq_chunk;
    int8_t*       xq  = grow(s.xq, w.k_pad);
    float*        d   = grow(s.d, nch);
    float*        xsm = grow(s.xsum, w.n_groups);
    for (int64_t i = 0; i < m; ++i) {
        gptq_quantize_activations(x + i * w.n_in, w, {xq, d, xsm});
        for (int64_t g = 0; g < w.n_groups; ++g)
            for (int64_t r = w.group_start[g]; r < w.group_start[g + 1]; ++r) {
                const int64_t p    = w.pad_start[g] + (r - w.group_start[g]);
                xs[i * w.n_in + r] = d[p / k_gptq_chunk] * static_cast<float>(xq[p]);
            }
    }
}

void linear_f32(const float* x, const gptq_cpu_layout& w, float* y, int64_t m, thread_pool* pool, bool int8_act) {
    float* xs = grow(thread_scratch().xs, m * w.n_in);
    if (int8_act)
        gather_rounded(x, w, m, xs);
    else
        for (int64_t i = 0; i < m; ++i)
            for (int64_t k = 0; k < w.n_in; ++k) xs[i * w.n_in + k] = x[i * w.n_in + (w.perm ? w.perm[k] : k)];
    const int64_t n_tasks = (w.n_out + k_rows_per_task - 1) / k_rows_per_task;
    auto          task    = [&](int64_t t0, int64_t t1) {
        float* wbuf = grow(thread_scratch().wbuf, k_rows_per_task * w.n_in);
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t n0 = t * k_rows_per_task, n1 = std::min(w.n_out, n0 + k_rows_per_task);
            dequantize_rows(w, n0, n1, wbuf);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), static_cast<blasint>(n1 - n0),
                                    static_cast<blasint>(w.n_in), 1.0f, xs, static_cast<blasint>(w.n_in), wbuf,
                                    static_cast<blasint>(w.n_in), 0.0f, y + n0, static_cast<blasint>(w.n_out));
        }
    };
    if (pool)
        pool->parallel_for(n_tasks, task);
    else
        task(0, n_tasks);
}

void linear_int8(const float* x, const gptq_cpu_layout& w, float* y, int64_t m, thread_pool* pool, gptq_isa isa) {
    scratch&      s   = thread_scratch();
    const int64_t nch = w.k_pad / k_gptq_chunk;
    int8_t*       xq  = grow(s.xq, m * w.k_pad);
    float*        d   = grow(s.d, m * nch);
    float*        xsm = grow(s.xsum, m * w.n_groups);
    for (int64_t i = 0; i < m; ++i)
        gptq_quantize_activations(x + i * w.n_in, w, {xq + i * w.k_pad, d + i * nch, xsm + i * w.n_groups});
    const int64_t n_tasks = (w.n_out + k_gemv_block - 1) / k_gemv_block;
    const bool    gemm    = m >= 4 && resolve(isa) == gptq_isa::GPTQ_ISA_AVX512;
    if (gemm) {
        s.rows.resize(static_cast<size_t>(m));
        for (int64_t i = 0; i < m; ++i)
            s.rows[static_cast<size_t>(i)] = {xq + i * w.k_pad, d + i * nch, xsm + i * w.n_groups};
    }
    const gptq_q8_row* rows = s.rows.data();
    auto               task = [&](int64_t t0, int64_t t1) {
        const int64_t n0 = t0 * k_gemv_block, n1 = std::min(w.n_out, t1 * k_gemv_block);
        if (gemm) {
            vnni::gemm_q8_512(w, rows, m, y, w.n_out, n0, n1);
            return;
        }
        for (int64_t i = 0; i < m; ++i)
            gptq_gemv_q8(w, {xq + i * w.k_pad, d + i * nch, xsm + i * w.n_groups}, y + i * w.n_out, n0, n1, isa);
    };
    if (pool)
        pool->parallel_for(n_tasks, task);
    else
        task(0, n_tasks);
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

void gptq_linear(const float* x, const gptq_cpu_layout& w, const float* bias, float* y, int64_t m, thread_pool* pool,
                 bool int8_act, gptq_isa isa) {
    if (m <= 0 || w.n_out == 0) return;
    // int8 activations: decode rows through the GEMV; prompt rows through the int8 GEMM where the
    // CPU has AVX512-VNNI (bit for bit the GEMV's result per row), else rounded activations in F32.
    if (int8_act && (m < 4 || resolve(isa) == gptq_isa::GPTQ_ISA_AVX512))
        linear_int8(x, w, y, m, pool, isa);
    else
        linear_f32(x, w, y, m, pool, int8_act);
    if (bias)
        for (int64_t i = 0; i < m; ++i)
            for (int64_t n = 0; n < w.n_out; ++n) y[i * w.n_out + n] += bias[n];
}

}  // namespace gptq::cpu
