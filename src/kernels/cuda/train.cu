// LoRA training kernels (train.cuh): plain, one block per row for the reductions (RMSNorm, softmax,
// cross-entropy), one thread per element otherwise. Correctness first: each mirrors the CPU
// training arithmetic (kernels/cpu/backward.cpp, model/llama_train.cpp), double where the CPU sums
// in double.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "core/dropout_mask.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/train.cuh"

namespace gptq::cuda {

namespace {

constexpr int     k_block = 256;
constexpr int64_t k_i32   = 0x7fffffff;

status check_rows(const char* who, int64_t n_rows, int64_t dim) {
    if (n_rows > k_i32 || dim > k_i32 || n_rows < 0 || dim < 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: {} rows of {} do not fit the grid", who, n_rows,
                          dim);
    return status::ok();
}

unsigned blocks_for(int64_t n) {
    return unsigned(std::min<int64_t>((n + k_block - 1) / k_block, 1 << 20));
}

// Sum over the block (k_block threads); every thread gets the total. `sh` holds k_block / 32 values.
template <typename T>
__device__ T block_sum(T v, T* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();  // sh may still be read by a previous call
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x / 32] = v;
    __syncthreads();
    T t = 0;
    for (int i = 0; i < k_block / 32; ++i) t += sh[i];
    return t;
}
__device__ float block_max(float v, float* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x / 32] = v;
    __syncthreads();
    float t = -INFINITY;
    for (int i = 0; i < k_block / 32; ++i) t = fmaxf(t, sh[i]);
    return t;
}

__global__ void f32_to_bf16_kernel(const float* src, __nv_bfloat16* dst, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}
__global__ void f16_to_bf16_kernel(const __half* src, __nv_bfloat16* dst, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        dst[i] = __float2bfloat16_rn(__half2float(src[i]));
}

__global__ void lora_dropout_kernel(const float* x, float* out, int64_t total, uint64_t key, uint32_t threshold,
                                    float inv, bool add) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const float v = dropout_keep(key, i, threshold) ? x[i] * inv : 0.0f;
        if (add)
            out[i] += v;
        else
            out[i] = v;
    }
}

__global__ void embedding_kernel(const __half* table, const int32_t* ids, float* out, int64_t n, int64_t vocab,
                                 int64_t dim) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n * dim;
         i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t t = i / dim, c = i % dim;
        const int32_t id = ids[t];
        out[i]           = (id >= 0 && id < vocab) ? __half2float(table[int64_t(id) * dim + c]) : 0.0f;
    }
}

__global__ void __launch_bounds__(k_block)
    rms_norm_kernel(const float* x, const __half* w, float* y, int64_t dim, float eps) {
    __shared__ double sh[k_block / 32];
    const float*      xr = x + int64_t(blockIdx.x) * dim;
    float*            yr = y + int64_t(blockIdx.x) * dim;
    double            ss = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += k_block) ss += double(xr[i]) * xr[i];
    ss              = block_sum(ss, sh);
    const float inv = float(1.0 / sqrt(ss / double(dim) + double(eps)));
    for (int64_t i = threadIdx.x; i < dim; i += k_block) yr[i] = __half2float(w[i]) * (xr[i] * inv);
}

__global__ void __launch_bounds__(k_block)
    rms_norm_backward_kernel(const float* x, const __half* w, const float* dy, float* dx, int64_t dim, float eps) {
    __shared__ double sh[k_block / 32];
    const int64_t     off = int64_t(blockIdx.x) * dim;
    double            ss = 0.0, gx = 0.0;
    for (int64_t i = threadIdx.x; i < dim; i += k_block) {
        const double xv = x[off + i];
        ss += xv * xv;
        gx += double(__half2float(w[i])) * dy[off + i] * xv;
    }
    ss              = block_sum(ss, sh);
    gx              = block_sum(gx, sh);
    const double rs = 1.0 / sqrt(ss / double(dim) + double(eps));
    const double c  = rs * rs * rs * gx / double(dim);
    for (int64_t i = threadIdx.x; i < dim; i += k_block)  // each thread rewrites what it read: dx may alias dy
        dx[off + i] = float(rs * double(__half2float(w[i])) * dy[off + i] - c * x[off + i]);
}

__global__ void rope_kernel(float* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads,
                            int64_t half, int64_t row_stride, float sin_sign) {
    const int64_t total = n_tokens * n_heads * half;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t j = i % half, h = (i / half) % n_heads, t = i / (half * n_heads);
        float*        v = x + t * row_stride + h * 2 * half;
        const float   c = cos[t * half + j], s = sin_sign * sin[t * half + j];
        const float   a = v[j], b = v[j + half];
        v[j]        = a * c - b * s;
        v[j + half] = b * c + a * s;
    }
}

