#include "kernels/cuda/device.h"

#include <cuda_runtime.h>

namespace gptq::cuda {

std::vector<device_info> device_list() {
    std::vector<device_info> out;
    int                      n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the error: no driver / no device is a normal CPU-only case
        return out;
    }
    for (int i = 0; i < n; ++i) {
        cudaDeviceProp prop{};
        if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) continue;
        out.push_back({i, prop.name, prop.major, prop.minor, prop.totalGlobalMem, prop.multiProcessorCount});
    }
    return out;
}

}  // namespace gptq::cuda
