// The k most likely tokens of F32 logits rows and the rows' softmax normalisers, on the device
// (the host reference and the meaning of every output: ops/logits_top.h logits_top_cpu). One block
// per row: a radix select of the k-th largest value (8 bits a pass over an order-preserving
// integer key), the candidates collected (the lowest ids among values equal to the k-th), a
// bitonic sort of them, and the two sums in double.
#pragma once

#include <cstdint>

#include "core/status.h"

typedef struct CUstream_st* cudaStream_t;

namespace gptq::cuda {

// logits [rows, n_vocab] F32; 1 <= k <= min(n_vocab, 256); inv_temp [rows] F32 or nullptr (1).
// ids, vals: [rows, k] (larger first, equal values: lower id first); sums: [rows, 2] F64:
// sum of exp(l - max), sum of exp((l - max) * inv_temp[row]). All device pointers.
status logits_top_f32(const float* logits, int64_t rows, int64_t n_vocab, int64_t k, const float* inv_temp,
                      int32_t* ids, float* vals, double* sums, cudaStream_t stream);

}  // namespace gptq::cuda
