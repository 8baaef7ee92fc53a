// GPTQ linear layers on the CPU with dequantization on the fly: y = x W^T + b where
// W[n, k] = scale[g(k), n] * (code[k, n] - zero[g(k), n]).
//
// Layout used here (built once at load by ops/gptq_linear.cpp from a checkpoint's tensors):
// the input rows k are sorted by group (stable, so act-order checkpoints get contiguous groups and
// the activations are gathered through `perm`), codes are one byte each, [K, N] row-major, and
// scales and zeros are F32 [G, N]. Within a group the sum factorises:
//   y[n] = sum_g scale[g, n] * (sum_{k in g} x[k] q[k, n] - zero[g, n] * sum_{k in g} x[k]),
// so the inner loop is a multiply-add of one x value against a row of codes, contiguous in n.
#pragma once

#include <cstdint>

namespace gptq {
class thread_pool;
}

namespace gptq::cpu {

struct gptq_cpu_layout {
    int64_t        n_in = 0, n_out = 0, n_groups = 0;
    const uint8_t* codes       = nullptr;  // [n_in, n_out] codes of the sorted input rows
    const float*   scales      = nullptr;  // [n_groups, n_out]
    const float*   zeros       = nullptr;  // [n_groups, n_out]
    const int32_t* group_start = nullptr;  // [n_groups + 1] first sorted row of each group
    const int32_t* perm        = nullptr;  // [n_in] sorted row i reads x[perm[i]]; nullptr = identity
};

// Plain reference: dequantize each weight from the ORIGINAL layout (codes_orig [n_out, n_in],
// g_idx [n_in]) and accumulate in double. x: [m, n_in]; y: [m, n_out]; bias [n_out] or nullptr.
void gptq_linear_ref(const float* x, const uint8_t* codes_orig, const float* scales, const float* zeros,
                     const int32_t* g_idx, const float* bias, float* y, int64_t m, int64_t n_out, int64_t n_in);

// The factorised kernel over the sorted layout: AVX2+FMA when the CPU has it (checked at run
// time), portable C++ otherwise; for m >= 4 it dequantizes slices of W and uses sgemm.
void gptq_linear(const float* x, const gptq_cpu_layout& w, const float* bias, float* y, int64_t m, thread_pool* pool);

// The portable path only (tests compare it with the AVX2 one).
void gptq_linear_portable(const float* x, const gptq_cpu_layout& w, const float* bias, float* y, int64_t m,
                          thread_pool* pool);

}  // namespace gptq::cpu
