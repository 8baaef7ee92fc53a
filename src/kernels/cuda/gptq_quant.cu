// GPTQ on the GPU: Hessian accumulation (cuBLAS), Cholesky of H^-1 (cuSOLVER, F32 like the CPU's
// LAPACK), and the column loop of one block (one warp per weight row).
//
// Exactness: the per-column arithmetic mirrors quant/gptq.cpp and quant/grid.cpp operation by
// operation, with explicit round-to-nearest intrinsics (__fmul_rn, __fsub_rn, __fdiv_rn) so that
// nvcc cannot contract a multiply and an add into an FMA the CPU build does not use. Given the same
// U and the same weights, a row gets the same codes, scales and loss as on the CPU; what differs is
// U itself (cuSOLVER vs OpenBLAS blocking) and the lazy update (cuBLAS vs OpenBLAS summation order),
// a few ULPs that flip a code only near a rounding tie (the test measures how often).
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cusolverDn.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gptq_quant.cuh"

namespace gptq::cuda {

namespace {

constexpr int k_block_max    = 128;  // columns per block held in registers: 4 per lane
constexpr int k_slots        = k_block_max / 32;
constexpr int k_warps        = 8;  // rows (warps) per CTA in the column loop
constexpr int k_mse_grid     = 100;
constexpr int k_mse_cands    = 80;  // maxshrink 0.8 * grid 100, as grid.cpp
constexpr int k_elem_threads = 256;

status cusolver_status_of(cusolverStatus_t err, const char* stmt, const char* func, const char* file, int line) {
    if (err == CUSOLVER_STATUS_SUCCESS) return status::ok();
    const auto code =
        err == CUSOLVER_STATUS_ALLOC_FAILED ? status_code::STATUS_OUT_OF_MEMORY : status_code::STATUS_INTERNAL;
    return make_error(code, "cuSOLVER error {} in '{}' at {} ({}:{})", static_cast<int>(err), stmt, func, file, line);
}
#define GPTQ_CUSOLVER_CHECK(stmt) GPTQ_TRY(cusolver_status_of((stmt), #stmt, __func__, __FILE__, __LINE__))

status check_int32(int64_t v, const char* what) {
    if (v < 0 || v > 0x7fffffff)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "gptq (cuda): {} = {} exceeds the int32 range of cuBLAS", what, v);
    return status::ok();
}

// cuSOLVER's devInfo, read on the host (waits for the stream).
status read_info(const int* info_dev, int* info, cudaStream_t stream) {
    GPTQ_CUDA_CHECK(cudaMemcpyAsync(info, info_dev, sizeof(int), cudaMemcpyDeviceToHost, stream));
    GPTQ_CUDA_CHECK(cudaStreamSynchronize(stream));
    return status::ok();
}

unsigned grid_1d(int64_t n) {
    return static_cast<unsigned>(std::min<int64_t>((n + k_elem_threads - 1) / k_elem_threads, 65535 * 8));
}

// ---- the grid (quant/grid.h semantics) ------------------------------------------------------

struct dev_grid {
    float scale;
    int   zero;
};

__device__ float round_scale_f16(float s) {
    float r = __half2float(__float2half_rn(s));  // RNE with subnormals, as core/dtype.cpp f32_to_f16
    if (!(r > 0.0f)) r = 6.103515625e-05f;       // F16 0x0400, the smallest normal
    if (isinf(r)) r = 65504.0f;                  // F16 0x7bff
    return r;
}

__device__ dev_grid params_for_range(float xmin, float xmax, bool sym, int zero_min, int maxq) {
    dev_grid p;
    p.scale = round_scale_f16(__fdiv_rn(__fsub_rn(xmax, xmin), static_cast<float>(maxq)));
    if (sym) {
        p.zero = (maxq + 1) / 2;
    } else {
        const float z  = rintf(__fdiv_rn(-xmin, p.scale));
        const float lo = static_cast<float>(zero_min), hi = static_cast<float>(maxq);
        p.zero = static_cast<int>(z < lo ? lo : (hi < z ? hi : z));  // std::clamp
    }
    return p;
}

__device__ int grid_quantize(float x, dev_grid p, int maxq) {
    const float v = __fadd_rn(rintf(__fdiv_rn(x, p.scale)), static_cast<float>(p.zero));
    return !(v >= 0.0f) ? 0 : (v > static_cast<float>(maxq) ? maxq : static_cast<int>(v));
}

__device__ float grid_dequantize(int q, dev_grid p) {
    return __fmul_rn(p.scale, static_cast<float>(q - p.zero));
}

// grid_find_params over x[0 .. n) (global memory), computed by the whole warp; every lane returns
// the same params. min/max are exact in any order; the MSE search gives each lane candidates
// lane, lane + 32, lane + 64 and sums each candidate's error over x in the CPU's order (F64).
__device__ dev_grid find_params_warp(const float* x, int64_t n, int bits, bool sym, bool mse, int zero_min,
                                     unsigned lane) {
    const int maxq = (1 << bits) - 1;
    float     xmin = 0.0f, xmax = 0.0f;
    for (int64_t k = lane; k < n; k += 32) {
        const float v = x[k];
        xmin          = v < xmin ? v : xmin;  // std::min(xmin, v)
        xmax          = xmax < v ? v : xmax;  // std::max(xmax, v)
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float omin = __shfl_xor_sync(0xffffffffu, xmin, off);
        const float omax = __shfl_xor_sync(0xffffffffu, xmax, off);
        xmin             = omin < xmin ? omin : xmin;
        xmax             = xmax < omax ? omax : xmax;
    }
    if (sym) {
        const float a = fabsf(xmin);
        xmax          = a < xmax ? xmax : a;  // std::max(|xmin|, xmax)
        if (xmin < 0.0f) xmin = -xmax;
    }
    if (xmin == 0.0f && xmax == 0.0f) {
        xmin = -1.0f;
        xmax = 1.0f;
    }
    if (!mse) return params_for_range(xmin, xmax, sym, zero_min, maxq);

    double best_err = INFINITY;
    int    best_c   = 0x7fffffff;
    for (int c = static_cast<int>(lane); c < k_mse_cands; c += 32) {
        const float    s    = 1.0f - __fdiv_rn(static_cast<float>(c), static_cast<float>(k_mse_grid));
        const dev_grid cand = params_for_range(__fmul_rn(s, xmin), __fmul_rn(s, xmax), sym, zero_min, maxq);
        double         err  = 0.0;
        for (int64_t j = 0; j < n; ++j) {
            const float v  = x[j];
            const float dv = fabsf(__fsub_rn(grid_dequantize(grid_quantize(v, cand, maxq), cand), v));
            err            = __dadd_rn(err, pow(static_cast<double>(dv), 2.4));
        }
        if (err < best_err) {  // strict: the first (smallest c) of equal errors, as the CPU's scan
            best_err = err;
            best_c   = c;
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const double oe = __shfl_xor_sync(0xffffffffu, best_err, off);
        const int    oc = __shfl_xor_sync(0xffffffffu, best_c, off);
        if (oe < best_err || (oe == best_err && oc < best_c)) {
            best_err = oe;
            best_c   = oc;
        }
    }
    if (best_c == 0x7fffffff) best_c = 0;  // every error infinite: the CPU keeps the first candidate
    const float s = 1.0f - __fdiv_rn(static_cast<float>(best_c), static_cast<float>(k_mse_grid));
    return params_for_range(__fmul_rn(s, xmin), __fmul_rn(s, xmax), sym, zero_min, maxq);
}

// ---- kernels --------------------------------------------------------------------------------

__global__ void hessian_finish_kernel(const float* h_sum, float* h, int64_t n, float scale) {
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * n;
         idx += gridDim.x * int64_t(blockDim.x)) {
        const int64_t i = idx / n, j = idx % n;
        if (j < i) continue;
        const float v = __fmul_rn(h_sum[idx], scale);
        h[i * n + j]  = v;
        h[j * n + i]  = v;
    }
}

__global__ void permute_w_kernel(const float* w, const float* h, const int32_t* perm, float* w_out, int64_t n_out,
                                 int64_t n_in) {
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n_out * n_in;
         idx += gridDim.x * int64_t(blockDim.x)) {
        const int64_t r = idx / n_in, i = idx % n_in;
        const int64_t src = perm ? perm[i] : i;
        w_out[idx]        = h[src * n_in + src] == 0.0f ? 0.0f : w[r * n_in + src];
    }
}

