// --device parsing and checks (include/gptq/device.h).
#include "gptq/device.h"

#include <fmt/format.h>

#include <charconv>

#include "core/error.h"
#ifdef GPTQ_HAVE_CUDA
#include "kernels/cuda/device.h"
#endif

namespace gptq {

result<device_spec> device_parse(const std::string& s) {
    device_spec d;
    if (s == "cpu") return d;
    if (s == "cuda") {
        d.cuda = true;
        return d;
    }
    if (s.rfind("cuda:", 0) == 0) {
        const std::string n = s.substr(5);
        int               v = -1;
        auto [end, ec]      = std::from_chars(n.data(), n.data() + n.size(), v);
        if (!n.empty() && ec == std::errc() && end == n.data() + n.size() && v >= 0) {
            d.cuda  = true;
            d.index = v;
            return d;
        }
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "--device '{}': the device index '{}' is not a non-negative integer (cuda:0, cuda:1, ...)", s,
                          n);
    }
    return make_error(status_code::STATUS_INVALID_ARGUMENT, "--device '{}': expected cpu, cuda or cuda:N", s);
}

std::string device_name(const device_spec& d) {
    return d.cuda ? fmt::format("cuda:{}", d.index) : std::string("cpu");
}

status device_check(const device_spec& d) {
    if (!d.cuda) return status::ok();
#ifdef GPTQ_HAVE_CUDA
    const auto devs = cuda::device_list();
    if (devs.empty())
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "--device {}: no CUDA device is present (no GPU or no driver); use --device cpu",
                          device_name(d));
    if (d.index >= static_cast<int>(devs.size()))
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "--device {}: only {} CUDA device{} present (cuda:0{})",
                          device_name(d), devs.size(), devs.size() == 1 ? " is" : "s are",
                          devs.size() > 1 ? fmt::format("..cuda:{}", devs.size() - 1) : "");
    return status::ok();
#else
    return make_error(status_code::STATUS_UNSUPPORTED,
                      "--device {}: this gptq was built without CUDA (configure with -DGPTQ_CUDA=ON); use --device cpu",
                      device_name(d));
#endif
}

}  // namespace gptq
