// Fast 4-bit GPTQ GEMV / skinny GEMM (see gptq_int4.cuh for the layout).
//
// Block = 8 warps on one tile of 32 output features; the warps split the k steps of the tile into
// contiguous ranges and each streams its range with `unroll` 16-byte loads in flight per lane
// (evict-first: the weights are read once). Per k32 step a lane turns its 16 bytes into 16 half2
// values q - zero (exact small integers: 0x6400 | nibble is 1024 + nibble in F16, so a subtract
// or an FMA by 1/16 finishes the job) and issues 4 (m <= 8) or 8 (m <= 16) mma.m16n8k16 with the
// weights as the 16-row A operand and the activations as the 8-column B operand (swap-AB: the
// tokens are the narrow side). Products are accumulated per group in F32 and multiplied by the
// group's scales when the group ends; the 8 warps are summed in shared memory at the end.
// mma.sync m16n8k16 exists on sm_80 and later: no Hopper-only instruction is used.
#include <cuda_fp16.h>

#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gptq_int4.cuh"

namespace gptq::cuda {

namespace {

constexpr int k_warps = 8;

__device__ inline uint32_t h2_bits(__half2 h) {
    return *reinterpret_cast<uint32_t*>(&h);
}
__device__ inline __half2 bits_h2(uint32_t u) {
    return *reinterpret_cast<__half2*>(&u);
}

// The 4 half2 (q - zero) of one packed word: slot j = nibbles (j, j + 4) = (k even, k odd).
// z1024 = 1024 + zero, z64 = -(64 + zero) as half2.
__device__ inline void dequant_word(uint32_t w, __half2 z1024, __half2 z64, uint32_t (&out)[4]) {
    const __half2  sixteenth = __float2half2_rn(1.0f / 16.0f);
    const uint32_t w8        = w >> 8;
    out[0]                   = h2_bits(__hsub2(bits_h2((w & 0x000F000Fu) | 0x64006400u), z1024));
    out[1]                   = h2_bits(__hfma2(bits_h2((w & 0x00F000F0u) | 0x64006400u), sixteenth, z64));
    out[2]                   = h2_bits(__hsub2(bits_h2((w8 & 0x000F000Fu) | 0x64006400u), z1024));
    out[3]                   = h2_bits(__hfma2(bits_h2((w8 & 0x00F000F0u) | 0x64006400u), sixteenth, z64));
}

__device__ inline void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // built only for sm_80+ (CMAKE_CUDA_ARCHITECTURES); older GPUs use the generic kernel
#endif
}

__device__ inline uint4 load_stream(const uint4* p) {
    return __ldcs(p);
}

// NB: 8-token column tiles (1: m <= 8, 2: m <= 16). U: 16-byte loads in flight per lane.
template <int NB, int U>
__global__ void __launch_bounds__(k_warps * 32)
    int4_gemv_kernel(const uint4* __restrict__ wts, const uint4* __restrict__ sz, const __half* __restrict__ x,
                     const __half* __restrict__ bias, __half* y, int m, int64_t n_out, int64_t k_steps, int64_t spg,
                     int64_t n_groups, int64_t x_stride, int64_t y_stride, float* partial, unsigned* counters) {
    const int     lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int64_t tn      = blockIdx.x;
    const int     n_split = int(gridDim.y), split = int(blockIdx.y);  // k split over blocks (partials + counters)
    const int64_t gw = int64_t(split) * k_warps + warp, n_w = int64_t(n_split) * k_warps;
    const int64_t s0 = k_steps * gw / n_w, s1 = k_steps * (gw + 1) / n_w;
    const uint4*  wp = wts + tn * k_steps * 32 + lane;

    float acc[2][NB][4], tmp[2][NB][4];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[t][b][c] = tmp[t][b][c] = 0.0f;
    float   scale[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    __half2 z1024[4], z64[4];
    // The group's (scale, zero) pairs of this lane's 4 rows, and the half2 zero terms. The next
    // group's pairs are fetched when a group starts, so a group change never waits on memory.
    auto fetch_group = [&](int gg) {
        return gg < n_groups ? sz[(tn * n_groups + gg) * 8 + gid] : make_uint4(0u, 0u, 0u, 0u);
    };
    auto use_group = [&](const uint4 v) {
        const uint32_t vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const __half2 sz2 = bits_h2(vv[i]);  // (scale, zero)
            scale[i]          = __low2float(sz2);
            const __half zh   = __high2half(sz2);
            z1024[i]          = __half2half2(__hadd(zh, __float2half(1024.0f)));
            z64[i]            = __half2half2(__hneg(__hadd(zh, __float2half(64.0f))));
        }
    };

    // Activation rows of this lane's B fragments (token gid of each 8-token tile), at step s0.
    const __half* xcur[NB];
    bool          xok[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) {
        xok[b]  = b * 8 + gid < m;
        xcur[b] = x + (xok[b] ? int64_t(b * 8 + gid) * x_stride : 0) + tig * 2 + s0 * 32;
    }
    const uint4* wcur   = wp + s0 * 32;
    int          n_left = int(s1 - s0);
    // Group bookkeeping without a division per step: group g, steps of it already done.
    int       g = int(s0 / spg), done_in_group = int(s0 % spg);
    const int steps_per_group = int(spg);
    uint4     sz_next         = make_uint4(0u, 0u, 0u, 0u);
    if (n_left > 0) {
        use_group(fetch_group(g));
        sz_next = fetch_group(g + 1);
    }

    while (n_left > 0) {
        const int cnt = n_left < U ? n_left : U;
        uint4     q[U];
#pragma unroll
        for (int u = 0; u < U; ++u)
            if (u < cnt) q[u] = load_stream(wcur + u * 32);
        // The batch's activation fragments, issued together with the weights (L2 hits, but a
        // dependent L2 round trip per step would otherwise serialise the steps).
        uint32_t bx[U][2][NB][2];
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int ks = 0; ks < 2; ++ks)
#pragma unroll
                for (int b = 0; b < NB; ++b) {
                    const __half* xp = xcur[b] + u * 32 + ks * 16;
                    const bool    ok = xok[b] && u < cnt;
                    bx[u][ks][b][0]  = ok ? *reinterpret_cast<const uint32_t*>(xp) : 0u;
                    bx[u][ks][b][1]  = ok ? *reinterpret_cast<const uint32_t*>(xp + 8) : 0u;
                }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            if (u >= cnt) break;
            if (done_in_group == steps_per_group) {  // group ended: scale its partial sums
#pragma unroll
                for (int t = 0; t < 2; ++t)
#pragma unroll
                    for (int b = 0; b < NB; ++b)
#pragma unroll
                        for (int c = 0; c < 4; ++c) {
                            acc[t][b][c] += scale[2 * t + c / 2] * tmp[t][b][c];
                            tmp[t][b][c] = 0.0f;
                        }
                use_group(sz_next);
                sz_next       = fetch_group(++g + 1);
                done_in_group = 0;
            }
            ++done_in_group;
            uint32_t       d[4][4];  // [word = row][slot]
            const uint32_t qw[4] = {q[u].x, q[u].y, q[u].z, q[u].w};
#pragma unroll
            for (int i = 0; i < 4; ++i) dequant_word(qw[i], z1024[i], z64[i], d[i]);
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    const uint32_t a[4] = {d[2 * t][2 * ks], d[2 * t + 1][2 * ks], d[2 * t][2 * ks + 1],
                                           d[2 * t + 1][2 * ks + 1]};
#pragma unroll
                    for (int b = 0; b < NB; ++b) mma_16816(tmp[t][b], a, bx[u][ks][b][0], bx[u][ks][b][1]);
                }
            }
        }
        wcur += cnt * 32;
