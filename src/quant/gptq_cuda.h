// GPTQ on one linear layer on the GPU (GPTQ_CUDA builds only; EXPERIMENTAL: compiled and tested
// against the CPU path by tests/cuda/test_gptq_cuda.cpp, see docs/gptq.md "GPTQ on the GPU").
//
// Same inputs, options, result and errors as gptq_quantize (quant/gptq.h); the CPU path stays the
// oracle. The cheap O(n_in) decisions (dead columns, act-order permutation, mean of diag(H), and
// the up-front grid params of full rows and static groups) run on the host with the CPU's code; the
// O(n^3) work (Cholesky of H^-1 with cuSOLVER, the column loop, the lazy updates with cuBLAS) runs on
// the device in F32, as the CPU does. Codes equal the CPU's except where a rounding tie falls
// differently (a few-ULP difference in U or in the lazy update), which the tests measure.
#pragma once

#include <cstdint>
#include <vector>

#include "core/status.h"
#include "ops/ops.h"
#include "ops/ops_cuda.h"
#include "ops/ops_cuda_gptq.h"
#include "quant/gptq.h"

namespace gptq {

// w: [n_out, n_in], h: [n_in, n_in] host arrays (unchanged). ctx: host threads for the host-side
// steps (grid params of full rows / static groups). Device memory: about 2 (n_out n_in + n_in^2)
// F32 plus the codes.
result<quantized_linear> gptq_quantize_cuda(cuda_context& cctx, const ops_context& ctx, const float* w, int64_t n_out,
                                            int64_t n_in, const float* h, const gptq_options& opt,
                                            gptq_stats* stats = nullptr);

// A quantized_linear's codes and params on the device (the device-resident path: W, H and Q stay
// there between the solve, the errors and the calibration runner's update; docs/cuda.md).
struct gptq_cuda_codes {
    int64_t         n_out = 0, n_in = 0;
    cuda_buffer     code;   // [n_out, n_in] U8, original column order
    cuda_buffer     scale;  // [n_groups, n_out] F32
    cuda_buffer     zero;   // [n_groups, n_out] I32
    cuda_buffer     g_idx;  // [n_in] I32
    cuda_gptq_codes view() const;
};
// q's params (and its codes unless `code` already holds them on the device) uploaded.
result<gptq_cuda_codes> gptq_cuda_codes_upload(cuda_context& cctx, const quantized_linear& q,
                                               cuda_buffer code = cuda_buffer());

// gptq_quantize_cuda with H already on the device (h_dev [n_in, n_in], unchanged; its diagonal
// and finiteness are read there, the same checks and messages) and the device copies kept: *w_dev
// gets W [n_out, n_in] F32 as given, *codes the result's codes and params. Same result as
// gptq_quantize_cuda(w, host copy of h_dev). w16_dev (or nullptr): W as F16 on the device, which
// the caller knows to widen to w exactly (every value F16-representable); W is then widened there
// instead of uploaded. solver (or nullptr): a cuSOLVER handle + workspace kept by the caller
// across linears (else one is made per call, as gptq_quantize_cuda does).
result<quantized_linear> gptq_quantize_cuda_resident(cuda_context& cctx, const ops_context& ctx, const float* w,
                                                     int64_t n_out, int64_t n_in, const float* h_dev,
                                                     const gptq_options& opt, gptq_stats* stats, cuda_buffer* w_dev,
                                                     gptq_cuda_codes* codes, const uint16_t* w16_dev = nullptr,
                                                     cuda_gptq_solver* solver = nullptr);
// hessian_weighted_error_cuda of a device W [n_out, n_in] F32 against device codes (the same
// value: D = W - dequantize(Q) with the host's rounding, then the same product and sum).
result<double> hessian_weighted_error_cuda(cuda_context& cctx, const float* w_dev, const gptq_cuda_codes& q,
                                           const float* h_dev);

// hessian_weighted_error (quant/gptq.h) on the GPU: trace((W - Q) H (W - Q)^T) for host w, wq
// [n_out, n_in] and a device h [n_in, n_in] (F32 product, double sum); W - Q on ctx's threads.
result<double> hessian_weighted_error_cuda(cuda_context& cctx, const ops_context& ctx, const float* w, const float* wq,
                                           int64_t n_out, int64_t n_in, const float* h_dev);

// H = (2 / n_tokens) sum x x^T on the device, F32 sums (hessian_accumulator's contract).
class cuda_hessian_accumulator {
public:
    static result<cuda_hessian_accumulator> create(cuda_context& cctx, int64_t n_in);
    // x: [n_tokens, n_in] row-major device array, F32 or F16 bits.
    status add_f32(cuda_context& cctx, const float* x, int64_t n_tokens);
    status add_f16(cuda_context& cctx, const uint16_t* x, int64_t n_tokens);
    // The normalised symmetric H [n_in, n_in] into a device array h (the sums are kept, so the
    // accumulator can continue), or copied to the host.
    status                     finish(cuda_context& cctx, float* h) const;
    result<std::vector<float>> finish_host(cuda_context& cctx) const;
    int64_t                    n_tokens() const { return n_tokens_; }
    int64_t                    n_in() const { return n_in_; }

private:
    int64_t     n_in_     = 0;
    int64_t     n_tokens_ = 0;
    cuda_buffer sum_;  // [n_in, n_in] F32, upper triangle of sum x x^T
};

}  // namespace gptq
