// GPTQ quantization on the GPU (docs/cuda.md, "GPTQ on the GPU"): Hessian accumulation with cuBLAS,
// the upper Cholesky factor of H^-1 with cuSOLVER, and the column loop of one block as a kernel
// (the lazy update of the columns after the block is a cuBLAS SGEMM). The math follows
// quant/gptq.cpp step by step; these launchers only run it. Matrices are row-major F32 device
// arrays unless said otherwise. No CUDA types here: the stream and handles are forward-declared.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st*       cudaStream_t;
typedef struct cublasContext*     cublasHandle_t;
typedef struct cusolverDnContext* cusolverDnHandle_t;

namespace gptq::cuda {

// h_sum[n_in, n_in] (upper triangle, j >= i; the lower one is left as it is) += x^T x for
// x: [n_tokens, n_in] row-major, F32 (x_f16 false) or F16 bits (x_f16 true). F32 compute throughout
// (cuBLAS SSYRK for F32; GemmEx F16 x F16 -> F32 for F16, whose products are exact in F32).
status gptq_hessian_accumulate(cublasHandle_t blas, const void* x, bool x_f16, int64_t n_tokens, int64_t n_in,
                               float* h_sum, cudaStream_t stream);

// h[i, j] = h[j, i] = h_sum[i, j] * scale for j >= i (scale = 2 / n_tokens as an F32, as the CPU's
// hessian_accumulator::finish). h may alias h_sum.
status gptq_hessian_finish(const float* h_sum, float* h, int64_t n_in, float scale, cudaStream_t stream);

// The act-order permutation and the dead-column rule (format.md 2.4) applied while copying:
// w_out[r, i] = dead(perm[i]) ? 0 : w[r, perm[i]] and h_out[i, j] = h[perm[i], perm[j]], with
// h_out[i, i] = 1 where h[perm[i], perm[i]] == 0 (dead). perm: [n_in] I32 device, nullptr for the
// identity. w: [n_out, n_in], h: [n_in, n_in]; outputs do not alias inputs.
status gptq_permute(const float* w, const float* h, const int32_t* perm, float* w_out, float* h_out, int64_t n_out,
                    int64_t n_in, cudaStream_t stream);

// u = h with `damp` added to the diagonal (F32 add, as the CPU).
status gptq_damp_copy(const float* h, float* u, int64_t n, float damp, cudaStream_t stream);

// Workspace (bytes) for gptq_cholesky_inverse_upper on an [n, n] matrix.
result<size_t> gptq_cholesky_workspace_bytes(cusolverDnHandle_t solver, float* a, int64_t n);

// In place: a[n, n] symmetric positive definite -> U, the upper Cholesky factor of a^-1
// (a^-1 = U^T U), strict lower triangle zero; the same three LAPACK steps in F32 as
// kernels/cpu/linalg.cpp (potrf, potri, potrf). `*positive_definite` false (not an error) when a
// factorisation fails; a is then garbage. work: gptq_cholesky_workspace_bytes(), info_dev: one I32
// on the device. Synchronises the stream (the outcome is read on the host).
status gptq_cholesky_inverse_upper(cusolverDnHandle_t solver, float* a, int64_t n, void* work, size_t work_bytes,
                                   int* info_dev, bool* positive_definite, cudaStream_t stream);

// The flipped route to the same U (issue 18; GPTQ_CUDA_CHOLESKY_FLIP=1, an experiment): with J the
// exchange matrix, B = J (h + damp I) J = L L^T (one potrf), and U = J L^-1 J (one trtri), since
// h + damp I = (J L J)(J L J)^T with J L J upper. Flipping both axes of a row-major [n, n] array
// reverses it. About half the flops of potrf + potri + potrf; U agrees with that route up to
// rounding (not bit for bit). Workspace: device bytes returned, host bytes in *host_bytes.
status         gptq_damp_flip_copy(const float* h, float* u, int64_t n, float damp, cudaStream_t stream);
result<size_t> gptq_cholesky_flip_workspace_bytes(cusolverDnHandle_t solver, float* a, int64_t n, size_t* host_bytes);
// a = gptq_damp_flip_copy's output -> U in place (strict lower zero); `*positive_definite` as
// gptq_cholesky_inverse_upper's. Synchronises the stream.
status gptq_cholesky_inverse_upper_flip(cusolverDnHandle_t solver, float* a, int64_t n, void* work, size_t work_bytes,
                                        void* host_work, size_t host_bytes, int* info_dev, bool* positive_definite,
                                        cudaStream_t stream);

// One block of the column loop, columns [i1, i1 + nb) in processing order (nb <= 128).
struct gptq_block_args {
    float*       w    = nullptr;  // [n_out, n_in], permuted, updated: the block's columns are written back
    const float* u    = nullptr;  // [n_in, n_in] upper Cholesky factor of H^-1 (permuted order)
    float*       err  = nullptr;  // [n_out, nb] out: (w - q) / d per column
    uint8_t*     code = nullptr;  // [n_out, n_in] out, ORIGINAL column order
    // Group params [n_groups, n_out]: with `dynamic_groups`, written when a group starts (processing
    // order); else read at each column for the group of its ORIGINAL column, orig / group_size
    // (static groups; no groups: group_size = n_in and one group per row).
    float*         scale    = nullptr;
    int32_t*       zero     = nullptr;
    const int32_t* perm     = nullptr;  // [n_in] processing position -> original column, or nullptr
    double*        row_loss = nullptr;  // [n_out] += (w - q)^2 / d^2 / 2, summed in column order
    int64_t        n_out = 0, n_in = 0, i1 = 0, nb = 0;
    int64_t        group_size     = 0;  // n_in when there are no groups
    bool           dynamic_groups = false;
    int            bits = 4, zero_min = 0;
    bool           sym = true, mse = false;
};
status gptq_quantize_block(const gptq_block_args& a, cudaStream_t stream);

// The lazy update after a block: w[:, i2:] -= err[n_out, nb] . u[i1:i2, i2:] (i2 = i1 + nb), F32.
status gptq_lazy_update(cublasHandle_t blas, float* w, const float* u, const float* err, int64_t n_out, int64_t n_in,
                        int64_t i1, int64_t nb, cudaStream_t stream);

// *out = sum_ij d[i, j] (d h)[i, j] = trace(D H D^T) for d: [n_out, n_in], h: [n_in, n_in] symmetric;
// the product in F32 (PEDANTIC) into work [n_out, n_in], the sum in double. out: one device double.
status gptq_weighted_error(cublasHandle_t blas, const float* d, const float* h, float* work, int64_t n_out,
                           int64_t n_in, double* out, cudaStream_t stream);

// ---- device-resident linears (docs/cuda.md "GPTQ on the GPU": W, H and Q kept on the device) ----

// A quantized_linear's codes and params on the device (quant/gptq.h's convention): code [n_out,
// n_in] U8 in the original column order, scale [n_groups, n_out] F32, zero [n_groups, n_out] I32,
// g_idx [n_in] I32.
struct gptq_codes_view {
    const uint8_t* code  = nullptr;
    const float*   scale = nullptr;
    const int32_t* zero  = nullptr;
    const int32_t* g_idx = nullptr;
    int64_t        n_out = 0, n_in = 0;
};

// d = w - dequantize(q), as quantized_linear_dequantize then the host's w - wq: the F32 product
// scale * float(code - zero), then the F32 difference, both rounded (no FMA). w, d: [n_out, n_in].
status gptq_dequant_diff(const float* w, const gptq_codes_view& q, float* d, cudaStream_t stream);

// out = F16(dequantize(q)) (round to nearest even, as core/dtype.cpp f32_to_f16); *first_bad (one
// device I64) = the smallest flat index whose F32 value is not within the F16 range (|v| > 65504 or
// NaN), n_out * n_in when there is none. out: [n_out, n_in] F16 bits.
status gptq_dequant_f16(const gptq_codes_view& q, uint16_t* out, int64_t* first_bad, cudaStream_t stream);

// diag[i] = h[i, i] for h [n, n]; *first_nonfinite (one device I64) = the smallest flat index of a
// NaN or Inf in h, n * n when there is none.
status gptq_diag_check(const float* h, int64_t n, float* diag, int64_t* first_nonfinite, cudaStream_t stream);

}  // namespace gptq::cuda
