#include "quant/gptq.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <numeric>

#include "core/error.h"
#include "core/log.h"
#include "core/thread_pool.h"
#include "ops/linalg.h"

namespace gptq {

namespace {

constexpr auto E_ARG = status_code::STATUS_INVALID_ARGUMENT;

grid_options grid_of(const gptq_options& o) {
    return {o.bits, o.sym, o.mse, o.zero_min};
}

// Run fn(r0, r1) over row ranges, on the pool when there is one.
template <typename Fn>
void for_rows(const ops_context& ctx, int64_t n_rows, Fn&& fn) {
    if (ctx.pool && n_rows >= 64) {
        ctx.pool->parallel_for(n_rows, [&](int64_t r0, int64_t r1) { fn(r0, r1); });
    } else {
        fn(0, n_rows);
    }
}

quantized_linear make_result(const gptq_options& opt, int64_t n_out, int64_t n_in) {
    quantized_linear q;
    q.n_out          = n_out;
    q.n_in           = n_in;
    q.bits           = opt.bits;
    q.group_size     = opt.group_size;
    q.sym            = opt.sym;
    const int64_t gs = opt.group_size == -1 ? n_in : opt.group_size;
    q.n_groups       = (n_in + gs - 1) / gs;
    q.codes.assign(static_cast<size_t>(n_out * n_in), 0);
    q.scales.assign(static_cast<size_t>(q.n_groups * n_out), 0.0f);
    q.zeros.assign(static_cast<size_t>(q.n_groups * n_out), 0);
    q.g_idx.assign(static_cast<size_t>(n_in), 0);
    return q;
}

}  // namespace

void hessian_accumulator::add(const ops_context& ctx, const float* x, int64_t n_tokens) {
    op_gram_accumulate_upper(ctx, x, n_tokens, n_in_, 1.0f, h_.data());
    n_tokens_ += n_tokens;
}

void cross_accumulator::add(const ops_context& ctx, const float* x_fp, const float* x_q, int64_t n_tokens) {
    const size_t n = static_cast<size_t>(n_tokens * n_in_);
    diff_.resize(n);
    for (size_t i = 0; i < n; ++i) diff_[i] = x_fp[i] - x_q[i];
    // d[i, j] += sum_t diff[t, i] x_q[t, j]
    op_sgemm(ctx, true, false, n_in_, n_in_, n_tokens, 1.0f, diff_.data(), n_in_, x_q, n_in_, 1.0f, d_.data(), n_in_);
    n_tokens_ += n_tokens;
}

std::vector<float> cross_accumulator::finish() const {
    std::vector<float> d(d_);
    const float        scale = n_tokens_ > 0 ? 2.0f / static_cast<float>(n_tokens_) : 0.0f;
    for (float& v : d) v *= scale;
    return d;
}

std::vector<float> hessian_accumulator::finish() const {
    std::vector<float> h(h_);
    const float        scale = n_tokens_ > 0 ? 2.0f / static_cast<float>(n_tokens_) : 0.0f;
    for (int64_t i = 0; i < n_in_; ++i)
        for (int64_t j = i; j < n_in_; ++j) {
            const float v                         = h[static_cast<size_t>(i * n_in_ + j)] * scale;
            h[static_cast<size_t>(i * n_in_ + j)] = v;
            h[static_cast<size_t>(j * n_in_ + i)] = v;
        }
    return h;
}

status gptq_check_options(const gptq_options& opt, int64_t n_in) {
    if (opt.bits != 2 && opt.bits != 3 && opt.bits != 4 && opt.bits != 8)
        return make_error(E_ARG, "bits {} is not supported (2, 3, 4 or 8)", opt.bits);
    if (opt.group_size != -1 && opt.group_size <= 0)
        return make_error(E_ARG, "group size {} must be -1 or positive", opt.group_size);
    if (!(opt.damp_percent > 0.0 && opt.damp_percent < 1.0))
        return make_error(E_ARG, "damp_percent {} must be in (0, 1)", opt.damp_percent);
    if (opt.block_size <= 0) return make_error(E_ARG, "block size {} must be positive", opt.block_size);
    if (opt.zero_min < 0 || opt.zero_min > grid_maxq(opt.bits))
        return make_error(E_ARG, "zero_min {} out of range", opt.zero_min);
    if (n_in <= 0) return make_error(E_ARG, "layer has {} input features", n_in);
    if (opt.mse && opt.mse_hessian)
        return make_error(E_ARG, "mse (|q - w|^2.4 grid) and mse_hessian exclude each other: choose one");
    if (opt.gar && opt.desc_act)
        return make_error(E_ARG, "GAR (group-aware act-order) and desc_act exclude each other: choose one");
    if (!(opt.gptaq_alpha >= 0.0 && opt.gptaq_alpha <= 1.0))
        return make_error(E_ARG, "gptaq_alpha {} must be in [0, 1]", opt.gptaq_alpha);
    return status::ok();
}

std::vector<int32_t> gptq_column_order(const float* diag, int64_t n_in, int group_size, bool desc_act, bool gar,
                                       std::vector<int32_t>* group_order) {
    group_order->clear();
    std::vector<int32_t> perm;
    if (!desc_act && !gar) return perm;
    perm.resize(static_cast<size_t>(n_in));
    std::iota(perm.begin(), perm.end(), 0);
    auto by_diag = [&](int32_t a, int32_t b) { return diag[a] > diag[b]; };
    if (desc_act) {
        std::stable_sort(perm.begin(), perm.end(), by_diag);
        return perm;
    }
    const int64_t      gs       = group_size == -1 ? n_in : group_size;
    const int64_t      n_groups = (n_in + gs - 1) / gs;
    std::vector<float> top(static_cast<size_t>(n_groups), -INFINITY);
    for (int64_t g = 0; g < n_groups; ++g) {
        const auto b = perm.begin() + g * gs, e = perm.begin() + std::min(n_in, (g + 1) * gs);
        std::stable_sort(b, e, by_diag);
        top[static_cast<size_t>(g)] = diag[*b];
    }
    group_order->resize(static_cast<size_t>(n_groups));
    std::iota(group_order->begin(), group_order->end(), 0);
    std::stable_sort(group_order->begin(), group_order->end(),
                     [&](int32_t a, int32_t b) { return top[static_cast<size_t>(a)] > top[static_cast<size_t>(b)]; });
    std::vector<int32_t> out;
    out.reserve(perm.size());
    for (int32_t g : *group_order)
        out.insert(out.end(), perm.begin() + g * gs, perm.begin() + std::min(n_in, (int64_t(g) + 1) * gs));
    return out;
}

status gptq_check_finite(const float* x, int64_t n_rows, int64_t n_cols, const std::string& what) {
    int64_t n_bad = 0, first = -1;
    for (int64_t i = 0; i < n_rows * n_cols; ++i)
        if (!std::isfinite(x[i])) {
            if (first < 0) first = i;
            ++n_bad;
        }
    if (n_bad == 0) return status::ok();
    return make_error(E_ARG, "{} holds {} at [{}, {}] ({} non-finite value{} of {})", what, x[first], first / n_cols,
                      first % n_cols, n_bad, n_bad == 1 ? "" : "s", n_rows * n_cols);
}

status gptq_check_finite(const ops_context& ctx, const float* x, int64_t n_rows, int64_t n_cols,
                         const std::string& what) {
    if (!ctx.pool || n_rows < 64) return gptq_check_finite(x, n_rows, n_cols, what);
    std::atomic<bool> bad{false};
    ctx.pool->parallel_for(n_rows, [&](int64_t r0, int64_t r1) {
        for (int64_t i = r0 * n_cols; i < r1 * n_cols; ++i)
            if (!std::isfinite(x[i])) {
                bad = true;
                return;
            }
    });
    return bad ? gptq_check_finite(x, n_rows, n_cols, what) : status::ok();  // the message counts them all
}

namespace {
// RTN over contiguous groups; each group's grid from find(x, k0, n) for the n values x = w[r, k0..).
template <typename Find>
result<quantized_linear> rtn_groups(const ops_context& ctx, const float* w, int64_t n_out, int64_t n_in,
                                    const gptq_options& opt, const Find& find) {
    GPTQ_TRY(gptq_check_options(opt, n_in));
    GPTQ_TRY(gptq_check_finite(ctx, w, n_out, n_in, "the weight"));
    quantized_linear q    = make_result(opt, n_out, n_in);
    const int64_t    gs   = opt.group_size == -1 ? n_in : opt.group_size;
    const int        maxq = grid_maxq(opt.bits);
    for (int64_t k = 0; k < n_in; ++k) q.g_idx[static_cast<size_t>(k)] = static_cast<int32_t>(k / gs);
    for_rows(ctx, n_out, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
            for (int64_t g = 0; g < q.n_groups; ++g) {
                const int64_t k0 = g * gs, k1 = std::min(n_in, k0 + gs);
                const auto    p                              = find(w + r * n_in + k0, k0, k1 - k0);
                q.scales[static_cast<size_t>(g * n_out + r)] = p.scale;
                q.zeros[static_cast<size_t>(g * n_out + r)]  = p.zero;
                for (int64_t k = k0; k < k1; ++k)
                    q.codes[static_cast<size_t>(r * n_in + k)] =
                        static_cast<uint8_t>(grid_quantize(w[r * n_in + k], p, maxq));
            }
    });
    return q;
}
}  // namespace

