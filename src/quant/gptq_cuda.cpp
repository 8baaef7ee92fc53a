// GPTQ on the GPU (experimental): quant/gptq.cpp's steps with the heavy ones on the device.
// Steps 1-5 decide on the host exactly as the CPU does (same code, same order of summation), so
// the dead columns, the permutation, the damping sequence and the up-front grid params are the
// CPU's; steps 6-7 (Cholesky of H^-1, column loop) run through ops_cuda_gptq.h.
#include "quant/gptq_cuda.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <numeric>

#include "core/error.h"
#include "core/log.h"
#include "core/thread_pool.h"
#include "ops/ops_cuda_gptq.h"

namespace gptq {

namespace {

constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;

template <typename Fn>
void for_rows(const ops_context& ctx, int64_t n_rows, Fn&& fn) {
    if (ctx.pool && n_rows >= 64) {
        ctx.pool->parallel_for(n_rows, [&](int64_t r0, int64_t r1) { fn(r0, r1); });
    } else {
        fn(0, n_rows);
    }
}

// Device copy of a host array, ordered on the context's stream (the host array must live until
// the stream has run it: every caller here synchronises before returning).
template <typename T>
result<cuda_buffer> to_device(cuda_context& cctx, const T* src, size_t n) {
    auto b = cuda_buffer::alloc(n * sizeof(T));
    if (!b) return b.error();
    GPTQ_TRY(cuda_copy_to_device_async(cctx, b->data(), src, n * sizeof(T)));
    return b;
}

constexpr const char* k_h_what =
    "the Hessian of the calibration inputs (the activations reaching this layer overflowed or hold NaN)";

// The Hessian's diagonal from a device h, after the finiteness check of the host path (a NaN / Inf
// found there: h comes to the host for gptq_check_finite's own message).
result<std::vector<float>> device_diag(cuda_context& cctx, const ops_context& ctx, const float* h_dev, int64_t n_in) {
    std::vector<float> diag(static_cast<size_t>(n_in));
    int64_t            first = -1;
    GPTQ_TRY(op_cuda_diag_check(cctx, h_dev, n_in, diag.data(), &first));
    if (first >= 0) {
        std::vector<float> h(static_cast<size_t>(n_in * n_in));
        GPTQ_TRY(cuda_copy_to_host(cctx, h.data(), h_dev, h.size() * sizeof(float)));
        GPTQ_TRY(gptq_check_finite(ctx, h.data(), n_in, n_in, k_h_what));
        return make_error(status_code::STATUS_INTERNAL, "gptq (cuda): a non-finite Hessian value at {} not found again",
                          first);
    }
    return diag;
}

// gptq_quantize_cuda with H on the host (h_in) or on the device (h_dev_in, unchanged); with the
// latter, W's device copy and the codes are handed out (w_keep, code_keep) instead of freed.
// w16_dev: W as F16 on the device, widened there instead of uploading w_in (exact: the caller's word).
// solver_in: the cuSOLVER handle and workspace to use (nullptr: one made for this call).
result<quantized_linear> quantize_impl(cuda_context& cctx, const ops_context& ctx, const float* w_in, int64_t n_out,
                                       int64_t n_in, const float* h_in, const float* h_dev_in, const gptq_options& opt,
                                       gptq_stats* stats, cuda_buffer* w_keep, cuda_buffer* code_keep,
                                       const uint16_t* w16_dev, cuda_gptq_solver* solver_in) {
    using clock      = std::chrono::steady_clock;
    const auto t0    = clock::now();
    auto       since = [](clock::time_point t) { return std::chrono::duration<double>(clock::now() - t).count(); };
    GPTQ_TRY(gptq_check_options(opt, n_in));
    if (opt.mse_hessian)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "--mse-hessian is not implemented in the GPU solve yet; use --device cpu or --mse");
    if (opt.gptaq)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "GPTAQ (--gptaq) is not implemented in the GPU solve; use --device cpu");
    GPTQ_TRY(gptq_check_finite(ctx, w_in, n_out, n_in, "the weight"));
    std::vector<float> diag_raw;  // diag(H) as given
    if (h_dev_in) {
        GPTQ_ASSIGN_OR_RETURN(diag_raw, device_diag(cctx, ctx, h_dev_in, n_in));
    } else {
        GPTQ_TRY(gptq_check_finite(ctx, h_in, n_in, n_in, k_h_what));
        diag_raw.resize(static_cast<size_t>(n_in));
        for (int64_t k = 0; k < n_in; ++k) diag_raw[size_t(k)] = h_in[k * n_in + k];
    }
    const int64_t      gs      = opt.group_size == -1 ? n_in : opt.group_size;
    const bool         grouped = opt.group_size != -1;
    const auto         K       = static_cast<size_t>(n_in);
    const grid_options gopt{opt.bits, opt.sym, opt.mse, opt.zero_min};
    const int64_t      n_groups = (n_in + gs - 1) / gs;

