// Embedding gather on device memory: rows of an F16 table picked by token ids.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// out[t, :dim] = table[ids[t], :dim] for t < n_tokens. table: [vocab, dim] F16; ids: [n_tokens]
// I32; out: [n_tokens, out_stride] F16. An id outside [0, vocab) gives a row of zeros (the kernel
// cannot report it; callers validate ids on the host, where they come from). scale != 1: each value
// multiplied by it in F32 and rounded to F16 once (Gemma's embedding scale); 1: copied as is.
status embedding_f16(const uint16_t* table, const int32_t* ids, uint16_t* out, int64_t n_tokens, int64_t vocab,
                     int64_t dim, int64_t out_stride, cudaStream_t stream, float scale = 1.0f);

}  // namespace gptq::cuda
