#include "io/gptq_pack.h"

#include <cstring>
#include <vector>

#include "core/error.h"

namespace gptq {

namespace {

// Write `n` codes (each < 2^bits) as a little-endian bit stream into words[0 .. n*bits/32).
// `get(i)` returns code i; `put(w, value)` stores word w.
template <typename Get, typename Put>
void pack_stream(int64_t n, int bits, Get get, Put put) {
    uint64_t acc    = 0;
    int      filled = 0;
    int64_t  w      = 0;
    for (int64_t i = 0; i < n; ++i) {
        acc |= static_cast<uint64_t>(get(i)) << filled;
        filled += bits;
        if (filled >= 32) {
            put(w++, static_cast<uint32_t>(acc & 0xffffffffu));
            acc >>= 32;
            filled -= 32;
        }
    }
}

template <typename Get, typename Put>
void unpack_stream(int64_t n, int bits, Get get_word, Put put) {
    const uint64_t mask   = (1u << bits) - 1;
    uint64_t       acc    = 0;
    int            filled = 0;
    int64_t        w      = 0;
    for (int64_t i = 0; i < n; ++i) {
        if (filled < bits) {
            acc |= static_cast<uint64_t>(get_word(w++)) << filled;
            filled += 32;
        }
        put(i, static_cast<uint32_t>(acc & mask));
        acc >>= bits;
        filled -= bits;
    }
}

}  // namespace

status gptq_check_packable(int64_t n_in, int64_t n_out, int bits, const std::string& module) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8)
        return make_error(status_code::STATUS_UNSUPPORTED, "{}: bits {} cannot be packed (2, 3, 4 or 8)", module, bits);
    if ((n_in * bits) % 32 != 0)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "{}: in_features {} x {} bits is not a multiple of 32; GPTQ checkpoints need it", module,
                          n_in, bits);
    if ((n_out * bits) % 32 != 0)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "{}: out_features {} x {} bits is not a multiple of 32; GPTQ checkpoints need it", module,
                          n_out, bits);
    return status::ok();
}

void gptq_pack_qweight(const uint8_t* codes, int64_t n_out, int64_t n_in, int bits, int32_t* qweight) {
    for (int64_t n = 0; n < n_out; ++n)
        pack_stream(
            n_in, bits, [&](int64_t k) { return codes[n * n_in + k]; },
            [&](int64_t w, uint32_t v) { std::memcpy(&qweight[w * n_out + n], &v, 4); });
}

void gptq_unpack_qweight(const int32_t* qweight, int64_t n_out, int64_t n_in, int bits, uint8_t* codes) {
    for (int64_t n = 0; n < n_out; ++n)
        unpack_stream(
            n_in, bits,
            [&](int64_t w) {
                uint32_t v;
                std::memcpy(&v, &qweight[w * n_out + n], 4);
                return v;
            },
            [&](int64_t k, uint32_t v) { codes[n * n_in + k] = static_cast<uint8_t>(v); });
}

status gptq_pack_qzeros(const int32_t* zeros, int64_t n_groups, int64_t n_out, int bits, gptq_checkpoint_format format,
                        int32_t* qzeros) {
    const bool    v1    = format == gptq_checkpoint_format::GPTQ_FORMAT_V1;
    const int32_t maxq  = (1 << bits) - 1;
    const int64_t words = gptq_packed_words(n_out, bits);
    for (int64_t g = 0; g < n_groups; ++g) {
        for (int64_t n = 0; n < n_out; ++n) {
            const int32_t z = zeros[g * n_out + n];
            if (z < (v1 ? 1 : 0) || z > maxq)
                return make_error(status_code::STATUS_INVALID_ARGUMENT,
                                  "zero point {} of group {} column {} cannot be stored in format {} at {} bits", z, g,
                                  n, gptq_checkpoint_format_name(format), bits);
        }
        pack_stream(
            n_out, bits, [&](int64_t n) { return static_cast<uint32_t>(zeros[g * n_out + n] - (v1 ? 1 : 0)); },
            [&](int64_t w, uint32_t v) { std::memcpy(&qzeros[g * words + w], &v, 4); });
    }
    return status::ok();
}

void gptq_unpack_qzeros(const int32_t* qzeros, int64_t n_groups, int64_t n_out, int bits, gptq_checkpoint_format format,
                        int32_t* zeros) {
    const bool    v1    = format == gptq_checkpoint_format::GPTQ_FORMAT_V1;
    const int64_t words = gptq_packed_words(n_out, bits);
    for (int64_t g = 0; g < n_groups; ++g)
        unpack_stream(
            n_out, bits,
            [&](int64_t w) {
                uint32_t v;
                std::memcpy(&v, &qzeros[g * words + w], 4);
                return v;
            },
            [&](int64_t n, uint32_t v) { zeros[g * n_out + n] = static_cast<int32_t>(v) + (v1 ? 1 : 0); });
}

}  // namespace gptq