    // Full-row params (no groups), from W before the dead-column fix.
    std::vector<grid_params> row_params;
    if (!grouped) {
        row_params.resize(static_cast<size_t>(n_out));
        for_rows(ctx, n_out, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r)
                row_params[static_cast<size_t>(r)] = grid_find_params(w_in + r * n_in, n_in, 1, gopt);
        });
    }

    // Dead columns (diag H == 0); the device applies them while permuting.
    std::vector<float> diag(K);
    int64_t            n_dead = 0;
    for (size_t k = 0; k < K; ++k) {
        diag[k] = diag_raw[k];
        if (diag[k] == 0.0f) {
            diag[k] = 1.0f;
            ++n_dead;
        }
    }
    if (n_dead == n_in) {
        GPTQ_LOG_WARN(
            "all {} input columns are dead (the calibration inputs of this layer are all zero); using "
            "round-to-nearest for it",
            n_in);
        if (stats) *stats = gptq_stats{0.0, n_dead, 0.0};
        return rtn_quantize(ctx, w_in, n_out, n_in, opt);
    }

    // static_groups: params of each contiguous original group, from W with dead columns zeroed.
    std::vector<grid_params> static_params;  // [n_groups, n_out]
    if (opt.static_groups && grouped) {
        static_params.resize(static_cast<size_t>(n_groups * n_out));
        for_rows(ctx, n_out, [&](int64_t r0, int64_t r1) {
            std::vector<float> row(K);
            for (int64_t r = r0; r < r1; ++r) {
                for (size_t k = 0; k < K; ++k)
                    row[k] = diag_raw[k] == 0.0f ? 0.0f : w_in[static_cast<size_t>(r) * K + k];
                for (int64_t g = 0; g < n_groups; ++g) {
                    const int64_t k0 = g * gs, k1 = std::min(n_in, k0 + gs);
                    static_params[static_cast<size_t>(g * n_out + r)] =
                        grid_find_params(&row[size_t(k0)], k1 - k0, 1, gopt);
                }
            }
        });
    }

    // Act-order or GAR (dead diagonal 1): the CPU's order. GAR: the device writes group params at
    // the processing block's index; they are moved to their original group after the loop.
    std::vector<int32_t> group_order;
    std::vector<int32_t> perm =
        gptq_column_order(diag.data(), n_in, opt.group_size, opt.desc_act, opt.gar, &group_order);
    double mean_diag = 0.0;  // in processing order, as the CPU sums it
    for (size_t k = 0; k < K; ++k) mean_diag += diag[perm.empty() ? k : static_cast<size_t>(perm[k])];
    mean_diag /= static_cast<double>(K);

    // Device: W and H permuted (dead columns applied), then H's buffer is reused for U.
    const size_t nw = static_cast<size_t>(n_out) * K, nh = K * K;
    auto         w_raw = w16_dev ? cuda_buffer::alloc(nw * sizeof(float)) : to_device(cctx, w_in, nw);
    if (w16_dev && w_raw) GPTQ_TRY(op_cuda_f16_to_f32(cctx, w16_dev, w_raw->as<float>(), int64_t(nw)));
    auto h_raw = h_dev_in ? cuda_buffer::alloc(nh * sizeof(float)) : to_device(cctx, h_in, nh);  // U later
    auto w_dev = cuda_buffer::alloc(nw * sizeof(float));
    auto h_dev = cuda_buffer::alloc(nh * sizeof(float));
    for (const auto* b : {&w_raw, &h_raw, &w_dev, &h_dev})
        if (!*b) return b->error();
    cuda_buffer perm_dev;
    if (!perm.empty()) {
        auto p = to_device(cctx, perm.data(), K);
        if (!p) return p.error();
        perm_dev = std::move(*p);
    }
    GPTQ_TRY(op_cuda_gptq_permute(cctx, w_raw->as<float>(), h_dev_in ? h_dev_in : h_raw->as<float>(),
                                  perm_dev.as<int32_t>(), w_dev->as<float>(), h_dev->as<float>(), n_out, n_in));
    GPTQ_TRY(cctx.synchronize());
    if (w_keep)
        *w_keep = std::move(*w_raw);
    else
        *w_raw = cuda_buffer();  // free early: one W-sized buffer fewer during the loop
    cuda_buffer  u         = std::move(*h_raw);
    const double t_prepare = since(t0);
    const auto   t1        = clock::now();

    // Damping, raised while the Cholesky factorisation fails (the CPU's sequence of values).
    std::unique_ptr<cuda_gptq_solver> own;
    if (!solver_in) {
        GPTQ_ASSIGN_OR_RETURN(own, cuda_gptq_solver::create(cctx));
    }
    cuda_gptq_solver* solver       = solver_in ? solver_in : own.get();
    double            damp_percent = opt.damp_percent;
    for (;;) {
        const float damp = static_cast<float>(damp_percent * mean_diag);
        auto        pd   = solver->damped_cholesky_inverse_upper(cctx, h_dev->as<float>(), u.as<float>(), n_in, damp);
        if (!pd) return pd.error();
        if (*pd) break;
        const double next = damp_percent + opt.damp_auto_increment;
        if (opt.damp_auto_increment <= 0.0 || next >= 1.0)
            return make_error(E_ARG,
                              "the Hessian [{} x {}] is not positive definite even with damp_percent {:.2f} "
                              "(too few calibration tokens for this layer, or inputs with NaN/Inf?)",
                              n_in, n_in, damp_percent);
        damp_percent = next;
    }
    if (damp_percent != opt.damp_percent)
        GPTQ_LOG_WARN("Hessian [{} x {}] not positive definite with damp_percent {:.3f}; used {:.3f}", n_in, n_in,
                      opt.damp_percent, damp_percent);
    *h_dev = cuda_buffer();

    // Group params the loop reads (full rows, static groups) or writes (dynamic groups).
    const bool           dynamic = grouped && static_params.empty();
    const int64_t        n_par   = grouped ? n_groups * n_out : n_out;
    std::vector<float>   scales(static_cast<size_t>(n_par), 0.0f);
    std::vector<int32_t> zeros(static_cast<size_t>(n_par), 0);
    const auto&          fixed = grouped ? static_params : row_params;
    for (size_t i = 0; i < fixed.size(); ++i) {
        scales[i] = fixed[i].scale;
        zeros[i]  = fixed[i].zero;
    }
    auto                scale_dev = to_device(cctx, scales.data(), scales.size());
    auto                zero_dev  = to_device(cctx, zeros.data(), zeros.size());
    std::vector<double> row_loss(static_cast<size_t>(n_out), 0.0);
    auto                loss_dev = to_device(cctx, row_loss.data(), row_loss.size());
    auto                code_dev = cuda_buffer::alloc(nw);
    for (const auto* b : {&scale_dev, &zero_dev, &loss_dev, &code_dev})
        if (!*b) return b->error();

    cuda_gptq_loop_args a;
    a.w                     = w_dev->as<float>();
    a.u                     = u.as<float>();
    a.code                  = code_dev->as<uint8_t>();
    a.scale                 = scale_dev->as<float>();
    a.zero                  = zero_dev->as<int32_t>();
    a.perm                  = perm_dev.as<int32_t>();
    a.row_loss              = loss_dev->as<double>();
    a.n_out                 = n_out;
    a.n_in                  = n_in;
    a.block_size            = opt.block_size;
    a.group_size            = gs;
    a.dynamic_groups        = dynamic;
    a.bits                  = opt.bits;
    a.zero_min              = opt.zero_min;
    a.sym                   = opt.sym;
    a.mse                   = opt.mse;
    const double t_cholesky = since(t1);
    const auto   t2         = clock::now();
    GPTQ_TRY(op_cuda_gptq_column_loop(cctx, a));
    GPTQ_TRY(cctx.synchronize());  // (the download below waits anyway: the loop's own time)
    const double t_loop = since(t2);
    const auto   t3     = clock::now();

    quantized_linear q;
    q.n_out      = n_out;
    q.n_in       = n_in;
    q.bits       = opt.bits;
    q.group_size = opt.group_size;
    q.sym        = opt.sym;
    q.n_groups   = n_groups;
    q.codes.assign(nw, 0);
    q.scales.assign(static_cast<size_t>(n_groups * n_out), 0.0f);
    q.zeros.assign(static_cast<size_t>(n_groups * n_out), 0);
    q.g_idx.assign(K, 0);
    GPTQ_TRY(cuda_copy_to_host(cctx, q.codes.data(), code_dev->data(), nw));
    GPTQ_TRY(cuda_copy_to_host(cctx, row_loss.data(), loss_dev->data(), row_loss.size() * sizeof(double)));
    if (dynamic) {
        GPTQ_TRY(cuda_copy_to_host(cctx, q.scales.data(), scale_dev->data(), q.scales.size() * sizeof(float)));
        GPTQ_TRY(cuda_copy_to_host(cctx, q.zeros.data(), zero_dev->data(), q.zeros.size() * sizeof(int32_t)));
        if (!group_order.empty()) {  // GAR: block b's params belong to group group_order[b]
            std::vector<float>   s2(q.scales.size());
            std::vector<int32_t> z2(q.zeros.size());
            for (size_t b = 0; b < group_order.size(); ++b)
                for (int64_t r = 0; r < n_out; ++r) {
                    s2[size_t(group_order[b]) * size_t(n_out) + size_t(r)] = q.scales[b * size_t(n_out) + size_t(r)];
                    z2[size_t(group_order[b]) * size_t(n_out) + size_t(r)] = q.zeros[b * size_t(n_out) + size_t(r)];
                }
            q.scales.swap(s2);
            q.zeros.swap(z2);
        }
    } else {
        q.scales = std::move(scales);  // full rows: [1, n_out]; static groups: [n_groups, n_out]
        q.zeros  = std::move(zeros);
    }

    if (grouped && !static_params.empty()) {
        for (int64_t k = 0; k < n_in; ++k) q.g_idx[static_cast<size_t>(k)] = static_cast<int32_t>(k / gs);
    } else {
        for (int64_t i = 0; i < n_in; ++i) {
            const int64_t orig = perm.empty() ? i : perm[static_cast<size_t>(i)];
            q.g_idx[static_cast<size_t>(orig)] =
                static_cast<int32_t>(group_order.empty() ? i / gs : group_order[static_cast<size_t>(i / gs)]);
        }
    }
    const double loss = std::accumulate(row_loss.begin(), row_loss.end(), 0.0);
    if (!std::isfinite(loss))
        return make_error(E_ARG,
                          "GPTQ diverged on this layer (non-finite error {}) with damp_percent {:.3f}; raise "
                          "--damp-percent",
                          loss, damp_percent);
    q.perm = std::move(perm);
    if (stats) {
        stats->damp_percent_used = damp_percent;
        stats->n_dead_columns    = n_dead;
        stats->loss              = loss;
        stats->seconds_prepare   = t_prepare;
        stats->seconds_cholesky  = t_cholesky;
        stats->seconds_loop      = t_loop;
        stats->seconds_download  = since(t3);
    }
    if (code_keep) *code_keep = std::move(*code_dev);
    return q;
}

}  // namespace