__global__ void permute_h_kernel(const float* h, const int32_t* perm, float* h_out, int64_t n) {
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * n;
         idx += gridDim.x * int64_t(blockDim.x)) {
        const int64_t i = idx / n, j = idx % n;
        const int64_t pi = perm ? perm[i] : i, pj = perm ? perm[j] : j;
        const float   v = h[pi * n + pj];
        h_out[idx]      = (i == j && v == 0.0f) ? 1.0f : v;
    }
}

__global__ void damp_copy_kernel(const float* h, float* u, int64_t n, float damp) {
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * n;
         idx += gridDim.x * int64_t(blockDim.x)) {
        const int64_t i = idx / n, j = idx % n;
        u[idx] = i == j ? __fadd_rn(h[idx], damp) : h[idx];
    }
}

// Row-major: lower -> upper (a[i, j] = a[j, i] for j > i), or zero the strict lower triangle.
__global__ void triangle_kernel(float* a, int64_t n, bool mirror_lower) {
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * n;
         idx += gridDim.x * int64_t(blockDim.x)) {
        const int64_t i = idx / n, j = idx % n;
        if (mirror_lower && j > i) a[idx] = a[j * n + i];
        if (!mirror_lower && j < i) a[idx] = 0.0f;
    }
}

// One warp per row (grid-stride over rows). Lane l holds block columns j = l + 32 t, t < 4.
__global__ void __launch_bounds__(32 * k_warps) gptq_block_kernel(gptq_block_args a) {
    const unsigned lane = threadIdx.x & 31u;
    const int64_t  nb = a.nb, i1 = a.i1, n_in = a.n_in, gs = a.group_size;
    const int      maxq = (1 << a.bits) - 1;
    for (int64_t row = blockIdx.x * int64_t(k_warps) + threadIdx.x / 32; row < a.n_out;
         row += gridDim.x * int64_t(k_warps)) {
        float* wrow = a.w + row * n_in;
        float  w[k_slots];
#pragma unroll
        for (int t = 0; t < k_slots; ++t) {
            const int64_t j = lane + 32 * t;
            w[t]            = j < nb ? wrow[i1 + j] : 0.0f;
        }
        double   loss = lane == 0 ? a.row_loss[row] : 0.0;
        dev_grid p{1.0f, 0};
        if (a.dynamic_groups && i1 % gs != 0) {  // a group that started in an earlier block
            const int64_t gi = (i1 / gs) * a.n_out + row;
            p                = dev_grid{a.scale[gi], a.zero[gi]};
        }
        for (int64_t i = 0; i < nb; ++i) {
            const int64_t col  = i1 + i;
            const int64_t orig = a.perm ? a.perm[col] : col;
            if (a.dynamic_groups) {
                if (col % gs == 0) {
                    // The group's params from the weights as updated so far: this block's working
                    // copy (written back to the row first) and, beyond the block, the global W.
#pragma unroll
                    for (int t = 0; t < k_slots; ++t) {
                        const int64_t j = lane + 32 * t;
                        if (j >= i && j < nb) wrow[i1 + j] = w[t];
                    }
                    __syncwarp();
                    const int64_t cend = col + gs < n_in ? col + gs : n_in;
                    p = find_params_warp(wrow + col, cend - col, a.bits, a.sym, a.mse, a.zero_min, lane);
                    if (lane == 0) {
                        a.scale[(col / gs) * a.n_out + row] = p.scale;
                        a.zero[(col / gs) * a.n_out + row]  = p.zero;
                    }
                    __syncwarp();
                }
            } else {
                const int64_t gi = (orig / gs) * a.n_out + row;
                p                = dev_grid{a.scale[gi], a.zero[gi]};
            }
            const int slot = static_cast<int>(i >> 5);
            float     mine = w[0];
#pragma unroll
            for (int t = 1; t < k_slots; ++t)
                if (slot == t) mine = w[t];
            const float x  = __shfl_sync(0xffffffffu, mine, static_cast<int>(i & 31));
            const int   qi = grid_quantize(x, p, maxq);
            const float dq = grid_dequantize(qi, p);
            const float d  = a.u[col * n_in + col];
            const float df = __fsub_rn(x, dq);
            const float e  = __fdiv_rn(df, d);
            if (lane == 0) {
                const double dd = static_cast<double>(df), d2 = static_cast<double>(d);
                loss = __dadd_rn(loss, __ddiv_rn(__ddiv_rn(__dmul_rn(dd, dd), __dmul_rn(d2, d2)), 2.0));
                a.code[row * n_in + orig] = static_cast<uint8_t>(qi);
                a.err[row * nb + i]       = e;
            }
            const float* urow = a.u + col * n_in + i1;
#pragma unroll
            for (int t = 0; t < k_slots; ++t) {
                const int64_t j = lane + 32 * t;
                if (j >= i && j < nb) w[t] = __fsub_rn(w[t], __fmul_rn(e, urow[j]));
            }
        }
#pragma unroll
        for (int t = 0; t < k_slots; ++t) {
            const int64_t j = lane + 32 * t;
            if (j < nb) wrow[i1 + j] = w[t];
        }
        if (lane == 0) a.row_loss[row] = loss;
        __syncwarp();
    }
}

}  // namespace

