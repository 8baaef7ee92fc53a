// Element types and exact scalar conversions between F32 and the 16-bit float formats.
//
// F16 is IEEE 754 binary16, BF16 the upper half of binary32. Conversions to F32 are exact.
// Conversions from F32 round to nearest, ties to even; overflow goes to +-Inf; F16 keeps
// subnormals; NaN stays NaN (quieted, sign kept).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace gptq {

enum class dtype : uint8_t {
    DTYPE_F32,
    DTYPE_F16,
    DTYPE_BF16,
    DTYPE_I32,
    DTYPE_I16,
    DTYPE_I8,
    DTYPE_U8,
    DTYPE_BOOL,
    // Further safetensors element types: readable and writable as bytes, no arithmetic on them.
    DTYPE_F64,
    DTYPE_I64,
    DTYPE_U16,
    DTYPE_U32,
    DTYPE_U64,
    DTYPE_F8_E4M3,
    DTYPE_F8_E5M2,
    DTYPE_COUNT,
};

size_t           dtype_size(dtype t);  // bytes per element
std::string_view dtype_name(dtype t);  // safetensors spelling: "F32", "BF16", "BOOL", ...
bool             dtype_from_name(std::string_view name, dtype* out);  // false when unknown
bool             dtype_is_float(dtype t);

// Scalar conversions (exact in the directions documented above).
float    f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);
float    bf16_to_f32(uint16_t b);
uint16_t f32_to_bf16(float f);

// Row conversions. `n` elements, no aliasing between src and dst.
void f16_to_f32_row(const uint16_t* src, float* dst, size_t n);
void f32_to_f16_row(const float* src, uint16_t* dst, size_t n);           // F16C where the CPU has it (the same bits)
void f32_to_f16_row_portable(const float* src, uint16_t* dst, size_t n);  // f32_to_f16 per element
void bf16_to_f32_row(const uint16_t* src, float* dst, size_t n);
void f32_to_bf16_row(const float* src, uint16_t* dst, size_t n);

// Convert `n` elements of a float type (F32/F16/BF16) to F32. Returns false for other dtypes.
bool to_f32_row(dtype src_type, const void* src, float* dst, size_t n);

}  // namespace gptq