__global__ void silu_mul_kernel(const float* g, const float* u, float* y, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float gv = g[i];
        y[i]           = gv / (1.0f + expf(-gv)) * u[i];
    }
}

__global__ void silu_mul_backward_kernel(const float* g, const float* u, const float* dy, float* dg, float* du,
                                         int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
        const float gv = g[i], uv = u[i], d = dy[i];
        const float s = 1.0f / (1.0f + expf(-gv));
        du[i]         = d * gv * s;
        dg[i]         = d * uv * s * (1.0f + gv * (1.0f - s));
    }
}

__global__ void add_kernel(float* x, const float* y, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
        x[i] += y[i];
}

__global__ void add_bias_kernel(float* y, const __half* bias, int64_t total, int64_t n) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x)
        y[i] += __half2float(bias[i % n]);
}

__global__ void rows_copy_kernel(const float* src, const int32_t* rows, float* dst, int64_t n, int64_t dim,
                                 bool scatter) {
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n * dim;
         i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = i / dim, c = i % dim, other = rows[r];
        if (scatter)
            dst[other * dim + c] = src[i];
        else
            dst[i] = src[other * dim + c];
    }
}

// One block per row of s.
__global__ void __launch_bounds__(k_block)
    causal_softmax_kernel(float* s, int64_t n_q, int64_t n_kv, int64_t q_pos0, int64_t window) {
    __shared__ float sh[k_block / 32];
    float*           row = s + int64_t(blockIdx.x) * n_kv;
    const int64_t    pos = q_pos0 + int64_t(blockIdx.x) % n_q;
    const int64_t    j0  = window > 0 ? max(int64_t(0), pos - window + 1) : 0;
    const int64_t    j1  = min(pos + 1, n_kv);  // keys [j0, j1) visible
    float            m   = -INFINITY;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += k_block) m = fmaxf(m, row[j]);
    m         = block_max(m, sh);
    float sum = 0.0f;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += k_block) sum += expf(row[j] - m);
    sum             = block_sum(sum, sh);
    const float inv = 1.0f / sum;
    for (int64_t j = threadIdx.x; j < n_kv; j += k_block) row[j] = (j >= j0 && j < j1) ? expf(row[j] - m) * inv : 0.0f;
}

__global__ void __launch_bounds__(k_block) softmax_backward_kernel(const float* p, float* dp, int64_t n_cols) {
    __shared__ double sh[k_block / 32];
    const float*      pr = p + int64_t(blockIdx.x) * n_cols;
    float*            dr = dp + int64_t(blockIdx.x) * n_cols;
    double            rd = 0.0;
    for (int64_t j = threadIdx.x; j < n_cols; j += k_block) rd += double(pr[j]) * dr[j];
    const float rdf = float(block_sum(rd, sh));
    for (int64_t j = threadIdx.x; j < n_cols; j += k_block) dr[j] = pr[j] * (dr[j] - rdf);
}

__global__ void __launch_bounds__(k_block) cross_entropy_kernel(float* logits, const int32_t* targets, double* nll,
                                                                int64_t n_vocab, float grad_scale, bool grad) {
    __shared__ float  shf[k_block / 32];
    __shared__ double shd[k_block / 32];
    float*            l  = logits + int64_t(blockIdx.x) * n_vocab;
    const int32_t     t  = targets[blockIdx.x];
    float             mx = -INFINITY;
    for (int64_t j = threadIdx.x; j < n_vocab; j += k_block) mx = fmaxf(mx, l[j]);
    mx       = block_max(mx, shf);
    double s = 0.0;
    for (int64_t j = threadIdx.x; j < n_vocab; j += k_block) s += exp(double(l[j]) - mx);
    s                = block_sum(s, shd);
    const double lse = double(mx) + log(s);
    if (threadIdx.x == 0) nll[blockIdx.x] = lse - double(l[t]);
    if (!grad) return;
    __syncthreads();  // l[t] read before it is overwritten
    for (int64_t j = threadIdx.x; j < n_vocab; j += k_block) l[j] = float(exp(double(l[j]) - lse) * double(grad_scale));
    __syncthreads();
    if (threadIdx.x == 0) l[t] -= grad_scale;
}

}  // namespace

