// 4-bit GPTQ GEMM for prefill and the dequantize kernel (see gptq_int4_gemm.cuh; the weight layout
// is gptq_int4.cuh's).
//
// Fused kernel, per block: BM tokens x BN = 32 NT outputs (NT layout tiles of 32 rows). k runs in
// stages of 64 (two layout k32 steps); each stage is three cp.async copies into shared memory:
// the NT x 2 weight chunks (512 bytes each, one 16-byte word per lane, already in mma A-fragment
// order), their scale/zero words (128 bytes per tile and step: one group per k32 step, since group
// sizes are multiples of 32), and the x tile (BM rows of 128 bytes, 16-byte chunks XOR-swizzled by
// row so that ldmatrix reads 8 rows without bank conflicts). STAGES stages are in flight.
// Warps split the block into WN x WM warp tiles (MT layout tiles x BM / WM tokens); per k32 step a
// warp reads its MT lane words, dequantizes each to 16 half2 f16(scale (q - zero)), and per k16 half
// loads its B fragments with ldmatrix.x4 and issues MT x 2 x NB mma.m16n8k16 (F32 accumulators).
// Epilogue: optional split-K sum (partials in a workspace, the last block of a tile adds them in
// split order, so the result does not depend on which block finishes last), bias, F16, staged
// through shared memory so that the output rows are written with 16-byte stores.
#include <cuda_fp16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/gptq_int4_gemm.cuh"
#include "kernels/cuda/ptx.cuh"

namespace gptq::cuda {

namespace {

// ---- small PTX wrappers -------------------------------------------------------------------------

// 16-byte global -> shared copy that bypasses L1 (.cg: every byte is used once per block); with
// src_bytes 0 it writes zeros (padding rows, tiles past n_out, steps past n_in) and reads nothing.
__device__ inline void cp_async16(uint32_t dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#endif
}

// Four 8x8 b16 matrices; lane i gives the row address of matrix i / 8, row i % 8.
[[maybe_unused]] __device__ inline void ldmatrix_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                                    uint32_t& r3) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
#else
    r0 = r1 = r2 = r3 = 0;
#endif
}

__device__ inline void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                 uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#else
    __trap();  // built only for sm_80+; the caller checks the device
#endif
}

// ---- Hopper: wgmma with the dequantized weights as the register A operand -------------------------

// The sm_90a instructions exist only in the arch-specific build (CMAKE_CUDA_ARCHITECTURES 90a); any
// other target compiles the wgmma kernel to a trap and int4_gemm_has_wgmma() says false on it.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GPTQ_HAS_WGMMA 1
#else
#define GPTQ_HAS_WGMMA 0
#endif

