// 4-bit GPTQ GEMM for prefill (m > 16 tokens) on the int4 layout of gptq_int4.cuh (the same
// `weights` / `sz` buffers the decode GEMV reads: one copy of the weights), and the dequantize
// kernel of the dequantize-to-F16 + cuBLAS path.
//
// Numerics (both paths): each weight is dequantized once to F16 as f16(scale * (q - zero)) (q - zero
// is an exact small integer, so this is one round-to-nearest of the exact product, the value a
// dequantize-then-matmul reference in F16 uses), then F16 x F16 products summed in F32 on the tensor
// cores (fused kernel) or by cuBLAS (CUBLAS_COMPUTE_32F); the output is rounded to F16 once.
//
// Fused kernel (docs/cuda.md, "Prefill GEMM"): swap-AB mma.sync.m16n8k16 (the weights are the
// 16-row A operand, straight from the layout's lane words; the tokens are the 8-column B operand);
// per block BM tokens x BN outputs, k in stages of 64 through a cp.async pipeline in shared memory
// (weights, their scale/zero words, the activation tile with an XOR swizzle read by ldmatrix);
// dequantization in registers with the group's scales applied per k32 step; F32 accumulators;
// optional split of k over blocks (partials in a workspace, the last block of a tile sums them in
// split order). sm_80+ (no Hopper-only instruction). The warp-streamed tiles (int4_gemm_tile WS_*)
// run another kernel with the same numerics and epilogue: each warp streams its own weight tiles
// through a private cp.async ring (no block barrier for them), x is staged per block in large k
// chunks (one barrier per chunk).
#pragma once

#include <cstdint>

#include "core/status.h"
#include "kernels/cuda/gptq_int4.cuh"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// Block tiles of the fused kernel: tokens x outputs per block. One entry of the dispatch table each.
enum class int4_gemm_tile : int {
    INT4_GEMM_TILE_AUTO = 0,   // the dispatch table's choice for m (int4_gemm_plan_for)
    INT4_GEMM_TILE_M32_N128,   // 4 warps, each 32 outputs x 32 tokens (the table's tile)
    INT4_GEMM_TILE_M64_N128,   // 4 warps, each 32 outputs x 64 tokens
    INT4_GEMM_TILE_M128_N128,  // 8 warps (4 x 2), each 32 outputs x 64 tokens
    INT4_GEMM_TILE_M128_N256,  // 8 warps (4 x 2), each 64 outputs x 64 tokens
    // Hopper (sm_90a) wgmma tiles (int4_gemm_has_wgmma): warpgroups x 128 outputs x m tokens.
    INT4_GEMM_TILE_WG_M32_N128,   // 1 warpgroup, wgmma m64n32k16
    INT4_GEMM_TILE_WG_M64_N128,   // 1 warpgroup, m64n64k16
    INT4_GEMM_TILE_WG_M64_N256,   // 2 warpgroups, m64n64k16
    INT4_GEMM_TILE_WG_M128_N128,  // 1 warpgroup, m64n128k16
    INT4_GEMM_TILE_WG_M128_N256,  // 2 warpgroups, m64n128k16
    // The same with x copied in the natural k order and the A registers transposed across each quad.
    INT4_GEMM_TILE_WG_M64_N256_XREG,
    INT4_GEMM_TILE_WG_M128_N256_XREG,
    // Warp-streamed tiles (sm_80+, docs/cuda.md "Warp-streamed prefill GEMM"): W warps, each with TN
    // layout tiles of its own streamed through a per-warp cp.async ring; x staged per block in chunks.
    INT4_GEMM_TILE_WS_M32_N256,     // 8 warps x 1 tile, 32 tokens, x chunks of 512 k
    INT4_GEMM_TILE_WS_M64_N256,     // 8 warps x 1 tile, 64 tokens, x chunks of 256 k
    INT4_GEMM_TILE_WS_M64_N512,     // 16 warps x 1 tile, 64 tokens, x chunks of 256 k
    INT4_GEMM_TILE_WS_M64_N512_T2,  // 8 warps x 2 tiles, 64 tokens, x chunks of 256 k
    INT4_GEMM_TILE_WS_M128_N256,    // 8 warps x 1 tile, 128 tokens, x chunks of 256 k
};
constexpr int int4_gemm_tile_count = 17;  // AUTO + the tiles above (for sweeps)
const char*   int4_gemm_tile_name(int4_gemm_tile t);
// True for the wgmma tiles.
bool int4_gemm_tile_is_wgmma(int4_gemm_tile t);
// True for the warp-streamed tiles.
bool int4_gemm_tile_is_ws(int4_gemm_tile t);

