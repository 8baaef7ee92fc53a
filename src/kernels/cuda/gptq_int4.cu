// Fast 4-bit GPTQ GEMV / skinny GEMM (see gptq_int4.cuh for the layout).
//
// Two kernels share the layout and the arithmetic (docs/perf-notes.md, session 4):
// - pipelined (v4, the default): block = W warps on TN tiles of 32 output features; k is cut into
//   16 chunks and each warp owns 16 / W consecutive chunks. Each lane streams, with cp.async into
//   a per-warp ring of D shared-memory slots, D - 1 steps ahead of the step it computes: its
//   16-byte weight word of each tile (evict-first), its activation fragment of each 8-token column
//   tile (one 16-byte load: the layout's in-step k order gives a lane 8 consecutive k) and, at a
//   group's first step, the (scale, zero) words (lanes lane % 4 == 0 copy, the warp reads them
//   after __syncwarp). A warp never drains between batches and the loads in flight cost no
//   registers. The first D - 1 steps' weights are issued before griddepcontrol.wait, and the
//   kernel is launched with programmatic stream serialization on sm_90 (GPTQ_INT4_PDL=0: off), so
//   its weight stream starts while the previous kernel in the stream finishes. Every variant sums
//   a column in the same order (chunk sums, then a binary tree over the 16 chunks): the variants,
//   and so the table's choice, do not change a bit of the result.
// - batched (v3): 8 warps per tile, batches of 8 register loads per lane (`ld.global.cs`) with the
//   batch's activation fragments; the only kernel with split-K and with activations that are not
//   16-byte aligned. Kept as variant 0 (its sums are in another order).
// Per k32 step a lane turns its 16 bytes into 16 half2 values q - zero (exact small integers:
// 0x6400 | nibble is 1024 + nibble in F16, so a subtract or an FMA by 1/16 finishes the job) and
// issues 4 (m <= 8) or 8 (m <= 16) mma.m16n8k16 per tile with the weights as the 16-row A operand
// and the activations as the 8-column B operand (swap-AB: the tokens are the narrow side).
// Products are accumulated per group in F32 and multiplied by the group's scales when the group
// ends. mma.sync, cp.async and createpolicy exist on sm_80 and later, griddepcontrol on sm_90 (a
// no-op below): no other Hopper-only instruction is used.
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/decode_math.cuh"
#include "kernels/cuda/gptq_int4.cuh"
#include "kernels/cuda/launch.cuh"
#include "kernels/cuda/ptx.cuh"

