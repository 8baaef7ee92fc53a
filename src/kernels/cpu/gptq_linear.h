// GPTQ linear layers on the CPU with the weights kept quantized: y = x W^T + b where
// W[n, k] = scale[g(k), n] * (code[k, n] - zero[g(k), n]) (format.md 1.5).
//
// Layout (built once at load by ops/gptq_linear.cpp from a checkpoint's tensors): the input rows k
// are sorted by group (stable, so act-order checkpoints get contiguous groups and the activations
// are gathered once per call through `perm`, format.md 1.5 "sort rows by g_idx"); each group's run
// of rows is padded with code 0 to a multiple of 32 ("chunks"). Two code layouts:
// - tiled (bits 2, 3, 4; what inference uses, issue 22 session 11): outputs in tiles of 16
//   (k_gptq_tile; the last tile padded with code 0, scale 0, zero 0), each tile's codes one
//   contiguous run of 64-byte steps, one step per 8 padded rows p .. p + 7: byte 4 o + j holds
//   output o's code of row p + j in its low nibble and of row p + 4 + j in its high nibble. A
//   512-bit register of a step thus holds 16 outputs x 4 rows per nibble half, and an int32 lane
//   of vpdpbusd is one output: the rows' int8 activations are broadcast 4 bytes at a time, and the
//   per-block scale and per-group zero point are one vector operation for 16 outputs. Scales and
//   zeros F32 [n_tiles, n_groups, 16].
// - rows (bits 8 always; bits <= 4 on request, the reference kernels' layout): codes per OUTPUT
//   row, bits 2, 3 and 4 as nibbles, 16 bytes per chunk, byte j holding the codes of chunk rows j
//   (low nibble) and 16 + j (high nibble); bits 8 as one byte per code. Scales and zeros F32
//   [n_out, n_groups].
//
// Two products:
// - F32 (exact up to summation order): a slice of W is dequantized to F32 and multiplied with
//   OpenBLAS sgemm. Used for prefill, perplexity and whenever int8 activations are not asked for.
// - int8 activations (decode rows): the gathered activations of each group are quantized once per
//   call to int8, one scale d = max|x| / 127 per block of up to 128 rows of the group (so per
//   group for group sizes 32/64/128; llama.cpp's Q8_0 uses blocks of 32), and every output row
//   accumulates integer products code x int8 (AVX2 maddubs + madd, or VNNI vpdpbusd) over the
//   block, converted to F32 and scaled by d once per block and by the weight scale once per group;
//   the zero point enters once per group through the group's sum of quantized activations:
//     y[n] = sum_g s[n,g] * (sum_{b in g} d_b * sum_{k in b} q[n,k] xq[k]  -  z[n,g] * xsum_g),
//     xsum_g = sum_{b in g} d_b * sum_{k in b} xq[k].
//   The result is the F32 product of W with the dequantized activations d_b * xq[k] (|error| per
//   activation <= d_b / 2), up to float summation order. The rows layout's kernels sum it in that
//   grouping; the tiled layout's (one F32 chain per output, its own function, the same on every
//   instruction set) as
//     acc = 0; per group g: per block b: acc = fma(float(I_b), s * d_b, acc);
//              then acc = fma(-(s * z), xsum_g, acc);   y = acc
//   with I_b the exact integer dot of the block (gemv_q8_tiled_scalar in gptq_linear.cpp).
#pragma once

#include <cstdint>

namespace gptq {
class thread_pool;
}

namespace gptq::cpu {

constexpr int64_t k_gptq_chunk      = 32;   // rows per chunk: the padding unit of each group
constexpr int64_t k_gptq_act_block  = 128;  // int8 activations: rows per scale (within a group)
constexpr int64_t k_gptq_act_chunks = k_gptq_act_block / k_gptq_chunk;
constexpr int64_t k_gptq_tile       = 16;  // outputs per tile of the tiled layout

struct gptq_cpu_layout {
    int64_t        n_in = 0, n_out = 0, n_groups = 0;
    int            bits        = 4;        // 2, 3, 4 (nibbles) or 8 (bytes)
    int64_t        k_pad       = 0;        // padded sorted rows: a multiple of k_gptq_chunk
    const uint8_t* codes       = nullptr;  // [n_out, row_bytes()]
    const float*   scales      = nullptr;  // [n_out, n_groups]
    const float*   zeros       = nullptr;  // [n_out, n_groups]
    const int32_t* group_start = nullptr;  // [n_groups + 1] first sorted row of each group
    const int32_t* pad_start   = nullptr;  // [n_groups + 1] first padded row of each group (multiples of 32)
    const int32_t* perm        = nullptr;  // [n_in] sorted row i reads x[perm[i]]; nullptr = identity
    bool           tiled       = false;    // the tiled layout (bits <= 4 only), else rows