result<quantized_linear> rtn_quantize(const ops_context& ctx, const float* w, int64_t n_out, int64_t n_in,
                                      const gptq_options& opt) {
    const grid_options g = grid_of(opt);
    return rtn_groups(ctx, w, n_out, n_in, opt,
                      [&](const float* x, int64_t, int64_t n) { return grid_find_params(x, n, 1, g); });
}

result<quantized_linear> rtn_quantize_weighted(const ops_context& ctx, const float* w, int64_t n_out, int64_t n_in,
                                               const float* wt, const gptq_options& opt) {
    if (opt.mse) return make_error(E_ARG, "rtn_quantize_weighted: mse (the |q - w|^2.4 grid) does not apply");
    for (int64_t k = 0; k < n_in; ++k)
        if (!(wt[k] >= 0.0f) || !std::isfinite(wt[k]))
            return make_error(E_ARG, "rtn_quantize_weighted: weight {} of column {} must be finite and >= 0", wt[k], k);
    const grid_options g = grid_of(opt);
    return rtn_groups(ctx, w, n_out, n_in, opt, [&](const float* x, int64_t k0, int64_t n) {
        return grid_find_params_weighted(x, wt + k0, n, g);
    });
}

namespace {

// GPTAQ's P = alpha * triu_1(D U^T) U [K, K] (gptaq_quantize), D the cross term in processing order.
std::vector<float> gptaq_correction(const ops_context& ctx, const std::vector<float>& D, const std::vector<float>& U,
                                    int64_t n_in, double alpha) {
    const auto         K = static_cast<size_t>(n_in);
    std::vector<float> T(K * K), P(K * K);
    op_sgemm(ctx, false, true, n_in, n_in, n_in, 1.0f, D.data(), n_in, U.data(), n_in, 0.0f, T.data(), n_in);
    for (size_t i = 0; i < K; ++i)
        for (size_t j = 0; j <= i; ++j) T[i * K + j] = 0.0f;  // the strict upper triangle only
    op_sgemm(ctx, false, false, n_in, n_in, n_in, static_cast<float>(alpha), T.data(), n_in, U.data(), n_in, 0.0f,
             P.data(), n_in);
    return P;
}

// GPTQ (dxxt null) or GPTAQ (dxxt: the cross term, opt.gptaq_alpha) after the callers' checks.
result<quantized_linear> gptq_solve(const ops_context& ctx, const float* w_in, int64_t n_out, int64_t n_in,
                                    const float* h_in, const float* dxxt, const gptq_options& opt, gptq_stats* stats) {
    GPTQ_TRY(gptq_check_options(opt, n_in));
    GPTQ_TRY(gptq_check_finite(ctx, w_in, n_out, n_in, "the weight"));
    GPTQ_TRY(gptq_check_finite(ctx, h_in, n_in, n_in,
                               "the Hessian of the calibration inputs (the activations reaching this layer overflowed "
                               "or hold NaN)"));
    const int          maxq    = grid_maxq(opt.bits);
    const int64_t      gs      = opt.group_size == -1 ? n_in : opt.group_size;
    const bool         grouped = opt.group_size != -1;
    const auto         K       = static_cast<size_t>(n_in);
    const grid_options gopt    = grid_of(opt);

    std::vector<float> W(w_in, w_in + n_out * n_in);  // [n_out, n_in], updated in place
    std::vector<float> H(h_in, h_in + n_in * n_in);
    std::vector<float> D;  // GPTAQ's cross term, permuted like H
    if (dxxt) D.assign(dxxt, dxxt + n_in * n_in);
    // Grid params of a slice x[0..n) of columns whose diag(H) is wt[0..n).
    auto find_params = [&](const float* x, const float* wt, int64_t n) {
        return opt.mse_hessian ? grid_find_params_weighted(x, wt, n, gopt) : grid_find_params(x, n, 1, gopt);
    };
    std::vector<float> diag0(K);  // diag(H) in the original order, before the dead-column fix
    for (size_t k = 0; k < K; ++k) diag0[k] = H[k * K + k];

    // Full-row params (used when there are no groups), from W before the dead-column fix.
    std::vector<grid_params> row_params(static_cast<size_t>(n_out));
    if (!grouped)
        for_rows(ctx, n_out, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r)
                row_params[static_cast<size_t>(r)] = find_params(&W[static_cast<size_t>(r) * K], diag0.data(), n_in);
        });

    // Dead columns: inputs that were always zero carry no information; quantize them to zero.
    int64_t n_dead = 0;
    for (size_t k = 0; k < K; ++k)
        if (H[k * K + k] == 0.0f) {
            H[k * K + k] = 1.0f;
            for (int64_t r = 0; r < n_out; ++r) W[static_cast<size_t>(r) * K + k] = 0.0f;
            for (size_t i = 0; i < K && !D.empty(); ++i) D[i * K + k] = 0.0f;
            ++n_dead;
        }
    if (n_dead == n_in) {
        // No calibration signal at all: every column would be zeroed. Round to nearest instead.
        GPTQ_LOG_WARN(
            "all {} input columns are dead (the calibration inputs of this layer are all zero); using "
            "round-to-nearest for it",
            n_in);
        if (stats) *stats = gptq_stats{0.0, n_dead, 0.0};
        return rtn_quantize(ctx, w_in, n_out, n_in, opt);
    }

    quantized_linear q = make_result(opt, n_out, n_in);

    // static_groups: params of each contiguous original group, fixed before any update.
    std::vector<grid_params> static_params;  // [n_groups, n_out]
    if (opt.static_groups && grouped) {
        static_params.resize(static_cast<size_t>(q.n_groups * n_out));
        for_rows(ctx, n_out, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r)
                for (int64_t g = 0; g < q.n_groups; ++g) {
                    const int64_t k0 = g * gs, k1 = std::min(n_in, k0 + gs);
                    static_params[static_cast<size_t>(g * n_out + r)] = find_params(
                        &W[static_cast<size_t>(r) * K + static_cast<size_t>(k0)], &diag0[size_t(k0)], k1 - k0);
                }
        });
    }

    // Act-order (or GAR): permute columns of W and rows/columns of H into the processing order.
    std::vector<float> diag(K);
    for (size_t k = 0; k < K; ++k) diag[k] = H[k * K + k];
    std::vector<int32_t> group_order;  // GAR: the original group of each processing block
    std::vector<int32_t> perm =
        gptq_column_order(diag.data(), n_in, opt.group_size, opt.desc_act, opt.gar, &group_order);
    // The group index (scales row) of processing position col.
    auto block_group = [&](int64_t col) {
        return group_order.empty() ? col / gs : int64_t(group_order[static_cast<size_t>(col / gs)]);
    };
    if (!perm.empty()) {
        std::vector<float> tmp(W.size());
        for (int64_t r = 0; r < n_out; ++r)
            for (size_t i = 0; i < K; ++i)
                tmp[static_cast<size_t>(r) * K + i] = W[static_cast<size_t>(r) * K + static_cast<size_t>(perm[i])];
        W.swap(tmp);
        std::vector<float> hp(H.size());
        for (size_t i = 0; i < K; ++i)
            for (size_t j = 0; j < K; ++j)
                hp[i * K + j] = H[static_cast<size_t>(perm[i]) * K + static_cast<size_t>(perm[j])];
        H.swap(hp);
        if (!D.empty()) {
            for (size_t i = 0; i < K; ++i)
                for (size_t j = 0; j < K; ++j)
                    hp[i * K + j] = D[static_cast<size_t>(perm[i]) * K + static_cast<size_t>(perm[j])];
            D.swap(hp);
        }
    }

    std::vector<float> pdiag(K);  // diag(H) in processing order (dead columns 1), before damping
    for (size_t k = 0; k < K; ++k) pdiag[k] = H[k * K + k];

    // Damping, raised while the Cholesky factorisation of H^-1 fails.
    double mean_diag = 0.0;
    for (size_t k = 0; k < K; ++k) mean_diag += H[k * K + k];
    mean_diag /= static_cast<double>(K);
    std::vector<float> U;  // upper Cholesky factor of (H + damp I)^-1
    double             damp_percent = opt.damp_percent;
    for (;;) {
        U                = H;
        const float damp = static_cast<float>(damp_percent * mean_diag);
        for (size_t k = 0; k < K; ++k) U[k * K + k] += damp;
        if (op_cholesky_inverse_upper(ctx, U.data(), n_in)) break;
        const double next = damp_percent + opt.damp_auto_increment;
        if (opt.damp_auto_increment <= 0.0 || next >= 1.0)
            return make_error(status_code::STATUS_INVALID_ARGUMENT,
                              "the Hessian [{} x {}] is not positive definite even with damp_percent {:.2f} "
                              "(too few calibration tokens for this layer, or inputs with NaN/Inf?)",
                              n_in, n_in, damp_percent);
        damp_percent = next;
    }
    if (damp_percent != opt.damp_percent)
        GPTQ_LOG_WARN("Hessian [{} x {}] not positive definite with damp_percent {:.3f}; used {:.3f}", n_in, n_in,
                      opt.damp_percent, damp_percent);
    std::vector<float> P;  // GPTAQ: alpha * triu_1(D U^T) U
    if (!D.empty()) {
        P = gptaq_correction(ctx, D, U, n_in, opt.gptaq_alpha);
        std::vector<float>().swap(D);
    }
    const bool asym = !P.empty();

    // Column loop. Rows are independent given U, so each thread owns a range of rows; within a
    // block of B columns the updates stay in a [rows, B] copy, and the rest of W is updated once
    // per block with a GEMM (the "lazy batch" trick).
    const int64_t       B = opt.block_size;
    std::vector<double> row_loss(static_cast<size_t>(n_out), 0.0);
    std::vector<float>  err(static_cast<size_t>(n_out) * static_cast<size_t>(std::min<int64_t>(B, n_in)));
    // GPTAQ: each column's value right before it was rounded (the block's w_i of the P update).
    std::vector<float>       wpre(asym ? err.size() : 0);
    std::vector<grid_params> cur(static_cast<size_t>(n_out));  // current group's params per row
    if (!grouped) cur = row_params;

    for (int64_t i1 = 0; i1 < n_in; i1 += B) {
        const int64_t i2 = std::min(n_in, i1 + B), nb = i2 - i1;
        for_rows(ctx, n_out, [&](int64_t r0, int64_t r1) {
            std::vector<float> w1(static_cast<size_t>(nb));
            std::vector<float> gbuf(static_cast<size_t>(grouped ? gs : 0));
            for (int64_t r = r0; r < r1; ++r) {
                float* wrow = &W[static_cast<size_t>(r) * K];
                std::memcpy(w1.data(), wrow + i1, static_cast<size_t>(nb) * sizeof(float));
                for (int64_t i = 0; i < nb; ++i) {
                    const int64_t col = i1 + i;  // position in processing order
                    if (grouped) {
                        if (!static_params.empty()) {
                            const int64_t orig          = perm.empty() ? col : perm[static_cast<size_t>(col)];
                            cur[static_cast<size_t>(r)] = static_params[static_cast<size_t>((orig / gs) * n_out + r)];
                        } else if (col % gs == 0) {
                            // Params of the group starting here, from the weights as updated so far:
                            // the block's working copy for columns inside this block, the global W
                            // beyond it. (The reference reads the global W only, whose in-block
                            // columns lack this block's updates: stale params for groups smaller
                            // than the block. See docs/gptq.md.)
                            const int64_t cend = std::min(n_in, col + gs);
                            for (int64_t c = col; c < cend; ++c)
                                gbuf[static_cast<size_t>(c - col)] = c < i2 ? w1[static_cast<size_t>(c - i1)] : wrow[c];
                            cur[static_cast<size_t>(r)] = find_params(gbuf.data(), &pdiag[size_t(col)], cend - col);
                        }
                    }
                    const grid_params p  = cur[static_cast<size_t>(r)];
                    const float       x  = w1[static_cast<size_t>(i)];
                    const int         qi = grid_quantize(x, p, maxq);
                    const float       dq = grid_dequantize(qi, p);
                    const float       d  = U[static_cast<size_t>(col) * K + static_cast<size_t>(col)];
                    const float       e  = (x - dq) / d;
                    row_loss[static_cast<size_t>(r)] +=
                        static_cast<double>(x - dq) * (x - dq) / (static_cast<double>(d) * d) / 2;
                    const int64_t orig                            = perm.empty() ? col : perm[static_cast<size_t>(col)];
                    q.codes[static_cast<size_t>(r * n_in + orig)] = static_cast<uint8_t>(qi);
                    if (grouped ? (static_params.empty() ? col % gs == 0 : false) : col == 0) {
                        q.scales[static_cast<size_t>(block_group(col) * n_out + r)] = p.scale;
                        q.zeros[static_cast<size_t>(block_group(col) * n_out + r)]  = p.zero;
                    }
                    const float* urow = &U[static_cast<size_t>(col) * K + static_cast<size_t>(i1)];
                    if (asym) {
                        const float* prow = &P[static_cast<size_t>(col) * K + static_cast<size_t>(i1)];
                        for (int64_t j = i; j < nb; ++j) w1[static_cast<size_t>(j)] -= e * urow[j] - x * prow[j];
                        wpre[static_cast<size_t>(r * nb + i)] = x;
                    } else {
                        for (int64_t j = i; j < nb; ++j) w1[static_cast<size_t>(j)] -= e * urow[j];
                    }
                    err[static_cast<size_t>(r * nb + i)] = e;
                }
                std::memcpy(wrow + i1, w1.data(), static_cast<size_t>(nb) * sizeof(float));
            }
        });
        // W[:, i2:] -= Err1 [n_out, nb] . U[i1:i2, i2:]
        if (i2 < n_in)
            op_sgemm(ctx, false, false, n_out, n_in - i2, nb, -1.0f, err.data(), nb,
                     &U[static_cast<size_t>(i1) * K + static_cast<size_t>(i2)], n_in, 1.0f, &W[static_cast<size_t>(i2)],
                     n_in);
        // GPTAQ: W[:, i2:] += Wpre1 [n_out, nb] . P[i1:i2, i2:]
        if (asym && i2 < n_in)
            op_sgemm(ctx, false, false, n_out, n_in - i2, nb, 1.0f, wpre.data(), nb,
                     &P[static_cast<size_t>(i1) * K + static_cast<size_t>(i2)], n_in, 1.0f, &W[static_cast<size_t>(i2)],
                     n_in);
    }

    // g_idx and, for static groups, the scales of the original groups.
    if (grouped && !static_params.empty()) {
        for (int64_t k = 0; k < n_in; ++k) q.g_idx[static_cast<size_t>(k)] = static_cast<int32_t>(k / gs);
        for (size_t i = 0; i < static_params.size(); ++i) {
            q.scales[i] = static_params[i].scale;
            q.zeros[i]  = static_params[i].zero;
        }
    } else {
        for (int64_t i = 0; i < n_in; ++i) {
            const int64_t orig                 = perm.empty() ? i : perm[static_cast<size_t>(i)];
            q.g_idx[static_cast<size_t>(orig)] = static_cast<int32_t>(block_group(i));
        }
    }
    const double loss = std::accumulate(row_loss.begin(), row_loss.end(), 0.0);
    if (!std::isfinite(loss))
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "GPTQ diverged on this layer (non-finite error {}) with damp_percent {:.3f}; raise "
                          "--damp-percent",
                          loss, damp_percent);
    q.perm = std::move(perm);
    if (stats) {
        stats->damp_percent_used = damp_percent;
        stats->n_dead_columns    = n_dead;
        stats->loss              = loss;
    }
    return q;
}

}  // namespace