result<quantized_linear> gptq_quantize_cuda(cuda_context& cctx, const ops_context& ctx, const float* w_in,
                                            int64_t n_out, int64_t n_in, const float* h_in, const gptq_options& opt,
                                            gptq_stats* stats) {
    return quantize_impl(cctx, ctx, w_in, n_out, n_in, h_in, nullptr, opt, stats, nullptr, nullptr, nullptr, nullptr);
}

cuda_gptq_codes gptq_cuda_codes::view() const {
    cuda_gptq_codes v;
    v.code  = code.as<uint8_t>();
    v.scale = scale.as<float>();
    v.zero  = zero.as<int32_t>();
    v.g_idx = g_idx.as<int32_t>();
    v.n_out = n_out;
    v.n_in  = n_in;
    return v;
}

result<gptq_cuda_codes> gptq_cuda_codes_upload(cuda_context& cctx, const quantized_linear& q, cuda_buffer code) {
    const size_t nw = static_cast<size_t>(q.n_out * q.n_in);
    if (q.codes.size() != nw || q.g_idx.size() != static_cast<size_t>(q.n_in) ||
        q.scales.size() != static_cast<size_t>(q.n_groups * q.n_out) || q.zeros.size() != q.scales.size())
        return make_error(E_ARG, "gptq (cuda): a quantized linear {} x {} with {} codes, {} scales, {} g_idx", q.n_out,
                          q.n_in, q.codes.size(), q.scales.size(), q.g_idx.size());
    gptq_cuda_codes c;
    c.n_out = q.n_out;
    c.n_in  = q.n_in;
    if (code.bytes() == nw) {
        c.code = std::move(code);
    } else {
        GPTQ_ASSIGN_OR_RETURN(c.code, to_device(cctx, q.codes.data(), nw));
    }
    GPTQ_ASSIGN_OR_RETURN(c.scale, to_device(cctx, q.scales.data(), q.scales.size()));
    GPTQ_ASSIGN_OR_RETURN(c.zero, to_device(cctx, q.zeros.data(), q.zeros.size()));
    GPTQ_ASSIGN_OR_RETURN(c.g_idx, to_device(cctx, q.g_idx.data(), q.g_idx.size()));
    GPTQ_TRY(cctx.synchronize());  // the host arrays may go
    return c;
}

