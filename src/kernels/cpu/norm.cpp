#include "kernels/cpu/norm.h"

#include <cmath>

#include "core/thread_pool.h"

namespace gptq::cpu {

void rms_norm_ref(const float* x, const float* w, float* y, int64_t n_rows, int64_t dim, float eps) {
    for (int64_t r = 0; r < n_rows; ++r) {
        const float* xr = x + r * dim;
        double       ss = 0.0;
        for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
        const float inv = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(dim) + eps));
        float*      yr  = y + r * dim;
        for (int64_t i = 0; i < dim; ++i) yr[i] = w[i] * (xr[i] * inv);
    }
}

namespace {
void rms_norm_rows(const float* x, const float* w, float* y, int64_t r0, int64_t r1, int64_t dim, float eps) {
    for (int64_t r = r0; r < r1; ++r) {
        const float* xr     = x + r * dim;
        float        acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        int64_t      i      = 0;
        for (; i + 8 <= dim; i += 8)
            for (int l = 0; l < 8; ++l) acc[l] += xr[i + l] * xr[i + l];
        float ss = 0.0f;
        for (; i < dim; ++i) ss += xr[i] * xr[i];
        ss += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        const float inv = 1.0f / std::sqrt(ss / static_cast<float>(dim) + eps);
        float*      yr  = y + r * dim;
        for (int64_t j = 0; j < dim; ++j) yr[j] = w[j] * (xr[j] * inv);
    }
}
}  // namespace

void rms_norm(const float* x, const float* w, float* y, int64_t n_rows, int64_t dim, float eps, thread_pool* pool) {
    if (!pool || n_rows < 4) {
        rms_norm_rows(x, w, y, 0, n_rows, dim, eps);
        return;
    }
    pool->parallel_for(n_rows, [&](int64_t r0, int64_t r1) { rms_norm_rows(x, w, y, r0, r1, dim, eps); });
}

}  // namespace gptq::cpu