// Whether the wgmma tiles can run on the current device: a compute capability 9.0 GPU and this
// build has sm_90a code (checked once per device by a probe kernel; GPTQ_INT4_WGMMA=0 turns them off).
// Call it once outside stream capture before the first GEMM (int4_repack does): the first call per
// device launches the probe and sets the kernels' shared-memory limits.
bool int4_gemm_has_wgmma();
// Whether the dispatch table takes the wgmma tiles (GPTQ_INT4_WGMMA_TABLE=1 on a device that has them).
bool int4_gemm_wgmma_in_table();
// Whether the dispatch table takes the warp-streamed tiles (GPTQ_INT4_WS_TABLE=1; before the wgmma ones).
bool int4_gemm_ws_in_table();

struct int4_gemm_plan {
    int4_gemm_tile tile   = int4_gemm_tile::INT4_GEMM_TILE_AUTO;
    int            splits = 0;  // k split over that many blocks per tile, 1..8 (0: the table's choice)
};

// The dispatch table: the tile by m bucket, k splits from m and n_in (about 2048 k per split and m
// block, at least 512 k per split, 1..8). Never from n_out: an output column's value then does not
// depend on n_out, so a fused q/k/v (gate/up) projection gives the same bits as its parts
// (test_llama_cuda's fused_projections_match_unfused_gptq). Entries of `forced` that are not AUTO /
// 0 are kept (the splits rule then applies to the forced tile).
int4_gemm_plan int4_gemm_plan_for(int64_t m, int64_t n_in, int4_gemm_plan forced = {});

// Device workspace for `plan` (resolved as int4_gemm_f16 resolves it): per-tile counters, then the
// split-K partial sums; 0 without a split. The counters must be zero before the first use
// (cudaMemset once); every launch leaves them zero. Launches on one stream may share it.
int64_t int4_gemm_workspace_bytes(const int4_layout& L, int64_t m, int4_gemm_plan plan = {});

// y[m, n_out] = x[m, n_in] W^T (+ bias), x already permuted when the layer has a perm.
// weights, sz: the layout's buffers (int4_repack). x: [m, x_stride] F16 with x_stride % 8 == 0 and
// x 16-byte aligned (cp.async of 16 bytes); y: [m, y_stride] F16 (16-byte stores when y_stride % 8
// == 0 and y is 16-byte aligned, else 2-byte ones); bias: [n_out] F16 or nullptr. Any m >= 1
// (meant for m > 16). workspace: see above.
status int4_gemm_f16(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x, const uint16_t* bias,
                     uint16_t* y, int64_t m, int64_t x_stride, int64_t y_stride, void* workspace,
                     int64_t workspace_bytes, cudaStream_t stream, int4_gemm_plan plan = {});

// w[n, k] = f16(scale * (q - zero)) for n < n_out, k < n_in in the layout's k order (the permuted
// order of an act-order layer: multiply by the permuted x). w: [n_out, w_stride] F16 device,
// w_stride >= n_in, w_stride % 8 == 0, 16-byte aligned. For dequantize + cuBLAS (gemm.cuh).
status int4_dequant_f16(const int4_layout& L, const void* weights, const void* sz, uint16_t* w, int64_t w_stride,
                        cudaStream_t stream);

}  // namespace gptq::cuda