    int64_t row_bytes() const { return bits == 8 ? k_pad : k_pad / 2; }  // rows layout
    int64_t n_tiles() const { return (n_out + k_gptq_tile - 1) / k_gptq_tile; }
    // Index into scales / zeros of (output n, group g).
    int64_t sz_index(int64_t n, int64_t g) const {
        return tiled ? ((n / k_gptq_tile) * n_groups + g) * k_gptq_tile + n % k_gptq_tile : n * n_groups + g;
    }
};

// Code of padded row p of output n.
inline int gptq_code_at(const gptq_cpu_layout& w, int64_t n, int64_t p) {
    if (w.tiled) {
        const int64_t step = (n / k_gptq_tile) * (w.k_pad / 8) + p / 8;
        const uint8_t b    = w.codes[step * 64 + (n % k_gptq_tile) * 4 + (p % 4)];
        return (p % 8) < 4 ? (b & 15) : (b >> 4);
    }
    const uint8_t* row = w.codes + n * w.row_bytes();
    if (w.bits == 8) return row[p];
    const uint8_t b = row[(p / k_gptq_chunk) * 16 + (p % 16)];
    return (p % k_gptq_chunk) < 16 ? (b & 15) : (b >> 4);
}

// Plain reference: dequantize each weight from the ORIGINAL layout (codes_orig [n_out, n_in],
// g_idx [n_in], scales/zeros [n_groups, n_out]) and accumulate in double. x: [m, n_in];
// y: [m, n_out]; bias [n_out] or nullptr.
void gptq_linear_ref(const float* x, const uint8_t* codes_orig, const float* scales, const float* zeros,
                     const int32_t* g_idx, const float* bias, float* y, int64_t m, int64_t n_out, int64_t n_in);

// Which int8-activation GEMV kernel runs: the best the CPU has (checked at run time), or one named
// (tests compare them; naming one the CPU lacks is a bug).
// VNNI: AVX512-VNNI vpdpbusd on 256-bit registers; AVX512: the same on 512-bit registers.
enum class gptq_isa { GPTQ_ISA_BEST, GPTQ_ISA_SCALAR, GPTQ_ISA_AVX2, GPTQ_ISA_VNNI, GPTQ_ISA_AVX512 };
bool        gptq_isa_available(gptq_isa isa);
const char* gptq_isa_name(gptq_isa isa);

// One row of activations quantized for the int8 GEMV: xq [k_pad] (padded rows 0), d
// [k_pad / 32] (per chunk: every chunk of a block holds the block's scale), xsum [n_groups] (see
// the header comment). x: [n_in], original order.
struct gptq_q8_row {
    int8_t* xq   = nullptr;
    float*  d    = nullptr;
    float*  xsum = nullptr;
};
// isa: SCALAR is the plain reference; AVX2 and AVX-512 (VNNI and AVX512 select it) give its
// result bit for bit.
void gptq_quantize_activations(const float* x, const gptq_cpu_layout& w, const gptq_q8_row& out,
                               gptq_isa isa = gptq_isa::GPTQ_ISA_BEST);

// y[n] for n in [n0, n1) from one quantized activation row (bias not added). Tiled layouts: every
// instruction set gives the scalar kernel's result bit for bit (integer block dots are exact, the
// F32 chain is the same); n0 must then be a multiple of k_gptq_tile.
void gptq_gemv_q8(const gptq_cpu_layout& w, const gptq_q8_row& xr, float* y, int64_t n0, int64_t n1, gptq_isa isa);

// y[m, n_out] = x W^T + bias. F32 products: dequantize + sgemm. int8_act: every row multiplies
// its int8-rounded activations d_b * xq (the same function for every row, so a row's result does
// not depend on how many rows share the call): m < 4 rows with the int8 GEMV; more rows (prompts)
// with the int8 GEMM of the same instruction set (AVX512 or VNNI vpdpbusd, AVX2 maddubs; bit for
// bit that GEMV's result per row), or for the SCALAR kernel with the rounded activations in F32
// through dequantize + sgemm. pool may be nullptr. Scratch
// memory is per thread and reused (no allocation per call once warm).
void gptq_linear(const float* x, const gptq_cpu_layout& w, const float* bias, float* y, int64_t m, thread_pool* pool,
                 bool int8_act, gptq_isa isa = gptq_isa::GPTQ_ISA_BEST);

// Several linears of one input (q/k/v, gate/up): y_j[m, n_out_j] = x W_j^T + bias_j, each exactly
// what gptq_linear gives it alone. With int8 activations, x is rounded once for all the layers
// whose activation layout (groups, padding, act-order permutation) is the same, and the int8
// products of all of them run as one parallel_for (one pool wake-up instead of one per layer).
struct gptq_linear_job {
    const gptq_cpu_layout* w    = nullptr;
    const float*           bias = nullptr;  // [n_out] or nullptr
    float*                 y    = nullptr;  // [m, n_out]
};
void gptq_linears(const float* x, const gptq_linear_job* jobs, int n_jobs, int64_t m, thread_pool* pool, bool int8_act,
                  gptq_isa isa = gptq_isa::GPTQ_ISA_BEST);
// Whether two layers round their activations identically (the sharing test of gptq_linears).
bool gptq_same_activation_layout(const gptq_cpu_layout& a, const gptq_cpu_layout& b);

}  // namespace gptq::cpu