status gptq_hessian_accumulate(cublasHandle_t blas, const void* x, bool x_f16, int64_t n_tokens, int64_t n_in,
                               float* h_sum, cudaStream_t stream) {
    if (n_tokens <= 0 || n_in <= 0) return status::ok();
    GPTQ_TRY(check_int32(n_tokens, "n_tokens"));
    GPTQ_TRY(check_int32(n_in, "n_in"));
    GPTQ_CUBLAS_CHECK(cublasSetStream(blas, stream));
    const float one = 1.0f;
    const int   n = static_cast<int>(n_in), k = static_cast<int>(n_tokens);
    // Row-major x [n_tokens, n_in] is column-major x^T [n_in, n_tokens]; x^T x is symmetric, and
    // cuBLAS's column-major lower triangle is our row-major upper one.
    if (x_f16) {
        GPTQ_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_T, n, n, k, &one, x, CUDA_R_16F, n, x, CUDA_R_16F,
                                       n, &one, h_sum, CUDA_R_32F, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    } else {
        GPTQ_CUBLAS_CHECK(cublasSsyrk(blas, CUBLAS_FILL_MODE_LOWER, CUBLAS_OP_N, n, k, &one,
                                      static_cast<const float*>(x), n, &one, h_sum, n));
    }
    return status::ok();
}

