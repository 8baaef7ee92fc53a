#include "core/dtype.h"

#include <cstring>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#endif

namespace gptq {

namespace {

struct dtype_info {
    dtype            type;
    std::string_view name;
    size_t           size;
    bool             is_float;
};

constexpr dtype_info k_dtypes[] = {
    {dtype::DTYPE_F32, "F32", 4, true},         {dtype::DTYPE_F16, "F16", 2, true},
    {dtype::DTYPE_BF16, "BF16", 2, true},       {dtype::DTYPE_I32, "I32", 4, false},
    {dtype::DTYPE_I16, "I16", 2, false},        {dtype::DTYPE_I8, "I8", 1, false},
    {dtype::DTYPE_U8, "U8", 1, false},          {dtype::DTYPE_BOOL, "BOOL", 1, false},
    {dtype::DTYPE_F64, "F64", 8, true},         {dtype::DTYPE_I64, "I64", 8, false},
    {dtype::DTYPE_U16, "U16", 2, false},        {dtype::DTYPE_U32, "U32", 4, false},
    {dtype::DTYPE_U64, "U64", 8, false},        {dtype::DTYPE_F8_E4M3, "F8_E4M3", 1, true},
    {dtype::DTYPE_F8_E5M2, "F8_E5M2", 1, true},
};
static_assert(sizeof(k_dtypes) / sizeof(k_dtypes[0]) == static_cast<size_t>(dtype::DTYPE_COUNT));

uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}
float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

}  // namespace

size_t dtype_size(dtype t) {
    return k_dtypes[static_cast<size_t>(t)].size;
}
std::string_view dtype_name(dtype t) {
    return k_dtypes[static_cast<size_t>(t)].name;
}
bool dtype_is_float(dtype t) {
    return k_dtypes[static_cast<size_t>(t)].is_float;
}

bool dtype_from_name(std::string_view name, dtype* out) {
    for (const auto& d : k_dtypes) {
        if (d.name == name) {
            *out = d.type;
            return true;
        }
    }
    return false;
}

float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp  = (h >> 10) & 0x1fu;
    uint32_t       man  = h & 0x3ffu;
    if (exp == 0x1f) return float_of(sign | 0x7f800000u | (man << 13));  // Inf / NaN (payload kept)
    if (exp != 0) return float_of(sign | ((exp + 112) << 23) | (man << 13));
    if (man == 0) return float_of(sign);  // +-0
    // Subnormal: value = man * 2^-24; normalise into an F32 (always representable exactly).
    int e = -1;
    do {
        ++e;
        man <<= 1;
    } while ((man & 0x400u) == 0);
    return float_of(sign | static_cast<uint32_t>(112 - e) << 23 | ((man & 0x3ffu) << 13));
}

uint16_t f32_to_f16(float f) {
    const uint32_t u    = bits_of(f);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t a    = u & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN, quiet
    if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds to >= 65520 -> Inf
    if (a >= 0x38800000u) {                                              // normal F16 range (>= 2^-14)
        const uint32_t mant = a & 0x7fffffu;
        const uint32_t exp  = (a >> 23) - 112;
        uint32_t       h    = (exp << 10) | (mant >> 13);
        const uint32_t rest = mant & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // carry into exponent is correct
        return static_cast<uint16_t>(sign | h);
    }
    if (a < 0x33000000u) return sign;  // < 2^-25: rounds to zero (2^-25 exactly is a tie -> even 0)
    // Subnormal F16: value / 2^-24 rounded to nearest even integer.
    const uint32_t exp   = a >> 23;  // 102..112
    const uint32_t mant  = (a & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126 - exp;  // 14..24: mant * 2^(exp-150) / 2^-24 = mant >> (126-exp)
    uint32_t       h     = mant >> shift;
    const uint32_t rest  = mant & ((1u << shift) - 1);
    const uint32_t half  = 1u << (shift - 1);
    if (rest > half || (rest == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
}

float bf16_to_f32(uint16_t b) {
    return float_of(static_cast<uint32_t>(b) << 16);
}

uint16_t f32_to_bf16(float f) {
    const uint32_t u = bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x0040u);  // quiet NaN
    const uint32_t lsb = (u >> 16) & 1u;
    return static_cast<uint16_t>((u + 0x7fffu + lsb) >> 16);
}

void f16_to_f32_row(const uint16_t* src, float* dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(src[i]);
}
namespace {
#if defined(__x86_64__)
// vcvtps2ph with round-to-nearest-even: the same bits as f32_to_f16 for every input (overflow to
// Inf, subnormals, NaN quietened with its top payload bits; MXCSR's DAZ is off in this process).
__attribute__((target("avx,f16c"))) void f32_to_f16_f16c(const float* src, uint16_t* dst, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}
bool cpu_has_f16c() {
    unsigned a = 0, b = 0, c = 0, d = 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0 && (c & bit_AVX) != 0;
}
#endif
}  // namespace

void f32_to_f16_row(const float* src, uint16_t* dst, size_t n) {
#if defined(__x86_64__)
    static const bool f16c = cpu_has_f16c();
    if (f16c) return f32_to_f16_f16c(src, dst, n);
#endif
    f32_to_f16_row_portable(src, dst, n);
}

void f32_to_f16_row_portable(const float* src, uint16_t* dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = f32_to_f16(src[i]);
}
void bf16_to_f32_row(const uint16_t* src, float* dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(src[i]);
}
void f32_to_bf16_row(const float* src, uint16_t* dst, size_t n) {
    for (size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

bool to_f32_row(dtype src_type, const void* src, float* dst, size_t n) {
    switch (src_type) {
        case dtype::DTYPE_F32:
            std::memcpy(dst, src, n * sizeof(float));
            return true;
        case dtype::DTYPE_F16:
            f16_to_f32_row(static_cast<const uint16_t*>(src), dst, n);
            return true;
        case dtype::DTYPE_BF16:
            bf16_to_f32_row(static_cast<const uint16_t*>(src), dst, n);
            return true;
        default:
            return false;
    }
}

}  // namespace gptq