result<quantized_linear> gptq_quantize_cuda_resident(cuda_context& cctx, const ops_context& ctx, const float* w,
                                                     int64_t n_out, int64_t n_in, const float* h_dev,
                                                     const gptq_options& opt, gptq_stats* stats, cuda_buffer* w_dev,
                                                     gptq_cuda_codes* codes, const uint16_t* w16_dev,
                                                     cuda_gptq_solver* solver) {
    *w_dev = cuda_buffer();
    cuda_buffer code;
    GPTQ_ASSIGN_OR_RETURN(quantized_linear q, quantize_impl(cctx, ctx, w, n_out, n_in, nullptr, h_dev, opt, stats,
                                                            w_dev, &code, w16_dev, solver));
    const size_t nw = static_cast<size_t>(n_out * n_in);
    if (w_dev->bytes() != nw * sizeof(float)) {  // every column dead: round to nearest, nothing uploaded
        GPTQ_ASSIGN_OR_RETURN(*w_dev, to_device(cctx, w, nw));
        GPTQ_TRY(cctx.synchronize());
    }
    GPTQ_ASSIGN_OR_RETURN(*codes, gptq_cuda_codes_upload(cctx, q, std::move(code)));
    return q;
}

result<double> hessian_weighted_error_cuda(cuda_context& cctx, const float* w_dev, const gptq_cuda_codes& q,
                                           const float* h_dev) {
    GPTQ_ASSIGN_OR_RETURN(cuda_buffer d, cuda_buffer::alloc(size_t(std::max<int64_t>(q.n_out * q.n_in, 1)) * 4));
    GPTQ_TRY(op_cuda_gptq_dequant_diff(cctx, w_dev, q.view(), d.as<float>()));
    return op_cuda_hessian_weighted_error(cctx, d.as<float>(), h_dev, q.n_out, q.n_in);  // waits: d may go
}

