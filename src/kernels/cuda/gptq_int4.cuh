// Fast 4-bit GPTQ linear for decode (m = 1..16 tokens per launch) on a weight layout repacked
// once at load from the checkpoint's tensors (the file stays in the standard format).
//
// Layout (docs/cuda.md): the output features are cut into tiles of 32 and k into steps of 32. For
// each (tile, step) the 32x32 codes are 512 bytes, one 16-byte word per lane, arranged so that a
// lane's 16 bytes are exactly its mma.m16n8k16 A-fragments (two 16-row tiles x two k16 steps)
// after a mask-and-OR dequantisation (nibble pairs -> half2 via 0x6400 exponent bits); within a
// step, lane l's words cover k = 8 (l % 4) .. 8 (l % 4) + 7 (the mma's k order is permuted so that
// a lane's activation fragment is 8 consecutive halves, one 16-byte load). Scales
// and zeros: one 16-byte word per (tile, group, lane/4): the (scale, zero) F16 pairs of the
// lane's 4 rows. Act-order: the k axis is sorted by group once (perm), the activations are
// permuted by gptq_permute_cols_f16 before the GEMV, so groups are contiguous runs.
#pragma once

#include <cstdint>
#include <vector>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// The in-step k order of the lane words, as int4_repack writes it: true when slot j (nibbles j, j + 4)
// of lane l holds k = 8 (l % 4) + 2 j + (0, 1) of the k32 step, false for the mma's own order
// k = 16 (j / 2) + 8 (j % 2) + 2 (l % 4) + (0, 1). Read by the prefill GEMM (gptq_int4_gemm.cu).
constexpr bool int4_layout_k_grouped = true;

struct int4_layout {
    int64_t n_out = 0, n_in = 0;
    int64_t group_size = 0;  // 32, 64, 128, ... (a multiple of 32) or n_in for "-1"
    int64_t n_tiles = 0, k_steps = 0, n_groups = 0;
    int64_t weight_bytes = 0;  // size of the repacked weights
    int64_t sz_bytes     = 0;  // size of the repacked scales/zeros
};

// Layout for an [n_out, n_in] 4-bit linear with `group_size` (-1: one group). UNSUPPORTED (the
// caller falls back to gptq_linear_generic_f16) unless n_in % 32 == 0 and the group size is -1 or
// a multiple of 32 dividing n_in.
result<int4_layout> int4_layout_for(int64_t n_out, int64_t n_in, int64_t group_size);

// Rows [32 tile0, 32 (tile0 + tiles)) of L (clipped to n_out) as a layout of their own: the layout is
// tile-major (32 rows per tile, every k step of a tile contiguous), so the slice's weights and
// scales/zeros start weight_offset / sz_offset bytes into L's buffers. For kernels run on a row
// range (dequantize + cuBLAS in L2-sized chunks, ops_cuda.cpp). tile0 + tiles <= n_tiles.
struct int4_layout_slice {
    int4_layout L;
    int64_t     weight_offset = 0, sz_offset = 0;
};
int4_layout_slice int4_layout_rows(const int4_layout& L, int64_t tile0, int64_t tiles);

// Host helper: the k order that makes groups contiguous. g_idx: [n_in] host array. On success
// `perm` is empty when g_idx is already k / group_size (no act-order), else the stable sort of k
// by g_idx; UNSUPPORTED when the sorted groups are not runs of exactly group_size (the caller
// falls back to the generic kernel).
status int4_act_order_perm(const int32_t* g_idx, int64_t n_in, int64_t group_size, std::vector<int32_t>& perm);

// Repack checkpoint tensors (device pointers, format.md 1.2) into the layout.
// qweight: [n_in / 8, n_out] I32; qzeros: [n_groups, n_out / 8] I32; scales: [n_groups, n_out]
// F16; perm: [n_in] I32 device array or nullptr (from int4_act_order_perm); zero_add: 1 for v1
// zeros, 0 for v2. weights: layout.weight_bytes, sz: layout.sz_bytes, both device, 16-aligned.
status int4_repack(const int4_layout& L, const int32_t* qweight, const int32_t* qzeros, const uint16_t* scales,
                   const int32_t* perm, int zero_add, void* weights, void* sz, cudaStream_t stream);

// Device workspace the GEMV needs for L with `splits` (0: the automatic choice on the current
// device): split-K partial sums + one counter per tile; 0 when k is not split. The counters must
// be zero before the first use (cudaMemset once); every launch leaves them zero. Launches on one
// stream may share one workspace.
int64_t int4_gemv_workspace_bytes(const int4_layout& L, int splits = 0);

// y[m, n_out] = x[m, n_in] W^T (+ bias), x already permuted when the layer has a perm.
// x: [m, x_stride] F16 (x_stride even, 4-byte aligned; 16-byte aligned with x_stride % 8 == 0 for
// the fast variants); y: [m, y_stride] F16; bias: [n_out] F16 or nullptr. Any m (chunks of 16
// tokens); fastest for m <= 16. workspace: see above. `unroll`: 0 or 8, both the default (kept for
// callers; the batched kernel's 16-byte loads in flight per lane); `splits`: k split over that
// many blocks per tile, 1..8 (0: automatic, currently 1; the workspace must fit the choice; only
// the batched variant 0 splits). `variant`: -1 the automatic per-shape choice, else a kernel
// variant (below) forced, for tests and benchmarks.
status int4_gemv_f16(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x, const uint16_t* bias,
                     uint16_t* y, int64_t m, int64_t x_stride, int64_t y_stride, void* workspace,
                     int64_t workspace_bytes, cudaStream_t stream, int unroll = 0, int splits = 0, int variant = -1);

