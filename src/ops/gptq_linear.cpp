#include "ops/gptq_linear.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"
#include "kernels/cpu/gptq_linear.h"
#include "kernels/cpu/linear.h"

namespace gptq {

gptq_packed_linear gptq_packed_linear::from_unpacked(const uint8_t* codes_orig, const float* scales,
                                                     const int32_t* zeros, const int32_t* g_idx, int64_t n_out,
                                                     int64_t n_in, int64_t n_groups) {
    gptq_packed_linear p;
    p.n_in     = n_in;
    p.n_out    = n_out;
    p.n_groups = n_groups;
    // Stable counting sort of the input rows by group.
    std::vector<int32_t> order(static_cast<size_t>(n_in));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return g_idx[a] < g_idx[b]; });
    p.group_start.assign(static_cast<size_t>(n_groups + 1), 0);
    for (int64_t k = 0; k < n_in; ++k) {
        GPTQ_ASSERT(g_idx[k] >= 0 && g_idx[k] < n_groups);
        p.group_start[static_cast<size_t>(g_idx[k] + 1)]++;
    }
    for (int64_t g = 0; g < n_groups; ++g)
        p.group_start[static_cast<size_t>(g + 1)] += p.group_start[static_cast<size_t>(g)];
    bool identity = true;
    for (int64_t i = 0; i < n_in; ++i) identity &= order[static_cast<size_t>(i)] == i;
    if (!identity) p.perm = order;
    p.codes.resize(static_cast<size_t>(n_in * n_out));
    for (int64_t i = 0; i < n_in; ++i) {
        const int64_t k = order[static_cast<size_t>(i)];
        for (int64_t n = 0; n < n_out; ++n) p.codes[static_cast<size_t>(i * n_out + n)] = codes_orig[n * n_in + k];
    }
    p.scales.assign(scales, scales + n_groups * n_out);
    p.zeros.resize(static_cast<size_t>(n_groups * n_out));
    for (size_t i = 0; i < p.zeros.size(); ++i) p.zeros[i] = static_cast<float>(zeros[i]);
    return p;
}

void gptq_packed_linear::dequantize(float* w) const {
    for (int64_t g = 0; g < n_groups; ++g)
        for (int32_t i = group_start[static_cast<size_t>(g)]; i < group_start[static_cast<size_t>(g + 1)]; ++i) {
            const int64_t k = perm.empty() ? i : perm[static_cast<size_t>(i)];
            for (int64_t n = 0; n < n_out; ++n)
                w[n * n_in + k] = scales[static_cast<size_t>(g * n_out + n)] *
                                  (static_cast<float>(codes[static_cast<size_t>(i * n_out + n)]) -
                                   zeros[static_cast<size_t>(g * n_out + n)]);
        }
}

size_t gptq_packed_linear::bytes() const {
    return codes.size() + (scales.size() + zeros.size()) * 4 + (group_start.size() + perm.size()) * 4;
}

void op_gptq_linear(const ops_context& ctx, const float* x, const gptq_packed_linear& w, const float* bias, float* y,
                    int64_t m) {
    cpu::gptq_cpu_layout l;
    l.n_in        = w.n_in;
    l.n_out       = w.n_out;
    l.n_groups    = w.n_groups;
    l.codes       = w.codes.data();
    l.scales      = w.scales.data();
    l.zeros       = w.zeros.data();
    l.group_start = w.group_start.data();
    l.perm        = w.perm.empty() ? nullptr : w.perm.data();
    cpu::blas_init_single_threaded();
    if (ctx.reference)
        cpu::gptq_linear_portable(x, l, bias, y, m, ctx.pool);
    else
        cpu::gptq_linear(x, l, bias, y, m, ctx.pool);
}

}  // namespace gptq
