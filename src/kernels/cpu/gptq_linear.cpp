#include "kernels/cpu/gptq_linear.h"

#include <cblas.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
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

// The tiled layout on 512-bit registers: T tiles of 16 outputs (a zmm each) x M activation rows;
// per step of 8 rows one 64-byte load per tile, two vpdpbusd per (tile, row) against the row's
// broadcast activation bytes. The operations per output are tiled_q8's (gptq_gemv_body.inc), so
// the result is the scalar tiled kernel's bit for bit.
template <int T, int M>
GPTQ_KT void tiled_q8_512(const gptq_cpu_layout& w, const gptq_q8_row* xr, float* const* y, int64_t n0, int64_t n1) {
    const int64_t  G = w.n_groups, tile = n0 / k_gptq_tile, steps = w.k_pad / 8;
    const uint8_t* codes[T];
    const float *  sc[T], *zr[T];
    for (int t = 0; t < T; ++t) {
        codes[t] = w.codes + (tile + t) * steps * 64;
        sc[t]    = w.scales + (tile + t) * G * k_gptq_tile;
        zr[t]    = w.zeros + (tile + t) * G * k_gptq_tile;
    }
    const __m512i m4 = _mm512_set1_epi8(15);
    __m512        acc[T][M];
    for (int t = 0; t < T; ++t)
        for (int i = 0; i < M; ++i) acc[t][i] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; ++g) {
        const int64_t p1 = w.pad_start[g + 1];
        for (int64_t pb = w.pad_start[g]; pb < p1; pb += k_gptq_act_block) {
            const int64_t pe = std::min(p1, pb + k_gptq_act_block);
            __m512i       iacc[T][M];
            for (int t = 0; t < T; ++t)
                for (int i = 0; i < M; ++i) iacc[t][i] = _mm512_setzero_si512();
            for (int64_t p = pb; p < pe; p += 8) {
                __m512i lo[T], hi[T];
                for (int t = 0; t < T; ++t) {
                    const __m512i v = _mm512_loadu_si512(codes[t] + p * 8);
                    lo[t]           = _mm512_and_si512(v, m4);
                    hi[t]           = _mm512_and_si512(_mm512_srli_epi16(v, 4), m4);
                }
                for (int i = 0; i < M; ++i) {
                    int32_t a, b;
                    std::memcpy(&a, xr[i].xq + p, 4);
                    std::memcpy(&b, xr[i].xq + p + 4, 4);
                    const __m512i xa = _mm512_set1_epi32(a), xb = _mm512_set1_epi32(b);
                    for (int t = 0; t < T; ++t)
                        iacc[t][i] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(iacc[t][i], lo[t], xa), hi[t], xb);
                }
            }
            for (int t = 0; t < T; ++t) {
                const __m512 s = _mm512_loadu_ps(sc[t] + g * k_gptq_tile);
                for (int i = 0; i < M; ++i) {
                    const __m512 ds = _mm512_mul_ps(s, _mm512_set1_ps(xr[i].d[pb / k_gptq_chunk]));
                    acc[t][i]       = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[t][i]), ds, acc[t][i]);
                }
            }
        }
        for (int t = 0; t < T; ++t) {
            const __m512 sz =
                _mm512_mul_ps(_mm512_loadu_ps(sc[t] + g * k_gptq_tile), _mm512_loadu_ps(zr[t] + g * k_gptq_tile));
            for (int i = 0; i < M; ++i) acc[t][i] = _mm512_fnmadd_ps(sz, _mm512_set1_ps(xr[i].xsum[g]), acc[t][i]);
        }
    }
    for (int t = 0; t < T; ++t) {
        const int64_t   cnt  = std::min<int64_t>(k_gptq_tile, n1 - (n0 + t * k_gptq_tile));
        const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1);
        for (int i = 0; i < M; ++i) _mm512_mask_storeu_ps(y[i] + n0 + t * k_gptq_tile, mask, acc[t][i]);
    }
}

