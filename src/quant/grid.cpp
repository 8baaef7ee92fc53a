#include "quant/grid.h"

#include <algorithm>

#include "core/dtype.h"

namespace gptq {

namespace {

float round_to_f16(float s) {
    float r = f16_to_f32(f32_to_f16(s));
    // A scale that underflows F16 would make every code saturate; keep the smallest normal instead.
    if (!(r > 0.0f)) r = f16_to_f32(0x0400);
    if (std::isinf(r)) r = f16_to_f32(0x7bff);
    return r;
}

grid_params params_for_range(float xmin, float xmax, const grid_options& opt, int maxq) {
    grid_params p;
    p.scale = round_to_f16((xmax - xmin) / static_cast<float>(maxq));
    if (opt.sym) {
        p.zero = (maxq + 1) / 2;
    } else {
        const float z = std::nearbyint(-xmin / p.scale);
        p.zero        = static_cast<int>(std::clamp(z, static_cast<float>(opt.zero_min), static_cast<float>(maxq)));
    }
    return p;
}

}  // namespace

grid_params grid_find_params(const float* x, int64_t n, int64_t stride, const grid_options& opt) {
    const int maxq = grid_maxq(opt.bits);
    float     xmin = 0.0f, xmax = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        const float v = x[i * stride];
        xmin          = std::min(xmin, v);
        xmax          = std::max(xmax, v);
    }
    if (opt.sym) {
        xmax = std::max(std::fabs(xmin), xmax);
        if (xmin < 0.0f) xmin = -xmax;
    }
    if (xmin == 0.0f && xmax == 0.0f) {
        xmin = -1.0f;
        xmax = 1.0f;
    }
    grid_params best = params_for_range(xmin, xmax, opt, maxq);
    if (!opt.mse) return best;

    // Grid search over shrunk ranges p * [xmin, xmax], p = 1, 0.99, ..., 0.21 (grid 100, maxshrink
    // 0.8, norm 2.4 as in the reference quantizer); keep the smallest sum |Q(x) - x|^2.4.
    constexpr int    grid      = 100;
    constexpr double maxshrink = 0.8, norm = 2.4;
    double           best_err = INFINITY;
    for (int i = 0; i < static_cast<int>(maxshrink * grid); ++i) {
        const float       s    = 1.0f - static_cast<float>(i) / grid;
        const grid_params cand = params_for_range(s * xmin, s * xmax, opt, maxq);
        double            err  = 0.0;
        for (int64_t j = 0; j < n; ++j) {
            const float v = x[j * stride];
            err += std::pow(std::fabs(grid_dequantize(grid_quantize(v, cand, maxq), cand) - v), norm);
        }
        if (err < best_err) {
            best_err = err;
            best     = cand;
        }
    }
    return best;
}

grid_params grid_find_params_weighted(const float* x, const float* wt, int64_t n, const grid_options& opt) {
    grid_options plain = opt;
    plain.mse          = false;
    const int maxq     = grid_maxq(opt.bits);
    float     xmin = 0.0f, xmax = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
        xmin = std::min(xmin, x[i]);
        xmax = std::max(xmax, x[i]);
    }
    if (opt.sym) {
        xmax = std::max(std::fabs(xmin), xmax);
        if (xmin < 0.0f) xmin = -xmax;
    }
    if (xmin == 0.0f && xmax == 0.0f) return grid_find_params(x, n, 1, plain);
    grid_params best     = params_for_range(xmin, xmax, plain, maxq);
    double      best_err = INFINITY;
    for (int i = 0; i < 80; ++i) {
        const float       s    = 1.0f - static_cast<float>(i) / 100;
        const grid_params cand = params_for_range(s * xmin, s * xmax, plain, maxq);
        double            err  = 0.0;
        for (int64_t j = 0; j < n; ++j) {
            const double d = grid_dequantize(grid_quantize(x[j], cand, maxq), cand) - x[j];
            err += static_cast<double>(wt[j]) * d * d;
        }
        if (err < best_err) {
            best_err = err;
            best     = cand;
        }
    }
    return best;
}

}  // namespace gptq