status gptq_hessian_finish(const float* h_sum, float* h, int64_t n_in, float scale, cudaStream_t stream) {
    if (n_in <= 0) return status::ok();
    hessian_finish_kernel<<<grid_1d(n_in * n_in), k_elem_threads, 0, stream>>>(h_sum, h, n_in, scale);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status gptq_permute(const float* w, const float* h, const int32_t* perm, float* w_out, float* h_out, int64_t n_out,
                    int64_t n_in, cudaStream_t stream) {
    if (n_out > 0 && n_in > 0) {
        permute_w_kernel<<<grid_1d(n_out * n_in), k_elem_threads, 0, stream>>>(w, h, perm, w_out, n_out, n_in);
        GPTQ_CUDA_CHECK_LAUNCH();
    }
    if (n_in > 0) {
        permute_h_kernel<<<grid_1d(n_in * n_in), k_elem_threads, 0, stream>>>(h, perm, h_out, n_in);
        GPTQ_CUDA_CHECK_LAUNCH();
    }
    return status::ok();
}

status gptq_damp_copy(const float* h, float* u, int64_t n, float damp, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    damp_copy_kernel<<<grid_1d(n * n), k_elem_threads, 0, stream>>>(h, u, n, damp);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

result<size_t> gptq_cholesky_workspace_bytes(cusolverDnHandle_t solver, float* a, int64_t n) {
    GPTQ_TRY(check_int32(n, "n_in"));
    const int nn = static_cast<int>(n);
    int       l1 = 0, l2 = 0, l3 = 0;
    GPTQ_CUSOLVER_CHECK(cusolverDnSpotrf_bufferSize(solver, CUBLAS_FILL_MODE_UPPER, nn, a, nn, &l1));
    GPTQ_CUSOLVER_CHECK(cusolverDnSpotri_bufferSize(solver, CUBLAS_FILL_MODE_UPPER, nn, a, nn, &l2));
    GPTQ_CUSOLVER_CHECK(cusolverDnSpotrf_bufferSize(solver, CUBLAS_FILL_MODE_LOWER, nn, a, nn, &l3));
    return static_cast<size_t>(std::max({l1, l2, l3, 1})) * sizeof(float);
}

status gptq_cholesky_inverse_upper(cusolverDnHandle_t solver, float* a, int64_t n, void* work, size_t work_bytes,
                                   int* info_dev, bool* positive_definite, cudaStream_t stream) {
    *positive_definite = false;
    if (n == 0) {
        *positive_definite = true;
        return status::ok();
    }
    GPTQ_TRY(check_int32(n, "n_in"));
    const int nn    = static_cast<int>(n);
    const int lwork = static_cast<int>(std::min<size_t>(work_bytes / sizeof(float), 0x7fffffff));
    auto*     wk    = static_cast<float*>(work);
    GPTQ_CUSOLVER_CHECK(cusolverDnSetStream(solver, stream));
    int info = 0;
    // The CPU's sequence (kernels/cpu/linalg.cpp): LAPACK sees our row-major array as its transpose,
    // so its "U" is our lower factor L (a = L L^T); potri leaves a^-1 in our lower triangle.
    GPTQ_CUSOLVER_CHECK(cusolverDnSpotrf(solver, CUBLAS_FILL_MODE_UPPER, nn, a, nn, wk, lwork, info_dev));
    GPTQ_TRY(read_info(info_dev, &info, stream));
    if (info != 0) return status::ok();
    GPTQ_CUSOLVER_CHECK(cusolverDnSpotri(solver, CUBLAS_FILL_MODE_UPPER, nn, a, nn, wk, lwork, info_dev));
    GPTQ_TRY(read_info(info_dev, &info, stream));
    if (info != 0) return status::ok();
    triangle_kernel<<<grid_1d(n * n), k_elem_threads, 0, stream>>>(a, n, true);
    GPTQ_CUDA_CHECK_LAUNCH();
    // LAPACK's lower factor of a^-1 is our upper U (a^-1 = U^T U).
    GPTQ_CUSOLVER_CHECK(cusolverDnSpotrf(solver, CUBLAS_FILL_MODE_LOWER, nn, a, nn, wk, lwork, info_dev));
    GPTQ_TRY(read_info(info_dev, &info, stream));
    if (info != 0) return status::ok();
    triangle_kernel<<<grid_1d(n * n), k_elem_threads, 0, stream>>>(a, n, false);
    GPTQ_CUDA_CHECK_LAUNCH();
    *positive_definite = true;
    return status::ok();
}

namespace {
// u = reverse(h) (both axes flipped) + damp on the diagonal (which reversal keeps in place).
__global__ void damp_flip_copy_kernel(const float* h, float* u, int64_t n, float damp) {
    const int64_t nn = n * n;
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < nn;
         idx += gridDim.x * int64_t(blockDim.x)) {
        const float v = h[nn - 1 - idx];
        u[idx]        = idx / n == idx % n ? __fadd_rn(v, damp) : v;
    }
}
// a reversed in place.
__global__ void reverse_kernel(float* a, int64_t nn) {
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < nn / 2;
         idx += gridDim.x * int64_t(blockDim.x)) {
        const float t   = a[idx];
        a[idx]          = a[nn - 1 - idx];
        a[nn - 1 - idx] = t;
    }
}
}  // namespace

