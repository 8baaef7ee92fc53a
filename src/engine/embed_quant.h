// The quantized input embedding table of `gptq quantize --quantize-embeddings` (docs/quantize.md,
// "Quantized embeddings"): GPTQModel's layout, the GPTQ linear of E^T (n_out = n_embd, n_in =
// n_vocab: a group is `group_size` consecutive token ids of one hidden column; format.md 1.5).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/gptq_checkpoint.h"
#include "ops/ops.h"
#include "quant/gptq.h"

namespace gptq {

// GPTQModel's TorchQuantEmbeddings takes these group sizes (SUPPORTS_GROUP_SIZE).
bool embed_group_size_supported(int group_size);

// Checks of the table's shape and settings before anything runs: the vocabulary must pack along
// 32-bit words at `bits` (n_vocab x bits a multiple of 32, GPTQModel's qweight [n_vocab x bits / 32,
// n_embd]), n_embd too (qzeros), the group size -1 or one GPTQModel takes. A last group shorter
// than the others (n_vocab not a multiple of the group) is allowed: g_idx = id / group, as
// GPTQModel builds it (ceil(n_vocab / group) groups). The message names the flag to change.
status embed_quant_check(int64_t n_vocab, int64_t n_embd, int bits, int group_size);

struct embed_quantized {
    gptq_linear_data   data;             // E^T as written (codes [n_embd, n_vocab], F16 scales)
    std::vector<float> table;            // the dequantized table [n_vocab, n_embd], F32: what every reader computes
    double             error     = 0.0;  // sum_v wt_v ||E_v - Q_v||^2 of the written codes
    double             error_rtn = 0.0;  // the same for plain RTN (the full range of each group)
};

// The token weights of `clip` "frequency": count in `calib_ids` plus one; else all ones (also the
// weights of the reported errors, with calib_ids empty when there is no calibration text).
std::vector<float> embed_token_weights(int64_t n_vocab, const std::vector<int32_t>& calib_ids);

// Quantize the table e [n_vocab, n_embd] (F32): opt's bits, group_size, sym, zero_min; clip "none"
// (rtn_quantize), "uniform" (rtn_quantize_weighted, weights one) or "frequency" (weights wt).
result<embed_quantized> embed_table_quantize(const ops_context& ctx, const float* e, int64_t n_vocab, int64_t n_embd,
                                             const gptq_options& opt, const std::string& clip,
                                             const std::vector<float>& wt);

// x [ids, n_embd] = scale * table[id] (the model's embed with the dequantized table).
status embed_rows(const std::vector<float>& table, int64_t n_embd, float scale, const std::vector<int32_t>& ids,
                  float* x);

}  // namespace gptq