namespace gptq::cuda {

namespace {

constexpr int k_warps = 8;

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
        xcur[b] = x + (xok[b] ? int64_t(b * 8 + gid) * x_stride : 0) + tig * 8 + s0 * 32;
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
                    // In-step k order (layout): lane tig holds k = 8 tig + 4 ks + (0, 1) in its
                    // first fragment register and + (2, 3) in its second.
                    const __half* xp = xcur[b] + u * 32 + ks * 4;
                    const bool    ok = xok[b] && u < cnt;
                    bx[u][ks][b][0]  = ok ? *reinterpret_cast<const uint32_t*>(xp) : 0u;
                    bx[u][ks][b][1]  = ok ? *reinterpret_cast<const uint32_t*>(xp + 2) : 0u;
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

// ---- pipelined kernel (v4) -----------------------------------------------------------------------

// cp.async copies and the L2 prefetch: ptx.cuh.

// Every pipelined variant sums a column in the same order, so that its bits do not depend on the
// variant (and so not on n_out through the table: a fused q/k/v or gate/up projection gives the
// same bits as its parts): k is cut into 16 chunks of steps, chunk c = [k_steps c / 16,
// k_steps (c + 1) / 16); a chunk's partial sum is its steps in order (F32 mma accumulation per
// group, times the group's scales at each group end and at the chunk's end); the 16 partials are
// added as a binary tree (node = left + right). A warp owns 16 / W consecutive chunks (their tree
// levels in shared memory), the block adds the warps' subtrees.
constexpr int k_chunks = 16;

// Fusion flags of the pipelined kernel (int4_gemv_fusion, docs/cuda.md "The fused decode step"):
// F_NORM: x is the residual stream; the block computes each token's RMSNorm (decode_math.cuh's order)
// into shared memory once and the warps read their fragments from there instead of the ring.
// F_RES: y is the residual stream, y += the (rounded) output. F_SILU: 32-row tiles of 16 gate then
// 16 up rows, y = silu(gate) * up per feature. F_F32 (alone): the un-rounded F32 sum (+ bias in F32)
// to y32 (int4_gemv_f32out: the quantized lm_head's logits). F_NORM_OUT (with F_RES): the block that
// finishes last (a device counter, split-K style) then normalises the whole updated residual stream
// into x_out, the next linear's input, as add_rms_norm_f16 would have after the add (its order and
// bits; in out_perm order when set): the add-and-norm launch after o / down disappears.
enum : int { F_NORM = 1, F_RES = 2, F_SILU = 4, F_F32 = 8, F_NORM_OUT = 16 };

// A ring slot (uint4 units): TN x 32 weight words, XB x 32 activation fragments (XB = NB, or 0 when
// the activations are in the block's normalised copy), TN x 8 scale words.
constexpr int pipe_slot_words(int tn, int xb) {
    return (tn + xb) * 32 + tn * 8;
}
constexpr int pipe_levels(int w) {  // pending tree levels per warp: log2(16 / W)
    return w >= 16 ? 0 : w == 8 ? 1 : w == 4 ? 2 : 3;
}
constexpr int pipe_xb(int nb, int f) {
    return (f & F_NORM) ? 0 : nb;
}
// F_SILU: the block's rounded outputs [TN][16 tokens][32 rows] F16, after the warps' sums.
constexpr size_t pipe_act_bytes(int tn, int f) {
    return (f & F_SILU) ? size_t(tn) * 16 * 32 * 2 : 0;
}
// Dynamic shared memory of a block: the rings (reused for the final sum of the warps' results and
// the F_SILU outputs), then each warp's pending chunk sums; with F_NORM then the norm's warp sums
// [16 tokens][32] and inverse RMS [16] (pipe_norm_bytes), then the rows of pipe_norm_rows_bytes.
constexpr size_t pipe_ring_bytes(int w, int tn, int nb, int d, int f = 0) {
    const size_t ring = size_t(w) * d * pipe_slot_words(tn, pipe_xb(nb, f)) * 16;
    const size_t red  = size_t(w) * tn * 2 * nb * 4 * 32 * 4 + pipe_act_bytes(tn, f);
    return ring > red ? ring : red;
}
constexpr size_t pipe_norm_bytes = 16 * 32 * 4 + 16 * 4;
constexpr size_t pipe_smem_bytes(int w, int tn, int nb, int d, int f = 0) {
    return pipe_ring_bytes(w, tn, nb, d, f) + size_t(w) * pipe_levels(w) * tn * 2 * nb * 4 * 32 * 4 +
           ((f & F_NORM) ? pipe_norm_bytes : 0);
}
// Halves per row in shared memory: n_in, plus 32 when that makes the row stride an odd multiple of
// 64 bytes (the 8 lanes of a 16-byte load phase then read two rows in distinct banks).
constexpr int64_t pipe_norm_stride(int64_t n_in) {
    return n_in % 64 == 0 ? n_in + 32 : n_in;
}
// F_NORM rows: the m input rows and the norm's weights as copied (m + 1 rows), normalised in place;
// with an act-order permutation the normalised rows (m more) are apart from them (a gather).
constexpr size_t pipe_norm_rows_bytes(int64_t m, int64_t n_in, bool perm) {
    return size_t((m + 1 + (perm ? m : 0)) * pipe_norm_stride(n_in)) * 2;
}

struct pipe_args {
    const uint4*  wts;
    const uint4*  sz;
    const __half* x;
    const __half* bias;
    __half*       y;
    int           m, n_out, n_tiles, k_steps, spg, n_groups;
    int64_t       x_stride, y_stride;
    // F_NORM: the norm's weights [n_in] F16, epsilon, the act-order column order [n_in] (or nullptr).
    const __half*  norm_w;
    const int32_t* perm;
    float          eps;
    int            prefetch;  // 1: cp.async.bulk.prefetch.L2 of each warp's weights first (sm_90)
    float*         y32;       // F_F32: the output [m, y_stride] F32 (y unused)
    // F_NORM_OUT: the next norm's weights [n_out] F16, its epsilon, the next linear's act-order column
    // order (or nullptr), the normalised rows' destination [m, x_out_stride], and a device counter
    // that is zero before the launch (the last block leaves it zero again).
    const __half*  out_norm_w;
    const int32_t* out_perm;
    float          out_eps;
    __half*        x_out;
    int64_t        x_out_stride;
    unsigned*      counter;
};

// The arguments of a launch of L over m rows of x (fusion fields empty: the callers set them).
pipe_args pipe_args_for(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x,
                        const uint16_t* bias, int64_t m, int64_t x_stride, int64_t y_stride, bool prefetch) {
    pipe_args a{};
    a.wts      = static_cast<const uint4*>(weights);
    a.sz       = static_cast<const uint4*>(sz);
    a.x        = reinterpret_cast<const __half*>(x);
    a.bias     = reinterpret_cast<const __half*>(bias);
    a.m        = int(m);
    a.n_out    = int(L.n_out);
    a.n_tiles  = int(L.n_tiles);
    a.k_steps  = int(L.k_steps);
    a.spg      = int(L.group_size / 32);
    a.n_groups = int(L.n_groups);
    a.x_stride = x_stride;
    a.y_stride = y_stride;
    a.prefetch = prefetch ? 1 : 0;
    return a;
}

// F_NORM prologue: the block's tokens normalised into xs [m][pipe_norm_stride] (in perm order when
// set), bit for bit add_rms_norm_f16 without the add (norm.cu). raw: the rows as copied (h, then the
// norm's weights); xs == raw without a permutation (normalised in place). The global reads are
// 16-byte copies issued in pairs per thread (one L2 round trip per 2 x 8 KB at 16 warps), the rest
// reads shared memory: virtual thread t of rms_threads(n_in) is lane t % 32 of warp (t / 32) % W.
template <int W>
__device__ void pipe_norm_prologue(const pipe_args& a, float* part, __half* raw, __half* xs) {
    constexpr int nt   = W * 32;
    const int     lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int     dim = a.k_steps * 32, xstr = int(pipe_norm_stride(dim));
    const int     T = rms_threads(dim), VW = T / 32, rows = a.m + 1;
    float*        inv     = part + 16 * 32;
    auto          src_row = [&](int r) { return r < a.m ? a.x + int64_t(r) * a.x_stride : a.norm_w; };
    const bool    v16     = (reinterpret_cast<uintptr_t>(a.x) % 16 == 0) && a.x_stride % 8 == 0 &&
                     (reinterpret_cast<uintptr_t>(a.norm_w) % 16 == 0);
    if (v16) {
        const int per_row = dim / 8, total = rows * per_row;  // 16-byte pieces
        for (int c0 = threadIdx.x; c0 < total; c0 += 2 * nt) {
            const int   c1 = c0 + nt;
            const uint4 v0 = *reinterpret_cast<const uint4*>(src_row(c0 / per_row) + (c0 % per_row) * 8);
            uint4       v1 = make_uint4(0u, 0u, 0u, 0u);
            if (c1 < total) v1 = *reinterpret_cast<const uint4*>(src_row(c1 / per_row) + (c1 % per_row) * 8);
            *reinterpret_cast<uint4*>(raw + (c0 / per_row) * xstr + (c0 % per_row) * 8) = v0;
            if (c1 < total) *reinterpret_cast<uint4*>(raw + (c1 / per_row) * xstr + (c1 % per_row) * 8) = v1;
        }
    } else {  // rows not 16-byte aligned (an odd stride): one half at a time
        for (int e = threadIdx.x; e < rows * dim; e += nt) raw[(e / dim) * xstr + e % dim] = src_row(e / dim)[e % dim];
    }
    __syncthreads();
    for (int tok = 0; tok < a.m; ++tok)
        for (int vw = warp; vw < VW; vw += W) {
            const float ss = rms_warp_sum(rms_thread_sumsq(raw + tok * xstr, dim, vw * 32 + lane, T));
            if (lane == 0) part[tok * 32 + vw] = ss;
        }
    __syncthreads();
    if (int(threadIdx.x) < a.m) inv[threadIdx.x] = rms_inv_from_partials(part + threadIdx.x * 32, VW, dim, a.eps);
    __syncthreads();
    const __half* g = raw + a.m * xstr;
    constexpr int U = 8;  // column indices loaded together (the permutation is in global memory)
    for (int i0 = threadIdx.x; i0 < dim; i0 += U * nt) {
        int j[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int i = i0 + u * nt;
            j[u]        = i < dim ? (a.perm ? a.perm[i] : i) : 0;
        }
        for (int tok = 0; tok < a.m; ++tok) {
            const float iv = inv[tok];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int i = i0 + u * nt;
                if (i < dim) xs[tok * xstr + i] = rms_apply(raw[tok * xstr + j[u]], iv, g[j[u]]);
            }
        }
    }
    __syncthreads();
}

// F_NORM_OUT epilogue, run by the block that finishes last: every block's residual rows are in
// global memory (read through L2: other SMs wrote them), normalised into x_out in decode_math.cuh's
// order (the T virtual threads of rms_threads(n_out), emulated by the block's warps as the F_NORM
// prologue does), bit for bit add_rms_norm_f16's output after its add. part: 16 x 32 floats of shared
// memory (the ring's, free by then), inv: 16 more.
template <int W>
__device__ void pipe_norm_epilogue(const pipe_args& a, float* part, float* inv) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int dim = a.n_out, T = rms_threads(dim), VW = T / 32;
    for (int tok = 0; tok < a.m; ++tok) {
        const __half* h = a.y + int64_t(tok) * a.y_stride;
        for (int vw = warp; vw < VW; vw += W) {
            float ss = 0.0f;
            for (int i = vw * 32 + lane; i < dim; i += T) {  // rms_thread_sumsq's order, through L2
                const float f = __half2float(__ldcg(h + i));
                ss            = __fmaf_rn(f, f, ss);
            }
            ss = rms_warp_sum(ss);
            if (lane == 0) part[tok * 32 + vw] = ss;
        }
    }
    __syncthreads();
    if (int(threadIdx.x) < a.m) inv[threadIdx.x] = rms_inv_from_partials(part + threadIdx.x * 32, VW, dim, a.out_eps);
    __syncthreads();
    for (int tok = 0; tok < a.m; ++tok) {
        const __half* h  = a.y + int64_t(tok) * a.y_stride;
        __half*       xo = a.x_out + int64_t(tok) * a.x_out_stride;
        const float   iv = inv[tok];
        for (int i = threadIdx.x; i < dim; i += W * 32) {
            const int j = a.out_perm ? a.out_perm[i] : i;
            xo[i]       = rms_apply(__ldcg(h + j), iv, a.out_norm_w[j]);
        }
    }
}

