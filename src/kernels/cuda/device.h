// CUDA device discovery. Host-only header (no CUDA types), so callers need no CUDA includes.
#pragma once

#include <string>
#include <vector>

#include "core/status.h"

namespace gptq::cuda {

struct device_info {
    int         index = 0;
    std::string name;
    int         sm_major = 0, sm_minor = 0;  // compute capability
    size_t      total_memory = 0;            // bytes
    int         n_sms        = 0;
};

// All visible devices; an empty list (not an error) when no driver or no GPU is present.
std::vector<device_info> device_list();

}  // namespace gptq::cuda
