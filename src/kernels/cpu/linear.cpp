#include "kernels/cpu/linear.h"

#include <cblas.h>

#include <algorithm>
#include <mutex>

#include "core/thread_pool.h"

namespace gptq::cpu {

void blas_init_single_threaded() {
    static std::once_flag once;
    std::call_once(once, [] { openblas_set_num_threads(1); });
}

void linear_ref(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k) {
    for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
            double acc = bias ? bias[j] : 0.0;
            for (int64_t l = 0; l < k; ++l) acc += static_cast<double>(x[i * k + l]) * w[j * k + l];
            y[i * n + j] = static_cast<float>(acc);
        }
    }
}

namespace {
// Output features per slice: a multiple of 16 keeps sgemm's packed panels whole; small enough that
// two threads share the work evenly on the smallest layers we run (n = 16 .. 152k).
constexpr int64_t k_slice_align = 16;
// Up to this many rows, one sgemv per row instead of one sgemm (see linear_slice); measured on the
// tiny-llama decode step (docs/generate.md).
constexpr int64_t k_gemv_max_rows = 4;
// With 2..4 rows, the slice is walked in blocks of output features whose weights (about this many
// bytes) stay in the core's L2 while every row's sgemv reads them: the weights come from memory
// once per block instead of once per row (a batch-4 decode step cost 3.3-4.1x a batch-1 step
// before; docs/perf-notes.md).
constexpr int64_t k_gemv_block_bytes = 256 * 1024;

void linear_slice(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k,
                  int64_t j0, int64_t j1) {
    const int64_t nj = j1 - j0;
    if (nj <= 0) return;
    if (bias) {
        for (int64_t i = 0; i < m; ++i) std::copy(bias + j0, bias + j1, y + i * n + j0);
    }
    if (m <= k_gemv_max_rows) {
        // Decode-sized batches: sgemm would pack (copy) the weight slice on every call, which for a
        // few rows costs more than the product itself; sgemv reads the weights in place. beta = 1
        // over a zeroed (or bias-filled) y, since not every BLAS clears y when beta = 0.
        if (!bias)
            for (int64_t i = 0; i < m; ++i) std::fill(y + i * n + j0, y + i * n + j1, 0.0f);
        const int64_t rows = m == 1 ? nj : std::max<int64_t>(k_slice_align, k_gemv_block_bytes / (4 * k));
        for (int64_t b0 = j0; b0 < j1; b0 += rows) {
            const int64_t nb = std::min(rows, j1 - b0);
            for (int64_t i = 0; i < m; ++i)
                cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<blasint>(nb), static_cast<blasint>(k), 1.0f,
                            w + b0 * k, static_cast<blasint>(k), x + i * k, 1, 1.0f, y + i * n + b0, 1);
        }
        return;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<blasint>(m), static_cast<blasint>(nj),
                static_cast<blasint>(k), 1.0f, x, static_cast<blasint>(k), w + j0 * k, static_cast<blasint>(k),
                bias ? 1.0f : 0.0f, y + j0, static_cast<blasint>(n));
}
}  // namespace

void linear_blas(const float* x, const float* w, const float* bias, float* y, int64_t m, int64_t n, int64_t k,
                 thread_pool* pool) {
    if (m == 0 || n == 0) return;
    if (k == 0) {  // sgemm with k = 0 leaves y untouched when beta = 0 is not applied by all BLASes
        for (int64_t i = 0; i < m; ++i)
            for (int64_t j = 0; j < n; ++j) y[i * n + j] = bias ? bias[j] : 0.0f;
        return;
    }
    blas_init_single_threaded();
    const int n_threads = pool ? pool->n_threads() : 1;
    if (n_threads == 1 || n < 2 * k_slice_align) {
        linear_slice(x, w, bias, y, m, n, k, 0, n);
        return;
    }
    const int64_t n_blocks = (n + k_slice_align - 1) / k_slice_align;
    pool->parallel_for(n_blocks, [&](int64_t b0, int64_t b1) {
        linear_slice(x, w, bias, y, m, n, k, b0 * k_slice_align, std::min(n, b1 * k_slice_align));
    });
}

}  // namespace gptq::cpu