__device__ inline void wgmma_fence() {
#if GPTQ_HAS_WGMMA
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ inline void wgmma_commit() {
#if GPTQ_HAS_WGMMA
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ inline void wgmma_wait() {
#if GPTQ_HAS_WGMMA
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// Makes this thread's generic-proxy shared-memory writes (cp.async included) visible to the async
// proxy through which wgmma reads its shared-memory operand; followed by a barrier.
__device__ inline void fence_proxy_async_shared() {
#if GPTQ_HAS_WGMMA
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}
// 4-byte global -> shared copy (cp.async sizes 4 and 8 go through L1: .ca); src_bytes 0 writes zeros.
__device__ inline void cp_async4(uint32_t dst, const void* src, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
#endif
}

// Shared-memory matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address >> 4 in bits
// 0-13, leading byte offset >> 4 in 16-29 (unused by the swizzled K-major layouts: 1), stride byte
// offset >> 4 in 32-45 (1024: the distance between groups of 8 rows of 128 bytes), base offset 0 (the
// tile starts 1024-aligned), swizzle mode 1 = 128-byte swizzle in bits 62-63.
__device__ inline uint64_t wgmma_desc_sw128(uint32_t smem_addr) {
    return uint64_t((smem_addr & 0x3FFFFu) >> 4) | (uint64_t(1) << 16) | (uint64_t(1024 >> 4) << 32) |
           (uint64_t(1) << 62);
}

// D[64 x N] += A[64 x 16] B[16 x N]: A from registers (each warp of the warpgroup gives 16 rows in the
// mma.m16n8k16 A-fragment layout), B = N rows of 16 k (K-major) in shared memory through desc_b; F32
// accumulators, element (row 16 warp + gid + 8 (i % 4 / 2), column 8 (i / 4) + 2 tig + i % 2) in d[i].
template <int N>
__device__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b);
template <>
__device__ __forceinline__ void wgmma_rs<32>(float (&d)[16], const uint32_t (&a)[4], uint64_t desc_b) {
#if GPTQ_HAS_WGMMA
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 {%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, "
        "{%16,%17,%18,%19}, %20, 1, 1, 1, 0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
#else
    (void)d, (void)a, (void)desc_b;
    __trap();
#endif
}
template <>
__device__ __forceinline__ void wgmma_rs<64>(float (&d)[32], const uint32_t (&a)[4], uint64_t desc_b) {
#if GPTQ_HAS_WGMMA
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%"
        "29,%30,%31}, {%32,%33,%34,%35}, %36, 1, 1, 1, 0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
#else
    (void)d, (void)a, (void)desc_b;
    __trap();
#endif
}
template <>
__device__ __forceinline__ void wgmma_rs<128>(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
#if GPTQ_HAS_WGMMA
    asm volatile(
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.f16.f16 "
        "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%"
        "29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%"
        "56,%57,%58,%59,%60,%61,%62,%63}, {%64,%65,%66,%67}, %68, 1, 1, 1, 0;\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
          "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b));
#else
    (void)d, (void)a, (void)desc_b;
    __trap();
#endif
}

// ---- the layout's in-step k order ----------------------------------------------------------------

// Slot j (0..3) of a lane word holds the codes of k = slot_k(tig, j) + (0, 1) within the k32 step
// (tig = lane % 4); for mma, slot 2 ks + h is the A-fragment register pair of k16 half ks at mma k
// 2 tig + 8 h, so the B fragments must hold x at the same k. int4_layout_k_grouped (gptq_int4.cuh)
// says which order int4_repack writes; test_cuda_gemm checks the repacked words against slot_k and
// both kernels here against a reference built from the checkpoint tensors.
// Grouped order (k = 8 tig + 2 j): a lane's activation fragments of one step are the 8 consecutive
// halves x[8 tig .. 8 tig + 7] (one 16-byte shared load); interleaved order (k = 16 (j / 2) + 8 (j %
// 2) + 2 tig, the mma's own k order): ldmatrix.x4.
constexpr bool                    k_layout_k_grouped = int4_layout_k_grouped;
__host__ __device__ constexpr int slot_k(int tig, int j) {
    return k_layout_k_grouped ? 8 * tig + 2 * j : 16 * (j / 2) + 8 * (j % 2) + 2 * tig;
}
// XOR swizzle of the 16-byte chunks (8 per 128-byte row) of the x tile in shared memory: grouped
// order reads rows (g, g + 1) x chunks (4 st + tig) per quarter warp, so odd rows use the other
// half of the banks; ldmatrix reads 8 rows of one chunk, so each row its own slot.
__host__ __device__ constexpr int x_swizzle(int row) {
    return k_layout_k_grouped ? (row & 1) << 2 : row & 7;
}

// ---- dequantization -----------------------------------------------------------------------------

// One lane word (4 rows x 8 k, gptq_int4.cuh) and its 4 rows' (scale, zero) F16 pairs -> a[row word]
// [slot] half2 f16(scale (q - zero)). Slot j of a 32-bit word holds (k even, k odd) codes in nibbles
// j and j + 4: (w & 0x000F000F) | 0x64006400 is the half2 (1024 + q_even, 1024 + q_odd), minus
// (1024 + zero) is q - zero exactly; the 0x00F0 nibbles read as 1024 + 16 q, so an FMA by 1/16 with
// -(64 + zero) gives q - zero exactly. One multiply by the scale then rounds the exact product once.
__device__ inline void dequant_scaled(const uint4 q, const uint4 s, uint32_t (&a)[4][4]) {
    const uint32_t qw[4] = {q.x, q.y, q.z, q.w}, sv[4] = {s.x, s.y, s.z, s.w};
    const __half2  sixteenth = __float2half2_rn(1.0f / 16.0f);
    const __half2  c1024 = __float2half2_rn(1024.0f), c64 = __float2half2_rn(64.0f);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const __half2  sz2   = bits_h2(sv[i]);  // (scale, zero)
        const __half2  sc    = __low2half2(sz2);
        const __half2  zz    = __high2half2(sz2);
        const __half2  z1024 = __hadd2(zz, c1024);
        const __half2  z64   = __hneg2(__hadd2(zz, c64));
        const uint32_t w = qw[i], w8 = w >> 8;
        a[i][0] = h2_bits(__hmul2(__hsub2(bits_h2((w & 0x000F000Fu) | 0x64006400u), z1024), sc));
        a[i][1] = h2_bits(__hmul2(__hfma2(bits_h2((w & 0x00F000F0u) | 0x64006400u), sixteenth, z64), sc));
        a[i][2] = h2_bits(__hmul2(__hsub2(bits_h2((w8 & 0x000F000Fu) | 0x64006400u), z1024), sc));
        a[i][3] = h2_bits(__hmul2(__hfma2(bits_h2((w8 & 0x00F000F0u) | 0x64006400u), sixteenth, z64), sc));
    }
}

// ---- the fused kernel ---------------------------------------------------------------------------

struct gemm_args {
    const uint4*  w;   // layout weights: [n_tiles][k_steps][32 lanes] x 16 bytes
    const uint4*  sz;  // layout scales/zeros: [n_tiles][n_groups][8] x 16 bytes
    const __half* x;   // [m, x_stride]
    const __half* bias;
    __half*       y;         // [m, y_stride]
    float*        partial;   // split-K: [splits][n_pad][m_pad] F32
    unsigned*     counters;  // split-K: [n_blocks * m_blocks]
    int64_t       m, n_out, n_tiles, k_steps, n_groups, spg, x_stride, y_stride, n_pad, m_pad;
    bool          y_vec;         // 16-byte output stores allowed
    bool          prefetch = 0;  // warp-streamed kernel: L2 prefetch of the weights ahead (sm_90)
};

// BM: tokens per block; NT: 32-row layout tiles per block; WM x WN warps (WN along the outputs);
// KS: k32 layout steps per stage (a stage is 32 KS of k); STAGES: stages in the ring.
template <int BM, int NT, int WM, int WN, int KS, int STAGES>
struct tile_config {
    static constexpr int ks      = KS;  // k32 layout steps per stage
    static constexpr int threads = WM * WN * 32;
    static constexpr int mt      = NT / WN;   // layout tiles per warp
    static constexpr int wtok    = BM / WM;   // tokens per warp
    static constexpr int nb      = wtok / 8;  // 8-token mma columns per warp
    static constexpr int w_bytes = NT * ks * 512, sz_bytes = NT * ks * 128, x_bytes = BM * ks * 64;
    static constexpr int stage_bytes = w_bytes + sz_bytes + x_bytes;
    static constexpr int out_pitch   = NT * 32 + 8;  // halves per staged output row (+16 bytes: no bank conflicts)
    static constexpr int smem_bytes =
        STAGES * stage_bytes > BM* out_pitch * 2 ? STAGES* stage_bytes : BM* out_pitch * 2;
    static_assert(NT % WN == 0 && BM % WM == 0 && nb % 2 == 0, "warp tile");
    static_assert((BM * ks * 4) % threads == 0 && (NT * ks * 32) % threads == 0 && NT * ks * 8 <= threads,
                  "loader split");
};

// The block's epilogue, shared by both kernels: `visit(f)` calls f(nl, tl, v0, v1) for each pair of
// the thread's accumulators, output row nl of the block (n0 + nl overall) at tokens tl and tl + 1 of
// the block (tok0 + tl overall), v0 and v1 by reference. Optional split-K sum (partials in the
// workspace; the last block of a tile adds them in split order, so the result does not depend on
// which block finishes last), bias, F16, staged through shared memory so that the output rows are
// written with 16-byte stores. Ends with the block's shared memory overwritten.
template <int BM, int NOUT, int THREADS, class Visit>
__device__ inline void gemm_epilogue(const gemm_args& p, unsigned char* smem, int64_t tok0, int64_t n0, int split,
                                     int n_split, Visit&& visit) {
    const int tid = int(threadIdx.x);
    if (n_split > 1) {
        const int64_t cidx = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
        visit([&](int nl, int tl, float& v0, float& v1) {
            *reinterpret_cast<float2*>(p.partial + (split * p.n_pad + n0 + nl) * p.m_pad + tok0 + tl) =
                make_float2(v0, v1);
        });
        __threadfence();
        __syncthreads();
        __shared__ bool last;
        if (tid == 0) last = atomicAdd(&p.counters[cidx], 1u) == unsigned(n_split - 1);
        __syncthreads();
        if (!last) return;
        __threadfence();
        visit([&](int nl, int tl, float& v0, float& v1) {
            float2 s = make_float2(0.0f, 0.0f);
            for (int sp = 0; sp < n_split; ++sp) {
                const float2 v =
                    __ldcg(reinterpret_cast<const float2*>(p.partial + (sp * p.n_pad + n0 + nl) * p.m_pad + tok0 + tl));
                s.x += v.x, s.y += v.y;
            }
            v0 = s.x, v1 = s.y;
        });
        if (tid == 0) p.counters[cidx] = 0u;  // ready for the next launch on this workspace
    }

    constexpr int pitch = NOUT + 8;  // halves per staged output row (+16 bytes: no bank conflicts)
    __half*       out_s = reinterpret_cast<__half*>(smem);  // [BM][pitch]
    visit([&](int nl, int tl, float& v0, float& v1) {
        const int64_t n              = n0 + nl;
        const float   bv             = (p.bias && n < p.n_out) ? __half2float(p.bias[n]) : 0.0f;
        out_s[tl * pitch + nl]       = __float2half_rn(v0 + bv);
        out_s[(tl + 1) * pitch + nl] = __float2half_rn(v1 + bv);
    });
    __syncthreads();
    constexpr int CPR = NOUT / 8;  // 16-byte chunks per output row of the block
    for (int e = tid; e < BM * CPR; e += THREADS) {
        const int     r = e / CPR, c = e % CPR;
        const int64_t tok = tok0 + r, n = n0 + c * 8;
        if (tok >= p.m || n >= p.n_out) continue;  // n_out % 8 == 0: a chunk is all in or all out
        const __half* src = out_s + r * pitch + c * 8;
        __half*       dst = p.y + tok * p.y_stride + n;
        if (p.y_vec) {
            *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
        } else {
#pragma unroll
            for (int q = 0; q < 8; ++q) dst[q] = src[q];
        }
    }
}

template <int BM, int NT, int WM, int WN, int KS_, int STAGES>
__global__ void __launch_bounds__(WM* WN * 32) int4_gemm_kernel(const gemm_args p) {
    using C                   = tile_config<BM, NT, WM, WN, KS_, STAGES>;
    constexpr int     KS      = C::ks;
    constexpr int     MT      = C::mt;
    constexpr int     NB      = C::nb;
    constexpr int     THREADS = C::threads;
    extern __shared__ __align__(128) unsigned char smem[];

    const int     tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5;
    const int     wn = warp % WN, wm = warp / WN, gid = lane >> 2, tig = lane & 3;
    const int64_t tok0  = int64_t(blockIdx.x) * BM;
    const int64_t t0    = int64_t(blockIdx.y) * NT;  // first layout tile
    const int     split = int(blockIdx.z), n_split = int(gridDim.z);
    // This split's stages (stage-aligned, so only the last stage of the layer can be short).
    const int64_t  n_stage_all = (p.k_steps + KS - 1) / KS;
    const int64_t  st_begin = n_stage_all * split / n_split, st_end = n_stage_all * (split + 1) / n_split;
    const int      n_stage = int(st_end - st_begin);
    const uint32_t sbase   = smem_u32(smem);

    // Loader assignments (fixed per thread). x: row r = e / (4 KS), chunk xc = e % (4 KS), which is
    // the same for all of a thread's chunks since THREADS is a multiple of 4 KS.
    constexpr int XPT = BM * KS * 4 / THREADS, WPT = NT * KS * 32 / THREADS;
    const int     xc = tid % (KS * 4);
    const __half* xsrc[XPT];
    uint32_t      xdst[XPT];
    bool          xok[XPT];
#pragma unroll
    for (int i = 0; i < XPT; ++i) {
        const int     r   = (tid + i * THREADS) / (KS * 4);
        const int64_t tok = tok0 + r;
        xok[i]            = tok < p.m;
        xsrc[i]           = p.x + (xok[i] ? tok : 0) * p.x_stride + xc * 8;
        xdst[i]           = uint32_t(C::w_bytes + C::sz_bytes + r * KS * 64 + ((xc ^ x_swizzle(r)) << 4));
    }
    const uint4* wsrc[WPT];
    bool         wok[WPT];
    int          wst[WPT];
#pragma unroll
    for (int i = 0; i < WPT; ++i) {
        const int e    = tid + i * THREADS;
        const int tile = e / (KS * 32);
        wst[i]         = (e / 32) % KS;
        wok[i]         = t0 + tile < p.n_tiles;
        wsrc[i]        = p.w + ((wok[i] ? t0 + tile : 0) * p.k_steps + wst[i]) * 32 + (e % 32);
    }
    const bool   szt   = tid < NT * KS * 8;
    const int    sz_st = (tid / 8) % KS;
    const bool   szok  = szt && t0 + tid / (KS * 8) < p.n_tiles;
    const uint4* szsrc = p.sz + (szok ? t0 + tid / (KS * 8) : 0) * p.n_groups * 8 + (tid % 8);

    auto load_stage = [&](int j) {
        const int64_t  s0   = (st_begin + j) * KS;  // first k32 step of the stage
        const uint32_t base = sbase + uint32_t((j % STAGES) * C::stage_bytes);
#pragma unroll
        for (int i = 0; i < WPT; ++i) {
            const bool ok = wok[i] && s0 + wst[i] < p.k_steps;
            cp_async16(base + uint32_t((tid + i * THREADS) * 16), ok ? wsrc[i] + s0 * 32 : p.w, ok ? 16 : 0);
        }
        if (szt) {
            const int64_t step = s0 + sz_st;
            const bool    ok   = szok && step < p.k_steps;
            cp_async16(base + uint32_t(C::w_bytes + tid * 16), ok ? szsrc + (step / p.spg) * 8 : p.sz, ok ? 16 : 0);
        }
#pragma unroll
        for (int i = 0; i < XPT; ++i) {
            const bool ok = xok[i] && s0 + xc / 4 < p.k_steps;
            cp_async16(base + xdst[i], ok ? xsrc[i] + s0 * 32 : p.x, ok ? 16 : 0);
        }
    };

    float acc[MT][2][NB][4];
#pragma unroll
    for (int a = 0; a < MT; ++a)
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[a][t][b][c] = 0.0f;

    // This lane's row in the x tile: grouped order, token wm wtok + 8 bb + gid (16-byte loads);
    // interleaved, the ldmatrix row wm wtok + lane % 8 + 8 (lane / 16) of k half (lane / 8) % 2.
    const int      x_r0  = k_layout_k_grouped ? wm * C::wtok + gid : wm * C::wtok + (lane & 7) + ((lane >> 4) << 3);
    const uint32_t x_row = uint32_t(x_r0 * KS * 64);
    const int      x_hi = (lane >> 3) & 1, x_sw = x_swizzle(x_r0);

#pragma unroll
    for (int j = 0; j < STAGES - 1; ++j) {
        if (j < n_stage) load_stage(j);
        cp_async_commit();
    }
    for (int it = 0; it < n_stage; ++it) {
        cp_async_wait<STAGES - 2>();
        __syncthreads();  // stage `it` visible to all; the buffer of stage it - 1 is free again
        if (it + STAGES - 1 < n_stage) load_stage(it + STAGES - 1);
        cp_async_commit();

        const int            buf  = it % STAGES;
        const unsigned char* sb   = smem + buf * C::stage_bytes;
        const uint4*         w_s  = reinterpret_cast<const uint4*>(sb);
        const uint4*         sz_s = reinterpret_cast<const uint4*>(sb + C::w_bytes);
        const uint32_t       x_s  = sbase + uint32_t(buf * C::stage_bytes + C::w_bytes + C::sz_bytes) + x_row;
        const unsigned char* x_p  = sb + C::w_bytes + C::sz_bytes + x_row;
#pragma unroll
        for (int st = 0; st < KS; ++st) {
            uint32_t a[MT][4][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int tl = wn * MT + mt;
                dequant_scaled(w_s[(tl * KS + st) * 32 + lane], sz_s[(tl * KS + st) * 8 + gid], a[mt]);
            }
            // B fragments of the step: b[bb][2 ks + h] = register h of k16 half ks, token column bb.
            uint32_t b[NB][4];
            if constexpr (k_layout_k_grouped) {
#pragma unroll
                for (int bb = 0; bb < NB; ++bb) {
                    const uint4 v =
                        *reinterpret_cast<const uint4*>(x_p + bb * 8 * KS * 64 + (((st * 4 + tig) ^ x_sw) << 4));
                    b[bb][0] = v.x, b[bb][1] = v.y, b[bb][2] = v.z, b[bb][3] = v.w;
                }
            } else {
#pragma unroll
                for (int ks = 0; ks < 2; ++ks)
#pragma unroll
                    for (int jb = 0; jb < NB / 2; ++jb)
                        ldmatrix_x4(
                            x_s + uint32_t(jb * 16 * KS * 64) + uint32_t(((st * 4 + ks * 2 + x_hi) ^ x_sw) << 4),
                            b[2 * jb][2 * ks], b[2 * jb][2 * ks + 1], b[2 * jb + 1][2 * ks], b[2 * jb + 1][2 * ks + 1]);
            }
#pragma unroll
            for (int ks = 0; ks < 2; ++ks)
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int t = 0; t < 2; ++t)
#pragma unroll
                        for (int bb = 0; bb < NB; ++bb)
                            mma_16816(acc[mt][t][bb], a[mt][2 * t][2 * ks], a[mt][2 * t + 1][2 * ks],
                                      a[mt][2 * t][2 * ks + 1], a[mt][2 * t + 1][2 * ks + 1], b[bb][2 * ks],
                                      b[bb][2 * ks + 1]);
        }
    }
    cp_async_wait<0>();
    __syncthreads();  // the pipeline's shared memory is reused below

    // Accumulator element (mt, t, bb, c): output row n_local = (wn MT + mt) 32 + 16 t + gid + 8 (c / 2)
    // of the block, token wm wtok + 8 bb + 2 tig + (c % 2).
    gemm_epilogue<BM, NT * 32, THREADS>(p, smem, tok0, t0 * 32, split, n_split, [&](auto&& f) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int t = 0; t < 2; ++t)
#pragma unroll
                for (int bb = 0; bb < NB; ++bb)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        f((wn * MT + mt) * 32 + 16 * t + gid + 8 * h, wm * C::wtok + 8 * bb + 2 * tig,
                          acc[mt][t][bb][2 * h], acc[mt][t][bb][2 * h + 1]);
    });
}

