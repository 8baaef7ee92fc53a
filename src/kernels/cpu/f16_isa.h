// The instruction set of the kernels that read F16 data (F16 weights: linear_f16.cpp; an F16 KV
// cache: attention.cpp), picked once at run time: AVX-512F (its vcvtph2ps on 512-bit registers),
// AVX2 + FMA + F16C, or portable C++ converting with core/dtype.h.
#pragma once

#include <cstdint>

namespace gptq::cpu {

enum class f16_isa { PORTABLE, AVX2, AVX512 };

f16_isa     f16_best_isa();                // the best set this CPU runs (cached)
bool        f16_isa_supported(f16_isa i);  // whether this CPU runs i (tests run every supported one)
const char* f16_isa_name(f16_isa i);       // "portable", "avx2", "avx512"

// dst[n] = src[n] F16 -> F32 (exact), with F16C unless isa is PORTABLE.
void f16_convert(f16_isa isa, const uint16_t* src, float* dst, int64_t n);

}  // namespace gptq::cpu
