#include "core/tensor.h"

#include "core/error.h"

namespace gptq {

tensor_view tensor_view::contiguous(void* data, dtype type, const int64_t* shape, int n_dims, device dev) {
    GPTQ_ASSERT(n_dims >= 0 && n_dims <= k_max_dims);
    tensor_view v;
    v.data         = data;
    v.type         = type;
    v.dev          = dev;
    v.n_dims       = n_dims;
    int64_t stride = 1;
    for (int i = n_dims - 1; i >= 0; --i) {
        v.shape[static_cast<size_t>(i)]   = shape[i];
        v.strides[static_cast<size_t>(i)] = stride;
        stride *= shape[i];
    }
    return v;
}

tensor_view tensor_view::contiguous(void* data, dtype type, std::initializer_list<int64_t> shape, device dev) {
    return contiguous(data, type, shape.begin(), static_cast<int>(shape.size()), dev);
}

int64_t tensor_view::numel() const {
    int64_t n = 1;
    for (int i = 0; i < n_dims; ++i) n *= shape[static_cast<size_t>(i)];
    return n;
}

bool tensor_view::is_contiguous() const {
    int64_t stride = 1;
    for (int i = n_dims - 1; i >= 0; --i) {
        const auto s = static_cast<size_t>(i);
        if (shape[s] != 1 && strides[s] != stride) return false;
        stride *= shape[s];
    }
    return true;
}

std::string tensor_view::shape_string() const {
    std::string s = "[";
    for (int i = 0; i < n_dims; ++i) {
        if (i) s += ", ";
        s += std::to_string(shape[static_cast<size_t>(i)]);
    }
    return s + "]";
}

}  // namespace gptq
