// Bit packing of GPTQ checkpoints (format.md 1.3 and 1.4): qweight packs integer codes along the
// input dimension K, qzeros packs zero points along the output dimension N, both as a contiguous
// little-endian bit stream cut into 32-bit words (for 2/4/8 bits: 32/b codes per word, code j at
// shift b*j; for 3 bits: 32 codes per 3 words, codes 10 and 21 straddling words).
// Zero points: v1 ("gptq") stores zero - 1, v2 ("gptq_v2") stores zero.
#pragma once

#include <cstdint>

#include "core/status.h"
#include "io/gptq_config.h"

namespace gptq {

// Words needed to pack `n` codes of `bits` bits (n * bits must be a multiple of 32).
inline int64_t gptq_packed_words(int64_t n, int bits) {
    return n * bits / 32;
}

// Check that K (input features) and N (output features) can be packed at `bits`: K * bits and
// N * bits multiples of 32. The message names the module and the offending size.
status gptq_check_packable(int64_t n_in, int64_t n_out, int bits, const std::string& module);

// codes: [n_out, n_in] (row n holds the K codes of output n) -> qweight: [n_in * bits / 32, n_out].
void gptq_pack_qweight(const uint8_t* codes, int64_t n_out, int64_t n_in, int bits, int32_t* qweight);
// Inverse: qweight [n_in * bits / 32, n_out] -> codes [n_out, n_in].
void gptq_unpack_qweight(const int32_t* qweight, int64_t n_out, int64_t n_in, int bits, uint8_t* codes);

// zeros: [n_groups, n_out] in 0..2^bits-1 -> qzeros: [n_groups, n_out * bits / 32]. v1 stores
// zero - 1 and so cannot hold zero 0: that is an error naming the group and column.
status gptq_pack_qzeros(const int32_t* zeros, int64_t n_groups, int64_t n_out, int bits, gptq_checkpoint_format format,
                        int32_t* qzeros);
// Inverse: v1 adds 1 back (so a stored field of 2^bits - 1 gives zero 2^bits, as every v1 reader
// computes it).
void gptq_unpack_qzeros(const int32_t* qzeros, int64_t n_groups, int64_t n_out, int bits, gptq_checkpoint_format format,
                        int32_t* zeros);

}  // namespace gptq