// ---- the Hopper kernel (sm_90a) -------------------------------------------------------------------

// Per block: BM tokens (the wgmma's N: 32, 64 or 128) x NT = 4 WG MT layout tiles of 32 outputs; WG
// warpgroups of 4 warps, each warp MT tiles. The weights are the register A operand: a warp's 32-row
// tile gives two 16-row slices, and each wgmma m64nBMk16 takes one slice from each warp of the
// warpgroup (rows 16 w .. 16 w + 15 of the wgmma = rows 16 t .. 16 t + 15 of warp w's tile). The
// tokens are the B operand, read by the tensor cores from shared memory through a descriptor: the x
// tile, BM rows of one 64-k stage (128 bytes), 128-byte swizzled. Stages as in the mma.sync kernel
// (cp.async ring of weights, scale/zero words and x), with two differences: x is copied in 4-byte
// pieces, because the layout's k order within a k32 step (slot_k, grouped) must be matched by x:
// position word (chunk c, slot tig) of a step holds the x pair of k = 8 tig + 2 c, i.e. the step's
// 16 words are transposed as a 4 x 4 matrix; and a proxy fence makes the copies visible to wgmma.
// Per k32 step a warp dequantizes its MT words into registers, then issues MT x 2 (slices) x 2 (k16
// halves) wgmma; a stage's wgmma complete before its buffer is refilled.
template <int BM, int MT, int WG, int STAGES>
struct wg_config {
    static constexpr int ks      = 2;  // k32 layout steps per stage: 64 k = one 128-byte swizzle row of x
    static constexpr int nt      = WG * 4 * MT;
    static constexpr int threads = WG * 128;
    static constexpr int x_bytes = BM * 128, w_bytes = nt * ks * 512, sz_bytes = nt * ks * 128;
    static constexpr int stage_bytes = (x_bytes + w_bytes + sz_bytes + 1023) / 1024 * 1024;
    static constexpr int out_bytes   = BM * (nt * 32 + 8) * 2;
    // + 1024: the dynamic shared memory is aligned to 1024 bytes in the kernel (the swizzle atom).
    static constexpr int smem_bytes = (STAGES * stage_bytes > out_bytes ? STAGES * stage_bytes : out_bytes) + 1024;
    static_assert(BM == 32 || BM == 64 || BM == 128, "wgmma n");
    static_assert(x_bytes % 1024 == 0 && (BM * 32) % threads == 0 && (BM * 8) % threads == 0 && nt * ks * 8 <= threads,
                  "loader split");
};

