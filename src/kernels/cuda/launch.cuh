// Programmatic dependent launch (PDL, sm_90+): a kernel launched with launch_pdl may start while
// the kernel before it on the stream is still running; it must call pdl_wait() before touching
// anything that kernel writes (pdl_wait returns once the previous grid has completed and its memory
// is visible), and calls pdl_launch_dependents() to let the kernel after it start early in turn.
// What a kernel does before pdl_wait (reading weights, which no kernel of the step writes) overlaps
// the previous kernel's tail and the launch latency between them: in the decode step most kernels
// are a few microseconds long, so that latency is a large share of the step (docs/perf-notes.md).
// Captured into CUDA graphs as programmatic edges. On GPUs before sm_90, or with GPTQ_PDL=0 in the
// environment, launch_pdl is a plain launch and both device calls compile to nothing.
// Rule: a kernel launched with launch_pdl must call pdl_wait() before its first dependent access;
// kernels launched plainly (cuBLAS, copies) keep full stream order.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace gptq::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// True when the current device is sm_90+ and GPTQ_PDL is not "0" (cached per device).
bool pdl_enabled();

template <typename... KArgs, typename... Args>
cudaError_t launch_pdl(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                       Args&&... args) {
    cudaLaunchConfig_t  cfg{};
    cudaLaunchAttribute attr[1];
    attr[0].id                                         = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim                                        = grid;
    cfg.blockDim                                       = block;
    cfg.dynamicSmemBytes                               = smem;
    cfg.stream                                         = stream;
    cfg.attrs                                          = attr;
    cfg.numAttrs                                       = pdl_enabled() ? 1 : 0;
    return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace gptq::cuda
