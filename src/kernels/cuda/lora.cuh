// LoRA's two skinny products after a linear (docs/lora.md): y[r] += scale * (x[r] A^T) B^T for each
// row r of a pass, with the adapter chosen per row. One launch per adapted linear.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// One adapter's factors for one linear (device pointers, F32): r == 0 when it leaves the linear alone.
struct lora_slot {
    const float* a     = nullptr;  // [r, n_in]
    const float* b     = nullptr;  // [n_out, r]
    int32_t      r     = 0;
    float        scale = 0.0f;
};

// For each row i < n_rows: k = row_adapter[i] (device I32, read when the kernel runs; < 0: the row
// is left alone), t = x[i] A_k^T (F32, in shared memory), y[i, o] += scale_k * t . B_k[o] (F32 sum,
// one rounding to F16). x: [n_rows, n_in] F16, y: [n_rows, y_stride] F16, slots: device array of
// the adapters' lora_slot; max_r >= every slot's r (at most k_lora_max_r). Launched with PDL.
constexpr int32_t k_lora_max_r = 1024;
status lora_add_f16(const uint16_t* x, uint16_t* y, int64_t n_rows, int64_t n_in, int64_t n_out, int64_t y_stride,
                    const int32_t* row_adapter, const lora_slot* slots, int32_t max_r, cudaStream_t stream);

}  // namespace gptq::cuda
