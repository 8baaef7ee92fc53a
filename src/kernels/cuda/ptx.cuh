// Small device helpers shared by the int4 kernels (gptq_int4.cu, gptq_int4_gemm.cu, moe.cu): half2 <->
// bit casts, the shared-memory address of a pointer, the cp.async copies and group fences, the L2 bulk
// prefetch, an int4 word's
// dequantisation into mma fragments and the mma (sm_80+; nothing below sm_80, where these kernels
// are not launched). PDL's griddepcontrol is in launch.cuh.
#pragma once

#include <cuda_fp16.h>

#include <cstdint>

namespace gptq::cuda {

__device__ __forceinline__ uint32_t h2_bits(__half2 h) {
    return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ __half2 bits_h2(uint32_t u) {
    return *reinterpret_cast<__half2*>(&u);
}
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// 16-byte global -> shared copies (cp.async, sm_80+). Weights: L2-only (.cg) with an evict-first
// policy (read once); activations and scales: L1-cached (.ca), read by every tile.
__device__ __forceinline__ uint64_t evict_first_policy() {
    uint64_t p = 0;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
#endif
    return p;
}
__device__ __forceinline__ void cp_async_stream16(void* dst, const void* src, uint64_t policy) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src),
                 "l"(policy)
                 : "memory");
#endif
}
__device__ __forceinline__ void cp_async_cached16(void* dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(dst)), "l"(src) : "memory");
#endif
}

// The bytes [src, src + bytes) into L2 (a hint: no data comes back, nothing waits for it). sm_90's
// bulk prefetch; 16-byte aligned, bytes a multiple of 16.
__device__ __forceinline__ void prefetch_l2_bulk(const void* src, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(src), "r"(bytes) : "memory");
#endif
}

// The int4 layout (gptq_int4.cuh) turned into mma fragments (gptq_int4.cu's GEMV, moe.cu's grouped
// linear). The 4 half2 (q - zero) of one packed word: slot j = nibbles (j, j + 4) = (k even, k odd).
// z1024 = 1024 + zero, z64 = -(64 + zero) as half2.
__device__ __forceinline__ void dequant_word(uint32_t w, __half2 z1024, __half2 z64, uint32_t (&out)[4]) {
    const __half2  sixteenth = __float2half2_rn(1.0f / 16.0f);
    const uint32_t w8        = w >> 8;
    out[0]                   = h2_bits(__hsub2(bits_h2((w & 0x000F000Fu) | 0x64006400u), z1024));
    out[1]                   = h2_bits(__hfma2(bits_h2((w & 0x00F000F0u) | 0x64006400u), sixteenth, z64));
    out[2]                   = h2_bits(__hsub2(bits_h2((w8 & 0x000F000Fu) | 0x64006400u), z1024));
    out[3]                   = h2_bits(__hfma2(bits_h2((w8 & 0x00F000F0u) | 0x64006400u), sixteenth, z64));
}

// mma.sync m16n8k16, F16 x F16 -> F32, accumulating into c (the fragments of the PTX ISA's layout).
__device__ __forceinline__ void mma_16816(float& c0, float& c1, float& c2, float& c3, const uint32_t (&a)[4],
                                          uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c0), "+f"(c1), "+f"(c2), "+f"(c3)
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // built only for sm_80+ (CMAKE_CUDA_ARCHITECTURES); older GPUs use the generic kernel
#endif
}

}  // namespace gptq::cuda
