// Where the forward pass runs: `--device cpu|cuda|cuda:N` of `gptq ppl` and `gptq generate`.
#pragma once

#include <string>

#include "gptq/status.h"

namespace gptq {

struct device_spec {
    bool cuda  = false;  // false: the CPU runtime
    int  index = 0;      // CUDA device index ("cuda" alone is cuda:0)
};

// "cpu", "cuda" or "cuda:N" (N a non-negative device index); anything else is an error quoting the
// value. Syntax only: whether the build has CUDA and the device exists is checked when a model is
// opened on it (device_check).
result<device_spec> device_parse(const std::string& s);
std::string         device_name(const device_spec& d);  // "cpu", "cuda:0"

// ok for the CPU; for CUDA an error when this build has no CUDA backend (configure with
// -DGPTQ_CUDA=ON) or no such device is present.
status device_check(const device_spec& d);

}  // namespace gptq
