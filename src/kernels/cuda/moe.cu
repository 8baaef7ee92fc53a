// MoE kernels (moe.cuh): top-k routing (one warp per token), row gathers, the grouped expert
// linears (a block per (output tile, pair), the expert read from the routing), the weighted sum.
// Every kernel is launched with programmatic dependent launch and waits (pdl_wait) before its first
// read, so each overlaps only its launch with the kernel before (launch.cuh's rule).
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/moe.cuh"
#include "kernels/cuda/ptx.cuh"

namespace gptq::cuda {

namespace {

constexpr unsigned k_full = 0xFFFFFFFFu;

unsigned grid_for(int64_t n) {
    const int64_t blocks = (n + 255) / 256;
    return unsigned(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

// ---- top-k ---------------------------------------------------------------------------------------

// (v, e) ranks above (bv, be): larger value, or equal value and lower expert (torch.topk).
__device__ inline bool ranks_above(float v, int e, float bv, int be) {
    return v > bv || (v == bv && e < be);
}

// PER: values per lane (n_expert <= 32 PER). A lane holds experts q * 32 + lane.
template <int PER>
__global__ void topk_kernel(const float* logits, int n_tokens, int n_expert, int k, bool renorm, int32_t* ids,
                            float* weights) {
    pdl_launch_dependents();
    pdl_wait();  // every input comes from the kernel before (launched with PDL: launch.cuh)
    const int lane = threadIdx.x & 31;
    const int t    = blockIdx.x * (blockDim.x / 32) + (threadIdx.x >> 5);
    if (t >= n_tokens) return;  // whole warps leave together
    const float* row = logits + int64_t(t) * n_expert;
    float        v[PER];
    float        mx = -INFINITY;
#pragma unroll
    for (int q = 0; q < PER; ++q) {
        const int e = q * 32 + lane;
        v[q]        = e < n_expert ? row[e] : -INFINITY;
        mx          = fmaxf(mx, v[q]);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(k_full, mx, off));
    float sum = 0.0f;
#pragma unroll
    for (int q = 0; q < PER; ++q) {
        const int e = q * 32 + lane;
        if (e < n_expert) {
            v[q] = expf(v[q] - mx);
            sum += v[q];
        }
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(k_full, sum, off);
        // Probabilities are >= 0: -1 marks lanes past n_expert, -2 the experts already chosen.
#pragma unroll
    for (int q = 0; q < PER; ++q) {
        const float pr = v[q] / sum;
        // NaN (a NaN logit): ranked below every number, so a chosen id is always a real expert.
        v[q] = q * 32 + lane < n_expert ? (pr >= 0.0f ? pr : -0.5f) : -1.0f;
    }

    int   sel[k_moe_max_k];
    float pv[k_moe_max_k];
    for (int j = 0; j < k; ++j) {
        float bv = -3.0f;
        int   be = n_expert;
#pragma unroll
        for (int q = 0; q < PER; ++q)
            if (ranks_above(v[q], q * 32 + lane, bv, be)) bv = v[q], be = q * 32 + lane;
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float ov = __shfl_xor_sync(k_full, bv, off);
            const int   oe = __shfl_xor_sync(k_full, be, off);
            if (ranks_above(ov, oe, bv, be)) bv = ov, be = oe;
        }
        sel[j] = be;
        pv[j]  = bv;
#pragma unroll
        for (int q = 0; q < PER; ++q)
            if (q * 32 + lane == be) v[q] = -2.0f;
    }
    if (lane != 0) return;
    float top = 0.0f;
    for (int j = 0; j < k; ++j) top += pv[j];
    for (int j = 0; j < k; ++j) {
        ids[int64_t(t) * k + j]     = sel[j];
        weights[int64_t(t) * k + j] = renorm ? pv[j] / top : pv[j];
    }
}

// ---- gathers ----------------------------------------------------------------------------------------

__global__ void gather_rows_kernel(const __half* x, int64_t x_stride, const int32_t* rows, int64_t n_rows, int64_t dim,
                                   __half* y) {
    pdl_launch_dependents();
    pdl_wait();  // every input comes from the kernel before (launched with PDL: launch.cuh)
    const int64_t total = n_rows * dim;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t a = i / dim, c = i % dim;
        y[i] = x[int64_t(rows[a]) * x_stride + c];
    }
}

__global__ void pair_rows_kernel(const moe_expert_linear* table, const int32_t* ids, const __half* x, int64_t x_stride,
                                 int64_t x_div, int64_t n_pairs, int64_t n_in, __half* y) {
    pdl_launch_dependents();
    pdl_wait();  // every input comes from the kernel before (launched with PDL: launch.cuh)
    const int64_t total = n_pairs * n_in;
    for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t  p = i / n_in, c = i % n_in;
        const int32_t* perm = table[ids[p]].perm;
        y[i]                = x[(p / x_div) * x_stride + (perm ? int64_t(perm[c]) : c)];
    }
}

// ---- grouped int4 -------------------------------------------------------------------------------------

constexpr int k_int4_warps = 8;  // k split over the block's warps: loads in flight for a decode-sized grid

// Block (tile tn of 32 output features, pair p); the warps split the k steps. A lane's 16-byte word
// of a step holds rows tn * 32 + (l >> 2) + 8 i (word i) at k = 32 s + 8 (l & 3) + 2 j + (0, 1) in
// nibbles (j, j + 4) (gptq_int4.cu int4_repack_weights_kernel): dequant_word turns it into the A
// fragments of two m16n8k16 tiles (rows 0-15 and 16-31) x two k16 halves, exactly as the GEMV of
// gptq_int4.cu; the pair's activations are column 0 of B (lanes l >> 2 == 0: the 8 halves at
// 8 (l & 3) of the step, one 16-byte load; the other columns zero). Products sum in F32 per group
// and are multiplied by the rows' scales when the group ends; the warps' sums are added in a fixed
// order.
__global__ void __launch_bounds__(k_int4_warps * 32)
    grouped_int4_kernel(const moe_expert_linear* table, const int32_t* ids, const int32_t* order, const __half* x,
                        int64_t x_stride, int64_t x_div, __half* y, int64_t y_stride, int64_t n_out, int64_t k_steps,
                        int64_t spg, int64_t n_groups) {
    pdl_launch_dependents();
    pdl_wait();  // every input comes from the kernel before (launched with PDL: launch.cuh)
    const int               lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int64_t           tn = blockIdx.x, p = order ? int64_t(order[blockIdx.y]) : int64_t(blockIdx.y);
    const moe_expert_linear ex  = table[ids[p]];
    const uint4*            wp  = static_cast<const uint4*>(ex.w) + tn * k_steps * 32 + lane;
    const uint4*            szp = static_cast<const uint4*>(ex.sz) + tn * n_groups * 8 + gid;
    const __half*           xr  = x + (p / x_div) * x_stride + tig * 8;
    const int64_t           s0 = k_steps * warp / k_int4_warps, s1 = k_steps * (warp + 1) / k_int4_warps;

    float acc[2][4], tmp[2][4];  // [row tile][C fragment]
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[t][c] = tmp[t][c] = 0.0f;
    float   scale[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    __half2 z1024[4], z64[4];
    auto    use_group = [&](int64_t g) {  // the (scale, zero) pairs of this lane's 4 rows
        const uint4    v     = __ldg(szp + g * 8);
        const uint32_t vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const __half2 sz2 = bits_h2(vv[i]);
            scale[i]          = __low2float(sz2);
            const __half zh   = __high2half(sz2);
            z1024[i]          = __half2half2(__hadd(zh, __float2half(1024.0f)));
            z64[i]            = __half2half2(__hneg(__hadd(zh, __float2half(64.0f))));
        }
    };
    auto flush = [&] {  // C fragments c0, c1: row l >> 2 of the tile (word 2 t); c2, c3: row + 8 (word 2 t + 1)
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                acc[t][c] += scale[2 * t + c / 2] * tmp[t][c];
                tmp[t][c] = 0.0f;
            }
    };
    int64_t g    = s0 / spg;
    int     left = int(spg - s0 % spg);  // steps left in group g
    if (s0 < s1) use_group(g);
#pragma unroll 2
    for (int64_t s = s0; s < s1; ++s) {
        if (left == 0) {
            flush();
            use_group(++g);
            left = int(spg);
        }
        --left;
        const uint4    q     = __ldcs(wp + s * 32);
        const uint4    xv    = *reinterpret_cast<const uint4*>(xr + s * 32);
        const uint32_t xw[4] = {gid == 0 ? xv.x : 0u, gid == 0 ? xv.y : 0u, gid == 0 ? xv.z : 0u, gid == 0 ? xv.w : 0u};
        const uint32_t qw[4] = {q.x, q.y, q.z, q.w};
        uint32_t       d[4][4];  // [word = row][slot]
#pragma unroll
        for (int i = 0; i < 4; ++i) dequant_word(qw[i], z1024[i], z64[i], d[i]);
#pragma unroll
        for (int ks = 0; ks < 2; ++ks)
#pragma unroll
            for (int t = 0; t < 2; ++t) {
                const uint32_t a[4] = {d[2 * t][2 * ks], d[2 * t + 1][2 * ks], d[2 * t][2 * ks + 1],
                                       d[2 * t + 1][2 * ks + 1]};
                mma_16816(tmp[t], a, xw[2 * ks], xw[2 * ks + 1]);
            }
    }
    flush();
    // Column 0 (the pair) sits in the lanes l & 3 == 0: c0 (row l >> 2) and c2 (row (l >> 2) + 8).
    __shared__ float red[k_int4_warps][32];
    if (tig == 0)
#pragma unroll
        for (int t = 0; t < 2; ++t) {
            red[warp][16 * t + gid]     = acc[t][0];
            red[warp][16 * t + gid + 8] = acc[t][2];
        }
    __syncthreads();
    if (threadIdx.x >= 32) return;
    const int64_t row = tn * 32 + threadIdx.x;
    if (row >= n_out) return;
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < k_int4_warps; ++w) sum += red[w][threadIdx.x];
    if (ex.bias) sum += __half2float(reinterpret_cast<const __half*>(ex.bias)[row]);
    y[p * y_stride + row] = __float2half_rn(sum);
}

