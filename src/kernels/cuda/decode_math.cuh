// Device arithmetic shared by a plain kernel and the kernel that fuses it (docs/cuda.md, "The fused
// decode step"): RMSNorm (norm.cu, and the int4 GEMV's input prologue), act(gate) * up
// (activation.cu, and the GEMV's gate/up epilogue) and RoPE (rope.cu, and the decode attention). Each piece is written
// once here so that the fused kernels give the plain path's bits: the same operations in the same order, FMA
// contraction spelled out rather than left to the compiler.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace gptq::cuda {

// RMSNorm's reduction order (add_rms_norm_f16): a row of `dim` values is summed by T =
// rms_threads(dim) virtual threads, thread t taking i = t, t + T, ... in order (F32 squares
// accumulated with fma); each virtual warp of 32 threads then reduces with xor shuffles (16, 8, .., 1),
// and the T / 32 warp sums are added in warp order from 0. Any kernel that reproduces these three
// steps gets the norm kernel's inverse RMS bit for bit, whatever its own block size.
constexpr int                     k_rms_max_threads = 1024;
__host__ __device__ constexpr int rms_threads(int64_t dim) {
    return dim >= k_rms_max_threads ? k_rms_max_threads : int((dim + 31) / 32 * 32);
}

// Virtual thread t's sum of squares of the (already rounded) F16 row r.
__device__ __forceinline__ float rms_thread_sumsq(const __half* r, int64_t dim, int t, int T) {
    float ss = 0.0f;
    for (int64_t i = t; i < dim; i += T) {
        const float f = __half2float(r[i]);
        ss            = __fmaf_rn(f, f, ss);
    }
    return ss;
}

// The xor-shuffle sum over a full warp (every lane gets the total).
__device__ __forceinline__ float rms_warp_sum(float ss) {
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    return ss;
}

// The inverse RMS from the T / 32 warp sums `partial` (in warp order).
__device__ __forceinline__ float rms_inv_from_partials(const float* partial, int n_warps, int64_t dim, float eps) {
    float total = 0.0f;
    for (int i = 0; i < n_warps; ++i) total += partial[i];
    return rsqrtf(__fdiv_rn(total, float(dim)) + eps);
}

// One normalised value, rounded to F16: (h * inv) * w in F32.
__device__ __forceinline__ __half rms_apply(__half h, float inv, __half w) {
    return __float2half_rn(__fmul_rn(__fmul_rn(__half2float(h), inv), __half2float(w)));
}

// act(g) * u in F32: SiLU, or GELU with the tanh approximation (transformers' gelu_pytorch_tanh,
// the formula of kernels/cpu/activation.cpp in F32).
enum class act_kind { SILU, GELU_TANH };
template <act_kind A>
__device__ __forceinline__ float act_mul_f32(float g, float u) {
    if constexpr (A == act_kind::SILU) {
        return __fmul_rn(__fdiv_rn(g, __fadd_rn(1.0f, expf(-g))), u);
    } else {
        constexpr float beta  = 0.7978845608028654f;  // sqrt(2 / pi)
        constexpr float kappa = 0.044715f;
        const float     g3    = __fmul_rn(__fmul_rn(g, g), g);
        const float     inner = __fmul_rn(beta, __fadd_rn(g, __fmul_rn(kappa, g3)));
        return __fmul_rn(__fmul_rn(__fmul_rn(0.5f, g), __fadd_rn(1.0f, tanhf(inner))), u);
    }
}

// The F16 result of act(gate) * up from the F16 gate and up values.
template <act_kind A>
__device__ __forceinline__ __half act_mul_h(__half g, __half u) {
    return __float2half_rn(act_mul_f32<A>(__half2float(g), __half2float(u)));
}

// RoPE (rotate_half, kernels/cpu/rope.h) of the pair (a, b) = (x[i], x[i + half]) with the token's cos c
// and sin s: (a c - b s, b c + a s) in F32, each rounded to F16 once; no FMA, so that rope_f16,
// rope_kv_store_f16 and the decode attention that rotates its own queries and new keys agree.
__device__ __forceinline__ __half rope_lo(float a, float b, float c, float s) {
    return __float2half_rn(__fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
}
__device__ __forceinline__ __half rope_hi(float a, float b, float c, float s) {
    return __float2half_rn(__fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
}
// Element e (< 2 half) of a head x [2 half] after RoPE with the token's tables cs, sn [half].
__device__ __forceinline__ __half rope_elem(const __half* x, const float* cs, const float* sn, int64_t half,
                                            int64_t e) {
    if (e < half) return rope_lo(__half2float(x[e]), __half2float(x[e + half]), cs[e], sn[e]);
    const int64_t i = e - half;
    return rope_hi(__half2float(x[i]), __half2float(x[e]), cs[i], sn[i]);
}

}  // namespace gptq::cuda