#pragma unroll
        for (int b = 0; b < NB; ++b) xcur[b] += cnt * 32;
        n_left -= cnt;
    }
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[t][b][c] += scale[2 * t + c / 2] * tmp[t][b][c];

    // Sum the warps: red[warp][e][lane], e = (t, b, c).
    __shared__ float red[k_warps][2 * NB * 4][32];
#pragma unroll
    for (int t = 0; t < 2; ++t)
#pragma unroll
        for (int b = 0; b < NB; ++b)
#pragma unroll
            for (int c = 0; c < 4; ++c) red[warp][(t * NB + b) * 4 + c][lane] = acc[t][b][c];
    __syncthreads();
    // Each thread owns the elements e = threadIdx.x + 256 j: their warp sum, then (split-K) the
    // sum over the splits, done by the last block of the tile to arrive.
    constexpr int n_elem = 2 * NB * 4 * 32;
    float         v[(n_elem + k_warps * 32 - 1) / (k_warps * 32)];
#pragma unroll
    for (int j = 0; j * k_warps * 32 < n_elem; ++j) {
        const int e = threadIdx.x + j * k_warps * 32;
        v[j]        = 0.0f;
#pragma unroll
        for (int w = 0; w < k_warps; ++w) v[j] += red[w][e / 32][e % 32];
    }
    auto where = [&](int e, int64_t& n_local, int& tok) {
        const int idx = e / 32, ln = e % 32;
        const int t = idx / (NB * 4), b = (idx / 4) % NB, c = idx % 4;
        n_local = t * 16 + (ln >> 2) + (c / 2) * 8;
        tok     = b * 8 + (ln & 3) * 2 + (c & 1);
    };
    if (n_split > 1) {
        float* mine = partial + (tn * n_split + split) * (16 * 32);  // [tok 16][n_local 32]
#pragma unroll
        for (int j = 0; j * k_warps * 32 < n_elem; ++j) {
            int64_t nl;
            int     tok;
            where(threadIdx.x + j * k_warps * 32, nl, tok);
            mine[tok * 32 + nl] = v[j];
        }
        __threadfence();
        __syncthreads();
        __shared__ bool last;
        if (threadIdx.x == 0) last = atomicAdd(&counters[tn], 1u) == unsigned(n_split - 1);
        __syncthreads();
        if (!last) return;
        __threadfence();
        const float* all = partial + tn * n_split * (16 * 32);
#pragma unroll
        for (int j = 0; j * k_warps * 32 < n_elem; ++j) {
            int64_t nl;
            int     tok;
            where(threadIdx.x + j * k_warps * 32, nl, tok);
            float sum = 0.0f;
            for (int s = 0; s < n_split; ++s) sum += __ldcg(all + s * (16 * 32) + tok * 32 + nl);
            v[j] = sum;
        }
        if (threadIdx.x == 0) counters[tn] = 0u;  // ready for the next call on this workspace
    }
