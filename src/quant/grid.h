// The quantization grid of one row slice: scale and integer zero point (format.md 2.3).
//
// For bits b (maxq = 2^b - 1): the range [min(x, 0), max(x, 0)] is mapped onto 0..maxq.
// sym: the range is made symmetric (xmin = -xmax when xmin < 0) and zero = 2^(b-1);
// asym: zero = round(-xmin / scale). An all-zero slice uses [-1, 1]. q = clamp(round(x / s) + z,
// 0, maxq) with round half to even; dequantized value s * (q - z).
// Scales are rounded to F16 before use, so the checkpoint's F16 scales are exactly the scales the
// GPTQ error feedback assumed (format.md 2.4 recommends it; AutoGPTQ re-derives codes instead).
#pragma once

#include <cmath>
#include <cstdint>

namespace gptq {

struct grid_options {
    int  bits     = 4;
    bool sym      = true;
    bool mse      = false;  // search a shrunk clipping range minimising sum |q - x|^2.4
    int  zero_min = 0;      // smallest zero point allowed (1 for asym in the v1 format, see docs)
};

struct grid_params {
    float scale = 1.0f;
    int   zero  = 0;
};

inline int grid_maxq(int bits) {
    return (1 << bits) - 1;
}

// NaN maps to code 0 (converting NaN to int is undefined); callers reject non-finite inputs first.
inline int grid_quantize(float x, grid_params p, int maxq) {
    const float v = std::nearbyint(x / p.scale) + static_cast<float>(p.zero);
    return !(v >= 0.0f) ? 0 : (v > static_cast<float>(maxq) ? maxq : static_cast<int>(v));
}

inline float grid_dequantize(int q, grid_params p) {
    return p.scale * static_cast<float>(q - p.zero);
}

// Parameters for the values x[0], x[stride], ..., x[(n-1) * stride] (one row's slice).
grid_params grid_find_params(const float* x, int64_t n, int64_t stride, const grid_options& opt);

// The clipping range p * [xmin, xmax] (p = 1, 0.99, ..., 0.21, as the --mse grid) that minimises
// sum_i wt[i] (Q(x[i]) - x[i])^2: with wt = diag(H) of the columns, the diagonal part of the
// Hessian-weighted error GPTQ minimises (--mse-hessian). opt.mse is ignored. Contiguous x, wt.
grid_params grid_find_params_weighted(const float* x, const float* wt, int64_t n, const grid_options& opt);

}  // namespace gptq
