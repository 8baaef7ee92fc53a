// LoRA dropout's masks (docs/lora.md "Dropout"): a counter-based hash, the same function on the
// host and on the device, so that the CPU and the GPU training paths drop the same elements, and
// the backward pass (which recomputes a layer) draws the mask of its forward pass again.
//
// Element `index` (row * n_in + column of the LoRA branch's input x) of module (layer, role) in the
// micro-batch whose masks have `seed` is kept when the top 24 bits of its hash are at or above
// dropout_threshold(p); kept values are scaled by 1 / (1 - p) (torch.nn.Dropout).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define GPTQ_HOST_DEVICE __host__ __device__
#else
#define GPTQ_HOST_DEVICE
#endif

namespace gptq {

GPTQ_HOST_DEVICE inline uint64_t dropout_mix(uint64_t z) {  // splitmix64's finaliser
    z += 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

// The per-module key, then the per-element draw.
GPTQ_HOST_DEVICE inline uint64_t dropout_module_key(uint64_t seed, int64_t layer, int role) {
    return dropout_mix(seed ^ dropout_mix(static_cast<uint64_t>(layer) * 16 + static_cast<uint64_t>(role)));
}
GPTQ_HOST_DEVICE inline bool dropout_keep(uint64_t module_key, int64_t index, uint32_t threshold) {
    return static_cast<uint32_t>(dropout_mix(module_key + static_cast<uint64_t>(index) * 0xd1b54a32d192ed03ULL) >>
                                 40) >= threshold;
}
// p in [0, 1): the threshold of the 24-bit draw.
inline uint32_t dropout_threshold(double p) {
    return static_cast<uint32_t>(p * 16777216.0);
}

}  // namespace gptq