#pragma unroll
    for (int j = 0; j * k_warps * 32 < n_elem; ++j) {
        int64_t nl;
        int     tok;
        where(threadIdx.x + j * k_warps * 32, nl, tok);
        const int64_t n = tn * 32 + nl;
        if (n < n_out && tok < m) {
            float out = v[j];
            if (bias) out += __half2float(bias[n]);
            y[int64_t(tok) * y_stride + n] = __float2half_rn(out);
        }
    }
}

// One thread per 32-bit word of the repacked weights: word i of lane `lane` of (tile, step).
__global__ void int4_repack_weights_kernel(const uint32_t* qweight, const int32_t* perm, uint32_t* out, int64_t n_out,
                                           int64_t k_steps, int64_t total) {
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
         idx += int64_t(gridDim.x) * blockDim.x) {
        const int     i = int(idx % 4), lane = int((idx / 4) % 32);
        const int64_t s = (idx / 128) % k_steps, tn = idx / (128 * k_steps);
        const int64_t n    = tn * 32 + i * 8 + (lane >> 2);
        uint32_t      word = 0;
        if (n < n_out) {
            for (int nib = 0; nib < 8; ++nib) {
                const int      j = nib % 4, e = nib / 4;  // slot, parity
                const int      kk = (j % 2) * 8 + (lane & 3) * 2 + e;
                const int64_t  kp = s * 32 + (j / 2) * 16 + kk;
                const int64_t  k  = perm ? perm[kp] : kp;
                const uint32_t q  = (qweight[(k / 8) * n_out + n] >> ((k % 8) * 4)) & 0xFu;
                word |= q << (4 * nib);
            }
        }
        out[idx] = word;
    }
}

// One thread per (tile, group, gid, row word): the (scale, zero) pair as two F16.
__global__ void int4_repack_sz_kernel(const uint32_t* qzeros, const __half* scales, uint32_t* out, int64_t n_out,
                                      int64_t n_groups, int zero_add, int64_t total) {
    for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
         idx += int64_t(gridDim.x) * blockDim.x) {
        const int     i = int(idx % 4), gid = int((idx / 4) % 8);
        const int64_t g = (idx / 32) % n_groups, tn = idx / (32 * n_groups);
        const int64_t n = tn * 32 + i * 8 + gid;
        __half        s = __float2half(0.0f), z = __float2half(0.0f);
        if (n < n_out) {
            s                = scales[g * n_out + n];
            const uint32_t f = (qzeros[g * (n_out / 8) + n / 8] >> ((n % 8) * 4)) & 0xFu;
            z                = __int2half_rn(int(f) + zero_add);
        }
        out[idx] = uint32_t(*reinterpret_cast<uint16_t*>(&s)) | (uint32_t(*reinterpret_cast<uint16_t*>(&z)) << 16);
    }
}