status gptq_damp_flip_copy(const float* h, float* u, int64_t n, float damp, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    damp_flip_copy_kernel<<<grid_1d(n * n), k_elem_threads, 0, stream>>>(h, u, n, damp);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

result<size_t> gptq_cholesky_flip_workspace_bytes(cusolverDnHandle_t solver, float* a, int64_t n, size_t* host_bytes) {
    GPTQ_TRY(check_int32(n, "n_in"));
    const int nn = static_cast<int>(n);
    int       l1 = 0;
    GPTQ_CUSOLVER_CHECK(cusolverDnSpotrf_bufferSize(solver, CUBLAS_FILL_MODE_UPPER, nn, a, nn, &l1));
    size_t dev = 0, host = 0;
    GPTQ_CUSOLVER_CHECK(cusolverDnXtrtri_bufferSize(solver, CUBLAS_FILL_MODE_UPPER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F,
                                                    a, n, &dev, &host));
    *host_bytes = std::max<size_t>(host, 1);
    return std::max({static_cast<size_t>(std::max(l1, 1)) * sizeof(float), dev, size_t(1)});
}

status gptq_cholesky_inverse_upper_flip(cusolverDnHandle_t solver, float* a, int64_t n, void* work, size_t work_bytes,
                                        void* host_work, size_t host_bytes, int* info_dev, bool* positive_definite,
                                        cudaStream_t stream) {
    *positive_definite = false;
    if (n == 0) {
        *positive_definite = true;
        return status::ok();
    }
    GPTQ_TRY(check_int32(n, "n_in"));
    const int nn    = static_cast<int>(n);
    const int lwork = static_cast<int>(std::min<size_t>(work_bytes / sizeof(float), 0x7fffffff));
    GPTQ_CUSOLVER_CHECK(cusolverDnSetStream(solver, stream));
    int info = 0;
    // Column-major "U" on the row-major B: B = L L^T with L in our lower triangle.
    GPTQ_CUSOLVER_CHECK(
        cusolverDnSpotrf(solver, CUBLAS_FILL_MODE_UPPER, nn, a, nn, static_cast<float*>(work), lwork, info_dev));
    GPTQ_TRY(read_info(info_dev, &info, stream));
    if (info != 0) return status::ok();
    // Its inverse in place: column-major upper = our lower triangle, L^-1.
    GPTQ_CUSOLVER_CHECK(cusolverDnXtrtri(solver, CUBLAS_FILL_MODE_UPPER, CUBLAS_DIAG_NON_UNIT, n, CUDA_R_32F, a, n,
                                         work, work_bytes, host_work, host_bytes, info_dev));
    GPTQ_TRY(read_info(info_dev, &info, stream));
    if (info != 0) return status::ok();
    // U = J L^-1 J: the array reversed puts it in our upper triangle; the rest (B's old upper) zeroed.
    reverse_kernel<<<grid_1d(n * n / 2 + 1), k_elem_threads, 0, stream>>>(a, n * n);
    GPTQ_CUDA_CHECK_LAUNCH();
    triangle_kernel<<<grid_1d(n * n), k_elem_threads, 0, stream>>>(a, n, false);
    GPTQ_CUDA_CHECK_LAUNCH();
    *positive_definite = true;
    return status::ok();
}

status gptq_quantize_block(const gptq_block_args& a, cudaStream_t stream) {
    if (a.nb <= 0 || a.n_out <= 0) return status::ok();
    if (a.nb > k_block_max || a.i1 < 0 || a.i1 + a.nb > a.n_in || a.group_size <= 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "gptq_quantize_block: block [{}, {}) of {} columns (at most {} per block), group size {}",
                          a.i1, a.i1 + a.nb, a.n_in, k_block_max, a.group_size);
    const int64_t blocks = std::min<int64_t>((a.n_out + k_warps - 1) / k_warps, 65535);
    gptq_block_kernel<<<static_cast<unsigned>(blocks), 32 * k_warps, 0, stream>>>(a);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status gptq_lazy_update(cublasHandle_t blas, float* w, const float* u, const float* err, int64_t n_out, int64_t n_in,
                        int64_t i1, int64_t nb, cudaStream_t stream) {
    const int64_t i2 = i1 + nb;
    if (i2 >= n_in || n_out <= 0 || nb <= 0) return status::ok();
    GPTQ_TRY(check_int32(n_out, "n_out"));
    GPTQ_TRY(check_int32(n_in, "n_in"));
    GPTQ_CUBLAS_CHECK(cublasSetStream(blas, stream));
    const float minus_one = -1.0f, one = 1.0f;
    // Row-major W[:, i2:] -= Err [n_out, nb] . U[i1:i2, i2:] is, column-major, W^T -= U^T Err^T.
    // PEDANTIC: full F32 products even if someone set a TF32 math mode on the handle.
    GPTQ_CUBLAS_CHECK(cublasGemmEx(
        blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n_in - i2), static_cast<int>(n_out), static_cast<int>(nb),
        &minus_one, u + i1 * n_in + i2, CUDA_R_32F, static_cast<int>(n_in), err, CUDA_R_32F, static_cast<int>(nb), &one,
        w + i2, CUDA_R_32F, static_cast<int>(n_in), CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
    return status::ok();
}

namespace {
// out += sum_i a[i] * b[i] in double: grid-stride partial sums, a block reduction, one atomic per block.
__global__ void dot_f32_to_f64(const float* a, const float* b, int64_t n, double* out) {
    double s = 0.0;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        s += double(a[i]) * double(b[i]);
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    __shared__ double warp_sums[32];
    const int         lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < int(blockDim.x >> 5) ? warp_sums[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (lane == 0) atomicAdd(out, s);
    }
}
}  // namespace

status gptq_weighted_error(cublasHandle_t blas, const float* d, const float* h, float* work, int64_t n_out,
                           int64_t n_in, double* out, cudaStream_t stream) {
    GPTQ_TRY(check_int32(n_out, "n_out"));
    GPTQ_TRY(check_int32(n_in, "n_in"));
    GPTQ_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double), stream));
    if (n_out <= 0 || n_in <= 0) return status::ok();
    GPTQ_CUBLAS_CHECK(cublasSetStream(blas, stream));
    const float one = 1.0f, zero = 0.0f;
    // Row-major work = D H is, column-major, work^T = H^T D^T = H D^T (H symmetric).
    GPTQ_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n_in), static_cast<int>(n_out),
                                   static_cast<int>(n_in), &one, h, CUDA_R_32F, static_cast<int>(n_in), d, CUDA_R_32F,
                                   static_cast<int>(n_in), &zero, work, CUDA_R_32F, static_cast<int>(n_in),
                                   CUBLAS_COMPUTE_32F_PEDANTIC, CUBLAS_GEMM_DEFAULT));
    const int64_t n      = n_out * n_in;
    const int     blocks = static_cast<int>(std::min<int64_t>((n + 255) / 256, 1024));
    dot_f32_to_f64<<<blocks, 256, 0, stream>>>(d, work, n, out);
    GPTQ_CUDA_CHECK(cudaGetLastError());
    return status::ok();
}