// The layout's grouped k order -> the mma's order for the A registers of one k32 step (XREG): slot j of
// lane (gid, tig) holds the pair of k = 8 tig + 2 j; the wgmma wants, in slot q = 2 ks + h, the pair of
// k = 16 ks + 8 h + 2 tig, which slot tig of lane (gid, q) holds: a 4 x 4 transpose over the quad,
// two exchange rounds (lane ^ 1, lane ^ 2), each swapping the two elements whose index bit differs
// from the lane's.
__device__ inline void quad_transpose(uint32_t (&v)[4], int tig) {
    const bool t0 = tig & 1, t1 = tig & 2;
    {
        const uint32_t r0 = __shfl_xor_sync(0xffffffffu, t0 ? v[0] : v[1], 1);
        const uint32_t r1 = __shfl_xor_sync(0xffffffffu, t0 ? v[2] : v[3], 1);
        if (t0)
            v[0] = r0, v[2] = r1;
        else
            v[1] = r0, v[3] = r1;
    }
    {
        const uint32_t r0 = __shfl_xor_sync(0xffffffffu, t1 ? v[0] : v[2], 2);
        const uint32_t r1 = __shfl_xor_sync(0xffffffffu, t1 ? v[1] : v[3], 2);
        if (t1)
            v[0] = r0, v[1] = r1;
        else
            v[2] = r0, v[3] = r1;
    }
}

template <int BM, int MT, int WG, int STAGES, bool XREG>
__global__ void __launch_bounds__(WG * 128) int4_gemm_wgmma_kernel(const gemm_args p) {
#if GPTQ_HAS_WGMMA
    using C                   = wg_config<BM, MT, WG, STAGES>;
    constexpr int     KS      = C::ks;
    constexpr int     NT      = C::nt;
    constexpr int     THREADS = C::threads;
    extern __shared__ __align__(128) unsigned char smem_raw[];
    // The epilogue's static `last` flag may precede the dynamic shared memory: align by hand.
    unsigned char* smem  = smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
    const uint32_t sbase = smem_u32(smem);

    const int     tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int     wtile = warp * MT;  // the warp's first tile in the block (warpgroup warp / 4, rank warp % 4)
    const int64_t tok0  = int64_t(blockIdx.x) * BM;
    const int64_t t0    = int64_t(blockIdx.y) * NT;
    const int     split = int(blockIdx.z), n_split = int(gridDim.z);
    const int64_t n_stage_all = (p.k_steps + KS - 1) / KS;
    const int64_t st_begin = n_stage_all * split / n_split, st_end = n_stage_all * (split + 1) / n_split;
    const int     n_stage = int(st_end - st_begin);

    // Loaders. Weights and scale/zero words as in the mma.sync kernel (after the x tile in a stage).
    constexpr int WPT = NT * KS * 32 / THREADS, XPT = BM * 32 / THREADS;
    const uint4*  wsrc[WPT];
    bool          wok[WPT];
    int           wst[WPT];
#pragma unroll
    for (int i = 0; i < WPT; ++i) {
        const int e    = tid + i * THREADS;
        const int tile = e / (KS * 32);
        wst[i]         = (e / 32) % KS;
        wok[i]         = t0 + tile < p.n_tiles;
        wsrc[i]        = p.w + ((wok[i] ? t0 + tile : 0) * p.k_steps + wst[i]) * 32 + (e % 32);
    }
    const bool   szt   = tid < NT * KS * 8;
    const int    sz_st = (tid / 8) % KS;
    const bool   szok  = szt && t0 + tid / (KS * 8) < p.n_tiles;
    const uint4* szsrc = p.sz + (szok ? t0 + tid / (KS * 8) : 0) * p.n_groups * 8 + (tid % 8);
    // x: element e = (row r = e / 32, word tw = e % 32 of the row's 64 k): warp w copies rows w, w + NW,
    // ... (128 bytes each), lane = tw. Word tw = 16 st + 4 c + i (k32 step st, 16-byte chunk c, word
    // i) goes to chunk 4 st + i, slot c, of the row: 128-byte swizzle, chunk ^ (row % 8).
    constexpr int NW         = THREADS / 32;
    const int     x_st       = lane / 16;
    const int     x_chk      = 4 * x_st + lane % 4;   // destination chunk before the swizzle
    const int     x_off      = 4 * ((lane / 4) % 4);  // byte offset of the slot in the chunk
    const __half* x_lane     = p.x + 2 * lane;
    auto          load_stage = [&](int j) {
        const int64_t  s0   = (st_begin + j) * KS;
        const uint32_t base = sbase + uint32_t((j % STAGES) * C::stage_bytes);
        if constexpr (XREG) {  // natural k order: 16-byte chunks, chunk c of row r at c ^ (r % 8)
#pragma unroll
            for (int i = 0; i < BM * 8 / THREADS; ++i) {
                const int     e = tid + i * THREADS, r = e / 8, c = e % 8;
                const int64_t tok = tok0 + r;
                const bool    ok  = tok < p.m && s0 + c / 4 < p.k_steps;
                cp_async16(base + uint32_t(r * 128 + ((c ^ (r & 7)) << 4)),
                           ok ? p.x + tok * p.x_stride + s0 * 32 + c * 8 : p.x, ok ? 16 : 0);
            }
        } else {
            const bool step_ok = s0 + x_st < p.k_steps;
#pragma unroll
            for (int i = 0; i < XPT; ++i) {
                const int     r   = warp + i * NW;
                const int64_t tok = tok0 + r;
                const bool    ok  = step_ok && tok < p.m;
                cp_async4(base + uint32_t(r * 128 + ((x_chk ^ (r & 7)) << 4) + x_off),
                          ok ? x_lane + tok * p.x_stride + s0 * 32 : p.x, ok ? 4 : 0);
            }
        }
#pragma unroll
        for (int i = 0; i < WPT; ++i) {
            const bool ok = wok[i] && s0 + wst[i] < p.k_steps;
            cp_async16(base + uint32_t(C::x_bytes + (tid + i * THREADS) * 16), ok ? wsrc[i] + s0 * 32 : p.w,
                       ok ? 16 : 0);
        }
        if (szt) {
            const int64_t step = s0 + sz_st;
            const bool    ok   = szok && step < p.k_steps;
            cp_async16(base + uint32_t(C::x_bytes + C::w_bytes + tid * 16), ok ? szsrc + (step / p.spg) * 8 : p.sz,
                       ok ? 16 : 0);
        }
    };

    float acc[MT][2][BM / 2];
#pragma unroll
    for (int a = 0; a < MT; ++a)
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int c = 0; c < BM / 2; ++c) acc[a][t][c] = 0.0f;

    // The ring: STAGES buffers, loads LEAD = STAGES - 2 stages ahead; the buffer refilled at the top
    // of iteration it is the one of stage it - 2, whose wgmma every warp has waited for before the
    // barrier.
    constexpr int LEAD = STAGES - 2;
#pragma unroll
    for (int j = 0; j < LEAD; ++j) {
        if (j < n_stage) load_stage(j);
        cp_async_commit();
    }
    for (int it = 0; it < n_stage; ++it) {
        cp_async_wait<LEAD - 1>();
        fence_proxy_async_shared();  // this thread's x copies -> the async proxy (wgmma)
        __syncthreads();             // stage `it` visible to all; stage it - 2's wgmma done in every warp
        if (it + LEAD < n_stage) load_stage(it + LEAD);
        cp_async_commit();

        const int            buf  = it % STAGES;
        const unsigned char* sb   = smem + buf * C::stage_bytes;
        const uint4*         w_s  = reinterpret_cast<const uint4*>(sb + C::x_bytes);
        const uint4*         sz_s = reinterpret_cast<const uint4*>(sb + C::x_bytes + C::w_bytes);
        const uint32_t       x_s  = sbase + uint32_t(buf * C::stage_bytes);
        uint32_t             a[KS][MT][4][4];
#pragma unroll
        for (int st = 0; st < KS; ++st)
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const int tl = wtile + mt;
                dequant_scaled(w_s[(tl * KS + st) * 32 + lane], sz_s[(tl * KS + st) * 8 + gid], a[st][mt]);
                if constexpr (XREG)
#pragma unroll
                    for (int i = 0; i < 4; ++i) quad_transpose(a[st][mt][i], tig);
            }
        wgmma_fence();
#pragma unroll
        for (int st = 0; st < KS; ++st)
#pragma unroll
            for (int ks = 0; ks < 2; ++ks) {
                const uint64_t desc = wgmma_desc_sw128(x_s + uint32_t(32 * (2 * st + ks)));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int t = 0; t < 2; ++t) {
                        const uint32_t af[4] = {a[st][mt][2 * t][2 * ks], a[st][mt][2 * t + 1][2 * ks],
                                                a[st][mt][2 * t][2 * ks + 1], a[st][mt][2 * t + 1][2 * ks + 1]};
                        wgmma_rs<BM>(acc[mt][t], af, desc);
                    }
            }
        wgmma_commit();
        // All of this stage's wgmma done before the next stage's dequantization: the A operand's
        // registers must not change while a wgmma reads them, and the compiler, which does not see
        // that read, may give the next stage's values the same registers (with wait_group 1 here the
        // _xreg tiles gave wrong rows and launch-to-launch differences on the H100).
        wgmma_wait<0>();
    }
    cp_async_wait<0>();
    __syncthreads();  // the pipeline's shared memory is reused below

    // Accumulator element (mt, t, i): output row (wtile + mt) 32 + 16 t + gid + 8 (i % 4 / 2) of the
    // block, token 8 (i / 4) + 2 tig + i % 2.
    gemm_epilogue<BM, NT * 32, THREADS>(p, smem, tok0, t0 * 32, split, n_split, [&](auto&& f) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int t = 0; t < 2; ++t)