__global__ void permute_cols_kernel(const __half* x, const int32_t* perm, __half* y, int64_t m, int64_t n_cols,
                                    int64_t x_stride, int64_t y_stride) {
    const int64_t total = m * n_cols;
    for (int64_t p = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; p < total; p += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = p / n_cols, i = p % n_cols;
        y[r * y_stride + i] = x[r * x_stride + perm[i]];
    }
}

unsigned grid_for(int64_t n) {
    const int64_t blocks = (n + 255) / 256;
    return unsigned(std::min<int64_t>(std::max<int64_t>(blocks, 1), 65535));
}

}  // namespace

result<int4_layout> int4_layout_for(int64_t n_out, int64_t n_in, int64_t group_size) {
    if (n_out <= 0 || n_in <= 0 || n_in % 32 != 0)
        return make_error(status_code::STATUS_UNSUPPORTED, "int4 layout: n_in {} is not a positive multiple of 32",
                          n_in);
    const int64_t gs = group_size == -1 ? n_in : group_size;
    if (gs <= 0 || gs % 32 != 0 || n_in % gs != 0)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "int4 layout: group size {} is not -1 or a multiple of 32 dividing n_in {}", group_size,
                          n_in);
    if (n_out % 8 != 0)
        return make_error(status_code::STATUS_UNSUPPORTED, "int4 layout: n_out {} is not a multiple of 8", n_out);
    int4_layout L;
    L.n_out = n_out, L.n_in = n_in, L.group_size = gs;
    L.n_tiles      = (n_out + 31) / 32;
    L.k_steps      = n_in / 32;
    L.n_groups     = n_in / gs;
    L.weight_bytes = L.n_tiles * L.k_steps * 512;
    L.sz_bytes     = L.n_tiles * L.n_groups * 32 * 4;
    return L;
}

status int4_act_order_perm(const int32_t* g_idx, int64_t n_in, int64_t group_size, std::vector<int32_t>& perm) {
    perm.clear();
    const int64_t gs       = group_size == -1 ? n_in : group_size;
    const int64_t n_groups = gs > 0 ? n_in / gs : 0;
    bool          trivial  = gs > 0 && n_in % gs == 0;
    for (int64_t k = 0; trivial && k < n_in; ++k) trivial = g_idx[k] == k / gs;
    if (trivial) return status::ok();
    std::vector<int64_t> count(size_t(n_groups) + 1, 0);
    for (int64_t k = 0; k < n_in; ++k) {
        if (g_idx[k] < 0 || g_idx[k] >= n_groups)
            return make_error(status_code::STATUS_UNSUPPORTED, "int4 act-order: g_idx[{}] = {} outside [0, {})", k,
                              g_idx[k], n_groups);
        ++count[size_t(g_idx[k]) + 1];
    }
    for (int64_t g = 0; g < n_groups; ++g)
        if (count[size_t(g) + 1] != gs)
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "int4 act-order: group {} has {} columns, not the group size {}", g, count[size_t(g) + 1],
                              gs);
    for (int64_t g = 0; g < n_groups; ++g) count[size_t(g) + 1] += count[size_t(g)];
    perm.assign(size_t(n_in), 0);
    for (int64_t k = 0; k < n_in; ++k) perm[size_t(count[size_t(g_idx[k])]++)] = int32_t(k);
    return status::ok();
}

status int4_repack(const int4_layout& L, const int32_t* qweight, const int32_t* qzeros, const uint16_t* scales,
                   const int32_t* perm, int zero_add, void* weights, void* sz, cudaStream_t stream) {
    const int64_t wtotal = L.weight_bytes / 4, stotal = L.sz_bytes / 4;
    int4_repack_weights_kernel<<<grid_for(wtotal), 256, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(qweight), perm, static_cast<uint32_t*>(weights), L.n_out, L.k_steps, wtotal);
    GPTQ_CUDA_CHECK_LAUNCH();
    int4_repack_sz_kernel<<<grid_for(stotal), 256, 0, stream>>>(
        reinterpret_cast<const uint32_t*>(qzeros), reinterpret_cast<const __half*>(scales), static_cast<uint32_t*>(sz),
        L.n_out, L.n_groups, zero_add, stotal);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

