// GPTQ on one linear layer (Frantar et al. 2022), and round-to-nearest as the baseline.
//
// Input: the weight W [n_out, n_in] (PyTorch layout) and the Hessian H = (2/n) sum x x^T of the
// layer's inputs [n_in, n_in]. Output: a neutral quantized_linear (integer codes, scales, zeros,
// g_idx) that knows nothing about any checkpoint layout; io/gptq_pack.h turns it into qweight /
// qzeros. The algorithm follows format.md section 2.4 step by step: dead columns, static groups,
// act-order permutation, relative damping (raised automatically while Cholesky fails), the upper
// Cholesky factor of H^-1, and the blocked column loop with lazy batch updates (block 128).
// GPTAQ (gptaq_quantize; format.md section 2.6, docs/quantize.md "GPTAQ") adds the cross term of
// the full-precision model's inputs to the same loop.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "ops/ops.h"
#include "quant/grid.h"

namespace gptq {

struct gptq_options {
    int  bits          = 4;
    int  group_size    = 128;  // -1: one group spanning the row
    bool sym           = true;
    bool desc_act      = false;  // act-order: process columns by decreasing diag(H)
    bool static_groups = false;  // group params fixed up front on the original column order
    // GAR (group-aware reordering): act-order inside each contiguous group, and the groups in the
    // order of their largest diag(H); g_idx stays k / group_size, so kernels need no gather.
    // Excludes desc_act.
    bool gar = false;
    bool mse = false;  // clipping-range grid search (grid.h)
    // The clipping range of each group (row) minimising its diag(H)-weighted squared error
    // (grid_find_params_weighted) instead of the plain range; excludes mse. CPU only for now.
    bool   mse_hessian         = false;
    double damp_percent        = 0.01;  // damping = damp_percent * mean(diag(H))
    double damp_auto_increment = 0.01;  // added to damp_percent while Cholesky fails (then error)
    int    block_size          = 128;
    int    zero_min            = 0;  // see grid_options::zero_min
    // GPTAQ (GPTQModel's "GPTQv2", Li et al. arXiv 2504.02692): the solve also pulls the weights
    // towards matching the full-precision model's output (gptaq_quantize, which needs the cross
    // term); gptaq_alpha scales that pull (GPTQModel's default 0.25). gptq_quantize refuses gptaq.
    bool   gptaq       = false;
    double gptaq_alpha = 0.25;
};

// The neutral result. Codes are in the ORIGINAL column order.
struct quantized_linear {
    int64_t              n_out = 0, n_in = 0;
    int                  bits       = 4;
    int                  group_size = 128;  // as requested (-1 allowed)
    int64_t              n_groups   = 1;
    bool                 sym        = true;
    std::vector<uint8_t> codes;   // [n_out, n_in] in 0 .. 2^bits - 1
    std::vector<float>   scales;  // [n_groups, n_out], exactly representable in F16
    std::vector<int32_t> zeros;   // [n_groups, n_out] in 0 .. 2^bits - 1
    std::vector<int32_t> g_idx;   // [n_in] group of each input column
    std::vector<int32_t> perm;    // [n_in] processing order (act-order), empty otherwise
};

struct gptq_stats {
    double  damp_percent_used = 0.0;  // after automatic increases
    int64_t n_dead_columns    = 0;    // diag(H) == 0
    double  loss              = 0.0;  // GPTQ's own running loss sum (w - q)^2 / d^2 / 2
    // Wall seconds of the GPU solve's steps (gptq_quantize_cuda; 0 on the CPU): checks, W and H
    // on the device and permuted; the damped Cholesky; the column loop; the results to the host.
    double seconds_prepare = 0.0, seconds_cholesky = 0.0, seconds_loop = 0.0, seconds_download = 0.0;
};

// Accumulates H = (2 / n_tokens) sum x x^T over batches of layer inputs, in F32.
class hessian_accumulator {
public:
    explicit hessian_accumulator(int64_t n_in) : n_in_(n_in), h_(static_cast<size_t>(n_in * n_in), 0.0f) {}
    // x: [n_tokens, n_in] row-major.
    void add(const ops_context& ctx, const float* x, int64_t n_tokens);
    // The normalised symmetric H [n_in, n_in]; the accumulator can continue afterwards.
    std::vector<float> finish() const;
    int64_t            n_tokens() const { return n_tokens_; }
    int64_t            n_in() const { return n_in_; }

private:
    int64_t            n_in_;
    int64_t            n_tokens_ = 0;
    std::vector<float> h_;  // upper triangle of sum x x^T
};

// GPTAQ's cross term dXXT = (2 / n_tokens) sum (x_fp - x_q) x_q^T [n_in, n_in] over batches of a
// linear's inputs in the full-precision model (x_fp) and in the partly quantized one (x_q, whose
// Hessian hessian_accumulator takes), token by token the same calibration positions. F32.
class cross_accumulator {
public:
    explicit cross_accumulator(int64_t n_in) : n_in_(n_in), d_(static_cast<size_t>(n_in * n_in), 0.0f) {}
    // x_fp, x_q: [n_tokens, n_in] row-major.
    void add(const ops_context& ctx, const float* x_fp, const float* x_q, int64_t n_tokens);
    // dXXT normalised by 2 / n_tokens (row i: feature i of x_fp - x_q; column j: of x_q).
    std::vector<float> finish() const;
    int64_t            n_tokens() const { return n_tokens_; }

private:
    int64_t            n_in_;
    int64_t            n_tokens_ = 0;
    std::vector<float> d_;     // sum (x_fp - x_q) x_q^T
    std::vector<float> diff_;  // scratch: x_fp - x_q of the last batch
};

// GPTQ's processing order of the columns from diag(H) [n_in]: empty (natural order) unless
// desc_act (stable argsort, descending) or gar (group_size gs, -1 = one group: each contiguous
// group's columns by descending diag, the groups by descending largest diag, ties by index).
// With gar, *group_order gets the original group processed at each block of gs positions (the
// group index its scales belong to); it is cleared otherwise.
std::vector<int32_t> gptq_column_order(const float* diag, int64_t n_in, int group_size, bool desc_act, bool gar,
                                       std::vector<int32_t>* group_order);

// GPTQ. w: [n_out, n_in], h: [n_in, n_in] (both unchanged). Errors: bad options, NaN/Inf in w or
// h (h non-finite means the layer's calibration inputs were), a Hessian that stays not positive
// definite even with damping raised to 1, or an update that diverged. A Hessian that is entirely
// zero (every input column dead: no calibration signal at all) falls back to rtn_quantize with a
// warning, rather than zeroing the whole weight as the dead-column rule would (docs/reliability.md).
result<quantized_linear> gptq_quantize(const ops_context& ctx, const float* w, int64_t n_out, int64_t n_in,
                                       const float* h, const gptq_options& opt, gptq_stats* stats = nullptr);

// GPTAQ (format.md section 2.6; docs/quantize.md "GPTAQ"): gptq_quantize with h the Hessian of
// the partly quantized model's inputs x_q and dxxt [n_in, n_in] the cross term
// (cross_accumulator) of the same calibration tokens. With U the upper Cholesky factor of
// (H + damp I)^-1 and P = alpha * triu_1(dXXT U^T) U (strict upper triangle; dead columns of H
// zeroed in dXXT's columns, both permuted alike under act-order / GAR), quantizing column i (in
// processing order) with value w_i, code q_i updates every later column j by
//     W[:, j] -= (w_i - q_i) / U[i, i] * U[i, j] - w_i * P[i, j],
// w_i the column's value right before it is rounded (in the blocked loop too: the reference's
// block update reads the rounded values there; see docs/quantize.md). opt.gptaq must be set;
// opt.gptaq_alpha in [0, 1]. Errors: those of gptq_quantize, a non-finite dxxt.
result<quantized_linear> gptaq_quantize(const ops_context& ctx, const float* w, int64_t n_out, int64_t n_in,
                                        const float* h, const float* dxxt, const gptq_options& opt,
                                        gptq_stats* stats = nullptr);

// Round to nearest with the same grid, contiguous groups (g_idx = k / group_size). Errors: bad
// options, NaN/Inf in w.
result<quantized_linear> rtn_quantize(const ops_context& ctx, const float* w, int64_t n_out, int64_t n_in,
                                      const gptq_options& opt);

// RTN whose grid per group (and row) is the clipping range minimising sum_k wt[k] (q_k - w_k)^2 over
// the group (grid_find_params_weighted: 1, 0.99, ..., 0.21 of the range); wt [n_in], finite, >= 0
// (all ones: the plain squared error). Contiguous groups as rtn_quantize; opt.mse must be off. The
// quantized embedding table uses it (docs/quantize.md "Quantized embeddings").
result<quantized_linear> rtn_quantize_weighted(const ops_context& ctx, const float* w, int64_t n_out, int64_t n_in,
                                               const float* wt, const gptq_options& opt);

// Check options against a layer shape; the message names the option and the value.
status gptq_check_options(const gptq_options& opt, int64_t n_in);

// x: [n_rows, n_cols]. An error naming `what`, the first non-finite value (NaN or Inf) and its
// position, and how many there are; ok when every value is finite.
status gptq_check_finite(const float* x, int64_t n_rows, int64_t n_cols, const std::string& what);
// The same with the scan split over ctx.pool (the error message is the same).
status gptq_check_finite(const ops_context& ctx, const float* x, int64_t n_rows, int64_t n_cols,
                         const std::string& what);

// out: [n_out, n_in] = scales[g_idx[k], n] * (codes[n, k] - zeros[g_idx[k], n]).
void quantized_linear_dequantize(const quantized_linear& q, float* out);
// The same with the rows split over ctx.pool.
void quantized_linear_dequantize(const ops_context& ctx, const quantized_linear& q, float* out);

// The error GPTQ minimises: sum over rows of (w - wq) H (w - wq)^T, i.e. tr(D H D^T) with
// D = w - wq [n_out, n_in]; with H = (2/n) X^T X this is (2/n) ||X D^T||^2.
double hessian_weighted_error(const ops_context& ctx, const float* w, const float* wq, int64_t n_out, int64_t n_in,
                              const float* h);

}  // namespace gptq