// ---- grouped dense F16 --------------------------------------------------------------------------------

constexpr int k_dense_warps = 8;  // output features per block, one warp each

// VEC: 16-byte loads of 8 halves (n_in % 8 == 0, x rows and weights 16-byte aligned).
template <bool VEC>
__global__ void __launch_bounds__(k_dense_warps * 32)
    grouped_f16_kernel(const moe_expert_linear* table, const int32_t* ids, const int32_t* order, const __half* x,
                       int64_t x_stride, int64_t x_div, __half* y, int64_t y_stride, int64_t n_out, int64_t n_in) {
    pdl_launch_dependents();
    pdl_wait();  // every input comes from the kernel before (launched with PDL: launch.cuh)
    const int     lane = threadIdx.x & 31;
    const int64_t row  = int64_t(blockIdx.x) * k_dense_warps + (threadIdx.x >> 5);
    const int64_t p    = order ? int64_t(order[blockIdx.y]) : int64_t(blockIdx.y);
    if (row >= n_out) return;
    const moe_expert_linear ex  = table[ids[p]];
    const __half*           w   = static_cast<const __half*>(ex.w) + row * n_in;
    const __half*           xr  = x + (p / x_div) * x_stride;
    float                   acc = 0.0f;
    if constexpr (VEC) {
#pragma unroll 4
        for (int64_t i = int64_t(lane) * 8; i < n_in; i += 256) {
            const uint4    wv    = __ldcs(reinterpret_cast<const uint4*>(w + i));
            const uint4    xv    = *reinterpret_cast<const uint4*>(xr + i);
            const uint32_t ww[4] = {wv.x, wv.y, wv.z, wv.w}, xx[4] = {xv.x, xv.y, xv.z, xv.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 a = __half22float2(bits_h2(ww[j])), b = __half22float2(bits_h2(xx[j]));
                acc = fmaf(a.x, b.x, acc);
                acc = fmaf(a.y, b.y, acc);
            }
        }
    } else {
        for (int64_t i = lane; i < n_in; i += 32) acc = fmaf(__half2float(w[i]), __half2float(xr[i]), acc);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(k_full, acc, off);
    if (lane != 0) return;
    if (ex.bias) acc += __half2float(reinterpret_cast<const __half*>(ex.bias)[row]);
    y[p * y_stride + row] = __float2half_rn(acc);
}

// ---- pair order ------------------------------------------------------------------------------------------

// One block: order = the pairs grouped by expert (a counting sort; the order within an expert is
// whatever the atomics give: it only decides which blocks run close together, never a result).
__global__ void sort_pairs_kernel(const int32_t* ids, int n_pairs, int n_expert, int32_t* order) {
    pdl_launch_dependents();
    pdl_wait();  // every input comes from the kernel before (launched with PDL: launch.cuh)
    __shared__ int start[k_moe_max_experts];
    for (int e = threadIdx.x; e < n_expert; e += blockDim.x) start[e] = 0;
    __syncthreads();
    for (int p = threadIdx.x; p < n_pairs; p += blockDim.x) atomicAdd(&start[ids[p]], 1);
    __syncthreads();
    if (threadIdx.x == 0) {
        int sum = 0;
        for (int e = 0; e < n_expert; ++e) {
            const int c = start[e];
            start[e]    = sum;
            sum += c;
        }
    }
    __syncthreads();
    for (int p = threadIdx.x; p < n_pairs; p += blockDim.x) order[atomicAdd(&start[ids[p]], 1)] = p;
}

// ---- combine ---------------------------------------------------------------------------------------------

// Block: (columns, token t). The token's pairs in ascending expert order are found once per block.
__global__ void combine_kernel(const __half* out, const int32_t* pos, const int32_t* ids, const float* weights,
                               int64_t t0, int64_t k, int64_t dim, const __half* shared_out, const float* shared_logit,
                               __half* y) {
    pdl_launch_dependents();
    pdl_wait();  // every input comes from the kernel before (launched with PDL: launch.cuh)
    const int64_t  t = t0 + blockIdx.y;
    __shared__ int order[k_moe_max_k];
    if (threadIdx.x == 0) {
        const int32_t* e = ids + t * k;
        for (int j = 0; j < k; ++j) order[j] = j;
        for (int a = 1; a < k; ++a)  // insertion sort by expert (distinct experts: no ties)
            for (int b = a; b > 0 && e[order[b]] < e[order[b - 1]]; --b) {
                const int tmp = order[b];
                order[b]      = order[b - 1];
                order[b - 1]  = tmp;
            }
    }
    __syncthreads();
    const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (c >= dim) return;
    float acc = 0.0f;
    for (int a = 0; a < k; ++a) {
        const int64_t pair = t * k + order[a];
        const int64_t r    = pos ? int64_t(pos[pair]) : pair;
        acc += __half2float(out[r * dim + c]) * weights[pair];
    }
    if (shared_out) {
        const float s = shared_logit ? 1.0f / (1.0f + expf(-shared_logit[t])) : 1.0f;
        acc += s * __half2float(shared_out[t * dim + c]);
    }
    y[t * dim + c] = __float2half_rn(acc);
}

template <int PER>
status topk_launch(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool renorm, int32_t* ids,
                   float* weights, cudaStream_t stream) {
    constexpr int warps = 4;
    const auto    grid  = unsigned((n_tokens + warps - 1) / warps);
    GPTQ_CUDA_CHECK(launch_pdl(topk_kernel<PER>, dim3(grid), dim3(warps * 32), 0, stream, logits, int(n_tokens),
                               int(n_expert), int(k), renorm, ids, weights));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace

status moe_topk_f32(const float* logits, int64_t n_tokens, int64_t n_expert, int64_t k, bool renorm, int32_t* ids,
                    float* weights, cudaStream_t stream) {
    if (n_tokens <= 0) return status::ok();
    if (n_expert < 1 || n_expert > k_moe_max_experts || k < 1 || k > n_expert || k > k_moe_max_k)
        return make_error(status_code::STATUS_UNSUPPORTED, "MoE top-k: {} of {} experts (at most {} of {})", k,
                          n_expert, k_moe_max_k, k_moe_max_experts);
    if (n_expert <= 32) return topk_launch<1>(logits, n_tokens, n_expert, k, renorm, ids, weights, stream);
    if (n_expert <= 64) return topk_launch<2>(logits, n_tokens, n_expert, k, renorm, ids, weights, stream);
    if (n_expert <= 128) return topk_launch<4>(logits, n_tokens, n_expert, k, renorm, ids, weights, stream);
    if (n_expert <= 256) return topk_launch<8>(logits, n_tokens, n_expert, k, renorm, ids, weights, stream);
    return topk_launch<32>(logits, n_tokens, n_expert, k, renorm, ids, weights, stream);
}

status moe_gather_rows_f16(const uint16_t* x, int64_t x_stride, const int32_t* rows, int64_t n_rows, int64_t dim,
                           uint16_t* y, cudaStream_t stream) {
    if (n_rows <= 0 || dim <= 0) return status::ok();
    GPTQ_CUDA_CHECK(launch_pdl(gather_rows_kernel, dim3(grid_for(n_rows * dim)), dim3(256), 0, stream,
                               reinterpret_cast<const __half*>(x), x_stride, rows, n_rows, dim,
                               reinterpret_cast<__half*>(y)));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status moe_pair_rows_f16(const moe_expert_linear* table, const int32_t* ids, const uint16_t* x, int64_t x_stride,
                         int64_t x_div, int64_t n_pairs, int64_t n_in, uint16_t* y, cudaStream_t stream) {
    if (n_pairs <= 0 || n_in <= 0) return status::ok();
    if (x_div < 1) return make_error(status_code::STATUS_INVALID_ARGUMENT, "MoE pair rows: x_div {}", x_div);
    GPTQ_CUDA_CHECK(launch_pdl(pair_rows_kernel, dim3(grid_for(n_pairs * n_in)), dim3(256), 0, stream, table, ids,
                               reinterpret_cast<const __half*>(x), x_stride, x_div, n_pairs, n_in,
                               reinterpret_cast<__half*>(y)));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status moe_grouped_int4_f16(const int4_layout& L, const moe_expert_linear* table, const int32_t* ids,
                            const int32_t* order, const uint16_t* x, int64_t x_stride, int64_t x_div, int64_t n_pairs,
                            uint16_t* y, int64_t y_stride, cudaStream_t stream) {
    if (n_pairs <= 0) return status::ok();
    if (x_div < 1 || x_stride % 8 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0 || y_stride < L.n_out)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "MoE grouped int4: x must be 16-byte aligned rows (stride {}), x_div {}, y stride {} < {}",
                          x_stride, x_div, y_stride, L.n_out);
    if (n_pairs > 65535)
        return make_error(status_code::STATUS_UNSUPPORTED, "MoE grouped int4: {} pairs in one launch (at most 65535)",
                          n_pairs);
    const dim3 grid(unsigned(L.n_tiles), unsigned(n_pairs));
    GPTQ_CUDA_CHECK(launch_pdl(grouped_int4_kernel, grid, dim3(k_int4_warps * 32), 0, stream, table, ids, order,
                               reinterpret_cast<const __half*>(x), x_stride, x_div, reinterpret_cast<__half*>(y),
                               y_stride, L.n_out, L.k_steps, L.group_size / 32, L.n_groups));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status moe_grouped_f16(const moe_expert_linear* table, const int32_t* ids, const int32_t* order, const uint16_t* x,
                       int64_t x_stride, int64_t x_div, int64_t n_pairs, int64_t n_out, int64_t n_in, uint16_t* y,
                       int64_t y_stride, cudaStream_t stream) {
    if (n_pairs <= 0 || n_out <= 0) return status::ok();
    if (x_div < 1 || y_stride < n_out)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "MoE grouped F16: x_div {}, y stride {} < {}", x_div,
                          y_stride, n_out);
    if (n_pairs > 65535)
        return make_error(status_code::STATUS_UNSUPPORTED, "MoE grouped F16: {} pairs in one launch (at most 65535)",
                          n_pairs);
    // The weights come from cudaMalloc (256-byte aligned): rows are 16-byte aligned when n_in % 8 == 0.
    const bool vec = n_in % 8 == 0 && x_stride % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0;
    const dim3 grid(unsigned((n_out + k_dense_warps - 1) / k_dense_warps), unsigned(n_pairs));
    const auto xh = reinterpret_cast<const __half*>(x);
    const auto yh = reinterpret_cast<__half*>(y);
    GPTQ_CUDA_CHECK(launch_pdl(vec ? grouped_f16_kernel<true> : grouped_f16_kernel<false>, grid,
                               dim3(k_dense_warps * 32), 0, stream, table, ids, order, xh, x_stride, x_div, yh,
                               y_stride, n_out, n_in));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status moe_sort_pairs(const int32_t* ids, int64_t n_pairs, int64_t n_expert, int32_t* order, cudaStream_t stream) {
    if (n_pairs <= 0) return status::ok();
    if (n_expert < 1 || n_expert > k_moe_max_experts || n_pairs > (int64_t(1) << 30))
        return make_error(status_code::STATUS_UNSUPPORTED, "MoE pair order: {} pairs over {} experts (at most {})",
                          n_pairs, n_expert, k_moe_max_experts);
    GPTQ_CUDA_CHECK(
        launch_pdl(sort_pairs_kernel, dim3(1), dim3(1024), 0, stream, ids, int(n_pairs), int(n_expert), order));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

status moe_combine_f16(const uint16_t* out, const int32_t* pos, const int32_t* ids, const float* weights,
                       int64_t n_tokens, int64_t k, int64_t dim, const uint16_t* shared_out, const float* shared_logit,
                       uint16_t* y, cudaStream_t stream) {
    if (n_tokens <= 0 || dim <= 0) return status::ok();
    if (k < 1 || k > k_moe_max_k)
        return make_error(status_code::STATUS_UNSUPPORTED, "MoE combine: k {} (at most {})", k, k_moe_max_k);
    for (int64_t t0 = 0; t0 < n_tokens; t0 += 65535) {  // grid.y: at most 65535 tokens per launch
        const dim3 grid(unsigned((dim + 255) / 256), unsigned(std::min<int64_t>(65535, n_tokens - t0)));
        GPTQ_CUDA_CHECK(launch_pdl(combine_kernel, grid, dim3(256), 0, stream, reinterpret_cast<const __half*>(out),
                                   pos, ids, weights, t0, k, dim, reinterpret_cast<const __half*>(shared_out),
                                   shared_logit, reinterpret_cast<__half*>(y)));
        GPTQ_CUDA_CHECK_LAUNCH();
    }
    return status::ok();
}

}  // namespace gptq::cuda