// Kernel variants of int4_gemv_f16: 0 .. int4_gemv_variant_count() - 1. Variant 0 is the batched
// kernel (any aligned-to-4 x, split-K); the others are pipelined (cp.async rings) with different
// warps per block, tiles per block and ring depths (the names say which). int4_gemv_auto_variant:
// the one the automatic choice takes for L and m tokens (m > 16: per 16-token chunk) on the
// current device when x is 16-byte aligned and k is not split.
int         int4_gemv_variant_count();
const char* int4_gemv_variant_name(int variant);
int         int4_gemv_auto_variant(const int4_layout& L, int64_t m);

// The fused decode step (docs/cuda.md "The fused decode step"): the pipelined GEMV with the op
// before it folded into its input, or the op after it into its output, giving the bits of the plain
// sequence (the arithmetic of decode_math.cuh). One of:
// - norm_w set (F_NORM): x is the residual stream h [m, x_stride] (any 2-byte alignment); the kernel
//   computes rms_norm(h) * norm_w as add_rms_norm_f16 without the add (in `perm` order when set: the
//   layer's act-order column order) and multiplies that; eps the norm's epsilon. Optionally with
//   silu.
// - residual: y is the residual stream [m, y_stride], y += the layer's (rounded) output, as add_f16.
// - silu (alone or with norm_w): the layer's 32-row tiles hold gate features 16 t .. 16 t + 15 in
//   rows 0..15 and the matching up features in rows 16..31 (n_out = 2 n_ff, n_ff % 16 == 0: the
//   interleaved gate/up layout); y [m, y_stride] receives silu(gate) * up, n_out / 2 features, as
//   silu_mul_f16.
// - out_norm_w (with residual): after the add, the block that finishes last writes
//   rms_norm(y) * out_norm_w into x_out [m, x_out_stride] (in out_perm order when set), bit for bit
//   add_rms_norm_f16(y, the layer's output, out_norm_w, x_out, out_perm); counter: one device
//   unsigned, zero before the launch and left zero (cuda_context::counters).
// bias as int4_gemv_f16 (added before the rounding of the layer's output).
struct int4_gemv_fusion {
    const uint16_t* norm_w       = nullptr;  // [n_in] F16: the input RMSNorm's weights (nullptr: none)
    float           eps          = 0.0f;
    const int32_t*  perm         = nullptr;  // [n_in] I32 device, with norm_w only
    bool            residual     = false;
    bool            silu         = false;
    const uint16_t* out_norm_w   = nullptr;  // [n_out] F16: the next RMSNorm's weights (nullptr: none)
    float           out_eps      = 0.0f;
    const int32_t*  out_perm     = nullptr;  // [n_out] I32 device: the next linear's column order
    uint16_t*       x_out        = nullptr;
    int64_t         x_out_stride = 0;
    unsigned*       counter      = nullptr;
};
// The most tokens a fused launch takes (16: two 8-token column tiles).
int64_t int4_gemv_fused_max_m();
// OK when int4_gemv_fused_f16 runs L for m tokens with f on the current device (m, the combination,
// the shared memory of the normalised rows); UNSUPPORTED (use the plain ops) otherwise.
status int4_gemv_fused_check(const int4_layout& L, int64_t m, const int4_gemv_fusion& f, int variant = -1);
// variant: -1 the table's choice (among the fused ones), or one for which int4_gemv_fused_variant is
// true (tests; at m > 8 every launch runs 16 warps x 4 slots, pipe-w16-t1-d4).
status int4_gemv_fused_f16(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x,
                           const uint16_t* bias, uint16_t* y, int64_t m, int64_t x_stride, int64_t y_stride,
                           const int4_gemv_fusion& f, cudaStream_t stream, int variant = -1);
bool   int4_gemv_fused_variant(int variant);

// The GEMV with an F32 output (the quantized lm_head's logits, docs/cuda.md "Quantized lm_head on
// the GPU"): y[m, y_stride] F32 = x W^T (+ bias in F32), the sum the pipelined variants round to F16
// in int4_gemv_f16, un-rounded (so rounding it to F16 gives int4_gemv_f16's bits). m in [1, 16]
// (the fused kernels: the table's fused variant, or `variant` forced, one for which
// int4_gemv_fused_variant is true); x as the pipelined variants need it (16-byte aligned,
// x_stride % 8 == 0), already permuted for an act-order layout. The check: OK when it runs L for m
// tokens on the current device, UNSUPPORTED (the caller takes another path) otherwise.
status int4_gemv_f32out_check(const int4_layout& L, int64_t m, int variant = -1);
status int4_gemv_f32out(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x,
                        const uint16_t* bias, float* y, int64_t m, int64_t x_stride, int64_t y_stride,
                        cudaStream_t stream, int variant = -1);

// y[r, i] = x[r, perm[i]] for r < m, i < n_cols. x: [m, x_stride], y: [m, y_stride] F16 (no alias);
// perm: [n_cols] I32 device array.
status gptq_permute_cols_f16(const uint16_t* x, const int32_t* perm, uint16_t* y, int64_t m, int64_t n_cols,
                             int64_t x_stride, int64_t y_stride, cudaStream_t stream);

}  // namespace gptq::cuda
