// A GPTQ-quantized linear layer kept quantized in memory (nibbles for bits <= 4, bytes for 8; rows
// sorted by group and padded per group; codes in tiles of 16 outputs for bits <= 4, per output row
// for bits 8) and applied with dequantization on
// the fly (kernels/cpu/gptq_linear.h has the layout and the two products).
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "ops/ops.h"

namespace gptq::cpu {
struct gptq_cpu_layout;  // kernels/cpu/gptq_linear.h
}

namespace gptq {

struct gptq_packed_linear {
    int64_t n_in = 0, n_out = 0, n_groups = 0;
    int     bits  = 4;
    int64_t k_pad = 0;      // sorted input rows padded per group to multiples of 32
    bool    tiled = false;  // the tiled layout (kernels/cpu/gptq_linear.h), else rows
    std::vector<uint8_t>
                       codes;   // tiled: [n_tiles, k_pad / 8, 64]; rows: [n_out, k_pad / 2] (bits <= 4), [n_out, k_pad]
    std::vector<float> scales;  // tiled: [n_tiles, n_groups, 16]; rows: [n_out, n_groups]
    std::vector<float> zeros;   // as scales
    std::vector<int32_t> group_start;  // [n_groups + 1]
    std::vector<int32_t> pad_start;    // [n_groups + 1]
    std::vector<int32_t> perm;         // [n_in] sorted row -> original input index; empty = identity

    // From the unpacked checkpoint form: codes_orig [n_out, n_in] in [0, 2^bits), scales/zeros
    // [n_groups, n_out], g_idx [n_in] with values in [0, n_groups) (the caller has checked them).
    // tiled: the tiled layout for bits <= 4 (bits 8 always get rows); false: the rows layout (the
    // reference kernels' layout, for tests and benchmarks).
    static gptq_packed_linear from_unpacked(const uint8_t* codes_orig, const float* scales, const int32_t* zeros,
                                            const int32_t* g_idx, int64_t n_out, int64_t n_in, int64_t n_groups,
                                            int bits, bool tiled = true);
    cpu::gptq_cpu_layout      layout() const;  // the kernels' view (pointers into this object)
    // W [n_out, n_in] in F32, original column order.
    void dequantize(float* w) const;
    // Rows [n0, n1) of W into w [n1 - n0, n_in], original column order (the backward's blocks).
    void   dequantize_rows(int64_t n0, int64_t n1, float* w) const;
    size_t bytes() const;  // memory held
};

// y[m, n_out] = x[m, n_in] W^T + bias (bias may be nullptr). y must not alias x. With
// ctx.int8_activations, rows of a decode step (m < 4) use the int8-activation GEMV.
void op_gptq_linear(const ops_context& ctx, const float* x, const gptq_packed_linear& w, const float* bias, float* y,
                    int64_t m);

// Several linears of the same input x [m, n_in] (q/k/v, gate/up): ys[j] = x W_j^T + biases[j], each
// exactly op_gptq_linear's result for it alone; with int8 activations x is rounded once per
// activation layout and the products share one pool dispatch (kernels/cpu/gptq_linear.h).
struct gptq_linear_out {
    const gptq_packed_linear* w    = nullptr;
    const float*              bias = nullptr;
    float*                    y    = nullptr;
};
void op_gptq_linears(const ops_context& ctx, const float* x, std::span<const gptq_linear_out> outs, int64_t m);

}  // namespace gptq