// Rows [i0, i0 + M) ... of the tiles from n: M = 4 while 4 rows are left, then the rest.
template <int T>
GPTQ_KT void tiled_rows_512(const gptq_cpu_layout& w, const gptq_q8_row* xr, int64_t m, float* y, int64_t ldy,
                            int64_t n, int64_t ne) {
    constexpr int M  = 4;
    int64_t       i0 = 0;
    float*        yr[M];
    for (; i0 + M <= m; i0 += M) {
        for (int i = 0; i < M; ++i) yr[i] = y + (i0 + i) * ldy;
        tiled_q8_512<T, M>(w, xr + i0, yr, n, ne);
    }
    for (int i = 0; i < m - i0; ++i) yr[i] = y + (i0 + i) * ldy;
    switch (m - i0) {
        case 3:
            tiled_q8_512<T, 3>(w, xr + i0, yr, n, ne);
            break;
        case 2:
            tiled_q8_512<T, 2>(w, xr + i0, yr, n, ne);
            break;
        case 1:
            tiled_q8_512<T, 1>(w, xr + i0, yr, n, ne);
            break;
        default:
            break;
    }
}

// y[i, n] for activation rows i < m and outputs [n0, n1) (n0 a multiple of 16): two tiles (32
// outputs, K bytes of codes) at a time, every row through them before the next pair.
GPTQ_KT void gemm_q8_tiled_512(const gptq_cpu_layout& w, const gptq_q8_row* xr, int64_t m, float* y, int64_t ldy,
                               int64_t n0, int64_t n1) {
    int64_t n = n0;
    for (; n + 2 * k_gptq_tile < n1 + k_gptq_tile; n += 2 * k_gptq_tile)  // a second tile with >= 1 output
        tiled_rows_512<2>(w, xr, m, y, ldy, n, std::min(n1, n + 2 * k_gptq_tile));
    if (n < n1) tiled_rows_512<1>(w, xr, m, y, ldy, n, n1);
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

// The tiled layout's function (gptq_linear.h), plainly: every vector kernel gives it bit for bit.
void gemv_q8_tiled_scalar(const gptq_cpu_layout& w, const gptq_q8_row& xr, float* y, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
        float acc = 0.0f;
        for (int64_t g = 0; g < w.n_groups; ++g) {
            const float   s  = w.scales[w.sz_index(n, g)];
            const int64_t p1 = w.pad_start[g + 1];
            for (int64_t pb = w.pad_start[g]; pb < p1; pb += k_gptq_act_block) {
                int32_t dot = 0;
                for (int64_t p = pb; p < std::min(p1, pb + k_gptq_act_block); ++p)
                    dot += gptq_code_at(w, n, p) * xr.xq[p];
                acc = std::fma(static_cast<float>(dot), s * xr.d[pb / k_gptq_chunk], acc);
            }
            acc = std::fma(-(s * w.zeros[w.sz_index(n, g)]), xr.xsum[g], acc);
        }
        y[n] = acc;
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

// ---- Activation rounding (gptq_quantize_activations) ----
// The reference is the plain loop below; the vector kernels compute a block's max |x| (exact in
// any order) and RNE(x * inv) with one F32 multiply and a conversion under the default rounding
// mode, which is what the reference's (x * inv + 1.5 * 2^23) - 1.5 * 2^23 yields for |x * inv| <=
// 127 (this file is compiled with -ffp-contract=off, so x * inv is rounded on its own there, as in
// the kernels). The scales, the chunk scales and the group sums are computed by one shared scalar
// function, so every kernel's result is the reference's bit for bit.
namespace {

struct act_scale {
    float d, inv;
};
// inv = 0 (every code 0) for an all-zero block, and for one so small (max |x| < 127 / FLT_MAX,
// denormals) that 127 / max overflows: an infinite inv would turn x * inv into inf and NaN.
act_scale block_scale(float amax) {
    const float inv = 127.0f / amax;
    return {amax / 127.0f, amax > 0.0f && std::isfinite(inv) ? inv : 0.0f};
}

// Chunk scales of a block at padded row p0 with n rows; returns its contribution to the group sum.
float block_finish(const gptq_q8_row& out, int64_t p0, int64_t n, float d, int32_t sum) {
    for (int64_t c = p0 / k_gptq_chunk; c < (p0 + n + k_gptq_chunk - 1) / k_gptq_chunk; ++c) out.d[c] = d;
    return d * static_cast<float>(sum);
}

void quantize_ref(const float* x, const gptq_cpu_layout& w, const gptq_q8_row& out) {
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
            const act_scale sc  = block_scale(amax);
            int32_t         sum = 0;
            for (int64_t j = j0; j < j1; ++j) {
                // Round to nearest even without a libm call: adding 1.5 * 2^23 leaves the integer
                // part in the mantissa (|x * inv| <= 127 here, inv = 0 for an all-zero block).
                const float   r       = (in_x(j) * sc.inv + 12582912.0f) - 12582912.0f;
                const int32_t q       = std::clamp(static_cast<int32_t>(r), -127, 127);
                out.xq[p0 + (j - j0)] = static_cast<int8_t>(q);
                sum += q;
            }
            xs += block_finish(out, p0, j1 - j0, sc.d, sum);
        }
        out.xsum[g] = xs;
    }
}

// Vector kernels over one block of n <= k_gptq_act_block values padded with zeros to a multiple
// of 32 (np): max |x|, and the rounded codes written to xq[0, np) with their sum returned.
namespace q_avx512 {
#define GPTQ_QT __attribute__((target("avx512f,avx512bw")))
GPTQ_QT float amax(const float* x, int64_t np) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t i = 0; i < np; i += 16)
        m = _mm512_max_ps(_mm512_abs_ps(_mm512_loadu_ps(x + i)), m);  // NaN ignored, as std::max
    return _mm512_reduce_max_ps(m);
}
GPTQ_QT int32_t round_block(const float* x, int64_t np, float inv, int8_t* xq) {
    const __m512  vi = _mm512_set1_ps(inv);
    const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
    __m512i       s = _mm512_setzero_si512();
    for (int64_t i = 0; i < np; i += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(x + i), vi));  // RNE (MXCSR default)
        q         = _mm512_min_epi32(_mm512_max_epi32(q, lo), hi);
        s         = _mm512_add_epi32(s, q);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xq + i), _mm512_cvtepi32_epi8(q));
    }
    return _mm512_reduce_add_epi32(s);
}
#undef GPTQ_QT
}  // namespace q_avx512

