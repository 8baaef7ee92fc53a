// Attention kernels (see attention.cuh for the contract).
//
// Prefill: a block owns 16 queries of one head and walks the 32-key tiles those queries can see
// (causal end, sliding-window start). Q (pre-scaled), the K tile and the V tile sit in shared
// memory in F32; 8 threads per query row compute 4 scores each, the row's running max/sum are
// updated online (flash attention), and each thread accumulates head_dim/8 output values.
// Decode: a block owns (query, head, chunk of keys); each warp walks keys of the chunk with the
// lanes splitting head_dim, keeps its own running max/sum/accumulator, the warps are merged in
// shared memory, and a combine kernel merges the chunks, or (counters given) the last block of each
// (query, head) to finish does, in the same order: one launch instead of two, the same bits.
// Prefill on tensor cores (head_dim 64 or 128, at least 64 queries, even strides): a block owns 64
// queries of one head, 4 warps of 16 query rows; per tile of 32 keys each warp computes its
// [16 x 32] scores with WMMA (F16 x F16 -> F32), runs the online softmax on them in shared memory
// (two lanes per row), splits P into two F16 parts (hi + lo, so P keeps ~22 bits: rounding P to
// one F16 gave 1e-3 relative errors on rows with few keys, measured against the CPU reference) and
// adds (P_hi + P_lo) V into its [16 x head_dim] F32 output, which
// lives in shared memory so that the per-row rescaling is plain arithmetic. The CUDA-core kernel
// serves every other shape.
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>

#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/decode_math.cuh"
#include "kernels/cuda/launch.cuh"

