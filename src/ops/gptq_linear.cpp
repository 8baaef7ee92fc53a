#include "ops/gptq_linear.h"

#include <algorithm>
#include <numeric>

#include "core/error.h"
#include "kernels/cpu/gptq_linear.h"
#include "kernels/cpu/linear.h"

namespace gptq {

gptq_packed_linear gptq_packed_linear::from_unpacked(const uint8_t* codes_orig, const float* scales,
                                                     const int32_t* zeros, const int32_t* g_idx, int64_t n_out,
                                                     int64_t n_in, int64_t n_groups, int bits, bool tiled) {
    GPTQ_ASSERT(bits == 2 || bits == 3 || bits == 4 || bits == 8);
    gptq_packed_linear p;
    p.n_in     = n_in;
    p.n_out    = n_out;
    p.n_groups = n_groups;
    p.bits     = bits;
    // Stable counting sort of the input rows by group (format.md 1.5: act-order groups are not
    // contiguous in k; sorted, each is a contiguous run of rows).
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
    p.pad_start.assign(static_cast<size_t>(n_groups + 1), 0);
    for (int64_t g = 0; g < n_groups; ++g) {
        const int64_t len          = p.group_start[size_t(g + 1)] - p.group_start[size_t(g)];
        const int64_t ch           = cpu::k_gptq_chunk;
        p.pad_start[size_t(g + 1)] = static_cast<int32_t>(p.pad_start[size_t(g)] + (len + ch - 1) / ch * ch);
    }
    p.k_pad       = p.pad_start[static_cast<size_t>(n_groups)];
    bool identity = true;
    for (int64_t i = 0; i < n_in; ++i) identity &= order[static_cast<size_t>(i)] == i;
    if (!identity) p.perm = order;
    p.tiled                           = tiled && bits != 8;
    const cpu::gptq_cpu_layout l      = p.layout();  // the index arithmetic only (no pointers yet)
    const int64_t              n_rows = p.tiled ? l.n_tiles() * cpu::k_gptq_tile : n_out;  // outputs incl. padding
    p.codes.assign(static_cast<size_t>(p.tiled ? n_rows * p.k_pad / 2 : n_out * l.row_bytes()), 0);
    for (int64_t n = 0; n < n_out; ++n)
        for (int64_t g = 0; g < n_groups; ++g)
            for (int64_t i = p.group_start[size_t(g)]; i < p.group_start[size_t(g + 1)]; ++i) {
                const uint8_t c   = codes_orig[n * n_in + order[static_cast<size_t>(i)]];
                const int64_t pos = p.pad_start[size_t(g)] + (i - p.group_start[size_t(g)]);
                if (p.tiled) {  // step of 8 rows: byte 4 o + j, rows j (low nibble) and 4 + j (high)
                    const int64_t step = (n / cpu::k_gptq_tile) * (p.k_pad / 8) + pos / 8;
                    p.codes[size_t(step * 64 + (n % cpu::k_gptq_tile) * 4 + pos % 4)] |=
                        static_cast<uint8_t>(pos % 8 < 4 ? c : c << 4);
                } else if (bits == 8) {
                    p.codes[size_t(n * l.row_bytes() + pos)] = c;
                } else {  // chunk of 32 in 16 bytes: rows 0..15 low nibbles, 16..31 high (kernels/cpu/gptq_linear.h)
                    p.codes[size_t(n * l.row_bytes() + (pos / 32) * 16 + pos % 16)] |=
                        static_cast<uint8_t>((pos % 32) < 16 ? c : c << 4);
                }
            }
    p.scales.assign(static_cast<size_t>(n_groups * n_rows), 0.0f);  // padding outputs: 0
    p.zeros.assign(p.scales.size(), 0.0f);
    for (int64_t g = 0; g < n_groups; ++g)
        for (int64_t n = 0; n < n_out; ++n) {
            p.scales[static_cast<size_t>(l.sz_index(n, g))] = scales[g * n_out + n];
            p.zeros[static_cast<size_t>(l.sz_index(n, g))]  = static_cast<float>(zeros[g * n_out + n]);
        }
    return p;
}

cpu::gptq_cpu_layout gptq_packed_linear::layout() const {
    cpu::gptq_cpu_layout l;
    l.n_in        = n_in;
    l.n_out       = n_out;
    l.n_groups    = n_groups;
    l.bits        = bits;
    l.k_pad       = k_pad;
    l.codes       = codes.data();
    l.scales      = scales.data();
    l.zeros       = zeros.data();
    l.group_start = group_start.data();
    l.pad_start   = pad_start.data();
    l.perm        = perm.empty() ? nullptr : perm.data();
    l.tiled       = tiled;
    return l;
}

void gptq_packed_linear::dequantize(float* w) const {
    dequantize_rows(0, n_out, w);
}

void gptq_packed_linear::dequantize_rows(int64_t n0, int64_t n1, float* w) const {
    GPTQ_ASSERT(0 <= n0 && n0 <= n1 && n1 <= n_out);
    const cpu::gptq_cpu_layout l = layout();
    for (int64_t n = n0; n < n1; ++n)
        for (int64_t g = 0; g < n_groups; ++g) {
            const float s = scales[static_cast<size_t>(l.sz_index(n, g))];
            const float z = zeros[static_cast<size_t>(l.sz_index(n, g))];
            for (int32_t i = group_start[static_cast<size_t>(g)]; i < group_start[static_cast<size_t>(g + 1)]; ++i) {
                const int64_t k        = perm.empty() ? i : perm[static_cast<size_t>(i)];
                const int64_t p        = pad_start[static_cast<size_t>(g)] + (i - group_start[static_cast<size_t>(g)]);
                w[(n - n0) * n_in + k] = s * (static_cast<float>(cpu::gptq_code_at(l, n, p)) - z);
            }
        }
}

size_t gptq_packed_linear::bytes() const {
    return codes.size() + (scales.size() + zeros.size()) * 4 +
           (group_start.size() + pad_start.size() + perm.size()) * 4;
}

void op_gptq_linear(const ops_context& ctx, const float* x, const gptq_packed_linear& w, const float* bias, float* y,
                    int64_t m) {
    cpu::blas_init_single_threaded();
    if (ctx.reference) {
        std::vector<float> wd(static_cast<size_t>(w.n_out * w.n_in));
        w.dequantize(wd.data());
        cpu::linear_ref(x, wd.data(), bias, y, m, w.n_out, w.n_in);
        return;
    }
    cpu::gptq_linear(x, w.layout(), bias, y, m, ctx.pool, ctx.int8_activations);
}

void op_gptq_linears(const ops_context& ctx, const float* x, std::span<const gptq_linear_out> outs, int64_t m) {
    constexpr size_t k_max = 8;  // a decoder layer shares an input among 3 linears at most
    if (outs.empty()) return;
    if (ctx.reference || outs.size() == 1 || outs.size() > k_max) {
        for (const gptq_linear_out& o : outs) op_gptq_linear(ctx, x, *o.w, o.bias, o.y, m);
        return;
    }
    cpu::blas_init_single_threaded();
    cpu::gptq_cpu_layout layouts[k_max];  // no allocation per decode step
    cpu::gptq_linear_job jobs[k_max];
    for (size_t j = 0; j < outs.size(); ++j) {
        layouts[j] = outs[j].w->layout();
        jobs[j]    = {&layouts[j], outs[j].bias, outs[j].y};
    }
    cpu::gptq_linears(x, jobs, static_cast<int>(outs.size()), m, ctx.pool, ctx.int8_activations);
}

}  // namespace gptq