result<double> hessian_weighted_error_cuda(cuda_context& cctx, const ops_context& ctx, const float* w, const float* wq,
                                           int64_t n_out, int64_t n_in, const float* h_dev) {
    const size_t       n = static_cast<size_t>(n_out * n_in);
    std::vector<float> d(n);
    for_rows(ctx, n_out, [&](int64_t r0, int64_t r1) {
        for (size_t i = size_t(r0 * n_in); i < size_t(r1 * n_in); ++i) d[i] = w[i] - wq[i];
    });
    auto d_dev = to_device(cctx, d.data(), n);
    if (!d_dev) return d_dev.error();
    return op_cuda_hessian_weighted_error(cctx, d_dev->as<float>(), h_dev, n_out, n_in);  // waits: d may go
}

// ---- cuda_hessian_accumulator ---------------------------------------------------------------------

result<cuda_hessian_accumulator> cuda_hessian_accumulator::create(cuda_context& cctx, int64_t n_in) {
    if (n_in <= 0) return make_error(E_ARG, "Hessian accumulator for {} input features", n_in);
    cuda_hessian_accumulator acc;
    acc.n_in_ = n_in;
    GPTQ_ASSIGN_OR_RETURN(acc.sum_, cuda_buffer::alloc(static_cast<size_t>(n_in * n_in) * sizeof(float)));
    GPTQ_TRY(cuda_zero_async(cctx, acc.sum_.data(), acc.sum_.bytes()));
    return acc;
}