namespace q_avx2 {
#define GPTQ_QT __attribute__((target("avx2")))
GPTQ_QT float amax(const float* x, int64_t np) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256       m    = _mm256_setzero_ps();
    for (int64_t i = 0; i < np; i += 8)
        m = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)), m);  // NaN ignored
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h        = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h        = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}
GPTQ_QT int32_t round_block(const float* x, int64_t np, float inv, int8_t* xq) {
    const __m256  vi = _mm256_set1_ps(inv);
    const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
    // packs interleave the 128-bit lanes: dwords (0, 4, 1, 5, 2, 6, 3, 7) restore row order.
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i       s     = _mm256_setzero_si256();
    for (int64_t i = 0; i < np; i += 32) {
        __m256i q[4];
        for (int t = 0; t < 4; ++t) {
            q[t] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * t), vi));  // RNE (MXCSR default)
            q[t] = _mm256_min_epi32(_mm256_max_epi32(q[t], lo), hi);
            s    = _mm256_add_epi32(s, q[t]);
        }
        const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + i), _mm256_permutevar8x32_epi32(b, order));
    }
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    h         = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(1, 0, 3, 2)));
    h         = _mm_add_epi32(h, _mm_shuffle_epi32(h, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(h);
}
#undef GPTQ_QT
}  // namespace q_avx2

// The reference's loop with each block's values copied (gathered through perm) into a zero-padded
// buffer and the two passes done by the vector kernels.
template <bool AVX512>
void quantize_vec(const float* x, const gptq_cpu_layout& w, const gptq_q8_row& out) {
    alignas(64) float buf[k_gptq_act_block];
    for (int64_t g = 0; g < w.n_groups; ++g) {
        const int64_t len = w.group_start[g + 1] - w.group_start[g];
        float         xs  = 0.0f;
        for (int64_t j0 = 0; j0 < len; j0 += k_gptq_act_block) {
            const int64_t n  = std::min(len, j0 + k_gptq_act_block) - j0;
            const int64_t np = (n + k_gptq_chunk - 1) / k_gptq_chunk * k_gptq_chunk;  // within the group's padding
            const int64_t i0 = w.group_start[g] + j0, p0 = w.pad_start[g] + j0;
            const float*  src = x + i0;
            if (w.perm || n != np) {
                for (int64_t j = 0; j < n; ++j) buf[j] = x[w.perm ? w.perm[i0 + j] : i0 + j];
                std::fill(buf + n, buf + np, 0.0f);
                src = buf;
            }
            const act_scale sc  = block_scale(AVX512 ? q_avx512::amax(src, np) : q_avx2::amax(src, np));
            const int32_t   sum = AVX512 ? q_avx512::round_block(src, np, sc.inv, out.xq + p0)
                                         : q_avx2::round_block(src, np, sc.inv, out.xq + p0);
            xs += block_finish(out, p0, n, sc.d, sum);
        }
        out.xsum[g] = xs;
    }
}

}  // namespace

