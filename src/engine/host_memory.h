// Host memory checks shared by the engine's commands (docs/reliability.md, "Out of memory"):
// each command estimates what it will hold, compares it with what the machine has free and
// refuses up front with both figures, rather than dying half way in the kernel's OOM killer.
#pragma once

#include <cstdint>
#include <string>

#include "core/status.h"

namespace gptq {

// Free host memory: MemAvailable from /proc/meminfo, or GPTQ_MEMORY_LIMIT_BYTES when that
// environment variable is set (to keep a run inside a budget, and for tests). 0 when unknown.
uint64_t host_memory_available();

// "1.50 GiB", "12.00 MiB", "4.00 KiB", "17 B".
std::string human_bytes(uint64_t n);

// STATUS_OUT_OF_MEMORY "<what> needs about X but only Y is available[ (GPTQ_MEMORY_LIMIT_BYTES)]; <hint>"
// when needed > available (and available is known), else ok.
status host_memory_check(const std::string& what, uint64_t needed, const std::string& hint);

}  // namespace gptq