result<quantized_linear> gptq_quantize(const ops_context& ctx, const float* w, int64_t n_out, int64_t n_in,
                                       const float* h, const gptq_options& opt, gptq_stats* stats) {
    if (opt.gptaq) return make_error(E_ARG, "gptq_quantize: gptaq is set; GPTAQ needs the cross term (gptaq_quantize)");
    return gptq_solve(ctx, w, n_out, n_in, h, nullptr, opt, stats);
}

result<quantized_linear> gptaq_quantize(const ops_context& ctx, const float* w, int64_t n_out, int64_t n_in,
                                        const float* h, const float* dxxt, const gptq_options& opt, gptq_stats* stats) {
    if (!opt.gptaq) return make_error(E_ARG, "gptaq_quantize: the options do not ask for GPTAQ (gptaq false)");
    GPTQ_TRY(gptq_check_options(opt, n_in));
    GPTQ_TRY(gptq_check_finite(ctx, dxxt, n_in, n_in,
                               "GPTAQ's cross term of the calibration inputs (the full-precision or quantized "
                               "activations reaching this layer overflowed or hold NaN)"));
    return gptq_solve(ctx, w, n_out, n_in, h, dxxt, opt, stats);
}

namespace {
void dequantize_rows(const quantized_linear& q, float* out, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
        for (int64_t k = 0; k < q.n_in; ++k) {
            const size_t gi = static_cast<size_t>(q.g_idx[static_cast<size_t>(k)] * q.n_out + r);
            out[r * q.n_in + k] =
                q.scales[gi] *
                static_cast<float>(static_cast<int>(q.codes[static_cast<size_t>(r * q.n_in + k)]) - q.zeros[gi]);
        }
}
}  // namespace

void quantized_linear_dequantize(const quantized_linear& q, float* out) {
    dequantize_rows(q, out, 0, q.n_out);
}

void quantized_linear_dequantize(const ops_context& ctx, const quantized_linear& q, float* out) {
    if (ctx.pool && q.n_out >= 64) {
        ctx.pool->parallel_for(q.n_out, [&](int64_t r0, int64_t r1) { dequantize_rows(q, out, r0, r1); });
    } else {
        dequantize_rows(q, out, 0, q.n_out);
    }
}

double hessian_weighted_error(const ops_context& ctx, const float* w, const float* wq, int64_t n_out, int64_t n_in,
                              const float* h) {
    std::vector<float> d(static_cast<size_t>(n_out * n_in)), dh(static_cast<size_t>(n_out * n_in));
    for (size_t i = 0; i < d.size(); ++i) d[i] = w[i] - wq[i];
    op_sgemm(ctx, false, false, n_out, n_in, n_in, 1.0f, d.data(), n_in, h, n_in, 0.0f, dh.data(), n_in);
    double s = 0.0;
    for (size_t i = 0; i < d.size(); ++i) s += static_cast<double>(d[i]) * dh[i];
    return s;
}

}  // namespace gptq