#pragma unroll
                for (int j = 0; j < BM / 8; ++j)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        f((wtile + mt) * 32 + 16 * t + gid + 8 * h, 8 * j + 2 * tig, acc[mt][t][4 * j + 2 * h],
                          acc[mt][t][4 * j + 2 * h + 1]);
    });
#else
    (void)p;
    __trap();  // int4_gemm_has_wgmma() is false on builds without sm_90a code
#endif
}

// Says whether this build's code for the current device has the wgmma kernel (GPTQ_HAS_WGMMA).
__global__ void int4_gemm_wgmma_probe(int* has) {
    *has = GPTQ_HAS_WGMMA;
}

// ---- the warp-streamed kernel (issue 18, session 11) -----------------------------------------------

// Per block: BM = 8 NB tokens x BN = 32 W TN outputs; warp w owns layout tiles W-block-first + w TN ..
// + TN - 1 for the whole k range of the block's split. Each warp streams its tiles' weight words and
// scale/zero words through its own cp.async ring of D slots in shared memory, D - 1 k32 steps ahead of
// the step it computes, as the decode GEMV does (evict-first weights, the (scale, zero) words copied
// by the lanes tig == 0 at a group's first step): no block barrier for the weights. The activations
// are the block's: x is staged in chunks of CS k32 steps (BM rows of 64 CS bytes; a row pitch of an
// odd multiple of 64 bytes, so that a quarter warp's 16-byte fragment loads of two rows hit every
// bank once), double-buffered, the next chunk copied while this one is read; the only block barrier
// is one per chunk (the hand-over of the buffers). Each chunk's copies ride in the commit group of
// the ring's refill at the previous chunk's first step, so the ring's own wait_group covers them (CS
// >= D - 1). Per k32 step a warp dequantizes its TN words (dequant_scaled: the GEMM's numerics, one
// F16 rounding of scale (q - zero)) and issues TN x 2 x 2 x NB mma.m16n8k16 (8-token columns past m
// skipped); F32 accumulators; the shared epilogue (split-K sum in split order, bias, F16). With
// `prefetch` (sm_90: cp.async.bulk.prefetch.L2; a no-op below) each warp requests its weights of the
// chunk after next into L2 at a chunk's start, so DRAM streams ahead of the ring.
template <int W, int TN, int NB, int CS, int D>
struct ws_config {
    static constexpr int threads = W * 32, bm = NB * 8, bn = W * TN * 32;
    static constexpr int slot       = TN * 40;  // uint4 per ring slot: TN x 32 weight words, TN x 8 scale words
    static constexpr int ring_bytes = W * D * slot * 16;
    static constexpr int pitch      = CS * 64 + 64;       // bytes per staged x row (an odd multiple of 64)
    static constexpr int x_bytes    = bm * pitch;         // one chunk buffer
    static constexpr int out_bytes  = bm * (bn + 8) * 2;  // gemm_epilogue's staging
    static constexpr int smem_bytes = ring_bytes + 2 * x_bytes > out_bytes ? ring_bytes + 2 * x_bytes : out_bytes;
    static constexpr int xpt        = bm * CS * 4 / threads;  // x 16-byte pieces per thread and chunk
    static_assert(D >= 2 && CS >= D - 1, "a chunk's x must be complete by the ring's wait at its first step");
    static_assert((bm * CS * 4) % threads == 0, "x loader split");
    static_assert(ring_bytes % 128 == 0, "x buffers 128-byte aligned");
};

