// Helpers for the `cuda` tests: skip without a GPU, a device buffer, F16 random data on the host.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <random>
#include <vector>

#include "core/dtype.h"

namespace gptq::test {

inline bool cuda_device_present() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    return n > 0;
}

#define GPTQ_SKIP_WITHOUT_GPU() \
    if (!::gptq::test::cuda_device_present()) GTEST_SKIP() << "no CUDA device: cuda tests skipped"

#define GPTQ_EXPECT_OK(expr)                       \
    do {                                           \
        const ::gptq::status st_ = (expr);         \
        ASSERT_TRUE(st_.is_ok()) << st_.message(); \
    } while (0)

// A device array of T, filled from / copied to host vectors. Poisoned (0xFF bytes: F16 NaN) on
// creation so that an unwritten output shows up as NaN.
template <typename T>
class device_array {
public:
    explicit device_array(size_t n) : n_(n) {
        if (n_ == 0) return;
        EXPECT_EQ(cudaMalloc(&p_, n_ * sizeof(T)), cudaSuccess);
        EXPECT_EQ(cudaMemset(p_, 0xFF, n_ * sizeof(T)), cudaSuccess);
    }
    explicit device_array(const std::vector<T>& host) : device_array(host.size()) { upload(host); }
    ~device_array() {
        if (p_) cudaFree(p_);
    }
    device_array(const device_array&)            = delete;
    device_array& operator=(const device_array&) = delete;

    void upload(const std::vector<T>& host) {
        if (n_) {
            EXPECT_EQ(cudaMemcpy(p_, host.data(), n_ * sizeof(T), cudaMemcpyHostToDevice), cudaSuccess);
        }
    }
    std::vector<T> download() const {
        std::vector<T> h(n_);
        EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        if (n_) {
            EXPECT_EQ(cudaMemcpy(h.data(), p_, n_ * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
        }
        return h;
    }
    T*     get() const { return p_; }
    size_t size() const { return n_; }

private:
    T*     p_ = nullptr;
    size_t n_ = 0;
};

// Random F16 values, normal(0, sd), and their exact F32 values.
inline std::vector<uint16_t> random_f16(std::mt19937& rng, size_t n, float sd = 1.0f) {
    std::normal_distribution<float> d(0.0f, sd);
    std::vector<uint16_t>           v(n);
    for (auto& x : v) x = f32_to_f16(d(rng));
    return v;
}
inline std::vector<float> to_f32(const std::vector<uint16_t>& h) {
    std::vector<float> v(h.size());
    for (size_t i = 0; i < h.size(); ++i) v[i] = f16_to_f32(h[i]);
    return v;
}

// Fresh seed per run (printed by the caller on failure), so that every run draws new inputs;
// GPTQ_TEST_SEED=N replays a printed one.
inline uint32_t fresh_seed() {
    if (const char* e = std::getenv("GPTQ_TEST_SEED"); e && *e) return uint32_t(std::strtoul(e, nullptr, 10));
    return std::random_device{}();
}

}  // namespace gptq::test