void gptq_quantize_activations(const float* x, const gptq_cpu_layout& w, const gptq_q8_row& out, gptq_isa isa) {
    switch (resolve(isa)) {
        case gptq_isa::GPTQ_ISA_AVX512:
        case gptq_isa::GPTQ_ISA_VNNI:
            return quantize_vec<true>(x, w, out);
        case gptq_isa::GPTQ_ISA_AVX2:
            return quantize_vec<false>(x, w, out);
        default:
            return quantize_ref(x, w, out);
    }
}

void gptq_gemv_q8(const gptq_cpu_layout& w, const gptq_q8_row& xr, float* y, int64_t n0, int64_t n1, gptq_isa isa) {
    if (w.tiled) {
        switch (resolve(isa)) {
            case gptq_isa::GPTQ_ISA_AVX512:
                return vnni::gemm_q8_tiled_512(w, &xr, 1, y, 0, n0, n1);
            case gptq_isa::GPTQ_ISA_VNNI:
                return vnni::gemm_q8_tiled(w, &xr, 1, y, 0, n0, n1);
            case gptq_isa::GPTQ_ISA_AVX2:
                return avx2::gemm_q8_tiled(w, &xr, 1, y, 0, n0, n1);
            default:
                return gemv_q8_tiled_scalar(w, xr, y, n0, n1);
        }
    }
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

constexpr int64_t k_rows_per_task       = 64;  // output rows per work item of the F32 path
constexpr int64_t k_gemv_block          = 16;  // output rows per work item of the int8 GEMV (a multiple of 4)
constexpr int64_t k_round_parallel_rows = 16;  // from this many rows the activation rounding is split over the pool
static_assert(k_gemv_block % k_gptq_tile == 0, "work items must start on a tile of the tiled layout");

// Per-thread scratch, grown as needed and kept: no allocation per call once warm.
struct scratch {
    std::vector<float>       xs;    // [m, n_in] gathered activations (F32 path)
    std::vector<float>       wbuf;  // [k_rows_per_task, n_in] dequantized weights (F32 path)
    std::vector<int8_t>      xq;    // [m, k_pad]
    std::vector<float>       d;     // [m, k_pad / 32]
    std::vector<float>       xsum;  // [m, n_groups]
    std::vector<gptq_q8_row> rows;  // [n_jobs, m] views of xq/d/xsum (the int8 GEMM)
    std::vector<int>         src;   // linears_int8's bookkeeping, kept to avoid allocations
    std::vector<int64_t>     off_q, off_d, off_s, task0;
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
            const float s = w.scales[w.sz_index(n, g)], z = w.zeros[w.sz_index(n, g)];
            for (int64_t i = w.group_start[g]; i < w.group_start[g + 1]; ++i)
                out[i] = s * (static_cast<float>(gptq_code_at(w, n, w.pad_start[g] + i - w.group_start[g])) - z);
        }
    }
}

// xs[i, sorted row] = d_b * xq (the int8-rounded activations the GEMV multiplies, dequantized).
void gather_rounded(const float* x, const gptq_cpu_layout& w, int64_t m, float* xs, gptq_isa isa) {
    scratch&      s   = thread_scratch();
    const int64_t nch = w.k_pad / k_gptq_chunk;
    int8_t*       xq  = grow(s.xq, w.k_pad);
    float*        d   = grow(s.d, nch);
    float*        xsm = grow(s.xsum, w.n_groups);
    for (int64_t i = 0; i < m; ++i) {
        gptq_quantize_activations(x + i * w.n_in, w, {xq, d, xsm}, isa);
        for (int64_t g = 0; g < w.n_groups; ++g)
            for (int64_t r = w.group_start[g]; r < w.group_start[g + 1]; ++r) {
                const int64_t p    = w.pad_start[g] + (r - w.group_start[g]);
                xs[i * w.n_in + r] = d[p / k_gptq_chunk] * static_cast<float>(xq[p]);
            }
    }
}