// W warps (16, 8 or 4), TN tiles per block, NB 8-token column tiles, ring of D slots (D - 1 steps
// in flight), registers capped for MINB blocks per SM, fusion flags F. x must be 16-byte aligned with
// x_stride % 8 == 0.
template <int W, int TN, int NB, int D, int MINB, int F = 0>
__global__ void __launch_bounds__(W * 32, MINB) int4_gemv_pipe_kernel(const pipe_args a) {
    static_assert(D >= 2, "ring of at least 2 slots");
    static_assert(W == 16 || W == 8 || W == 4, "16 chunks over the warps");
    static_assert(!((F & F_RES) && (F & F_SILU)), "one epilogue");
    static_assert(!(F & F_F32) || F == F_F32, "the F32 output takes no other fusion");
    static_assert(!(F & F_NORM_OUT) || (F & F_RES), "the output norm follows the residual add");
    constexpr bool          NORM = (F & F_NORM) != 0;
    constexpr int           XB   = pipe_xb(NB, F);
    constexpr int           SLOT = pipe_slot_words(TN, XB), CPW = k_chunks / W, LV = pipe_levels(W);
    constexpr int           E = TN * 2 * NB * 4;  // accumulators per lane
    extern __shared__ uint4 smem[];
    const int               lane = threadIdx.x & 31, warp = threadIdx.x >> 5, gid = lane >> 2, tig = lane & 3;
    const int               tile0 = int(blockIdx.x) * TN;
    const unsigned          ks    = unsigned(a.k_steps);
    const int               c0    = warp * CPW;
    const int               s0 = int(ks * unsigned(c0) / k_chunks), s1 = int(ks * unsigned(c0 + CPW) / k_chunks);
    const int               n          = s1 - s0;
    uint4*                  ring       = smem + warp * (D * SLOT);
    char*                   after_ring = reinterpret_cast<char*>(smem) + pipe_ring_bytes(W, TN, NB, D, F);
    float*                  pend       = reinterpret_cast<float*>(after_ring) + warp * (LV * E * 32);
    char*                   after_pend = after_ring + size_t(W) * LV * E * 32 * 4;
    float*                  norm_part  = reinterpret_cast<float*>(after_pend);                     // F_NORM
    __half*                 norm_raw   = reinterpret_cast<__half*>(after_pend + pipe_norm_bytes);  // F_NORM
    const int64_t           xs_stride  = pipe_norm_stride(int64_t(a.k_steps) * 32);
    // The normalised rows: in place over the copied ones, or after them with a permutation.
    __half* xs = a.perm ? norm_raw + (a.m + 1) * xs_stride : norm_raw;

    // Sources at step s0. Tiles past the end (n_tiles % TN != 0) re-read the last tile; their
    // results are not written.
    const uint4* wsrc[TN];
    const uint4* ssrc[TN];
#pragma unroll
    for (int tt = 0; tt < TN; ++tt) {
        const int64_t tile = tile0 + tt < a.n_tiles ? tile0 + tt : a.n_tiles - 1;
        wsrc[tt]           = a.wts + (tile * a.k_steps + s0) * 32 + lane;
        ssrc[tt]           = a.sz + tile * a.n_groups * 8 + gid;
    }
    const __half* xsrc[NB];
    bool          xok[NB];
#pragma unroll
    for (int b = 0; b < NB; ++b) {
        xok[b] = b * 8 + gid < a.m;
        if constexpr (NORM) {  // the block's normalised copy
            xsrc[b] = xs + (xok[b] ? int64_t(b * 8 + gid) * xs_stride : 0) + int64_t(s0) * 32 + tig * 8;
        } else {
            xsrc[b] = a.x + (xok[b] ? int64_t(b * 8 + gid) * a.x_stride : 0) + int64_t(s0) * 32 + tig * 8;
            // Tokens past m: their fragment slots are zeroed once and never copied into.
            if (!xok[b])
#pragma unroll
                for (int i = 0; i < D; ++i) ring[i * SLOT + (TN + b) * 32 + lane] = make_uint4(0u, 0u, 0u, 0u);
        }
    }
    const uint64_t policy = evict_first_policy();

    // Issue side: step s0 + j into a slot; the activations and (scale, zero) words separately from
    // the weights, so that the first weights are in flight before the previous kernel has finished.
    int  ig = s0 / a.spg, iin = s0 % a.spg;
    auto issue_w = [&](int j, int slot) {
        uint4* sl = ring + slot * SLOT;
#pragma unroll
        for (int tt = 0; tt < TN; ++tt) cp_async_stream16(sl + tt * 32 + lane, wsrc[tt] + j * 32, policy);
    };
    auto issue_xs = [&](int j, int slot) {  // called for j = 0, 1, 2, ... in order
        uint4* sl = ring + slot * SLOT;
#pragma unroll
        for (int b = 0; b < XB; ++b)
            if (xok[b]) cp_async_cached16(sl + (TN + b) * 32 + lane, xsrc[b] + j * 32);
        if ((iin == 0 || j == 0) && tig == 0)
#pragma unroll
            for (int tt = 0; tt < TN; ++tt) cp_async_cached16(sl + (TN + XB) * 32 + tt * 8 + gid, ssrc[tt] + ig * 8);
        if (++iin == a.spg) iin = 0, ++ig;
    };

    float acc[E], tmp[E];  // index ((tt * 2 + t) * NB + b) * 4 + c
#pragma unroll
    for (int e = 0; e < E; ++e) acc[e] = tmp[e] = 0.0f;
    float   scale[TN][4];
    __half2 z1024[TN][4], z64[TN][4];
#pragma unroll
    for (int tt = 0; tt < TN; ++tt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            scale[tt][i] = 0.0f;
            z1024[tt][i] = z64[tt][i] = __float2half2_rn(0.0f);
        }
    auto flush = [&]() {  // a group or chunk ended: scale its partial sums
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int tt = e / (8 * NB), t = (e / (4 * NB)) % 2, c = e % 4;
            acc[e] += scale[tt][2 * t + c / 2] * tmp[e];
            tmp[e] = 0.0f;
        }
    };
    // Chunk i (local) of this warp is complete in acc: add it into the warp's subtree.
    auto finish_chunk = [&](int i) {
        int idx = i, level = 0;
        while (idx & 1) {  // merge with the left sibling kept at this level
#pragma unroll
            for (int e = 0; e < E; ++e) acc[e] = pend[(level * E + e) * 32 + lane] + acc[e];
            ++level, idx >>= 1;
        }
        if (i != CPW - 1) {
#pragma unroll
            for (int e = 0; e < E; ++e) {
                pend[(level * E + e) * 32 + lane] = acc[e];
                acc[e]                            = 0.0f;
            }
        }
    };

    // The warp's whole weight range of each tile requested into L2 at once (weights are never written by
    // a kernel of the step: before pdl_wait), so that DRAM streams at its full rate from the start
    // while the ring copies below, D - 1 steps ahead, find their bytes in L2 (docs/cuda.md).
    if (a.prefetch && lane < TN && n > 0) {
        const int64_t tile = tile0 + lane < a.n_tiles ? tile0 + lane : a.n_tiles - 1;
        prefetch_l2_bulk(a.wts + (tile * a.k_steps + s0) * 32, uint32_t(n) * 512u);
    }