status sgemm_rm(cublasHandle_t h, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b, float beta, float* c,
                int64_t ldc, int64_t stride_c, int64_t batch, bool tf32, cudaStream_t stream) {
    if (m <= 0 || n <= 0 || batch <= 0) return status::ok();
    for (int64_t v : {m, n, k, lda, ldb, ldc, batch})
        if (v > k_i32 || v < 0)
            return make_error(status_code::STATUS_INVALID_ARGUMENT, "sgemm_rm: m={} n={} k={} batch={} exceed int32", m,
                              n, k, batch);
    if (lda < (ta ? m : k) || ldb < (tb ? k : n) || ldc < n)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "sgemm_rm: leading dimensions a={} b={} c={} too small for m={} n={} k={}", lda, ldb, ldc, m,
                          n, k);
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T: cuBLAS sees each row-major
    // matrix as its transpose, so B goes first with its own flag.
    GPTQ_CUBLAS_CHECK(cublasSetStream(h, stream));
    const cublasComputeType_t ct = tf32 ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
    GPTQ_CUBLAS_CHECK(cublasGemmStridedBatchedEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N,
                                                 int(n), int(m), int(k), &alpha, b, CUDA_R_32F, int(ldb), stride_b, a,
                                                 CUDA_R_32F, int(lda), stride_a, &beta, c, CUDA_R_32F, int(ldc),
                                                 stride_c, int(batch), ct, CUBLAS_GEMM_DEFAULT));
    return status::ok();
}

