// ops_cuda.h, its last section: a timeline of CUDA events for per-op timing of the forward pass
// (llama_cuda_model's profile_ops) and the strided KV-cache store of the fused q/k/v projection.
// Kept out of ops_cuda.cpp, whose host <-> device copies are being reworked separately.
#include <cuda_runtime.h>

#include <utility>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/kv_cache.cuh"
#include "ops/ops_cuda.h"

namespace gptq {

cuda_timeline::~cuda_timeline() {
    for (void* e : ev_) cudaEventDestroy(static_cast<cudaEvent_t>(e));
}
cuda_timeline::cuda_timeline(cuda_timeline&& o) noexcept : ev_(std::exchange(o.ev_, {})), n_(std::exchange(o.n_, 0)) {}
cuda_timeline& cuda_timeline::operator=(cuda_timeline&& o) noexcept {
    if (this != &o) {
        this->~cuda_timeline();
        ev_ = std::exchange(o.ev_, {});
        n_  = std::exchange(o.n_, 0);
    }
    return *this;
}

status cuda_timeline::mark(cudaStream_t s) {
    if (n_ == ev_.size()) {
        cudaEvent_t e = nullptr;
        GPTQ_CUDA_CHECK(cudaEventCreate(&e));  // with timing
        ev_.push_back(e);
    }
    GPTQ_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(ev_[n_]), s));
    ++n_;
    return status::ok();
}

result<std::vector<float>> cuda_timeline::intervals_ms() const {
    std::vector<float> ms;
    if (n_ < 2) return ms;
    GPTQ_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(ev_[n_ - 1])));
    ms.resize(n_ - 1);
    for (size_t i = 0; i + 1 < n_; ++i)
        GPTQ_CUDA_CHECK(
            cudaEventElapsedTime(&ms[i], static_cast<cudaEvent_t>(ev_[i]), static_cast<cudaEvent_t>(ev_[i + 1])));
    return ms;
}

status op_cuda_kv_store_strided(cuda_context& ctx, const uint16_t* k, const uint16_t* v, int64_t src_stride,
                                uint16_t* cache_k, uint16_t* cache_v, const int32_t* pos_dev, int64_t n_tokens,
                                int64_t kv_dim, int64_t n_ctx) {
    return cuda::kv_store_f16(k, v, src_stride, cache_k, cache_v, pos_dev, n_tokens, kv_dim, n_ctx, ctx.stream());
}

}  // namespace gptq