void linear_f32(const float* x, const gptq_cpu_layout& w, float* y, int64_t m, thread_pool* pool, bool int8_act,
                gptq_isa isa) {
    float* xs = grow(thread_scratch().xs, m * w.n_in);
    if (int8_act)
        gather_rounded(x, w, m, xs, isa);
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

// The int8 products of several layers of one input (gptq_linears): each distinct activation
// layout's rows rounded once, then one parallel_for over every layer's blocks of k_gemv_block
// outputs (the layers' blocks one after another).
void linears_int8(const float* x, const gptq_linear_job* jobs, int n_jobs, int64_t m, thread_pool* pool, gptq_isa isa) {
    scratch& s = thread_scratch();
    // Rounded rows per job: its own, or those of the first earlier job with the same layout.
    std::vector<int>&     src   = s.src;
    std::vector<int64_t>& off_q = s.off_q;  // offsets into xq / d / xsum of each job's rows
    std::vector<int64_t>& off_d = s.off_d;
    std::vector<int64_t>& off_s = s.off_s;
    std::vector<int64_t>& task0 = s.task0;  // first task of each job; task0[n_jobs] = all tasks
    src.assign(static_cast<size_t>(n_jobs), -1);
    off_q.assign(static_cast<size_t>(n_jobs), 0);
    off_d.assign(static_cast<size_t>(n_jobs), 0);
    off_s.assign(static_cast<size_t>(n_jobs), 0);
    task0.assign(static_cast<size_t>(n_jobs + 1), 0);
    int64_t nq = 0, nd = 0, ns = 0;
    for (int j = 0; j < n_jobs; ++j) {
        const gptq_cpu_layout& w = *jobs[j].w;
        int                    o = j;
        for (int e = 0; e < j && o == j; ++e)
            if (src[size_t(e)] == e && gptq_same_activation_layout(*jobs[e].w, w)) o = e;
        src[size_t(j)] = o;
        if (o == j) {
            off_q[size_t(j)] = nq;
            off_d[size_t(j)] = nd;
            off_s[size_t(j)] = ns;
            nq += m * w.k_pad;
            nd += m * (w.k_pad / k_gptq_chunk);
            ns += m * w.n_groups;
        } else {
            off_q[size_t(j)] = off_q[size_t(o)];
            off_d[size_t(j)] = off_d[size_t(o)];
            off_s[size_t(j)] = off_s[size_t(o)];
        }
        task0[size_t(j + 1)] = task0[size_t(j)] + (w.n_out + k_gemv_block - 1) / k_gemv_block;
    }
    int8_t* xq  = grow(s.xq, nq);
    float*  d   = grow(s.d, nd);
    float*  xsm = grow(s.xsum, ns);
    auto    row = [&](int j, int64_t i) {
        const gptq_cpu_layout& w = *jobs[j].w;
        return gptq_q8_row{xq + off_q[size_t(j)] + i * w.k_pad, d + off_d[size_t(j)] + i * (w.k_pad / k_gptq_chunk),
                           xsm + off_s[size_t(j)] + i * w.n_groups};
    };
    // Each row is rounded on its own (the same bits whichever thread does it): prompts split their
    // rows over the pool (serial, 512 rows were ~1.5 % of a 1-thread prefill and more with threads),
    // decode rows stay with the caller (a dispatch costs more than rounding one row).
    auto round_rows = [&](int64_t i0, int64_t i1) {
        for (int j = 0; j < n_jobs; ++j)
            if (src[size_t(j)] == j)
                for (int64_t i = i0; i < i1; ++i)
                    gptq_quantize_activations(x + i * jobs[j].w->n_in, *jobs[j].w, row(j, i), isa);
    };
    if (pool && m >= k_round_parallel_rows)
        pool->parallel_for(m, round_rows);
    else
        round_rows(0, m);
    const gptq_isa            kernel = resolve(isa);
    const bool                gemm   = m >= 4 && kernel != gptq_isa::GPTQ_ISA_SCALAR;
    std::vector<gptq_q8_row>& rows   = s.rows;  // the int8 GEMM's views: [n_jobs, m]
    if (kernel != gptq_isa::GPTQ_ISA_SCALAR) {  // the tiled kernels take them at every m
        rows.resize(static_cast<size_t>(n_jobs * m));
        for (int j = 0; j < n_jobs; ++j)
            for (int64_t i = 0; i < m; ++i) rows[static_cast<size_t>(j * m + i)] = row(j, i);
    }
    auto task = [&](int64_t t0, int64_t t1) {
        for (int j = 0; j < n_jobs; ++j) {
            const int64_t a = std::max(t0, task0[size_t(j)]), b = std::min(t1, task0[size_t(j + 1)]);
            if (a >= b) continue;
            const gptq_cpu_layout& w  = *jobs[j].w;
            const int64_t          n0 = (a - task0[size_t(j)]) * k_gemv_block;
            const int64_t          n1 = std::min(w.n_out, (b - task0[size_t(j)]) * k_gemv_block);
            if (w.tiled && kernel == gptq_isa::GPTQ_ISA_AVX512)  // every row count, decode and prompt
                vnni::gemm_q8_tiled_512(w, rows.data() + j * m, m, jobs[j].y, w.n_out, n0, n1);
            else if (w.tiled && kernel == gptq_isa::GPTQ_ISA_VNNI)
                vnni::gemm_q8_tiled(w, rows.data() + j * m, m, jobs[j].y, w.n_out, n0, n1);
            else if (w.tiled && kernel == gptq_isa::GPTQ_ISA_AVX2)
                avx2::gemm_q8_tiled(w, rows.data() + j * m, m, jobs[j].y, w.n_out, n0, n1);
            else if (gemm && kernel == gptq_isa::GPTQ_ISA_AVX512)
                vnni::gemm_q8_512(w, rows.data() + j * m, m, jobs[j].y, w.n_out, n0, n1);
            else if (gemm && kernel == gptq_isa::GPTQ_ISA_VNNI)
                vnni::gemm_q8(w, rows.data() + j * m, m, jobs[j].y, w.n_out, n0, n1);
            else if (gemm)
                avx2::gemm_q8(w, rows.data() + j * m, m, jobs[j].y, w.n_out, n0, n1);
            else
                for (int64_t i = 0; i < m; ++i) gptq_gemv_q8(w, row(j, i), jobs[j].y + i * w.n_out, n0, n1, isa);
        }
    };
    const int64_t n_tasks = task0[size_t(n_jobs)];
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

bool gptq_same_activation_layout(const gptq_cpu_layout& a, const gptq_cpu_layout& b) {
    if (a.n_in != b.n_in || a.n_groups != b.n_groups || a.k_pad != b.k_pad ||
        (a.perm == nullptr) != (b.perm == nullptr))
        return false;
    const size_t ng = static_cast<size_t>(a.n_groups + 1);
    return std::equal(a.group_start, a.group_start + ng, b.group_start) &&
           std::equal(a.pad_start, a.pad_start + ng, b.pad_start) &&
           (!a.perm || std::equal(a.perm, a.perm + a.n_in, b.perm));
}

void gptq_linears(const float* x, const gptq_linear_job* jobs, int n_jobs, int64_t m, thread_pool* pool, bool int8_act,
                  gptq_isa isa) {
    if (m <= 0) return;
    // int8 activations: decode rows through the GEMV; prompt rows through the int8 GEMM of the same
    // instruction set (AVX512-VNNI, or AVX2 maddubs; bit for bit its GEMV's result per row), with
    // the scalar kernel in F32 on the rounded activations (dequantize + sgemm).
    if (int8_act && (m < 4 || resolve(isa) != gptq_isa::GPTQ_ISA_SCALAR))
        linears_int8(x, jobs, n_jobs, m, pool, isa);
    else
        for (int j = 0; j < n_jobs; ++j)
            if (jobs[j].w->n_out > 0) linear_f32(x, *jobs[j].w, jobs[j].y, m, pool, int8_act, isa);
    for (int j = 0; j < n_jobs; ++j) {
        const gptq_linear_job& jb = jobs[j];
        if (jb.bias)
            for (int64_t i = 0; i < m; ++i)
                for (int64_t n = 0; n < jb.w->n_out; ++n) jb.y[i * jb.w->n_out + n] += jb.bias[n];
    }
}

void gptq_linear(const float* x, const gptq_cpu_layout& w, const float* bias, float* y, int64_t m, thread_pool* pool,
                 bool int8_act, gptq_isa isa) {
    const gptq_linear_job job{&w, bias, y};
    gptq_linears(x, &job, 1, m, pool, int8_act, isa);
}

}  // namespace gptq::cpu