status gemm_bf16_rm(cublasHandle_t h, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const uint16_t* a,
                    int64_t lda, const uint16_t* b, int64_t ldb, float beta, float* c, int64_t ldc,
                    cudaStream_t stream) {
    if (m <= 0 || n <= 0) return status::ok();
    for (int64_t v : {m, n, k, lda, ldb, ldc})
        if (v > k_i32 || v < 0)
            return make_error(status_code::STATUS_INVALID_ARGUMENT, "gemm_bf16_rm: m={} n={} k={} exceed int32", m, n,
                              k);
    if (lda < (ta ? m : k) || ldb < (tb ? k : n) || ldc < n)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "gemm_bf16_rm: leading dimensions a={} b={} c={} too small for m={} n={} k={}", lda, ldb, ldc,
                          m, n, k);
    GPTQ_CUBLAS_CHECK(cublasSetStream(h, stream));
    GPTQ_CUBLAS_CHECK(cublasGemmEx(h, tb ? CUBLAS_OP_T : CUBLAS_OP_N, ta ? CUBLAS_OP_T : CUBLAS_OP_N, int(n), int(m),
                                   int(k), &alpha, b, CUDA_R_16BF, int(ldb), a, CUDA_R_16BF, int(lda), &beta, c,
                                   CUDA_R_32F, int(ldc), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    return status::ok();
}

status f32_to_bf16(const float* src, uint16_t* dst, int64_t n, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    f32_to_bf16_kernel<<<blocks_for(n), k_block, 0, stream>>>(src, reinterpret_cast<__nv_bfloat16*>(dst), n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status f16_to_bf16(const uint16_t* src, uint16_t* dst, int64_t n, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    f16_to_bf16_kernel<<<blocks_for(n), k_block, 0, stream>>>(reinterpret_cast<const __half*>(src),
                                                              reinterpret_cast<__nv_bfloat16*>(dst), n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status lora_dropout_f32(const float* x, float* out, int64_t n_rows, int64_t n_in, uint64_t module_key,
                        uint32_t threshold, float inv_keep, bool add, cudaStream_t stream) {
    const int64_t total = n_rows * n_in;
    if (total <= 0) return status::ok();
    lora_dropout_kernel<<<blocks_for(total), k_block, 0, stream>>>(x, out, total, module_key, threshold, inv_keep, add);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status embedding_f32(const uint16_t* table, const int32_t* ids, float* out, int64_t n, int64_t vocab, int64_t dim,
                     cudaStream_t stream) {
    if (n <= 0 || dim <= 0) return status::ok();
    embedding_kernel<<<blocks_for(n * dim), k_block, 0, stream>>>(reinterpret_cast<const __half*>(table), ids, out, n,
                                                                  vocab, dim);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status rms_norm_f32(const float* x, const uint16_t* w, float* y, int64_t n_rows, int64_t dim, float eps,
                    cudaStream_t stream) {
    GPTQ_TRY(check_rows("rms_norm_f32", n_rows, dim));
    if (n_rows == 0) return status::ok();
    rms_norm_kernel<<<unsigned(n_rows), k_block, 0, stream>>>(x, reinterpret_cast<const __half*>(w), y, dim, eps);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status rms_norm_backward_f32(const float* x, const uint16_t* w, const float* dy, float* dx, int64_t n_rows, int64_t dim,
                             float eps, cudaStream_t stream) {
    GPTQ_TRY(check_rows("rms_norm_backward_f32", n_rows, dim));
    if (n_rows == 0) return status::ok();
    rms_norm_backward_kernel<<<unsigned(n_rows), k_block, 0, stream>>>(x, reinterpret_cast<const __half*>(w), dy, dx,
                                                                       dim, eps);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status rope_f32(float* x, const float* cos, const float* sin, int64_t n_tokens, int64_t n_heads, int64_t head_dim,
                int64_t row_stride, float sin_sign, cudaStream_t stream) {
    if (head_dim % 2 != 0 || row_stride < n_heads * head_dim)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "rope_f32: head_dim {} (odd?) or row stride {} < {}",
                          head_dim, row_stride, n_heads * head_dim);
    const int64_t total = n_tokens * n_heads * (head_dim / 2);
    if (total <= 0) return status::ok();
    rope_kernel<<<blocks_for(total), k_block, 0, stream>>>(x, cos, sin, n_tokens, n_heads, head_dim / 2, row_stride,
                                                           sin_sign);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status silu_mul_f32(const float* g, const float* u, float* y, int64_t n, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    silu_mul_kernel<<<blocks_for(n), k_block, 0, stream>>>(g, u, y, n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status silu_mul_backward_f32(const float* g, const float* u, const float* dy, float* dg, float* du, int64_t n,
                             cudaStream_t stream) {
    if (n <= 0) return status::ok();
    silu_mul_backward_kernel<<<blocks_for(n), k_block, 0, stream>>>(g, u, dy, dg, du, n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status add_f32(float* x, const float* y, int64_t n, cudaStream_t stream) {
    if (n <= 0) return status::ok();
    add_kernel<<<blocks_for(n), k_block, 0, stream>>>(x, y, n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status add_bias_f32(float* y, const uint16_t* bias, int64_t n_rows, int64_t n, cudaStream_t stream) {
    if (n_rows <= 0 || n <= 0) return status::ok();
    add_bias_kernel<<<blocks_for(n_rows * n), k_block, 0, stream>>>(y, reinterpret_cast<const __half*>(bias),
                                                                    n_rows * n, n);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status rows_gather_f32(const float* src, const int32_t* rows, float* dst, int64_t n, int64_t dim, cudaStream_t stream) {
    if (n <= 0 || dim <= 0) return status::ok();
    rows_copy_kernel<<<blocks_for(n * dim), k_block, 0, stream>>>(src, rows, dst, n, dim, false);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status rows_scatter_f32(const float* src, const int32_t* rows, float* dst, int64_t n, int64_t dim,
                        cudaStream_t stream) {
    if (n <= 0 || dim <= 0) return status::ok();
    rows_copy_kernel<<<blocks_for(n * dim), k_block, 0, stream>>>(src, rows, dst, n, dim, true);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status causal_softmax_f32(float* s, int64_t n_mat, int64_t n_q, int64_t n_kv, int64_t q_pos0, int64_t window,
                          cudaStream_t stream) {
    GPTQ_TRY(check_rows("causal_softmax_f32", n_mat * n_q, n_kv));
    if (n_mat * n_q == 0 || n_kv == 0) return status::ok();
    causal_softmax_kernel<<<unsigned(n_mat * n_q), k_block, 0, stream>>>(s, n_q, n_kv, q_pos0, window);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status softmax_backward_f32(const float* p, float* dp, int64_t n_rows, int64_t n_cols, cudaStream_t stream) {
    GPTQ_TRY(check_rows("softmax_backward_f32", n_rows, n_cols));
    if (n_rows == 0 || n_cols == 0) return status::ok();
    softmax_backward_kernel<<<unsigned(n_rows), k_block, 0, stream>>>(p, dp, n_cols);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status cross_entropy_f32(float* logits, const int32_t* targets, double* nll, int64_t n_rows, int64_t n_vocab,
                         float grad_scale, bool grad, cudaStream_t stream) {
    GPTQ_TRY(check_rows("cross_entropy_f32", n_rows, n_vocab));
    if (n_rows == 0) return status::ok();
    cross_entropy_kernel<<<unsigned(n_rows), k_block, 0, stream>>>(logits, targets, nll, n_vocab, grad_scale, grad);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