namespace {

constexpr int k_max_splits = 8;

// Splits of k over blocks when the caller asks for the automatic choice: none. Measured on the
// H100 (docs/perf-notes.md, run 3), splitting the 4096-wide layers over 4-5 blocks per tile was
// 25-40 % slower than one block per tile once the kernel stopped being issue-bound; the split path
// stays for explicit use (and is tested) until a layout that needs it (e.g. 70B's 8192 x 28672).
int auto_splits(const int4_layout&) {
    return 1;
}

int64_t workspace_for(const int4_layout& L, int splits) {
    const int64_t counters = (L.n_tiles * 4 + 255) / 256 * 256;
    return splits > 1 ? counters + L.n_tiles * splits * 16 * 32 * 4 : 0;
}

}  // namespace

int64_t int4_gemv_workspace_bytes(const int4_layout& L, int splits) {
    return workspace_for(L, splits > 0 ? std::min(splits, k_max_splits) : auto_splits(L));
}

status int4_gemv_f16(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x, const uint16_t* bias,
                     uint16_t* y, int64_t m, int64_t x_stride, int64_t y_stride, void* workspace,
                     int64_t workspace_bytes, cudaStream_t stream, int unroll, int splits) {
    if (x_stride % 2 != 0 || reinterpret_cast<uintptr_t>(x) % 4 != 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_f16: x (stride {}) must be 4-byte aligned with an even stride", x_stride);
    if (x_stride < L.n_in || y_stride < L.n_out)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemv_f16: x_stride {} / y_stride {} too small",
                          x_stride, y_stride);
    if (unroll != 0 && unroll != 8)  // 16 was measured slower (docs/perf-notes.md) and removed
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemv_f16: unroll {} is not 8", unroll);
    if (splits == 0) splits = auto_splits(L);
    if (splits < 1 || splits > k_max_splits || workspace_for(L, splits) > workspace_bytes)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_f16: {} k splits need {} bytes of workspace, {} given (max {} splits)", splits,
                          workspace_for(L, splits), workspace_bytes, k_max_splits);
    unsigned* counters = static_cast<unsigned*>(workspace);
    float*    partial  = reinterpret_cast<float*>(static_cast<char*>(workspace) + (L.n_tiles * 4 + 255) / 256 * 256);
    if (L.n_tiles > 0x7fffffff)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemv_f16: n_out {} too large", L.n_out);
    const uint4*  w   = static_cast<const uint4*>(weights);
    const uint4*  s   = static_cast<const uint4*>(sz);
    const __half* b   = reinterpret_cast<const __half*>(bias);
    const int64_t spg = L.group_size / 32;
    for (int64_t r = 0; r < m; r += 16) {
        const int     mm = int(std::min<int64_t>(16, m - r));
        const __half* xr = reinterpret_cast<const __half*>(x) + r * x_stride;
        __half*       yr = reinterpret_cast<__half*>(y) + r * y_stride;
        const dim3    grid(unsigned(L.n_tiles), unsigned(splits));
        if (mm <= 8)
            int4_gemv_kernel<1, 8><<<grid, k_warps * 32, 0, stream>>>(
                w, s, xr, b, yr, mm, L.n_out, L.k_steps, spg, L.n_groups, x_stride, y_stride, partial, counters);
        else
            int4_gemv_kernel<2, 8><<<grid, k_warps * 32, 0, stream>>>(
                w, s, xr, b, yr, mm, L.n_out, L.k_steps, spg, L.n_groups, x_stride, y_stride, partial, counters);
        GPTQ_CUDA_CHECK_LAUNCH();
    }
    return status::ok();
}

status gptq_permute_cols_f16(const uint16_t* x, const int32_t* perm, uint16_t* y, int64_t m, int64_t n_cols,
                             int64_t x_stride, int64_t y_stride, cudaStream_t stream) {
    if (m <= 0 || n_cols <= 0) return status::ok();
    permute_cols_kernel<<<grid_for(m * n_cols), 256, 0, stream>>>(
        reinterpret_cast<const __half*>(x), perm, reinterpret_cast<__half*>(y), m, n_cols, x_stride, y_stride);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