#pragma unroll
    for (int j = 0; j < D - 1; ++j)
        if (j < n) issue_w(j, j);
    pdl_wait();  // the activations (and y) may be the previous kernel's
#pragma unroll
    for (int j = 0; j < D - 1; ++j) {
        if (j < n) issue_xs(j, j);
        cp_async_commit();  // group 0 also holds the weights of steps 0 .. D - 2
    }
    pdl_launch_dependents();
    if constexpr (NORM) pipe_norm_prologue<W>(a, norm_part, norm_raw, xs);  // while the first steps are in flight

    int cslot = 0, islot = D - 1, cin = s0 % a.spg, chunk = 0;
    int chunk_end = int(ks * unsigned(c0 + 1) / k_chunks) - s0;  // local step where chunk 0 ends
    for (int j = 0; j < n; ++j) {
        // Refill the slot consumed in the previous step, then wait for this step's (one commit
        // group per step: at most D - 1 newer groups may still be in flight).
        if (j + D - 1 < n) {
            issue_w(j + D - 1, islot);
            issue_xs(j + D - 1, islot);
        }
        cp_async_commit();
        cp_async_wait<D - 1>();
        if (++islot == D) islot = 0;
        while (CPW > 1 && chunk < CPW - 1 && j == chunk_end) {  // chunk boundaries (empty chunks too)
            flush();
            finish_chunk(chunk++);
            chunk_end = int(ks * unsigned(c0 + chunk + 1) / k_chunks) - s0;
        }
        const uint4* sl = ring + cslot * SLOT;
        if (cin == 0 || j == 0) {  // a group starts: its (scale, zero) words, copied by lanes tig == 0
            if (j > 0) flush();
            __syncwarp();
#pragma unroll
            for (int tt = 0; tt < TN; ++tt) {
                const uint4    v     = sl[(TN + XB) * 32 + tt * 8 + gid];
                const uint32_t vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const __half2 sz2 = bits_h2(vv[i]);  // (scale, zero)
                    scale[tt][i]      = __low2float(sz2);
                    const __half zh   = __high2half(sz2);
                    z1024[tt][i]      = __half2half2(__hadd(zh, __float2half(1024.0f)));
                    z64[tt][i]        = __half2half2(__hneg(__hadd(zh, __float2half(64.0f))));
                }
            }
            __syncwarp();  // every lane has read the words before a lane refills the slot
        }
        if (++cin == a.spg) cin = 0;
        uint32_t xw[NB][4];
#pragma unroll
        for (int b = 0; b < NB; ++b) {
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if constexpr (NORM) {
                if (xok[b]) v = *reinterpret_cast<const uint4*>(xsrc[b] + int64_t(j) * 32);
            } else {
                v = sl[(TN + b) * 32 + lane];
            }
            xw[b][0] = v.x, xw[b][1] = v.y, xw[b][2] = v.z, xw[b][3] = v.w;
        }