template <int W, int TN, int NB, int CS, int D>
__global__ void __launch_bounds__(W * 32) int4_gemm_ws_kernel(const gemm_args p) {
    using C                   = ws_config<W, TN, NB, CS, D>;
    constexpr int     BM      = C::bm;
    constexpr int     SLOT    = C::slot;
    constexpr int     THREADS = C::threads;
    extern __shared__ __align__(128) unsigned char smem[];

    const int     tid = int(threadIdx.x), lane = tid & 31, warp = tid >> 5, gid = lane >> 2, tig = lane & 3;
    const int64_t tok0  = int64_t(blockIdx.x) * BM;
    const int64_t t0    = int64_t(blockIdx.y) * (W * TN);  // the block's first layout tile
    const int     split = int(blockIdx.z), n_split = int(gridDim.z);
    const int64_t s_begin = p.k_steps * split / n_split, s_end = p.k_steps * (split + 1) / n_split;
    const int     n       = int(s_end - s_begin);  // k32 steps of this split
    const int     m_valid = int(p.m - tok0 < BM ? p.m - tok0 : BM);
    const int     nbv     = (m_valid + 7) / 8;  // 8-token columns holding a token (block-uniform)
    const int     spg     = int(p.spg);

    uint4*         ring   = reinterpret_cast<uint4*>(smem) + warp * (D * SLOT);
    unsigned char* xs     = smem + C::ring_bytes;
    const uint32_t xs_u32 = smem_u32(xs);

    // The warp's tiles at step s_begin (past n_tiles: the last tile again; its outputs are not written).
    const uint4* wsrc[TN];
    const uint4* ssrc[TN];
#pragma unroll
    for (int tt = 0; tt < TN; ++tt) {
        const int64_t t    = t0 + warp * TN + tt;
        const int64_t tile = t < p.n_tiles ? t : p.n_tiles - 1;
        wsrc[tt]           = p.w + (tile * p.k_steps + s_begin) * 32 + lane;
        ssrc[tt]           = p.sz + tile * p.n_groups * 8 + gid;
    }
    // Lane tt < TN prefetches tile tt's weights (512 contiguous bytes per step).
    const uint4* pf = wsrc[0] - lane;
#pragma unroll
    for (int tt = 1; tt < TN; ++tt)
        if (lane == tt) pf = wsrc[tt] - lane;
    const uint64_t policy = evict_first_policy();

    // x chunk c of the split: rows < 8 nbv (rows past m zero-filled), steps [c CS, min(c CS + CS, n))
    // into buffer c % 2. Piece e: row e / (4 CS), 16-byte piece e % (4 CS) of the row's 64 CS bytes.
    auto load_x = [&](int c) {
        const int      st0 = c * CS, pieces = 4 * (n - st0 < CS ? n - st0 : CS);
        const uint32_t base = xs_u32 + uint32_t((c & 1) * C::x_bytes);
#pragma unroll
        for (int i = 0; i < C::xpt; ++i) {
            const int e = tid + i * THREADS, r = e / (4 * CS), pc = e % (4 * CS);
            if (r < 8 * nbv && pc < pieces) {
                const int64_t tok = tok0 + r;
                const bool    ok  = tok < p.m;
                cp_async16(base + uint32_t(r * C::pitch + pc * 16),
                           ok ? p.x + tok * p.x_stride + (s_begin + st0) * 32 + pc * 8 : p.x, ok ? 16 : 0);
            }
        }
    };
    auto prefetch_chunk = [&](int c) {
        const int st0 = c * CS;
        if (!p.prefetch || lane >= TN || st0 >= n) return;
        prefetch_l2_bulk(pf + int64_t(st0) * 32, uint32_t(n - st0 < CS ? n - st0 : CS) * 512u);
    };
    // Ring refill: local step j (called for j = 0, 1, 2, ... in order) into `slot`.
    int  ig = int(s_begin / spg), iin = int(s_begin % spg);
    auto issue = [&](int j, int slot) {
        uint4* sl = ring + slot * SLOT;
#pragma unroll
        for (int tt = 0; tt < TN; ++tt) cp_async_stream16(sl + tt * 32 + lane, wsrc[tt] + int64_t(j) * 32, policy);
        if ((iin == 0 || j == 0) && tig == 0)
#pragma unroll
            for (int tt = 0; tt < TN; ++tt) cp_async_cached16(sl + TN * 32 + tt * 8 + gid, ssrc[tt] + int64_t(ig) * 8);
        if (++iin == spg) iin = 0, ++ig;
    };

    float acc[TN][2][NB][4];
#pragma unroll
    for (int tt = 0; tt < TN; ++tt)
#pragma unroll
        for (int t = 0; t < 2; ++t)
#pragma unroll
            for (int b = 0; b < NB; ++b)
#pragma unroll
                for (int c = 0; c < 4; ++c) acc[tt][t][b][c] = 0.0f;
    uint4 szr[TN];  // the current group's (scale, zero) words of the lane's rows
#pragma unroll
    for (int tt = 0; tt < TN; ++tt) szr[tt] = make_uint4(0u, 0u, 0u, 0u);

    if (n > 0) {
        prefetch_chunk(0);
        prefetch_chunk(1);
        load_x(0);  // in commit group 0, with step 0's weights
    }
#pragma unroll
    for (int j = 0; j < D - 1; ++j) {
        if (j < n) issue(j, j);
        cp_async_commit();
    }
    int cslot = 0, islot = D - 1, cin = int(s_begin % spg), jl = 0, buf = 0;
    for (int j = 0; j < n; ++j) {
        if (jl == 0) {  // chunk c = j / CS starts
            // Groups up to step j's done: chunk c's x (in the group of step (c - 1) CS + D - 1 <= j).
            cp_async_wait<D - 2>();
            __syncthreads();  // chunk c visible to all; every warp is done with chunk c - 1's buffer
            const int c = j / CS;
            if ((c + 1) * CS < n) load_x(c + 1);  // in the commit group below
            prefetch_chunk(c + 2);
        }
        if (j + D - 1 < n) issue(j + D - 1, islot);
        cp_async_commit();
        cp_async_wait<D - 1>();  // step j's slot is here (this lane's copies)
        if (++islot == D) islot = 0;
        const uint4* sl = ring + cslot * SLOT;
        if (cin == 0 || j == 0) {  // a group starts: the words the lanes tig == 0 copied
            __syncwarp();
#pragma unroll
            for (int tt = 0; tt < TN; ++tt) szr[tt] = sl[TN * 32 + tt * 8 + gid];
            __syncwarp();  // read by every lane before a lane refills the slot
        }
        if (++cin == spg) cin = 0;
        uint32_t a[TN][4][4];
#pragma unroll
        for (int tt = 0; tt < TN; ++tt) dequant_scaled(sl[tt * 32 + lane], szr[tt], a[tt]);
        // B fragments: token 8 bb + gid, k = 8 tig .. 8 tig + 7 of the step (the layout's grouped order).
        const unsigned char* xp = xs + buf * C::x_bytes + gid * C::pitch + jl * 64 + tig * 16;
#pragma unroll
        for (int bb = 0; bb < NB; ++bb) {
            if (bb < nbv) {
                const uint4    v    = *reinterpret_cast<const uint4*>(xp + bb * 8 * C::pitch);
                const uint32_t b[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
                for (int ks = 0; ks < 2; ++ks)
#pragma unroll
                    for (int tt = 0; tt < TN; ++tt)
#pragma unroll
                        for (int t = 0; t < 2; ++t)
                            mma_16816(acc[tt][t][bb], a[tt][2 * t][2 * ks], a[tt][2 * t + 1][2 * ks],
                                      a[tt][2 * t][2 * ks + 1], a[tt][2 * t + 1][2 * ks + 1], b[2 * ks], b[2 * ks + 1]);
            }
        }
        if (++cslot == D) cslot = 0;
        if (++jl == CS) jl = 0, buf ^= 1;
    }
    cp_async_wait<0>();
    __syncthreads();  // the rings and x buffers are reused below

    // Accumulator element (tt, t, bb, c): output row (w TN + tt) 32 + 16 t + gid + 8 (c / 2) of the
    // block, token 8 bb + 2 tig + c % 2.
    gemm_epilogue<BM, C::bn, THREADS>(p, smem, tok0, t0 * 32, split, n_split, [&](auto&& f) {
#pragma unroll
        for (int tt = 0; tt < TN; ++tt)
#pragma unroll
            for (int t = 0; t < 2; ++t)
#pragma unroll
                for (int bb = 0; bb < NB; ++bb)
#pragma unroll
                    for (int h = 0; h < 2; ++h)
                        f((warp * TN + tt) * 32 + 16 * t + gid + 8 * h, 8 * bb + 2 * tig, acc[tt][t][bb][2 * h],
                          acc[tt][t][bb][2 * h + 1]);
    });
}

// ---- the dequantize kernel ------------------------------------------------------------------------

constexpr int k_dq_steps = 4;  // k32 steps per warp item: rows of 128 k = 256 bytes written per row

constexpr int k_dq_warps = 4;  // 4 x 8.5 KB of shared memory per block

// One warp per (tile, group of 4 k32 steps): each lane dequantizes its words into a shared [32 rows]
// [128 k] tile, then each half-warp writes one row's 256 bytes with 16-byte stores.
__global__ void __launch_bounds__(k_dq_warps * 32)
    int4_dequant_kernel(const uint4* __restrict__ wts, const uint4* __restrict__ sz, __half* w, int64_t n_out,
                        int64_t n_tiles, int64_t k_steps, int64_t n_groups, int64_t spg, int64_t w_stride) {
    constexpr int pitch = 32 * k_dq_steps + 8;  // halves per shared row
    __shared__ __align__(16) __half tile_s[k_dq_warps][32 * pitch];
    const int     lane = int(threadIdx.x) & 31, warp = int(threadIdx.x) >> 5, gid = lane >> 2, tig = lane & 3;
    __half*       ts      = tile_s[warp];
    const int64_t n_sgrp  = (k_steps + k_dq_steps - 1) / k_dq_steps;
    const int64_t n_items = n_tiles * n_sgrp;
    for (int64_t item = int64_t(blockIdx.x) * k_dq_warps + warp; item < n_items;
         item += int64_t(gridDim.x) * k_dq_warps) {
        const int64_t tn = item / n_sgrp, s0 = (item % n_sgrp) * k_dq_steps;
        const int     n_st = k_steps - s0 < k_dq_steps ? int(k_steps - s0) : k_dq_steps;
        for (int st = 0; st < n_st; ++st) {
            const int64_t step = s0 + st;
            uint32_t      a[4][4];
            dequant_scaled(__ldcs(wts + (tn * k_steps + step) * 32 + lane),
                           __ldg(sz + (tn * n_groups + step / spg) * 8 + gid), a);
            // word i: row 8 i + gid; slot j: k = slot_k(tig, j) + (0, 1)
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    *reinterpret_cast<uint32_t*>(ts + (8 * i + gid) * pitch + st * 32 + slot_k(tig, j)) = a[i][j];
        }
        __syncwarp();
        const int half = lane >> 4, c = lane & 15;
        for (int r = half; r < 32; r += 2) {
            const int64_t n = tn * 32 + r;
            if (n < n_out && c < n_st * 4)
                *reinterpret_cast<uint4*>(w + n * w_stride + s0 * 32 + c * 8) =
                    *reinterpret_cast<const uint4*>(ts + r * pitch + c * 8);
        }
        __syncwarp();
    }
}

// ---- host side -----------------------------------------------------------------------------------

constexpr int k_max_splits = 8;
constexpr int k_stages     = 4;
constexpr int k_wg_stages  = 6;  // wgmma kernel: loads 4 stages ahead (LEAD = STAGES - 2)

struct tile_shape {
    int bm, bn;
};
tile_shape shape_of(int4_gemm_tile t) {
    switch (t) {
        case int4_gemm_tile::INT4_GEMM_TILE_M32_N128:
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M32_N128:
            return {32, 128};
        case int4_gemm_tile::INT4_GEMM_TILE_M64_N128:
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N128:
            return {64, 128};
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N256:
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N256_XREG:
            return {64, 256};
        case int4_gemm_tile::INT4_GEMM_TILE_M128_N128:
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N128:
            return {128, 128};
        case int4_gemm_tile::INT4_GEMM_TILE_M128_N256:
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N256:
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N256_XREG:
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M128_N256:
            return {128, 256};
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M32_N256:
            return {32, 256};
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N256:
            return {64, 256};
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N512:
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N512_T2:
            return {64, 512};
        default:
            return {0, 0};
    }
}

// The dispatch table (docs/cuda.md, "Prefill GEMM"; measurements in docs/perf-notes.md, session 4):
// the tile by m bucket. Measured on the H100 over every tile x split on the Llama-2-7B shapes (runs
// 1-3): m32_n128 was fastest (or within 5 %) for m <= 192 on every shape but gate_up at m = 128
// (m64_n128, 5 % better); larger tiles lose because a block's warps are few and latency-bound (ncu,
// run 2: 0.44 issued warps per scheduler, 56 % of cycles with no eligible warp, occupancy limited
// by registers and shared memory). Tiles tried and dropped: 8-warp m32_n256 and m64_n256, k stages
// of 128 (no better than 64). From m = 192 on the op layer takes dequantize + cuBLAS
// (gptq_prefill_path_for); m128_n256 remains the fused tile for larger m when the kernel is forced.
// With wgmma (Hopper) and GPTQ_INT4_WGMMA_TABLE=1: m32 / m64 / m128 token tiles of 256 outputs by m
// bucket. Off by default: on the H100 (session 9's first sweep) the wgmma tiles were slower than
// m32_n128 at every m (docs/perf-notes.md, session 9).
bool wgmma_in_table() {
    static const bool on = [] {
        const char* e = std::getenv("GPTQ_INT4_WGMMA_TABLE");
        return e && std::strcmp(e, "1") == 0;
    }();
    return on && int4_gemm_has_wgmma();
}

// With GPTQ_INT4_WS_TABLE=1 (before the wgmma switch): the warp-streamed tiles by m bucket, 32 / 64 /
// 128 tokens (a first guess until a device sweep, docs/perf-notes.md session 11).
bool ws_in_table() {
    static const bool on = [] {
        const char* e = std::getenv("GPTQ_INT4_WS_TABLE");
        return e && std::strcmp(e, "1") == 0;
    }();
    return on;
}

// The warp-streamed kernel's L2 prefetch of the weights ahead (sm_90; GPTQ_INT4_WS_PREFETCH=0: off, to
// measure it).
bool ws_prefetch() {
    static const bool on = [] {
        const char* e = std::getenv("GPTQ_INT4_WS_PREFETCH");
        return !(e && std::strcmp(e, "0") == 0);
    }();
    return on;
}

int4_gemm_tile table_tile(int64_t m) {
    if (ws_in_table()) {
        if (m <= 32) return int4_gemm_tile::INT4_GEMM_TILE_WS_M32_N256;
        if (m <= 64) return int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N256;
        return int4_gemm_tile::INT4_GEMM_TILE_WS_M128_N256;
    }
    if (wgmma_in_table()) {
        if (m <= 32) return int4_gemm_tile::INT4_GEMM_TILE_WG_M32_N128;
        if (m <= 64) return int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N256;
        return int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N256;
    }
    if (m <= 191) return int4_gemm_tile::INT4_GEMM_TILE_M32_N128;
    return int4_gemm_tile::INT4_GEMM_TILE_M128_N256;
}

// Resolve AUTO entries: the table's tile for m; splits for the (possibly forced) tile: about 1024 k
// per split with one or two m blocks, halved per doubling of the m blocks beyond two (the sweep's
// best for m32_n128: n_in 4096 at 4 splits for m = 32 and 64, 2 at m = 128; 11008 at 8, then 4),
// at least 512 k per split, 1..8. From m and n_in only.
int4_gemm_plan resolve(int4_gemm_plan plan, int64_t m, int64_t n_in) {
    if (plan.tile == int4_gemm_tile::INT4_GEMM_TILE_AUTO) plan.tile = table_tile(m);
    if (plan.splits == 0) {
        const int64_t m_blocks = (m + shape_of(plan.tile).bm - 1) / shape_of(plan.tile).bm;
        int64_t       s        = std::llround(double(n_in) / (1024.0 * double(std::max<int64_t>(1, m_blocks / 2))));
        s                      = std::min<int64_t>(s, n_in / 512);
        plan.splits            = int(std::clamp<int64_t>(s, 1, k_max_splits));
    }
    return plan;
}

int64_t workspace_for(const int4_layout& L, int64_t m, int4_gemm_plan plan) {
    if (plan.splits <= 1) return 0;
    const tile_shape sh       = shape_of(plan.tile);
    const int64_t    m_blocks = (m + sh.bm - 1) / sh.bm, n_blocks = (L.n_out + sh.bn - 1) / sh.bn;
    const int64_t    counters = (n_blocks * m_blocks * 4 + 255) / 256 * 256;
    return counters + int64_t(plan.splits) * (n_blocks * sh.bn) * (m_blocks * sh.bm) * 4;
}

// Opt `kern` in to more than 48 KB of dynamic shared memory once per device (a host-side attribute;
// done before any graph capture because the first prefill runs uncaptured). `configured`: one per kernel.
template <class Kernel>
status opt_in_smem(Kernel kern, int bytes, std::atomic<uint64_t>& configured) {
    int dev = 0;
    GPTQ_CUDA_CHECK(cudaGetDevice(&dev));
    const uint64_t bit = dev < 64 ? (uint64_t(1) << dev) : 0;
    if (!bit || !(configured.load() & bit)) {
        GPTQ_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
        configured.fetch_or(bit);
    }
    return status::ok();
}

template <int BM, int NT, int WM, int WN, int KS = 2, int STAGES = k_stages>
status launch(const gemm_args& a, int splits, cudaStream_t stream) {
    using C                           = tile_config<BM, NT, WM, WN, KS, STAGES>;
    auto                         kern = int4_gemm_kernel<BM, NT, WM, WN, KS, STAGES>;
    static std::atomic<uint64_t> configured{0};
    GPTQ_TRY(opt_in_smem(kern, C::smem_bytes, configured));
    const int64_t m_blocks = (a.m + BM - 1) / BM, n_blocks = (a.n_tiles + NT - 1) / NT;
    if (m_blocks > 0x7fffffff || n_blocks > 65535)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemm_f16: m {} / n_out {} too large", a.m,
                          a.n_out);
    const dim3 grid{unsigned(m_blocks), unsigned(n_blocks), unsigned(splits)};
    kern<<<grid, C::threads, C::smem_bytes, stream>>>(a);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

template <int W, int TN, int NB, int CS, int D>
status launch_ws(const gemm_args& a, int splits, cudaStream_t stream) {
    using C                           = ws_config<W, TN, NB, CS, D>;
    auto                         kern = int4_gemm_ws_kernel<W, TN, NB, CS, D>;
    static std::atomic<uint64_t> configured{0};
    GPTQ_TRY(opt_in_smem(kern, C::smem_bytes, configured));
    const int64_t m_blocks = (a.m + C::bm - 1) / C::bm, n_blocks = (a.n_tiles + W * TN - 1) / (W * TN);
    if (m_blocks > 0x7fffffff || n_blocks > 65535)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemm_f16: m {} / n_out {} too large", a.m,
                          a.n_out);
    const dim3 grid{unsigned(m_blocks), unsigned(n_blocks), unsigned(splits)};
    kern<<<grid, C::threads, C::smem_bytes, stream>>>(a);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

template <int BM, int MT, int WG, bool XREG = false, int STAGES = k_wg_stages>
status launch_wg(const gemm_args& a, int splits, cudaStream_t stream) {
    using C                = wg_config<BM, MT, WG, STAGES>;
    const int64_t m_blocks = (a.m + BM - 1) / BM, n_blocks = (a.n_tiles + C::nt - 1) / C::nt;
    if (m_blocks > 0x7fffffff || n_blocks > 65535)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemm_f16: m {} / n_out {} too large", a.m,
                          a.n_out);
    const dim3 grid{unsigned(m_blocks), unsigned(n_blocks), unsigned(splits)};
    int4_gemm_wgmma_kernel<BM, MT, WG, STAGES, XREG><<<grid, C::threads, C::smem_bytes, stream>>>(a);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

template <int BM, int MT, int WG, bool XREG = false, int STAGES = k_wg_stages>
cudaError_t configure_wg() {
    return cudaFuncSetAttribute(int4_gemm_wgmma_kernel<BM, MT, WG, STAGES, XREG>,
                                cudaFuncAttributeMaxDynamicSharedMemorySize, wg_config<BM, MT, WG, STAGES>::smem_bytes);
}

// The probe of int4_gemm_has_wgmma on the current device (compute capability 9.0): a private
// non-blocking stream and relaxed capture mode, so that a first call during another stream's graph
// capture neither breaks that capture nor fails.
bool probe_wgmma() {
    if (const char* e = std::getenv("GPTQ_INT4_WGMMA"); e && std::strcmp(e, "0") == 0) return false;
    int dev = 0, major = 0, minor = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) != cudaSuccess || major != 9 ||
        minor != 0)
        return false;
    cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&mode);
    bool         ok = false;
    cudaStream_t s  = nullptr;
    int*         d  = nullptr;
    int          h  = 0;
    if (cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking) == cudaSuccess &&
        cudaMalloc(&d, sizeof(int)) == cudaSuccess) {
        int4_gemm_wgmma_probe<<<1, 1, 0, s>>>(d);
        ok = cudaGetLastError() == cudaSuccess &&
             cudaMemcpyAsync(&h, d, sizeof(int), cudaMemcpyDeviceToHost, s) == cudaSuccess &&
             cudaStreamSynchronize(s) == cudaSuccess && h == 1;
    }
    if (d) cudaFree(d);
    if (s) cudaStreamDestroy(s);
    if (ok)
        ok = configure_wg<32, 1, 1>() == cudaSuccess && configure_wg<64, 1, 1>() == cudaSuccess &&
             configure_wg<64, 1, 2>() == cudaSuccess && configure_wg<128, 1, 1>() == cudaSuccess &&
             configure_wg<128, 1, 2>() == cudaSuccess && configure_wg<64, 1, 2, true>() == cudaSuccess &&
             configure_wg<128, 1, 2, true>() == cudaSuccess;
    cudaThreadExchangeStreamCaptureMode(&mode);
    (void)cudaGetLastError();  // a failed probe leaves no sticky error behind
    return ok;
}