// ---- device-resident linears ------------------------------------------------------------------

namespace {

__device__ __forceinline__ float dequant_at(const gptq_codes_view& q, int64_t idx) {
    const int64_t r = idx / q.n_in, k = idx % q.n_in;
    const int64_t gi = int64_t(q.g_idx[k]) * q.n_out + r;
    return __fmul_rn(q.scale[gi], static_cast<float>(static_cast<int>(q.code[idx]) - q.zero[gi]));
}

__global__ void dequant_diff_kernel(const float* w, gptq_codes_view q, float* d) {
    const int64_t n = q.n_out * q.n_in;
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n; idx += gridDim.x * int64_t(blockDim.x))
        d[idx] = __fsub_rn(w[idx], dequant_at(q, idx));
}

__global__ void fill_i64_kernel(int64_t* p, int64_t v) {
    *p = v;
}

__global__ void dequant_f16_kernel(gptq_codes_view q, uint16_t* out, unsigned long long* first_bad) {
    const int64_t n = q.n_out * q.n_in;
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n;
         idx += gridDim.x * int64_t(blockDim.x)) {
        const float v = dequant_at(q, idx);
        if (!(fabsf(v) <= 65504.0f)) atomicMin(first_bad, static_cast<unsigned long long>(idx));
        out[idx] = __half_as_ushort(__float2half_rn(v));
    }
}

