// Fast 4-bit GPTQ linear for decode (m = 1..16 tokens per launch) on a weight layout repacked
// once at load from the checkpoint's tensors (the file stays in the standard format).
//
// Layout (docs/cuda.md): the output features are cut into tiles of 32 and k into steps of 32. For
// each (tile, step) the 32x32 codes are 512 bytes, one 16-byte word per lane, arranged so that a
// lane's 16 bytes are exactly its mma.m16n8k16 A-fragments (two 16-row tiles x two k16 steps)
// after a mask-and-OR dequantisation (nibble pairs -> half2 via 0x6400 exponent bits). Scales
// and zeros: one 16-byte word per (tile, group, lane/4): the (scale, zero) F16 pairs of the
// lane's 4 rows. Act-order: the k axis is sorted by group once (perm), the activations are
// permuted by gptq_permute_cols_f16 before the GEMV, so groups are contiguous runs.
#pragma once

#include <cstdint>
#include <vector>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

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
// x: [m, x_stride] F16 (x_stride even, 4-byte aligned); y: [m, y_stride] F16; bias: [n_out] F16 or
// nullptr. Any m (chunks of 16 tokens); fastest for m <= 16. workspace: see above. `unroll`:
// 16-byte loads in flight per lane, 8 (0: the default; 16 was slower and is gone); `splits`: k split over that many
// blocks per tile, 1..8 (0: automatic, currently 1; the workspace must fit the choice).
status int4_gemv_f16(const int4_layout& L, const void* weights, const void* sz, const uint16_t* x, const uint16_t* bias,
                     uint16_t* y, int64_t m, int64_t x_stride, int64_t y_stride, void* workspace,
                     int64_t workspace_bytes, cudaStream_t stream, int unroll = 0, int splits = 0);

// y[r, i] = x[r, perm[i]] for r < m, i < n_cols. x: [m, x_stride], y: [m, y_stride] F16 (no alias);
// perm: [n_cols] I32 device array.
status gptq_permute_cols_f16(const uint16_t* x, const int32_t* perm, uint16_t* y, int64_t m, int64_t n_cols,
                             int64_t x_stride, int64_t y_stride, cudaStream_t stream);

}  // namespace gptq::cuda