unsigned grid_for_items(int64_t items, int per_block) {
    const int64_t blocks = (items + per_block - 1) / per_block;
    return unsigned(std::min<int64_t>(std::max<int64_t>(blocks, 1), 1 << 20));
}

}  // namespace

bool int4_gemm_has_wgmma() {
    // Per device: 0 unknown, 1 no, 2 yes (64 devices at most; others: no).
    static std::atomic<uint8_t> known[64];
    int                         dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return false;
    uint8_t v = known[dev].load();
    if (v == 0) {
        v = probe_wgmma() ? 2 : 1;
        known[dev].store(v);
    }
    return v == 2;
}

bool int4_gemm_wgmma_in_table() {
    return wgmma_in_table();
}

bool int4_gemm_ws_in_table() {
    return ws_in_table();
}

bool int4_gemm_tile_is_wgmma(int4_gemm_tile t) {
    return int(t) >= int(int4_gemm_tile::INT4_GEMM_TILE_WG_M32_N128) &&
           int(t) <= int(int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N256_XREG);
}

bool int4_gemm_tile_is_ws(int4_gemm_tile t) {
    return int(t) >= int(int4_gemm_tile::INT4_GEMM_TILE_WS_M32_N256) && int(t) < int4_gemm_tile_count;
}

const char* int4_gemm_tile_name(int4_gemm_tile t) {
    switch (t) {
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M32_N128:
            return "wg_m32_n128";
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N128:
            return "wg_m64_n128";
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N256:
            return "wg_m64_n256";
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N128:
            return "wg_m128_n128";
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N256:
            return "wg_m128_n256";
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N256_XREG:
            return "wg_m64_n256_xreg";
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N256_XREG:
            return "wg_m128_n256_xreg";
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M32_N256:
            return "ws_m32_n256";
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N256:
            return "ws_m64_n256";
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N512:
            return "ws_m64_n512";
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N512_T2:
            return "ws_m64_n512_t2";
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M128_N256:
            return "ws_m128_n256";
        case int4_gemm_tile::INT4_GEMM_TILE_AUTO:
            return "auto";
        case int4_gemm_tile::INT4_GEMM_TILE_M32_N128:
            return "m32_n128";
        case int4_gemm_tile::INT4_GEMM_TILE_M64_N128:
            return "m64_n128";
        case int4_gemm_tile::INT4_GEMM_TILE_M128_N128:
            return "m128_n128";
        case int4_gemm_tile::INT4_GEMM_TILE_M128_N256:
            return "m128_n256";
    }
    return "?";
}