#pragma unroll
        for (int tt = 0; tt < TN; ++tt) {
            const uint4    q     = sl[tt * 32 + lane];
            const uint32_t qw[4] = {q.x, q.y, q.z, q.w};
            uint32_t       d[4][4];  // [word = row][slot]
#pragma unroll
            for (int i = 0; i < 4; ++i) dequant_word(qw[i], z1024[tt][i], z64[tt][i], d[i]);
#pragma unroll
            for (int kh = 0; kh < 2; ++kh)
#pragma unroll
                for (int t = 0; t < 2; ++t) {
                    const uint32_t af[4] = {d[2 * t][2 * kh], d[2 * t + 1][2 * kh], d[2 * t][2 * kh + 1],
                                            d[2 * t + 1][2 * kh + 1]};
#pragma unroll
                    for (int b = 0; b < NB; ++b) {
                        const int e0 = ((tt * 2 + t) * NB + b) * 4;
                        mma_16816(tmp[e0], tmp[e0 + 1], tmp[e0 + 2], tmp[e0 + 3], af, xw[b][2 * kh], xw[b][2 * kh + 1]);
                    }
                }
        }
        if (++cslot == D) cslot = 0;
    }
    flush();
    while (chunk < CPW - 1) {  // trailing empty chunks (fewer than 16 steps)
        finish_chunk(chunk++);
        flush();
    }
    finish_chunk(CPW - 1);
    cp_async_wait<0>();

    // The warps' subtrees: red[warp][e][lane]; the rings are free once every warp is here.
    float*  red = reinterpret_cast<float*>(smem);
    __half* act = reinterpret_cast<__half*>(red + W * E * 32);  // F_SILU: [TN][16][32]
    __syncthreads();
#pragma unroll
    for (int e = 0; e < E; ++e) red[(warp * E + e) * 32 + lane] = acc[e];
    __syncthreads();
    for (int e = threadIdx.x; e < E * 32; e += W * 32) {
        float v[W];
#pragma unroll
        for (int w = 0; w < W; ++w) v[w] = red[w * E * 32 + e];
#pragma unroll
        for (int step = 1; step < W; step *= 2)
#pragma unroll
            for (int w = 0; w + step < W; w += 2 * step) v[w] = v[w] + v[w + step];
        const int     idx = e / 32, ln = e % 32;
        const int     c = idx % 4, b = (idx / 4) % NB, t = (idx / (4 * NB)) % 2, tt = idx / (8 * NB);
        const int     tile    = tile0 + tt;
        const int     n_local = t * 16 + (ln >> 2) + (c / 2) * 8, tok = b * 8 + (ln & 3) * 2 + (c & 1);
        const int64_t nn = int64_t(tile) * 32 + n_local;
        if (tile < a.n_tiles && nn < a.n_out && tok < a.m) {
            float out = v[0];
            if (a.bias) out += __half2float(a.bias[nn]);
            if constexpr ((F & F_F32) != 0) {  // the value the F16 variants round, as it is
                a.y32[int64_t(tok) * a.y_stride + nn] = out;
                continue;
            }
            __half o = __float2half_rn(out);
            if constexpr ((F & F_SILU) != 0) {
                act[(tt * 16 + tok) * 32 + n_local] = o;  // combined below, once the tile is complete
                continue;
            }
            __half* dst = a.y + int64_t(tok) * a.y_stride + nn;
            if constexpr ((F & F_RES) != 0) o = __float2half_rn(__half2float(*dst) + __half2float(o));  // add_f16
            *dst = o;
        }
    }
    if constexpr ((F & F_SILU) != 0) {
        // Tile tile0 + tt holds gate features 16 (tile0 + tt) .. + 15 in rows 0..15, the up ones in 16..31.
        __syncthreads();
        for (int i = threadIdx.x; i < TN * a.m * 16; i += W * 32) {
            const int tt = i / (a.m * 16), tok = (i / 16) % a.m, jf = i % 16;
            const int tile = tile0 + tt;
            if (tile >= a.n_tiles) continue;
            const __half* r                                          = act + (tt * 16 + tok) * 32;
            a.y[int64_t(tok) * a.y_stride + int64_t(tile) * 16 + jf] = act_mul_h<act_kind::SILU>(r[jf], r[16 + jf]);
        }
    }
    if constexpr ((F & F_NORM_OUT) != 0) {
        // The last block to get here normalises the stream (every block's rows visible device-wide
        // before it counts itself in), then leaves the counter zero for the next launch.
        __threadfence();
        __syncthreads();
        __shared__ bool last;
        if (threadIdx.x == 0) last = atomicAdd(a.counter, 1u) == gridDim.x - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        pipe_norm_epilogue<W>(a, red, red + 16 * 32);
        if (threadIdx.x == 0) *a.counter = 0u;
    }
}

// One thread per 32-bit word of the repacked weights: word i of lane `lane` of (tile, step).
static_assert(int4_layout_k_grouped, "int4_repack_weights_kernel writes the grouped in-step k order");
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
                const int j = nib % 4, e = nib / 4;  // slot, parity
                // Slot j of lane l holds k = 8 (l % 4) + 2 j + e: the A fragment's (k, k+1) pair at
                // mma k 2 (l % 4) + 8 (j % 2) of the k16 half j / 2, so that the matching B fragments
                // (the activations) are 8 consecutive halves per lane, one 16-byte load.
                const int64_t  kp = s * 32 + (lane & 3) * 8 + 2 * j + e;
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

