// e^x on 16 (AVX-512F) or 8 (AVX2 + FMA) floats at once, Cephes' expf: the input clamped to
// [k_exp_lo, k_exp_hi] (e^x stays a normal float), x = n ln2 + r with ln2 = k_ln2_hi + k_ln2_lo
// (|r| <= ln2 / 2), e^r = 1 + r + r^2 P(r), times 2^n. A few ulps from the correctly rounded value.
// Used where the generation path trades libm's expf for speed: the decode and F16-cache prompt
// softmax (attention.cpp) and SwiGLU's SiLU (activation.cpp silu_mul_fast). Callers compile with
// a target that includes the function's.
#pragma once

#include <immintrin.h>

namespace gptq::cpu {

namespace vec_exp_detail {
constexpr float k_exp_lo = -87.3365447505531f, k_exp_hi = 88.3762626647949f;
constexpr float k_log2e = 1.44269504088896341f, k_ln2_hi = 0.693359375f, k_ln2_lo = -2.12194440e-4f;
constexpr float k_exp_p[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
}  // namespace vec_exp_detail

__attribute__((target("avx512f"))) inline __m512 vec_exp512(__m512 x) {
    using namespace vec_exp_detail;
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(k_exp_lo)), _mm512_set1_ps(k_exp_hi));
    const __m512 n =
        _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(k_log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(k_ln2_hi), x);
    r        = _mm512_fnmadd_ps(n, _mm512_set1_ps(k_ln2_lo), r);
    __m512 p = _mm512_set1_ps(k_exp_p[0]);
    for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(k_exp_p[i]));
    const __m512 y = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

// As vec_exp512; 2^n through the exponent bits (n in [-126, 127]).
__attribute__((target("avx2,fma"))) inline __m256 vec_exp256(__m256 x) {
    using namespace vec_exp_detail;
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(k_exp_lo)), _mm256_set1_ps(k_exp_hi));
    const __m256 n =
        _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(k_log2e)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(k_ln2_hi), x);
    r        = _mm256_fnmadd_ps(n, _mm256_set1_ps(k_ln2_lo), r);
    __m256 p = _mm256_set1_ps(k_exp_p[0]);
    for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(k_exp_p[i]));
    const __m256  y  = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e2));
}

}  // namespace gptq::cpu