int4_gemm_plan int4_gemm_plan_for(int64_t m, int64_t n_in, int4_gemm_plan forced) {
    return resolve(forced, m, n_in);
}

int64_t int4_gemm_workspace_bytes(const int4_layout& L, int64_t m, int4_gemm_plan plan) {
    if (m <= 0) return 0;
    plan = resolve(plan, m, L.n_in);
    return workspace_for(L, m, plan);
}

status int4_gemm_f16(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x, const uint16_t* bias,
                     uint16_t* y, int64_t m, int64_t x_stride, int64_t y_stride, void* workspace,
                     int64_t workspace_bytes, cudaStream_t stream, int4_gemm_plan plan) {
    if (m <= 0) return status::ok();
    if (x_stride % 8 != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemm_f16: x (stride {}) must be 16-byte aligned with a stride multiple of 8", x_stride);
    if (x_stride < L.n_in || y_stride < L.n_out)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemm_f16: x_stride {} / y_stride {} too small",
                          x_stride, y_stride);
    if (plan.splits < 0 || plan.splits > k_max_splits)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemm_f16: splits {} not in 0..{}", plan.splits,
                          k_max_splits);
    plan = resolve(plan, m, L.n_in);
    if (shape_of(plan.tile).bm == 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemm_f16: unknown tile {}", int(plan.tile));
    if (int4_gemm_tile_is_wgmma(plan.tile) && !int4_gemm_has_wgmma())
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "int4_gemm_f16: tile {} needs a compute capability 9.0 GPU and a build with sm_90a code",
                          int4_gemm_tile_name(plan.tile));
    const int64_t need = workspace_for(L, m, plan);
    if (need > workspace_bytes)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_gemm_f16: tile {} with {} splits needs {} bytes of workspace, {} given",
                          int4_gemm_tile_name(plan.tile), plan.splits, need, workspace_bytes);
    const tile_shape sh = shape_of(plan.tile);
    gemm_args        a;
    a.w = static_cast<const uint4*>(weights), a.sz = static_cast<const uint4*>(sz);
    a.x = reinterpret_cast<const __half*>(x), a.bias = reinterpret_cast<const __half*>(bias);
    a.y = reinterpret_cast<__half*>(y);
    a.m = m, a.n_out = L.n_out, a.n_tiles = L.n_tiles, a.k_steps = L.k_steps, a.n_groups = L.n_groups;
    a.spg = L.group_size / 32, a.x_stride = x_stride, a.y_stride = y_stride;
    a.n_pad = (L.n_out + sh.bn - 1) / sh.bn * sh.bn, a.m_pad = (m + sh.bm - 1) / sh.bm * sh.bm;
    a.y_vec    = y_stride % 8 == 0 && reinterpret_cast<uintptr_t>(y) % 16 == 0;
    a.prefetch = ws_prefetch();
    if (plan.splits > 1) {
        const int64_t m_blocks = a.m_pad / sh.bm, n_blocks = a.n_pad / sh.bn;
        a.counters = static_cast<unsigned*>(workspace);
        a.partial =
            reinterpret_cast<float*>(static_cast<char*>(workspace) + (n_blocks * m_blocks * 4 + 255) / 256 * 256);
    }
    switch (plan.tile) {
        case int4_gemm_tile::INT4_GEMM_TILE_M32_N128:
            return launch<32, 4, 1, 4>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_M64_N128:
            return launch<64, 4, 1, 4>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_M128_N128:
            return launch<128, 4, 2, 4>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_M128_N256:
            return launch<128, 8, 2, 4>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M32_N128:
            return launch_wg<32, 1, 1>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N128:
            return launch_wg<64, 1, 1>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N256:
            return launch_wg<64, 1, 2>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N128:
            return launch_wg<128, 1, 1>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N256:
            return launch_wg<128, 1, 2>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M64_N256_XREG:
            return launch_wg<64, 1, 2, true>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WG_M128_N256_XREG:
            return launch_wg<128, 1, 2, true>(a, plan.splits, stream);
        // Warp-streamed: <warps, tiles per warp, 8-token columns, k32 steps per x chunk, ring slots>.
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M32_N256:
            return launch_ws<8, 1, 4, 16, 4>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N256:
            return launch_ws<8, 1, 8, 8, 4>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N512:
            return launch_ws<16, 1, 8, 8, 4>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M64_N512_T2:
            return launch_ws<8, 2, 8, 8, 4>(a, plan.splits, stream);
        case int4_gemm_tile::INT4_GEMM_TILE_WS_M128_N256:
            return launch_ws<8, 1, 16, 8, 5>(a, plan.splits, stream);
        default:
            break;
    }
    return make_error(status_code::STATUS_INVALID_ARGUMENT, "int4_gemm_f16: unknown tile {}", int(plan.tile));
}

status int4_dequant_f16(const int4_layout& L, const void* weights, const void* sz, uint16_t* w, int64_t w_stride,
                        cudaStream_t stream) {
    if (w_stride < L.n_in || w_stride % 8 != 0 || reinterpret_cast<uintptr_t>(w) % 16 != 0)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "int4_dequant_f16: w_stride {} must be >= n_in {} and a multiple of 8, w 16-byte aligned",
                          w_stride, L.n_in);
    const int64_t items = L.n_tiles * ((L.k_steps + k_dq_steps - 1) / k_dq_steps);
    int4_dequant_kernel<<<grid_for_items(items, k_dq_warps), k_dq_warps * 32, 0, stream>>>(
        static_cast<const uint4*>(weights), static_cast<const uint4*>(sz), reinterpret_cast<__half*>(w), L.n_out,
        L.n_tiles, L.k_steps, L.n_groups, L.group_size / 32, w_stride);
    GPTQ_CUDA_CHECK_LAUNCH();
    return status::ok();
}

}  // namespace gptq::cuda