int4_layout_slice int4_layout_rows(const int4_layout& L, int64_t tile0, int64_t tiles) {
    int4_layout_slice s;
    s.L              = L;
    s.L.n_tiles      = tiles;
    s.L.n_out        = std::min(L.n_out, 32 * (tile0 + tiles)) - 32 * tile0;
    s.L.weight_bytes = tiles * L.k_steps * 512;
    s.L.sz_bytes     = tiles * L.n_groups * 32 * 4;
    s.weight_offset  = tile0 * L.k_steps * 512;
    s.sz_offset      = tile0 * L.n_groups * 32 * 4;
    return s;
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

// The kernel variants (int4_gemv_variant_name): 0 the batched v3 kernel, the others pipelined with
// (warps per block, tiles per block, ring slots). All pipelined variants give the same bits.
struct variant_info {
    const char* name;
    int         warps, tiles, depth;  // warps 0: the batched kernel
};
constexpr variant_info k_variants[] = {
    {"v3-batched", 0, 1, 8},         {"pipe-w16-t1-d4", 16, 1, 4}, {"pipe-w16-t1-d6", 16, 1, 6},
    {"pipe-w16-t1-d4-2b", 16, 1, 4}, {"pipe-w8-t1-d6", 8, 1, 6},   {"pipe-w4-t2-d4", 4, 2, 4},
};
constexpr int k_n_variants = int(sizeof(k_variants) / sizeof(k_variants[0]));
// -2b: registers capped for two blocks per SM (64; at m > 8 89 -> 64 with 80 bytes of spills).
enum : int { V_W16_D4 = 1, V_W16_D6, V_W16_D4_2B, V_W8_D6, V_W4_T2_D4 };

size_t variant_smem(int v, int m) {
    const variant_info& vi = k_variants[v];
    return vi.warps ? pipe_smem_bytes(vi.warps, vi.tiles, m <= 8 ? 1 : 2, vi.depth) : 0;
}

struct device_caps {
    int  sms        = 0;      // multiprocessors
    int  smem_optin = 0;      // dynamic shared memory a block may opt in to
    int  smem_sm    = 0;      // shared memory per multiprocessor
    bool pdl        = false;  // programmatic dependent launch (sm_90+, not disabled by GPTQ_INT4_PDL=0 or GPTQ_PDL=0)
    bool prefetch   = false;  // each warp's weights prefetched into L2 at its start (sm_90+, GPTQ_INT4_PREFETCH=1: on)
};

// Of the current device, queried once per device.
device_caps current_device_caps() {
    static std::atomic<int> sms[64], smem[64], smem_sm[64], major[64];  // zero: not queried yet
    static const bool       pdl_env = [] {
        const char* e = std::getenv("GPTQ_INT4_PDL");
        return !(e && e[0] == '0');
    }();
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) {
        cudaGetLastError();
        return {132, 48 * 1024, 48 * 1024, false};
    }
    device_caps c{sms[dev].load(std::memory_order_relaxed), smem[dev].load(std::memory_order_relaxed),
                  smem_sm[dev].load(std::memory_order_relaxed), false};
    int         mj = major[dev].load(std::memory_order_relaxed);
    if (c.sms == 0) {
        if (cudaDeviceGetAttribute(&c.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&c.smem_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&mj, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&c.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) {
            cudaGetLastError();
            return {132, 48 * 1024, 48 * 1024, false};
        }
        smem[dev].store(c.smem_optin, std::memory_order_relaxed);
        smem_sm[dev].store(c.smem_sm, std::memory_order_relaxed);
        major[dev].store(mj, std::memory_order_relaxed);
        sms[dev].store(c.sms, std::memory_order_relaxed);
    }
    c.pdl = pdl_env && mj >= 9 && pdl_enabled();  // GPTQ_PDL=0 (launch.cuh) turns it off as well
    // Off unless GPTQ_INT4_PREFETCH=1: on the H100 (session 9) the W4 decode step was ~0.6 ms slower
    // with it (docs/perf-notes.md).
    static const bool prefetch_env = [] {
        const char* e = std::getenv("GPTQ_INT4_PREFETCH");
        return e && e[0] == '1';
    }();
    c.prefetch = prefetch_env && mj >= 9;
    return c;
}

// The table (docs/perf-notes.md, session 4, H100 run 3 sweep): which variant runs a chunk of m <= 16
// tokens, from the number of 32-row tiles against the SM count. The variants give the same bits,
// so the choice may depend on n_out. Llama-2-7B on the H100: o and down are 128 tiles, qkv 384,
// gate_up 688, for 132 SMs.
int auto_variant(const int4_layout& L, int m, const device_caps& c) {
    const int64_t sms = c.sms > 0 ? c.sms : 1;
    int           v   = V_W16_D4;  // 16 warps per tile, one block per SM (o, down; qkv at m > 8)
    if (m <= 8 && L.n_tiles >= 2 * sms)
        v = V_W16_D4_2B;  // registers capped (64) for two blocks per SM: qkv, gate_up
    else if (m > 8 && L.n_tiles >= 4 * sms)
        v = V_W4_T2_D4;  // two tiles per warp, each activation fragment read once for both: gate_up
    return variant_smem(v, m) <= size_t(c.smem_optin) ? v : 0;
}

template <int W, int TN, int NB, int D, int MINB, int F = 0>
status launch_pipe_nb(const pipe_args& a, const device_caps& caps, cudaStream_t stream) {
    constexpr size_t base = pipe_smem_bytes(W, TN, NB, D, F);
    // F_NORM: the normalised rows come on top, their size known at launch only.
    const size_t bytes =
        base + ((F & F_NORM) ? pipe_norm_rows_bytes(a.m, int64_t(a.k_steps) * 32, a.perm != nullptr) : 0);
    auto* kernel = int4_gemv_pipe_kernel<W, TN, NB, D, MINB, F>;
    // Once per device: the dynamic shared memory limit, and the carveout: as much shared memory as
    // the blocks that the registers allow per SM need, the rest L1 (the activations are read
    // through L1 by every block of the SM). F_NORM kernels read their activations from shared
    // memory: the device's whole limit, all shared.
    static std::atomic<uint64_t> configured{0};
    int                          dev = 0;
    GPTQ_CUDA_CHECK(cudaGetDevice(&dev));
    const uint64_t bit = dev < 64 ? uint64_t(1) << dev : 0;
    if (!(configured.load(std::memory_order_relaxed) & bit)) {
        const int limit = (F & F_NORM) ? caps.smem_optin : int(base);
        GPTQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, limit));
        GPTQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                             int(cudaSharedmemCarveoutMaxShared)));
        int most = 0, got = 0;
        if (!(F & F_NORM)) GPTQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&most, kernel, W * 32, base));
        if (caps.smem_sm > 0 && most > 0) {
            const int pct = int(
                std::min<int64_t>(100, (int64_t(most) * int64_t(base + 1024) * 100 + caps.smem_sm - 1) / caps.smem_sm));
            GPTQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, pct));
            GPTQ_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&got, kernel, W * 32, base));
            if (got < most)
                GPTQ_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout,
                                                     int(cudaSharedmemCarveoutMaxShared)));
        }
        configured.fetch_or(bit, std::memory_order_relaxed);
    }
    cudaLaunchConfig_t cfg{};
    cfg.gridDim          = dim3(unsigned((a.n_tiles + TN - 1) / TN));
    cfg.blockDim         = dim3(W * 32);
    cfg.dynamicSmemBytes = bytes;
    cfg.stream           = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id                                         = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs                                          = attr;
    cfg.numAttrs                                       = caps.pdl ? 1 : 0;
    GPTQ_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

template <int W, int TN, int D, int MINB = 1>
status launch_pipe(const pipe_args& a, const device_caps& caps, cudaStream_t stream) {
    return a.m <= 8 ? launch_pipe_nb<W, TN, 1, D, MINB>(a, caps, stream)
                    : launch_pipe_nb<W, TN, 2, D, MINB>(a, caps, stream);
}

status launch_variant(int v, const pipe_args& a, const device_caps& caps, cudaStream_t stream) {
    switch (v) {
        case V_W16_D4:
            return launch_pipe<16, 1, 4>(a, caps, stream);
        case V_W16_D6:
            return launch_pipe<16, 1, 6>(a, caps, stream);
        case V_W16_D4_2B:
            return launch_pipe<16, 1, 4, 2>(a, caps, stream);
        case V_W8_D6:
            return launch_pipe<8, 1, 6>(a, caps, stream);
        case V_W4_T2_D4:
            return launch_pipe<4, 2, 4>(a, caps, stream);
        default:
            break;
    }
    return make_error(status_code::STATUS_INTERNAL, "int4_gemv_f16: no pipelined kernel for variant {}", v);
}

