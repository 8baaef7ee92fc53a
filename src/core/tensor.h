// tensor_view: a non-owning view of a strided n-d array (data, shape, strides, dtype, device).
//
// Shapes are outermost first, as in PyTorch and safetensors ([rows, cols] row-major means
// strides {cols, 1}). Strides count elements, not bytes. The view never owns or frees memory.
#pragma once

#include <array>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "core/dtype.h"

namespace gptq {

enum class device_kind : uint8_t { DEVICE_CPU, DEVICE_CUDA };

struct device {
    device_kind kind  = device_kind::DEVICE_CPU;
    int         index = 0;  // CUDA ordinal; 0 for CPU

    bool operator==(const device&) const = default;
};

constexpr int k_max_dims = 6;

struct tensor_view {
    void*                           data   = nullptr;
    dtype                           type   = dtype::DTYPE_F32;
    device                          dev    = {};
    int                             n_dims = 0;
    std::array<int64_t, k_max_dims> shape{};    // [n_dims] outermost first
    std::array<int64_t, k_max_dims> strides{};  // [n_dims] in elements

    // A contiguous row-major view of `shape`. Asserts on more than k_max_dims dimensions.
    static tensor_view contiguous(void* data, dtype type, std::initializer_list<int64_t> shape, device dev = {});
    static tensor_view contiguous(void* data, dtype type, const int64_t* shape, int n_dims, device dev = {});

    int64_t numel() const;
    size_t  nbytes() const { return static_cast<size_t>(numel()) * dtype_size(type); }
    bool    is_contiguous() const;
    int64_t dim(int i) const { return shape[static_cast<size_t>(i)]; }

    template <typename T>
    T* as() const {
        return static_cast<T*>(data);
    }

    std::string shape_string() const;  // "[4096, 11008]"
};

}  // namespace gptq
