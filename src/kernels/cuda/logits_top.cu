// logits_top_f32 (logits_top.cuh).
#include <climits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/logits_top.cuh"

namespace gptq::cuda {

namespace {

constexpr int k_threads = 512;
constexpr int k_max     = 256;

// Order-preserving key: a > b as floats <=> key(a) > key(b) as unsigned, and -0 == +0 as floats
// compare them (so ties between them go by id, as on the host); NaNs at the ends.
__device__ __forceinline__ uint32_t order_key(float x) {
    const uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Exclusive prefix count of `flag` over the block's threads in thread order; *total: the count.
// Every thread of the block must call it (it synchronises).
__device__ int block_prefix(bool flag, int* warp_counts, int* total) {
    const int      lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
    const unsigned ballot = __ballot_sync(0xffffffffu, flag);
    if (lane == 0) warp_counts[warp] = __popc(ballot);
    __syncthreads();
    int before = 0, sum = 0;
    for (int w = 0; w < n_warps; ++w) {
        before += w < warp ? warp_counts[w] : 0;
        sum += warp_counts[w];
    }
    __syncthreads();  // warp_counts is written again by the next call
    *total = sum;
    return before + __popc(ballot & ((1u << lane) - 1u));
}

__device__ __forceinline__ bool goes_first(uint32_t ka, int32_t ia, uint32_t kb, int32_t ib) {
    return ka > kb || (ka == kb && ia < ib);
}

__global__ void __launch_bounds__(k_threads)
    logits_top_kernel(const float* logits, int64_t n_vocab, int k, const float* inv_temp, int32_t* ids_out,
                      float* vals_out, double* sums_out) {
    __shared__ uint32_t hist[256];
    __shared__ uint32_t s_prefix, s_need;
    __shared__ int      s_count;
    __shared__ int      warp_counts[k_threads / 32];
    __shared__ uint32_t c_key[k_max];
    __shared__ int32_t  c_id[k_max];
    __shared__ double   red[k_threads / 32][2];

    const int64_t row = blockIdx.x;
    const float*  l   = logits + row * n_vocab;
    const int     tid = threadIdx.x, lane = tid & 31;

    // 1. The k-th largest key, 8 bits a pass from the top. After the passes `prefix` is that key
    // and `need` how many of the values equal to it are among the k.
    uint32_t prefix = 0, mask = 0, need = uint32_t(k);
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        for (int64_t i = tid; i < n_vocab; i += blockDim.x) {
            const uint32_t key   = order_key(l[i]);
            const uint32_t bin   = (key & mask) == prefix ? (key >> shift) & 0xffu : 256u;  // 256: not counted
            const unsigned peers = __match_any_sync(__activemask(), bin);
            if (bin < 256u && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], uint32_t(__popc(peers)));
        }
        __syncthreads();
        if (tid == 0) {
            uint32_t above = 0;
            int      d     = 255;
            for (; d > 0; --d) {
                if (above + hist[d] >= need) break;
                above += hist[d];
            }
            s_prefix = prefix | (uint32_t(d) << shift);
            s_need   = need - above;
        }
        __syncthreads();
        prefix = s_prefix;
        need   = s_need;
        mask |= 0xffu << shift;
    }

    // 2. The candidates: every value above the k-th (in any order), then the `need` lowest ids of
    // the values equal to it.
    const int n_above = k - int(need);
    if (tid == 0) s_count = 0;
    __syncthreads();
    for (int64_t i = tid; i < n_vocab; i += blockDim.x) {
        const uint32_t key = order_key(l[i]);
        if (key > prefix) {
            const int slot = atomicAdd(&s_count, 1);
            c_key[slot]    = key;
            c_id[slot]     = int32_t(i);
        }
    }
    int taken = 0;  // the same in every thread
    for (int64_t base = 0; base < n_vocab && taken < int(need); base += blockDim.x) {
        const int64_t i  = base + tid;
        const bool    eq = i < n_vocab && order_key(l[i]) == prefix;
        int           total;
        const int     before = block_prefix(eq, warp_counts, &total);
        if (eq && taken + before < int(need)) {
            c_key[n_above + taken + before] = prefix;
            c_id[n_above + taken + before]  = int32_t(i);
        }
        taken += total;
    }

    // 3. Bitonic sort of the k candidates (padded to a power of two with entries that go last).
    int p2 = 1;
    while (p2 < k) p2 <<= 1;
    for (int i = k + tid; i < p2; i += blockDim.x) {
        c_key[i] = 0;
        c_id[i]  = INT_MAX;
    }
    __syncthreads();
    for (int size = 2; size <= p2; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            for (int i = tid; i < p2; i += blockDim.x) {
                const int j = i ^ stride;
                if (j <= i) continue;
                const bool forward = (i & size) == 0;  // this run ends up in goes_first order
                const bool i_first = goes_first(c_key[i], c_id[i], c_key[j], c_id[j]);
                if (forward != i_first) {
                    const uint32_t tk = c_key[i];
                    const int32_t  ti = c_id[i];
                    c_key[i]          = c_key[j];
                    c_id[i]           = c_id[j];
                    c_key[j]          = tk;
                    c_id[j]           = ti;
                }
            }
            __syncthreads();
        }
    }
    for (int i = tid; i < k; i += blockDim.x) {
        ids_out[row * k + i]  = c_id[i];
        vals_out[row * k + i] = l[c_id[i]];
    }

    // 4. The normalisers, relative to the row's largest value.
    const double m  = l[c_id[0]];
    const double it = inv_temp ? double(inv_temp[row]) : 1.0;
    double       s1 = 0.0, st = 0.0;
    for (int64_t i = tid; i < n_vocab; i += blockDim.x) {
        const double d = double(l[i]) - m;
        s1 += exp(d);
        st += exp(d * it);
    }
    for (int off = 16; off > 0; off >>= 1) {
        s1 += __shfl_down_sync(0xffffffffu, s1, off);
        st += __shfl_down_sync(0xffffffffu, st, off);
    }
    if (lane == 0) {
        red[tid >> 5][0] = s1;
        red[tid >> 5][1] = st;
    }
    __syncthreads();
    if (tid == 0) {
        double a = 0.0, b = 0.0;
        for (int w = 0; w < int(blockDim.x >> 5); ++w) a += red[w][0], b += red[w][1];
        sums_out[row * 2]     = a;
        sums_out[row * 2 + 1] = b;
    }
}

}  // namespace

status logits_top_f32(const float* logits, int64_t rows, int64_t n_vocab, int64_t k, const float* inv_temp,
                      int32_t* ids, float* vals, double* sums, cudaStream_t stream) {
    if (rows <= 0) return status::ok();
    if (k < 1 || k > k_max || k > n_vocab || rows > 0x7fffffff || n_vocab > 0x7fffffff)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "logits_top_f32: k {} with n_vocab {} and {} rows (k from 1 to min(n_vocab, {}))", k, n_vocab,
                          rows, k_max);
    logits_top_kernel<<<unsigned(rows), k_threads, 0, stream>>>(logits, n_vocab, int(k), inv_temp, ids, vals, sums);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