// The fused kernels (int4_gemv_fused_f16): m <= 16; at m <= 8 (one 8-token column tile) the two
// 16-warp variants that the table picks there, at m > 8 (two column tiles) 16 warps x 4 slots (the
// register-capped variant would spill).
constexpr int k_fused_max_m = 16;
bool          fused_variant(int v) {
             return v == V_W16_D4 || v == V_W16_D4_2B;
}
// The variant a fused launch of m rows runs: the forced one or the table's, among the fused ones.
int fused_variant_for(const int4_layout& L, int m, int variant, const device_caps& caps) {
    int v = variant >= 0 ? variant : auto_variant(L, m, caps);
    return fused_variant(v) && m <= 8 ? v : V_W16_D4;
}
int fusion_flags(const int4_gemv_fusion& f) {
    return (f.norm_w ? F_NORM : 0) | (f.residual ? F_RES : 0) | (f.silu ? F_SILU : 0) | (f.out_norm_w ? F_NORM_OUT : 0);
}
size_t fused_smem(int v, int flags, int64_t m, int64_t n_in, bool perm) {
    const variant_info& vi = k_variants[v];
    return pipe_smem_bytes(vi.warps, vi.tiles, m <= 8 ? 1 : 2, vi.depth, flags) +
           ((flags & F_NORM) ? pipe_norm_rows_bytes(m, n_in, perm) : 0);
}

template <int F>
status launch_fused_f(int v, const pipe_args& a, const device_caps& caps, cudaStream_t stream) {
    if (a.m > 8) return launch_pipe_nb<16, 1, 2, 4, 1, F>(a, caps, stream);
    if (v == V_W16_D4) return launch_pipe_nb<16, 1, 1, 4, 1, F>(a, caps, stream);
    if (v == V_W16_D4_2B) return launch_pipe_nb<16, 1, 1, 4, 2, F>(a, caps, stream);
    return make_error(status_code::STATUS_INTERNAL, "int4_gemv_fused_f16: no fused kernel for variant {}", v);
}

status launch_fused(int v, int flags, const pipe_args& a, const device_caps& caps, cudaStream_t stream) {
    switch (flags) {
        case F_NORM:
            return launch_fused_f<F_NORM>(v, a, caps, stream);
        case F_NORM | F_SILU:
            return launch_fused_f<F_NORM | F_SILU>(v, a, caps, stream);
        case F_RES:
            return launch_fused_f<F_RES>(v, a, caps, stream);
        case F_SILU:
            return launch_fused_f<F_SILU>(v, a, caps, stream);
        case F_RES | F_NORM_OUT:
            return launch_fused_f<F_RES | F_NORM_OUT>(v, a, caps, stream);
        case F_F32:
            return launch_fused_f<F_F32>(v, a, caps, stream);
        default:
            break;
    }
    return make_error(status_code::STATUS_UNSUPPORTED,
                      "int4_gemv_fused_f16: fusion (norm {}, residual {}, silu {}, output norm {}) is not one of norm, "
                      "norm + silu, silu, residual, residual + output norm",
                      (flags & F_NORM) != 0, (flags & F_RES) != 0, (flags & F_SILU) != 0, (flags & F_NORM_OUT) != 0);
}

}  // namespace

int int4_gemv_variant_count() {
    return k_n_variants;
}

const char* int4_gemv_variant_name(int variant) {
    return variant >= 0 && variant < k_n_variants ? k_variants[variant].name : "auto";
}

int int4_gemv_auto_variant(const int4_layout& L, int64_t m) {
    return auto_variant(L, int(std::clamp<int64_t>(m, 1, 16)), current_device_caps());
}

int64_t int4_gemv_workspace_bytes(const int4_layout& L, int splits) {
    return workspace_for(L, splits > 0 ? std::min(splits, k_max_splits) : auto_splits(L));
}

