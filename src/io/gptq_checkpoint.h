// GPTQ-quantized linear layers in a checkpoint: the four tensors of a module (format.md 1.2)
// <module>.qweight I32 [K*b/32, N], .qzeros I32 [G, N*b/32], .scales F16 [G, N], .g_idx I32 [K]
// (+ .bias F16 [N]), to and from a neutral unpacked form. Knows names and bytes, not GPTQ math.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "core/status.h"
#include "io/gptq_config.h"
#include "io/safetensors.h"
#include "io/tensor_source.h"

namespace gptq {

// Unpacked form of one quantized linear (K = n_in, N = n_out, G = n_groups).
struct gptq_linear_data {
    int64_t               n_out = 0, n_in = 0, n_groups = 0;
    int                   bits = 4;
    std::vector<uint8_t>  codes;    // [n_out, n_in] (empty when read with keep_packed)
    std::vector<int32_t>  qweight;  // keep_packed: the file's packed words [n_in * bits / 32, n_out]
    std::vector<int32_t>  zeros;    // [n_groups, n_out], the real zero point (v1 +1 already applied)
    std::vector<uint16_t> scales;   // [n_groups, n_out] F16 bits
    std::vector<int32_t>  g_idx;    // [n_in]
    std::vector<uint16_t> bias;     // [n_out] F16 bits, or empty

    // w[n_out, n_in] = scale[g_idx[k], n] * (code[n, k] - zero[g_idx[k], n]), in F32.
    void dequantize(float* w) const;
};

// Output rows [row0, row0 + n_out) of a linear (codes rows, scales/zeros/bias columns; g_idx
// shared): a linear's output features are independent (format.md 1.2), so a fused checkpoint
// module (Phi-3 qkv_proj, gate_up_proj) splits into its parts and joins back exactly.
gptq_linear_data gptq_linear_rows(const gptq_linear_data& d, int64_t row0, int64_t n_out);
// The parts stacked by output rows, in order; they must share n_in, bits, n_groups and g_idx.
result<gptq_linear_data> gptq_linear_join_rows(const std::vector<const gptq_linear_data*>& parts,
                                               const std::string&                          module);

// Declarations of the module's tensors, for a safetensors_writer.
std::vector<safetensors_decl> gptq_linear_decls(const std::string& module, int64_t n_out, int64_t n_in,
                                                int64_t n_groups, int bits, bool has_bias);

// Pack and write the module's tensors through `w` (which declared gptq_linear_decls).
status gptq_linear_write(safetensors_writer& w, const std::string& module, const gptq_linear_data& d,
                         gptq_checkpoint_format format);

// Read and unpack a module's tensors, checking every shape against (n_out, n_in) and the config's
// bits, and every g_idx value against the group count. Zeros are read in cfg.format: callers that
// load a checkpoint set it with gptq_zero_format_resolve first (the data decides, format.md 1.4).
// keep_packed: qweight keeps the file's packed words and codes stays empty (a reader that uploads
// the packed form as it is, the GPU model, skips unpacking and packing every weight again).
result<gptq_linear_data> gptq_linear_read(const tensor_source& src, const std::string& module, int64_t n_out,
                                          int64_t n_in, const gptq_config& cfg, bool keep_packed = false);

// True when the checkpoint holds `<module>.qweight`.
bool gptq_linear_present(const tensor_source& src, const std::string& module);

}  // namespace gptq
