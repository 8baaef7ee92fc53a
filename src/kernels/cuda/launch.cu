#include "kernels/cuda/launch.cuh"

#include <array>
#include <cstdlib>
#include <cstring>

namespace gptq::cuda {

bool pdl_enabled() {
    static const bool env_off = [] {
        const char* e = std::getenv("GPTQ_PDL");
        return e && std::strcmp(e, "0") == 0;
    }();
    if (env_off) return false;
    static std::array<signed char, 64> cached{};  // 0 unknown, 1 yes, -1 no (per device index)
    int                                dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= int(cached.size())) {
        cudaGetLastError();
        return false;
    }
    if (cached[size_t(dev)] == 0) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
            cudaGetLastError();
            major = 0;
        }
        cached[size_t(dev)] = major >= 9 ? 1 : -1;
    }
    return cached[size_t(dev)] == 1;
}

}  // namespace gptq::cuda