__global__ void diag_check_kernel(const float* h, int64_t n, float* diag, unsigned long long* first_nonfinite) {
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < n * n;
         idx += gridDim.x * int64_t(blockDim.x)) {
        const float v = h[idx];
        if (!isfinite(v)) atomicMin(first_nonfinite, static_cast<unsigned long long>(idx));
        if (idx / n == idx % n) diag[idx / n] = v;
    }
}

}  // namespace

status gptq_dequant_diff(const float* w, const gptq_codes_view& q, float* d, cudaStream_t stream) {
    const int64_t n = q.n_out * q.n_in;
    if (n <= 0) return status::ok();
    dequant_diff_kernel<<<grid_1d(n), k_elem_threads, 0, stream>>>(w, q, d);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status gptq_dequant_f16(const gptq_codes_view& q, uint16_t* out, int64_t* first_bad, cudaStream_t stream) {
    const int64_t n = q.n_out * q.n_in;
    static_assert(sizeof(int64_t) == sizeof(unsigned long long));
    fill_i64_kernel<<<1, 1, 0, stream>>>(first_bad, n);
    GPTQ_CUDA_CHECK_LAUNCH();
    if (n <= 0) return status::ok();
    dequant_f16_kernel<<<grid_1d(n), k_elem_threads, 0, stream>>>(q, out,
                                                                  reinterpret_cast<unsigned long long*>(first_bad));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status gptq_diag_check(const float* h, int64_t n, float* diag, int64_t* first_nonfinite, cudaStream_t stream) {
    fill_i64_kernel<<<1, 1, 0, stream>>>(first_nonfinite, n * n);
    GPTQ_CUDA_CHECK_LAUNCH();
    if (n <= 0) return status::ok();
    diag_check_kernel<<<grid_1d(n * n), k_elem_threads, 0, stream>>>(
        h, n, diag, reinterpret_cast<unsigned long long*>(first_nonfinite));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
