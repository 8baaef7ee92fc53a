// Small device helpers shared by the int4 kernels (gptq_int4.cu, gptq_int4_gemm.cu): half2 <-> bit
// casts, the shared-memory address of a pointer, and the cp.async group fences (sm_80+; nothing
// below sm_80, where these kernels are not launched). PDL's griddepcontrol is in launch.cuh.
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

}  // namespace gptq::cuda