status int4_gemv_f16(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x, const uint16_t* bias,
                     uint16_t* y, int64_t m, int64_t x_stride, int64_t y_stride, void* workspace,
                     int64_t workspace_bytes, cudaStream_t stream, int unroll, int splits, int variant) {
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
    if (variant < -1 || variant >= k_n_variants)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemv_f16: variant {} not in [-1, {})", variant,
                          k_n_variants);
    // The pipelined kernels read 16-byte activation fragments and do not split k.
    const bool pipe_ok = splits == 1 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && x_stride % 8 == 0;
    if (variant > 0 && !pipe_ok)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_f16: variant {} needs splits 1 and 16-byte aligned x with x_stride % 8 == 0 "
                          "(splits {}, x_stride {})",
                          k_variants[variant].name, splits, x_stride);
    unsigned* counters = static_cast<unsigned*>(workspace);
    float*    partial  = reinterpret_cast<float*>(static_cast<char*>(workspace) + (L.n_tiles * 4 + 255) / 256 * 256);
    if (L.n_tiles > 0x7fffffff / 32 || L.k_steps > 0x7fffffff / 32)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemv_f16: layout {} x {} too large", L.n_out,
                          L.n_in);
    const device_caps caps = current_device_caps();
    const uint4*      w    = static_cast<const uint4*>(weights);
    const uint4*      s    = static_cast<const uint4*>(sz);
    const __half*     b    = reinterpret_cast<const __half*>(bias);
    const int64_t     spg  = L.group_size / 32;
    for (int64_t r = 0; r < m; r += 16) {
        const int     mm = int(std::min<int64_t>(16, m - r));
        const __half* xr = reinterpret_cast<const __half*>(x) + r * x_stride;
        __half*       yr = reinterpret_cast<__half*>(y) + r * y_stride;
        int           v  = variant >= 0 ? variant : pipe_ok ? auto_variant(L, mm, caps) : 0;
        if (v > 0 && variant_smem(v, mm) > size_t(caps.smem_optin))
            return make_error(status_code::STATUS_UNSUPPORTED,
                              "int4_gemv_f16: variant {} needs {} bytes of shared memory, the device allows {}",
                              k_variants[v].name, variant_smem(v, mm), caps.smem_optin);
        if (v > 0) {
            pipe_args a = pipe_args_for(L, weights, sz, x + r * x_stride, bias, mm, x_stride, y_stride, caps.prefetch);
            a.y         = yr;
            GPTQ_TRY(launch_variant(v, a, caps, stream));
            continue;
        }
        const dim3 grid(unsigned(L.n_tiles), unsigned(splits));
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

int64_t int4_gemv_fused_max_m() {
    return k_fused_max_m;
}

bool int4_gemv_fused_variant(int variant) {
    return variant >= 0 && variant < k_n_variants && fused_variant(variant);
}

status int4_gemv_fused_check(const int4_layout& L, int64_t m, const int4_gemv_fusion& f, int variant) {
    if (m < 1 || m > k_fused_max_m)
        return make_error(status_code::STATUS_UNSUPPORTED, "int4_gemv_fused_f16: m {} not in [1, {}]", m,
                          k_fused_max_m);
    if (f.perm && !f.norm_w)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_fused_f16: a column order without the norm (the caller permutes x)");
    if (f.silu && L.n_out % 32 != 0)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "int4_gemv_fused_f16: gate/up in 32-row tiles needs n_out % 32 == 0 (n_out {})", L.n_out);
    if (variant != -1 && !int4_gemv_fused_variant(variant))
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemv_fused_f16: variant {} has no fused kernel",
                          variant);
    const int flags = fusion_flags(f);
    if (flags != F_NORM && flags != (F_NORM | F_SILU) && flags != F_SILU && flags != F_RES &&
        flags != (F_RES | F_NORM_OUT))
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "int4_gemv_fused_f16: fusion (norm {}, residual {}, silu {}, output norm {}) is not one of "
                          "norm, norm + silu, silu, residual, residual + output norm",
                          f.norm_w != nullptr, f.residual, f.silu, f.out_norm_w != nullptr);
    if (f.out_norm_w && f.x_out_stride < L.n_out)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_fused_f16: the output norm's rows [m, >= {}] (stride {})", L.n_out,
                          f.x_out_stride);
    if (L.n_tiles > 0x7fffffff / 32 || L.k_steps > 0x7fffffff / 32)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemv_fused_f16: layout {} x {} too large",
                          L.n_out, L.n_in);
    const device_caps caps = current_device_caps();
    const int         v    = fused_variant_for(L, int(m), variant, caps);
    if (fused_smem(v, flags, m, L.n_in, f.perm != nullptr) > size_t(caps.smem_optin))
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "int4_gemv_fused_f16: {} tokens of {} inputs need {} bytes of shared memory, the device "
                          "allows {}",
                          m, L.n_in, fused_smem(v, flags, m, L.n_in, f.perm != nullptr), caps.smem_optin);
    return status::ok();
}

status int4_gemv_fused_f16(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x,
                           const uint16_t* bias, uint16_t* y, int64_t m, int64_t x_stride, int64_t y_stride,
                           const int4_gemv_fusion& f, cudaStream_t stream, int variant) {
    GPTQ_TRY(int4_gemv_fused_check(L, m, f, variant));
    if (x_stride < L.n_in || y_stride < (f.silu ? L.n_out / 2 : L.n_out))
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_fused_f16: x_stride {} / y_stride {} too small for {} x {}", x_stride, y_stride,
                          L.n_out, L.n_in);
    // Without the norm the warps copy 16-byte fragments of x (the pipelined kernels' condition).
    if (!f.norm_w && (reinterpret_cast<uintptr_t>(x) % 16 != 0 || x_stride % 8 != 0))
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_fused_f16: x must be 16-byte aligned with x_stride % 8 == 0 (x_stride {})",
                          x_stride);
    if (f.out_norm_w && (!f.counter || !f.x_out))
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_fused_f16: the output norm needs its destination and a device counter");
    const device_caps caps = current_device_caps();
    const int         v    = fused_variant_for(L, int(m), variant, caps);
    pipe_args         a    = pipe_args_for(L, weights, sz, x, bias, m, x_stride, y_stride, caps.prefetch);
    a.y                    = reinterpret_cast<__half*>(y);
    a.norm_w               = reinterpret_cast<const __half*>(f.norm_w);
    a.perm                 = f.perm;
    a.eps                  = f.eps;
    a.out_norm_w           = reinterpret_cast<const __half*>(f.out_norm_w);
    a.out_perm             = f.out_perm;
    a.out_eps              = f.out_eps;
    a.x_out                = reinterpret_cast<__half*>(f.x_out);
    a.x_out_stride         = f.x_out_stride;
    a.counter              = f.counter;
    return launch_fused(v, fusion_flags(f), a, caps, stream);
}

status int4_gemv_f32out_check(const int4_layout& L, int64_t m, int variant) {
    if (m < 1 || m > k_fused_max_m)
        return make_error(status_code::STATUS_UNSUPPORTED, "int4_gemv_f32out: m {} not in [1, {}]", m, k_fused_max_m);
    if (variant != -1 && !int4_gemv_fused_variant(variant))
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemv_f32out: variant {} has no fused kernel",
                          variant);
    if (L.n_tiles > 0x7fffffff / 32 || L.k_steps > 0x7fffffff / 32)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemv_f32out: layout {} x {} too large", L.n_out,
                          L.n_in);
    const device_caps caps = current_device_caps();
    const int         v    = fused_variant_for(L, int(m), variant, caps);
    if (fused_smem(v, F_F32, m, L.n_in, false) > size_t(caps.smem_optin))
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "int4_gemv_f32out: {} needs {} bytes of shared memory, the device allows {}",
                          k_variants[v].name, fused_smem(v, F_F32, m, L.n_in, false), caps.smem_optin);
    return status::ok();
}

status int4_gemv_f32out(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x,
                        const uint16_t* bias, float* y, int64_t m, int64_t x_stride, int64_t y_stride,
                        cudaStream_t stream, int variant) {
    GPTQ_TRY(int4_gemv_f32out_check(L, m, variant));
    if (x_stride < L.n_in || y_stride < L.n_out)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_f32out: x_stride {} / y_stride {} too small for {} x {}", x_stride, y_stride,
                          L.n_out, L.n_in);
    // The warps copy 16-byte fragments of x (the pipelined kernels' condition).
    if (reinterpret_cast<uintptr_t>(x) % 16 != 0 || x_stride % 8 != 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemv_f32out: x must be 16-byte aligned with x_stride % 8 == 0 (x_stride {})", x_stride);
    const device_caps caps = current_device_caps();
    const int         v    = fused_variant_for(L, int(m), variant, caps);
    pipe_args         a    = pipe_args_for(L, weights, sz, x, bias, m, x_stride, y_stride, caps.prefetch);
    a.y32                  = y;
    return launch_fused(v, F_F32, a, caps, stream);
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