namespace gptq::cuda {

namespace {

constexpr int k_qt      = 16;   // queries per prefill block
constexpr int k_kt      = 32;   // keys per tile
constexpr int k_threads = 128;  // 16 rows x 8 threads
constexpr int k_max_dim = 256;

struct dev_params {
    const __half * q, *k, *v;
    __half*        out;
    int64_t        n_q, n_kv, q_pos0, n_head, group, head_dim, window;
    float          scale;
    float          softcap;  // > 0: scaled scores s -> softcap * tanh(s / softcap) before the mask; 0 = off
    int64_t        q_stride, kv_stride, out_stride;
    const int32_t* q_pos_dev;  // decode, ragged: each query's position (attention_params::q_pos_dev)
    const int32_t* q_seq_dev;  // decode, ragged: each query's sequence, or nullptr (sequence 0)
    kv_page_dev    pages;      // paged K/V: row j of sequence s at pool row kv_page_row(pages, s, j)
    const int32_t* out_col;    // decode: output column c at out_col[c] (attention_params::out_col), or nullptr
    // Decode with RoPE and the cache append (attention_params::k_new ...): k_new nullptr when off.
    const __half *k_new, *v_new;
    int64_t       new_stride;
    const float * rope_cos, *rope_sin;
    int64_t       n_ctx;
};

// Gemma 2's attention logit soft-capping of a scaled score (cap 0: the score unchanged, no op).
__device__ inline float softcapped(float s, float cap) {
    return cap > 0.0f ? tanhf(s / cap) * cap : s;
}

__device__ inline bool visible(int64_t pos, int64_t j, int64_t window) {
    return j <= pos && (window <= 0 || pos - j < window);
}

__global__ void __launch_bounds__(k_threads) prefill_kernel(dev_params p) {
    extern __shared__ float smem[];
    const int64_t           D   = p.head_dim;
    const int64_t           Dp  = D + 1;            // K rows padded: the 8 threads of a row read 8 keys at one d
    float*                  q_s = smem;             // [k_qt][D]
    float*                  k_s = q_s + k_qt * D;   // [k_kt][D + 1]
    float*                  v_s = k_s + k_kt * Dp;  // [k_kt][D]
    float*                  p_s = v_s + k_kt * D;   // [k_qt][k_kt]
    const int               tid = threadIdx.x, r = tid / 8, sub = tid % 8;
    const int64_t           q0 = int64_t(blockIdx.x) * k_qt, h = blockIdx.y, hk = h / p.group;

    for (int64_t i = tid; i < k_qt * D; i += k_threads) {
        const int64_t qi = q0 + i / D, d = i % D;
        q_s[i] = qi < p.n_q ? __half2float(p.q[qi * p.q_stride + h * D + d]) * p.scale : 0.0f;
    }
    const int64_t last_q    = (q0 + k_qt < p.n_q ? q0 + k_qt : p.n_q) - 1;
    const int64_t key_end   = p.q_pos0 + last_q + 1;  // exclusive
    const int64_t first_pos = p.q_pos0 + q0;
    int64_t       key_begin = p.window > 0 ? first_pos - p.window + 1 : 0;
    if (key_begin < 0) key_begin = 0;
    key_begin -= key_begin % k_kt;
    const int64_t pos   = p.q_pos0 + q0 + r;
    const bool    valid = q0 + r < p.n_q;

    const int nd = int((D + 7) / 8);  // output values per thread: d = sub + 8 * j
    float     acc[k_max_dim / 8];
#pragma unroll
    for (int j = 0; j < k_max_dim / 8; ++j) acc[j] = 0.0f;
    float m_i = -INFINITY, l_i = 0.0f;

    for (int64_t kt = key_begin; kt < key_end; kt += k_kt) {
        __syncthreads();
        for (int64_t i = tid; i < k_kt * D; i += k_threads) {
            const int64_t j = kt + i / D, d = i % D;
            const int64_t row = j < p.n_kv ? kv_page_row(p.pages, 0, j) : -1;  // the pool row (paged)
            float         kv = 0.0f, vv = 0.0f;
            if (row >= 0) {
                kv = __half2float(p.k[row * p.kv_stride + hk * D + d]);
                vv = __half2float(p.v[row * p.kv_stride + hk * D + d]);
            }
            k_s[(i / D) * Dp + d] = kv;
            v_s[i]                = vv;
        }
        __syncthreads();
        float s[k_kt / 8];
        float tile_max = -INFINITY;
#pragma unroll
        for (int i = 0; i < k_kt / 8; ++i) {
            const int     jl  = sub + 8 * i;
            const int64_t j   = kt + jl;
            float         dot = 0.0f;
            for (int64_t d = 0; d < D; ++d) dot += q_s[r * D + d] * k_s[jl * Dp + d];
            s[i]     = (valid && j < p.n_kv && visible(pos, j, p.window)) ? softcapped(dot, p.softcap) : -INFINITY;
            tile_max = fmaxf(tile_max, s[i]);
        }
        for (int o = 1; o < 8; o <<= 1) tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, o));
        const float m_new = fmaxf(m_i, tile_max);
        float       sum   = 0.0f;
#pragma unroll
        for (int i = 0; i < k_kt / 8; ++i) {
            const float e               = m_new == -INFINITY ? 0.0f : __expf(s[i] - m_new);
            p_s[r * k_kt + sub + 8 * i] = e;
            sum += e;
        }
        for (int o = 1; o < 8; o <<= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        const float corr = (m_i == -INFINITY) ? 0.0f : __expf(m_i - m_new);
        l_i              = l_i * corr + sum;
        m_i              = m_new;
        __syncwarp();
#pragma unroll
        for (int j = 0; j < k_max_dim / 8; ++j) acc[j] *= corr;
        for (int jl = 0; jl < k_kt; ++jl) {
            const float pj = p_s[r * k_kt + jl];
#pragma unroll
            for (int j = 0; j < k_max_dim / 8; ++j)
                if (j < nd && sub + 8 * j < D) acc[j] += pj * v_s[jl * D + sub + 8 * j];
        }
        __syncwarp();
    }
    if (!valid) return;
    const float inv = l_i > 0.0f ? 1.0f / l_i : 0.0f;
    __half*     o   = p.out + (q0 + r) * p.out_stride + h * D;
#pragma unroll
    for (int j = 0; j < k_max_dim / 8; ++j)
        if (j < nd && sub + 8 * j < D) o[sub + 8 * j] = __float2half_rn(acc[j] * inv);
}

// ---- prefill on tensor cores ---------------------------------------------------------------------

constexpr int k_tc_q = 64;  // queries per block: 4 warps x 16 rows
constexpr int k_tc_k = 32;  // keys per tile

template <int D>
constexpr size_t prefill_tc_smem_bytes() {
    return sizeof(__half) * (size_t(k_tc_q) * D + 2 * size_t(k_tc_k) * D + 2 * 4 * 16 * k_tc_k) +
           sizeof(float) * (4 * 16 * k_tc_k + 4 * 16 * size_t(D));
}

template <int D>
__global__ void __launch_bounds__(128) prefill_tc_kernel(dev_params p) {
    namespace wm = nvcuda::wmma;
    extern __shared__ __align__(128) unsigned char tc_smem[];
    __half*                                        q_s  = reinterpret_cast<__half*>(tc_smem);  // [64][D]
    __half*                                        k_s  = q_s + k_tc_q * D;                    // [32][D]
    __half*                                        v_s  = k_s + k_tc_k * D;                    // [32][D]
    __half*                                        p_s  = v_s + k_tc_k * D;       // [4 warps][16][32] P, high part
    __half*                                        pl_s = p_s + 4 * 16 * k_tc_k;  // [4 warps][16][32] P, low part
    float*        s_s = reinterpret_cast<float*>(pl_s + 4 * 16 * k_tc_k);         // [4 warps][16][32] scores
    float*        o_s = s_s + 4 * 16 * k_tc_k;                                    // [4 warps][16][D] output
    const int     tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
    const int64_t q0 = int64_t(blockIdx.x) * k_tc_q, h = blockIdx.y, hk = h / p.group;
    const __half2 zero2 = __float2half2_rn(0.0f);

    for (int i = tid; i < k_tc_q * D / 2; i += 128) {  // Q tile, rows past n_q zero
        const int     r = (2 * i) / D, d = (2 * i) % D;
        const int64_t qi = q0 + r;
        reinterpret_cast<__half2*>(q_s)[i] =
            qi < p.n_q ? *reinterpret_cast<const __half2*>(p.q + qi * p.q_stride + h * D + d) : zero2;
    }
    float*  o_w  = o_s + warp * 16 * D;
    float*  s_w  = s_s + warp * 16 * k_tc_k;
    __half* p_w  = p_s + warp * 16 * k_tc_k;
    __half* pl_w = pl_s + warp * 16 * k_tc_k;
    for (int i = lane; i < 16 * D; i += 32) o_w[i] = 0.0f;
    const int     row = lane / 2, side = lane % 2;  // softmax: two lanes per row, 16 keys each
    const int64_t qrow = q0 + warp * 16 + row, pos = p.q_pos0 + qrow;
    const bool    valid = qrow < p.n_q;
    float         m_i = -INFINITY, l_i = 0.0f;

    const int64_t last_q    = (q0 + k_tc_q < p.n_q ? q0 + k_tc_q : p.n_q) - 1;
    const int64_t key_end   = p.q_pos0 + last_q + 1;
    int64_t       key_begin = p.window > 0 ? p.q_pos0 + q0 - p.window + 1 : 0;
    if (key_begin < 0) key_begin = 0;
    key_begin -= key_begin % k_tc_k;

    for (int64_t kt = key_begin; kt < key_end; kt += k_tc_k) {
        __syncthreads();  // every warp is done with the previous K/V tile
        for (int i = tid; i < k_tc_k * D / 2; i += 128) {
            const int     r = (2 * i) / D, d = (2 * i) % D;
            const int64_t j   = kt + r;
            const int64_t row = j < p.n_kv ? kv_page_row(p.pages, 0, j) : -1;  // the pool row (paged)
            __half2       kv = zero2, vv = zero2;
            if (row >= 0) {
                kv = *reinterpret_cast<const __half2*>(p.k + row * p.kv_stride + hk * D + d);
                vv = *reinterpret_cast<const __half2*>(p.v + row * p.kv_stride + hk * D + d);
            }
            reinterpret_cast<__half2*>(k_s)[i] = kv;
            reinterpret_cast<__half2*>(v_s)[i] = vv;
        }
        __syncthreads();
        // S [16 x 32] = Q_w [16 x D] K^T.
        wm::fragment<wm::accumulator, 16, 16, 16, float> sf[k_tc_k / 16];
#pragma unroll
        for (int n = 0; n < k_tc_k / 16; ++n) wm::fill_fragment(sf[n], 0.0f);
#pragma unroll
        for (int kk = 0; kk < D; kk += 16) {
            wm::fragment<wm::matrix_a, 16, 16, 16, __half, wm::row_major> a;
            wm::load_matrix_sync(a, q_s + warp * 16 * D + kk, D);
#pragma unroll
            for (int n = 0; n < k_tc_k / 16; ++n) {
                wm::fragment<wm::matrix_b, 16, 16, 16, __half, wm::col_major> b;  // K^T: (d, key) at k_s[key * D + d]
                wm::load_matrix_sync(b, k_s + n * 16 * D + kk, D);
                wm::mma_sync(sf[n], a, b, sf[n]);
            }
        }
#pragma unroll
        for (int n = 0; n < k_tc_k / 16; ++n) wm::store_matrix_sync(s_w + n * 16, sf[n], k_tc_k, wm::mem_row_major);
        __syncwarp();
        // Online softmax over this row's 32 keys (16 per lane), P rounded to F16.
        float sv[16], tile_max = -INFINITY;
#pragma unroll
        for (int c = 0; c < 16; ++c) {
            const int     col = side * 16 + c;
            const int64_t j   = kt + col;
            const bool    vis = valid && j < p.n_kv && visible(pos, j, p.window);
            sv[c]             = vis ? softcapped(s_w[row * k_tc_k + col] * p.scale, p.softcap) : -INFINITY;
            tile_max          = fmaxf(tile_max, sv[c]);
        }
        tile_max          = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        const float m_new = fmaxf(m_i, tile_max);
        float       sum   = 0.0f;
#pragma unroll
        for (int c = 0; c < 16; ++c) {
            const float  e                     = m_new == -INFINITY ? 0.0f : __expf(sv[c] - m_new);
            const __half hi                    = __float2half_rn(e);
            p_w[row * k_tc_k + side * 16 + c]  = hi;
            pl_w[row * k_tc_k + side * 16 + c] = __float2half_rn(e - __half2float(hi));
            sum += e;
        }
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        const float corr = m_i == -INFINITY ? 0.0f : __expf(m_i - m_new);
        l_i              = l_i * corr + sum;
        m_i              = m_new;
        for (int d = side; d < D; d += 2) o_w[row * D + d] *= corr;
        __syncwarp();
        // O_w [16 x D] += P [16 x 32] V [32 x D].
        wm::fragment<wm::matrix_a, 16, 16, 16, __half, wm::row_major> pa[k_tc_k / 16], pl[k_tc_k / 16];
#pragma unroll
        for (int kk = 0; kk < k_tc_k / 16; ++kk) {
            wm::load_matrix_sync(pa[kk], p_w + kk * 16, k_tc_k);
            wm::load_matrix_sync(pl[kk], pl_w + kk * 16, k_tc_k);
        }
#pragma unroll
        for (int n = 0; n < D / 16; ++n) {
            wm::fragment<wm::accumulator, 16, 16, 16, float> of;
            wm::load_matrix_sync(of, o_w + n * 16, D, wm::mem_row_major);
#pragma unroll
            for (int kk = 0; kk < k_tc_k / 16; ++kk) {
                wm::fragment<wm::matrix_b, 16, 16, 16, __half, wm::row_major> b;  // V: (key, d) at v_s[key * D + d]
                wm::load_matrix_sync(b, v_s + kk * 16 * D + n * 16, D);
                wm::mma_sync(of, pl[kk], b, of);  // the small part first
                wm::mma_sync(of, pa[kk], b, of);
            }
            wm::store_matrix_sync(o_w + n * 16, of, D, wm::mem_row_major);
        }
        __syncwarp();
    }
    if (!valid) return;
    const float inv = l_i > 0.0f ? 1.0f / l_i : 0.0f;
    __half*     o   = p.out + qrow * p.out_stride + h * D;
    for (int d = side; d < D; d += 2) o[d] = __float2half_rn(o_w[row * D + d] * inv);
}

template <int D>
status launch_prefill_tc(const dev_params& dp, int64_t n_q, int64_t n_head, cudaStream_t stream) {
    constexpr size_t bytes = prefill_tc_smem_bytes<D>();
    if (bytes > 48 * 1024)
        GPTQ_CUDA_CHECK(
            cudaFuncSetAttribute(prefill_tc_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    const dim3 grid(unsigned((n_q + k_tc_q - 1) / k_tc_q), unsigned(n_head));
    prefill_tc_kernel<D><<<grid, 128, bytes, stream>>>(dp);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

// ---- decode ------------------------------------------------------------------------------------

constexpr int k_dec_warps  = 4;
constexpr int k_dec_pairs  = k_max_dim / 2 / 32;  // half2 pairs per lane at most
constexpr int k_dec_keys   = 8;                   // keys per warp per batch (their rows loaded together)
constexpr int k_min_chunk  = 64;
constexpr int k_max_splits = 64;
constexpr int k_split_goal = 264;  // blocks wanted: two per SM of an H100

// The blocks wanted per decode launch: k_split_goal, or GPTQ_ATTN_SPLIT_GOAL (an experiment knob: more
// key chunks, fewer keys per warp; read once). The grid and the workspace follow it, so the host's
// sizing (attention_decode_workspace_floats) and the launch agree.
int64_t split_goal() {
    static const int64_t goal = [] {
        const char* e = std::getenv("GPTQ_ATTN_SPLIT_GOAL");
        const long  v = e ? std::strtol(e, nullptr, 10) : 0;
        return v >= 1 && v <= 65536 ? int64_t(v) : int64_t(k_split_goal);
    }();
    return goal;
}

int64_t decode_splits(int64_t n_q, int64_t n_kv, int64_t n_head) {
    int64_t want = split_goal() / (n_q * n_head > 0 ? n_q * n_head : 1);
    if (want < 1) want = 1;
    if (want > k_max_splits) want = k_max_splits;
    const int64_t by_len = (n_kv + k_min_chunk - 1) / k_min_chunk;
    return want < by_len ? want : (by_len > 0 ? by_len : 1);
}

// Chunk partials [n_splits][2 + D] of (query qi, head h) merged into the output row: the one merge,
// run by the combine kernel or by the last block of the decode kernel (threads tid, tid + nt, ...).
// Loads through L2 (__ldcg): in the decode kernel the partials were written by other blocks.
__device__ void combine_chunks(const dev_params& p, const float* ws, int64_t n_splits, int64_t qi, int64_t h, int tid,
                               int nt) {
    const int64_t D   = p.head_dim;
    const float*  src = ws + (qi * p.n_head + h) * n_splits * (2 + D);
    float         M   = -INFINITY;
    for (int64_t s = 0; s < n_splits; ++s) M = fmaxf(M, __ldcg(src + s * (2 + D)));
    float L = 0.0f;
    for (int64_t s = 0; s < n_splits; ++s) {
        const float ms = __ldcg(src + s * (2 + D));
        if (ms != -INFINITY) L += __ldcg(src + s * (2 + D) + 1) * __expf(ms - M);
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    for (int64_t d = tid; d < D; d += nt) {
        float o = 0.0f;
        for (int64_t s = 0; s < n_splits; ++s) {
            const float ms = __ldcg(src + s * (2 + D));
            if (ms != -INFINITY) o += __ldcg(src + s * (2 + D) + 2 + d) * __expf(ms - M);
        }
        const int64_t c                                                    = h * D + d;
        p.out[qi * p.out_stride + (p.out_col ? int64_t(p.out_col[c]) : c)] = __float2half_rn(o * inv);
    }
}

// counters: nullptr, the combine kernel merges the chunks; else [n_q * n_head] zeros, and the last
// block of each (query, head) to finish merges them (the counters left zero): one launch.
// ROPE: p.k_new is set (RoPE and the cache append here); a template parameter so that the plain
// launches compile to the kernel without that code (registers, the key loop's branch).
template <bool ROPE>
__global__ void __launch_bounds__(k_dec_warps * 32)
    decode_kernel(dev_params p, float* ws, int64_t n_splits, unsigned* counters) {
    pdl_launch_dependents();
    pdl_wait();  // q and the cache rows come from the kernels before
    const int64_t h = blockIdx.x, split = blockIdx.y, qi = blockIdx.z, hk = h / p.group;
    const int     lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int64_t D = p.head_dim, n_pairs = D / 2;
    // Ragged (a graph replays this as the sequences grow): query qi at position q_pos_dev[qi] of
    // sequence q_seq_dev[qi], its keys 0 .. pos; else query qi at q_pos0 + qi of the one sequence.
    // Key j's row is looked up in the sequence's page table (paged) or is row j.
    const bool    ragged = p.q_pos_dev != nullptr;
    const int64_t pos    = ragged ? int64_t(p.q_pos_dev[qi]) : p.q_pos0 + qi;
    const int64_t n_kv   = ragged ? (pos + 1 < p.n_kv ? pos + 1 : p.n_kv) : p.n_kv;
    const int64_t seq    = ragged && p.q_seq_dev ? int64_t(p.q_seq_dev[qi]) : 0;
    const int64_t end    = pos + 1 < n_kv ? pos + 1 : n_kv;
    int64_t       begin  = p.window > 0 ? pos - p.window + 1 : 0;
    if (begin < 0) begin = 0;
    const int64_t chunk = (n_kv + n_splits - 1) / n_splits;
    int64_t       c0 = split * chunk, c1 = c0 + chunk;
    if (c0 < begin) c0 = begin;
    if (c1 > end) c1 = end;

    // RoPE here (p.k_new): the queries and the new keys (this pass's rows: query qi's own position, or
    // with several queries of one sequence every key from q_pos0 on) come unrotated from the
    // projection and are rotated with their row's tables, as rope_kv_store_f16 would have stored them.
    constexpr bool rope = ROPE;
    const int64_t  half = D / 2, new0 = ragged ? pos : p.q_pos0;
    auto           rotated = [&](const __half* x, int64_t t, int64_t pi) {  // pair pi of head x, token row t
        const float* cs = p.rope_cos + t * half;
        const float* sn = p.rope_sin + t * half;
        return __halves2half2(rope_elem(x, cs, sn, half, 2 * pi), rope_elem(x, cs, sn, half, 2 * pi + 1));
    };

    float2         q[k_dec_pairs];
    float2         acc[k_dec_pairs];
    const __half*  qh   = p.q + qi * p.q_stride + h * D;
    const __half2* qrow = reinterpret_cast<const __half2*>(qh);
#pragma unroll
    for (int j = 0; j < k_dec_pairs; ++j) {
        const int64_t pi = lane + 32 * j;
        q[j]             = pi >= n_pairs ? make_float2(0.0f, 0.0f)
                           : rope        ? __half22float2(rotated(qh, qi, pi))
                                         : __half22float2(qrow[pi]);
        q[j].x *= p.scale;
        q[j].y *= p.scale;
        acc[j] = make_float2(0.0f, 0.0f);
    }
    // The block of (qi, the group's first head, the chunk holding pos) stores query qi's key and value.
    if (rope && h % p.group == 0 && split == pos / chunk && pos < p.n_ctx) {
        const int64_t row = kv_page_row(p.pages, seq, pos);
        if (row >= 0) {
            const __half* kn = p.k_new + qi * p.new_stride + hk * D;
            const __half* vn = p.v_new + qi * p.new_stride + hk * D;
            const float * cs = p.rope_cos + qi * half, *sn = p.rope_sin + qi * half;
            __half*       kc = const_cast<__half*>(p.k) + row * p.kv_stride + hk * D;
            __half*       vc = const_cast<__half*>(p.v) + row * p.kv_stride + hk * D;
            for (int64_t e = threadIdx.x; e < D; e += blockDim.x) {
                kc[e] = rope_elem(kn, cs, sn, half, e);
                vc[e] = vn[e];
            }
        }
    }
    // Keys in batches of k_dec_keys per warp (keys j0 + u * k_dec_warps): all their K and V rows are
    // loaded before any is used, so a warp waits for memory once per batch instead of twice per key.
    float m = -INFINITY, l = 0.0f;
    for (int64_t j0 = c0 + warp; j0 < c1; j0 += int64_t(k_dec_warps) * k_dec_keys) {
        __half2 kr[k_dec_keys][k_dec_pairs], vr[k_dec_keys][k_dec_pairs];
#pragma unroll
        for (int u = 0; u < k_dec_keys; ++u) {
            const int64_t j  = j0 + int64_t(u) * k_dec_warps;
            const int64_t jj = j < c1 ? j : j0;  // a valid key; its score is masked below
            if (rope && jj >= new0) {            // a key of this pass: from the projection, rotated
                const int64_t  t    = ragged ? qi : jj - p.q_pos0;
                const __half*  kn   = p.k_new + t * p.new_stride + hk * D;
                const __half2* vrow = reinterpret_cast<const __half2*>(p.v_new + t * p.new_stride + hk * D);
#pragma unroll
                for (int tt = 0; tt < k_dec_pairs; ++tt) {
                    const int64_t pi = lane + 32 * tt;
                    kr[u][tt]        = pi < n_pairs ? rotated(kn, t, pi) : __float2half2_rn(0.0f);
                    vr[u][tt]        = pi < n_pairs ? vrow[pi] : __float2half2_rn(0.0f);
                }
                continue;
            }
            const int64_t  row  = kv_page_row(p.pages, seq, jj);  // every key < c1 has its page
            const __half2* krow = reinterpret_cast<const __half2*>(p.k + row * p.kv_stride + hk * D);
            const __half2* vrow = reinterpret_cast<const __half2*>(p.v + row * p.kv_stride + hk * D);
#pragma unroll
            for (int t = 0; t < k_dec_pairs; ++t) {
                const int64_t pi = lane + 32 * t;
                kr[u][t]         = pi < n_pairs ? krow[pi] : __float2half2_rn(0.0f);
                vr[u][t]         = pi < n_pairs ? vrow[pi] : __float2half2_rn(0.0f);
            }
        }
        float dot[k_dec_keys];
#pragma unroll
        for (int u = 0; u < k_dec_keys; ++u) {
            dot[u] = 0.0f;
#pragma unroll
            for (int t = 0; t < k_dec_pairs; ++t) {
                const float2 kv = __half22float2(kr[u][t]);
                dot[u] += q[t].x * kv.x + q[t].y * kv.y;
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1)
#pragma unroll
            for (int u = 0; u < k_dec_keys; ++u) dot[u] += __shfl_xor_sync(0xffffffffu, dot[u], o);
        float m_new = m;
#pragma unroll
        for (int u = 0; u < k_dec_keys; ++u) {
            dot[u] = softcapped(dot[u], p.softcap);
            if (j0 + int64_t(u) * k_dec_warps >= c1) dot[u] = -INFINITY;
            m_new = fmaxf(m_new, dot[u]);
        }
        const float corr = m == -INFINITY ? 0.0f : __expf(m - m_new);
        float       e[k_dec_keys];
        l *= corr;
#pragma unroll
        for (int u = 0; u < k_dec_keys; ++u) {
            e[u] = dot[u] == -INFINITY ? 0.0f : __expf(dot[u] - m_new);
            l += e[u];
        }
        m = m_new;
#pragma unroll
        for (int t = 0; t < k_dec_pairs; ++t) {
            float2 a = make_float2(acc[t].x * corr, acc[t].y * corr);
#pragma unroll
            for (int u = 0; u < k_dec_keys; ++u) {
                const float2 vv = __half22float2(vr[u][t]);
                a.x += e[u] * vv.x;
                a.y += e[u] * vv.y;
            }
            acc[t] = a;
        }
    }
    // Merge the warps: [warp][2 + D] in shared memory.
    __shared__ float part[k_dec_warps][2 + k_max_dim];
    if (lane == 0) {
        part[warp][0] = m;
        part[warp][1] = l;
    }
#pragma unroll
    for (int t = 0; t < k_dec_pairs; ++t) {
        const int64_t pi = lane + 32 * t;
        if (pi < n_pairs) {
            part[warp][2 + 2 * pi]     = acc[t].x;
            part[warp][2 + 2 * pi + 1] = acc[t].y;
        }
    }
    __syncthreads();
    float M = -INFINITY;
    for (int w = 0; w < k_dec_warps; ++w) M = fmaxf(M, part[w][0]);
    float* dst = ws + ((qi * p.n_head + h) * n_splits + split) * (2 + D);
    if (threadIdx.x == 0) {
        float L = 0.0f;
        for (int w = 0; w < k_dec_warps; ++w)
            if (part[w][0] != -INFINITY) L += part[w][1] * __expf(part[w][0] - M);
        dst[0] = M;
        dst[1] = L;
    }
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < k_dec_warps; ++w)
            if (part[w][0] != -INFINITY) o += part[w][2 + d] * __expf(part[w][0] - M);
        dst[2 + d] = o;
    }
    if (!counters) return;
    // The last block of (qi, h) to get here merges the chunks (the split-K pattern: every block's
    // partial is visible device-wide before it counts itself in).
    __threadfence();
    __syncthreads();
    __shared__ bool last;
    unsigned*       count = counters + qi * p.n_head + h;
    if (threadIdx.x == 0) last = atomicAdd(count, 1u) == unsigned(n_splits - 1);
    __syncthreads();
    if (!last) return;
    __threadfence();
    combine_chunks(p, ws, n_splits, qi, h, int(threadIdx.x), int(blockDim.x));
    if (threadIdx.x == 0) *count = 0u;  // ready for the next launch on these counters
}

__global__ void decode_combine_kernel(dev_params p, const float* ws, int64_t n_splits) {
    pdl_launch_dependents();
    pdl_wait();
    combine_chunks(p, ws, n_splits, blockIdx.y, blockIdx.x, int(threadIdx.x), int(blockDim.x));
}

status check_params(const attention_params& a, const char* who) {
    auto bad = [&](const char* what, int64_t v) {
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: {} = {} is invalid", who, what, v);
    };
    if (a.n_q < 0) return bad("n_q", a.n_q);
    if (a.n_head <= 0) return bad("n_head", a.n_head);
    if (a.n_head_kv <= 0 || a.n_head % a.n_head_kv != 0) return bad("n_head_kv", a.n_head_kv);
    if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.head_dim > k_max_dim) return bad("head_dim", a.head_dim);
    GPTQ_TRY(kv_page_map_check(a.kv_pages, a.n_kv, who));
    if (!a.q_pos_dev && (a.q_pos0 < 0 || a.q_pos0 + a.n_q > a.n_kv))
        return bad("q_pos0 + n_q (> n_kv)", a.q_pos0 + a.n_q);
    if (a.q_seq_dev && !a.q_pos_dev) return bad("q_seq_dev without q_pos_dev, n_q", a.n_q);
    if (a.q_seq_dev && !a.kv_pages.pages) return bad("q_seq_dev without a page table (kv_pages), n_q", a.n_q);
    if (a.q_stride < a.n_head * a.head_dim) return bad("q_stride", a.q_stride);
    if (a.kv_stride < a.n_head_kv * a.head_dim) return bad("kv_stride", a.kv_stride);
    if (a.out_stride < a.n_head * a.head_dim) return bad("out_stride", a.out_stride);
    if (a.window < 0) return bad("window", a.window);
    if (!(a.softcap >= 0.0f))
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "{}: softcap = {} is invalid", who, a.softcap);
    return status::ok();
}

dev_params to_dev(const attention_params& a) {
    return dev_params{reinterpret_cast<const __half*>(a.q),
                      reinterpret_cast<const __half*>(a.k),
                      reinterpret_cast<const __half*>(a.v),
                      reinterpret_cast<__half*>(a.out),
                      a.n_q,
                      a.n_kv,
                      a.q_pos0,
                      a.n_head,
                      a.n_head / a.n_head_kv,
                      a.head_dim,
                      a.window,
                      a.scale,
                      a.softcap,
                      a.q_stride,
                      a.kv_stride,
                      a.out_stride,
                      a.q_pos_dev,
                      a.q_seq_dev,
                      kv_page_dev_of(a.kv_pages),
                      a.out_col,
                      reinterpret_cast<const __half*>(a.k_new),
                      reinterpret_cast<const __half*>(a.v_new),
                      a.new_stride,
                      a.rope_cos,
                      a.rope_sin,
                      a.n_ctx};
}

bool& force_cuda_cores_flag() {
    static bool f = false;
    return f;
}
bool prefill_force_cuda_cores() {
    return force_cuda_cores_flag();
}

}  // namespace

void attention_prefill_force_cuda_cores(bool on) {
    force_cuda_cores_flag() = on;
}

status attention_prefill_f16(const attention_params& a, cudaStream_t stream) {
    GPTQ_TRY(check_params(a, "attention_prefill_f16"));
    if (a.q_pos_dev || a.q_seq_dev || a.out_col || a.k_new)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "attention_prefill_f16: device query positions and sequences (q_pos_dev, q_seq_dev), "
                          "output columns (out_col) and RoPE with the cache append (k_new) are for the decode kernel "
                          "only");
    if (a.n_q == 0) return status::ok();
    const int64_t D = a.head_dim;
    // Tensor cores for the shapes they are written for (half2 loads: even strides, aligned bases).
    const bool aligned = reinterpret_cast<uintptr_t>(a.q) % 4 == 0 && reinterpret_cast<uintptr_t>(a.k) % 4 == 0 &&
                         reinterpret_cast<uintptr_t>(a.v) % 4 == 0 && a.q_stride % 2 == 0 && a.kv_stride % 2 == 0;
    if (aligned && a.n_q >= k_tc_q && (D == 64 || D == 128) && !prefill_force_cuda_cores()) {
        return D == 64 ? launch_prefill_tc<64>(to_dev(a), a.n_q, a.n_head, stream)
                       : launch_prefill_tc<128>(to_dev(a), a.n_q, a.n_head, stream);
    }
    const size_t bytes = sizeof(float) * size_t(k_qt * D + k_kt * (D + 1) + k_kt * D + k_qt * k_kt);
    if (bytes > 48 * 1024)  // beyond the default limit (head_dim > 160): opt in, per launch (cheap, any device)
        GPTQ_CUDA_CHECK(cudaFuncSetAttribute(prefill_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    const dim3 grid(unsigned((a.n_q + k_qt - 1) / k_qt), unsigned(a.n_head));
    prefill_kernel<<<grid, k_threads, bytes, stream>>>(to_dev(a));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

int64_t attention_decode_workspace_floats(int64_t n_q, int64_t n_kv, int64_t n_head, int64_t head_dim) {
    return n_q * n_head * decode_splits(n_q, n_kv, n_head) * (2 + head_dim);
}

int64_t attention_decode_counters(int64_t n_q, int64_t n_head) {
    return n_q * n_head;
}

status attention_decode_f16(const attention_params& a, float* workspace, int64_t workspace_floats, cudaStream_t stream,
                            unsigned* counters) {
    GPTQ_TRY(check_params(a, "attention_decode_f16"));
    if (a.n_q == 0) return status::ok();
    const int64_t need = attention_decode_workspace_floats(a.n_q, a.n_kv, a.n_head, a.head_dim);
    if (workspace_floats < need)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "attention_decode_f16: workspace holds {} floats, {} needed", workspace_floats, need);
    if (a.q_stride % 2 != 0 || a.kv_stride % 2 != 0)  // rows are read as half2
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "attention_decode_f16: q_stride {} and kv_stride {} must be even", a.q_stride, a.kv_stride);
    if (a.k_new && (!a.v_new || !a.rope_cos || !a.rope_sin || a.new_stride % 2 != 0 ||
                    a.new_stride < a.n_head_kv * a.head_dim || (a.q_seq_dev && !a.q_pos_dev)))
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "attention_decode_f16: RoPE in the kernel needs k_new, v_new, the tables and an even "
                          "new_stride >= {} (new_stride {})",
                          a.n_head_kv * a.head_dim, a.new_stride);
    if (a.n_q > 65535)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "attention_decode_f16: n_q {} too large", a.n_q);
    const int64_t    splits = decode_splits(a.n_q, a.n_kv, a.n_head);
    const dev_params dp     = to_dev(a);
    GPTQ_CUDA_CHECK(launch_pdl(a.k_new ? decode_kernel<true> : decode_kernel<false>,
                               dim3(unsigned(a.n_head), unsigned(splits), unsigned(a.n_q)), dim3(k_dec_warps * 32), 0,
                               stream, dp, workspace, splits, counters));
    GPTQ_CUDA_CHECK_LAUNCH();
    if (counters) return status::ok();  // merged by each (query, head)'s last block
    GPTQ_CUDA_CHECK(launch_pdl(decode_combine_kernel, dim3(unsigned(a.n_head), unsigned(a.n_q)), dim3(128), 0, stream,
                               dp, workspace, splits));
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