status cuda_hessian_accumulator::add_f32(cuda_context& cctx, const float* x, int64_t n_tokens) {
    GPTQ_TRY(op_cuda_hessian_accumulate(cctx, x, false, n_tokens, n_in_, sum_.as<float>()));
    n_tokens_ += n_tokens;
    return status::ok();
}

status cuda_hessian_accumulator::add_f16(cuda_context& cctx, const uint16_t* x, int64_t n_tokens) {
    GPTQ_TRY(op_cuda_hessian_accumulate(cctx, x, true, n_tokens, n_in_, sum_.as<float>()));
    n_tokens_ += n_tokens;
    return status::ok();
}

status cuda_hessian_accumulator::finish(cuda_context& cctx, float* h) const {
    const float scale = n_tokens_ > 0 ? 2.0f / static_cast<float>(n_tokens_) : 0.0f;
    return op_cuda_hessian_finish(cctx, sum_.as<float>(), h, n_in_, scale);
}

result<std::vector<float>> cuda_hessian_accumulator::finish_host(cuda_context& cctx) const {
    const size_t n = static_cast<size_t>(n_in_ * n_in_);
    auto         d = cuda_buffer::alloc(n * sizeof(float));
    if (!d) return d.error();
    GPTQ_TRY(finish(cctx, d->as<float>()));
    std::vector<float> h(n);
    GPTQ_TRY(cuda_copy_to_host(cctx, h.data(), d->data(), n * sizeof(float)));
    return h;
}

}  // namespace gptq
