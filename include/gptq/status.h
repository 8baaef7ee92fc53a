// Public re-export of gptq::status and gptq::result<T> (defined in src/core/status.h, std-only).
#pragma once

#include "core/status.h"
