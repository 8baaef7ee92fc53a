// CUDA dispatch of ops (GPTQ_CUDA builds only): context, buffers, shape checks at the boundary,
// the choice between kernels (decode vs prefill attention, fast int4 vs generic GPTQ), and the
// one-time preparation of GPTQ layers (act-order permutation, repacking).
#include "ops/ops_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <utility>
#include <vector>

#include "kernels/cuda/activation.cuh"
#include "kernels/cuda/attention.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/embedding.cuh"
#include "kernels/cuda/gemm.cuh"
#include "kernels/cuda/gptq_int4.cuh"
#include "kernels/cuda/gptq_int4_gemm.cuh"
#include "kernels/cuda/gptq_linear.cuh"
#include "kernels/cuda/kv_cache.cuh"
#include "kernels/cuda/logits_top.cuh"
#include "kernels/cuda/lora.cuh"
#include "kernels/cuda/norm.cuh"
#include "kernels/cuda/rope.cuh"
#include "ops/ops_cuda_gptq.h"  // op_cuda_f16_to_f32

namespace gptq {

// ---- staged host <-> device copies ---------------------------------------------------------------
// Large copies between pageable host memory and the device go through two pinned chunks: on the
// lent H100 machines (sandboxed) pageable copies ran at about 1 GB/s (GPTQ on the GPU of a 7B
// shape spent most of its time in them; docs/perf-notes.md), pinned ones at ~50 GB/s. The host
// copies a chunk into pinned memory while the device copies the previous one. Copies below
// k_stage_min, from or to pinned or device memory, on another device than the chunks' events,
// or when pinned memory cannot be had, are plain cudaMemcpyAsync.
namespace {
constexpr size_t k_stage_min   = size_t(4) << 20;
constexpr size_t k_stage_chunk = size_t(16) << 20;

struct staging_area {
    std::mutex  mu;
    bool        tried = false, ok = false;
    int         device = -1;
    void*       buf[2] = {nullptr, nullptr};
    cudaEvent_t ev[2]  = {nullptr, nullptr};
};
staging_area& staging() {
    static staging_area* s = new staging_area();  // process lifetime (freed by the driver at exit)
    return *s;
}

bool pageable(const void* p) {
    cudaPointerAttributes a{};
    if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
        cudaGetLastError();
        return true;
    }
    return a.type == cudaMemoryTypeUnregistered;
}

// Locks the area and makes it ready on the current device; false: use a plain copy.
bool staging_ready(staging_area& s) {
    int dev = -1;
    if (cudaGetDevice(&dev) != cudaSuccess) {
        cudaGetLastError();
        return false;
    }
    if (!s.tried) {
        s.tried  = true;
        s.device = dev;
        s.ok     = true;
        for (int i = 0; i < 2 && s.ok; ++i)
            s.ok = cudaHostAlloc(&s.buf[i], k_stage_chunk, cudaHostAllocPortable) == cudaSuccess &&
                   cudaEventCreateWithFlags(&s.ev[i], cudaEventDisableTiming) == cudaSuccess;
        if (!s.ok) cudaGetLastError();
    }
    return s.ok && s.device == dev;
}

// Host -> device on stream st. Returns once src has been read; with `wait`, once the copy is done.
status copy_h2d(void* dst, const void* src, size_t bytes, cudaStream_t st, bool wait) {
    if (bytes == 0) return status::ok();
    staging_area& s = staging();
    if (bytes >= k_stage_min && pageable(src)) {
        std::lock_guard<std::mutex> lock(s.mu);
        if (staging_ready(s)) {
            for (size_t off = 0, i = 0; off < bytes; off += k_stage_chunk, ++i) {
                const size_t n = std::min(k_stage_chunk, bytes - off);
                const int    b = int(i % 2);
                GPTQ_CUDA_CHECK(cudaEventSynchronize(s.ev[b]));  // the device has read the chunk's last use
                std::memcpy(s.buf[b], static_cast<const char*>(src) + off, n);
                GPTQ_CUDA_CHECK(
                    cudaMemcpyAsync(static_cast<char*>(dst) + off, s.buf[b], n, cudaMemcpyHostToDevice, st));
                GPTQ_CUDA_CHECK(cudaEventRecord(s.ev[b], st));
            }
            if (wait)
                for (cudaEvent_t e : s.ev) GPTQ_CUDA_CHECK(cudaEventSynchronize(e));
            return status::ok();
        }
    }
    GPTQ_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, st));
    if (wait) GPTQ_CUDA_CHECK(cudaStreamSynchronize(st));
    return status::ok();
}

// Device -> host on stream st; returns when dst holds the bytes.
status copy_d2h(void* dst, const void* src, size_t bytes, cudaStream_t st) {
    if (bytes == 0) return status::ok();
    staging_area& s = staging();
    if (bytes >= k_stage_min && pageable(dst)) {
        std::lock_guard<std::mutex> lock(s.mu);
        if (staging_ready(s)) {
            // Chunk i goes to buf[i % 2]; chunk i - 1 is copied out while chunk i is in flight.
            size_t prev_off = 0, prev_n = 0;
            int    prev_b = -1;
            for (size_t off = 0, i = 0; off < bytes; off += k_stage_chunk, ++i) {
                const size_t n = std::min(k_stage_chunk, bytes - off);
                const int    b = int(i % 2);
                GPTQ_CUDA_CHECK(cudaEventSynchronize(s.ev[b]));
                GPTQ_CUDA_CHECK(
                    cudaMemcpyAsync(s.buf[b], static_cast<const char*>(src) + off, n, cudaMemcpyDeviceToHost, st));
                GPTQ_CUDA_CHECK(cudaEventRecord(s.ev[b], st));
                if (prev_b >= 0) {
                    GPTQ_CUDA_CHECK(cudaEventSynchronize(s.ev[prev_b]));
                    std::memcpy(static_cast<char*>(dst) + prev_off, s.buf[prev_b], prev_n);
                }
                prev_off = off;
                prev_n   = n;
                prev_b   = b;
            }
            GPTQ_CUDA_CHECK(cudaEventSynchronize(s.ev[prev_b]));
            std::memcpy(static_cast<char*>(dst) + prev_off, s.buf[prev_b], prev_n);
            return status::ok();
        }
    }
    GPTQ_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, st));
    GPTQ_CUDA_CHECK(cudaStreamSynchronize(st));
    return status::ok();
}
}  // namespace

// ---- cuda_buffer -------------------------------------------------------------------------------

cuda_buffer::~cuda_buffer() {
    if (p_ && owned_) cudaFree(p_);
}
cuda_buffer::cuda_buffer(cuda_buffer&& o) noexcept
    : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)), owned_(std::exchange(o.owned_, true)) {}
cuda_buffer& cuda_buffer::operator=(cuda_buffer&& o) noexcept {
    if (this != &o) {
        if (p_ && owned_) cudaFree(p_);
        p_     = std::exchange(o.p_, nullptr);
        n_     = std::exchange(o.n_, 0);
        owned_ = std::exchange(o.owned_, true);
    }
    return *this;
}

cuda_buffer cuda_buffer::borrow(void* p, size_t bytes) {
    cuda_buffer b;
    b.p_     = p;
    b.n_     = bytes;
    b.owned_ = false;
    return b;
}

result<cuda_buffer> cuda_buffer::alloc(size_t bytes) {
    cuda_buffer b;
    if (bytes == 0) return b;
    const cudaError_t err = cudaMalloc(&b.p_, bytes);
    if (err != cudaSuccess) {
        cudaGetLastError();
        size_t free = 0, total = 0;
        int    dev = -1;
        cudaGetDevice(&dev);
        if (cudaMemGetInfo(&free, &total) != cudaSuccess) cudaGetLastError();
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "cudaMalloc of {} bytes ({:.1f} MiB) failed on cuda:{}: {} ({:.1f} MiB free of {:.1f} MiB)",
                          bytes, bytes / 1048576.0, dev, cudaGetErrorString(err), free / 1048576.0, total / 1048576.0);
    }
    b.n_ = bytes;
    return b;
}

result<cuda_buffer> cuda_buffer::from_host(const void* src, size_t bytes) {
    auto b = alloc(bytes);
    if (!b) return b.error();
    GPTQ_TRY(b->upload(src, bytes));
    return b;
}

status cuda_buffer::upload(const void* src, size_t bytes, size_t offset) {
    GPTQ_ASSERT(offset + bytes <= n_);
    // Synchronous, as cudaMemcpy: callers use the bytes from other streams right after.
    return copy_h2d(static_cast<char*>(p_) + offset, src, bytes, nullptr, /*wait=*/true);
}

status cuda_buffer::download(void* dst, size_t bytes, size_t offset) const {
    GPTQ_ASSERT(offset + bytes <= n_);
    return copy_d2h(dst, static_cast<const char*>(p_) + offset, bytes, nullptr);
}

// ---- cuda_context ------------------------------------------------------------------------------

// One dequantize slot: `ahead` while work queued on the side stream for `key` waits to be taken;
// `busy` between dequant_take and dequant_release; `ready` recorded on the side stream after its
// fill, `used` on the main stream after the ops that read the slot.
struct cuda_dequant_slot_state {
    cuda_buffer buf;
    const void* key   = nullptr;
    bool        ahead = false, busy = false, side_wrote = false;
    uint64_t    stamp = 0;  // last take or ahead (least recently used first)
    cudaEvent_t ready = nullptr, used = nullptr;
};

struct cuda_context_state {
    int                     device = 0, sm = 0;
    cudaStream_t            stream = nullptr;
    cublasHandle_t          blas   = nullptr;
    cuda_buffer             scratch;
    cuda_buffer             zeroed;
    cuda_buffer             counters;        // k_context_counters zeros, allocated with the context, never moved
    cudaStream_t            side = nullptr;  // dequantize ahead (created on first use)
    cuda_dequant_slot_state dq[2];
    uint64_t                dq_clock = 0;
};

result<std::unique_ptr<cuda_context>> cuda_context::create(int device) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
        cudaGetLastError();
        return make_error(status_code::STATUS_UNSUPPORTED, "no CUDA device available (asked for cuda:{})", device);
    }
    if (device < 0 || device >= n)
        return make_error(status_code::STATUS_INVALID_ARGUMENT, "CUDA device {} does not exist ({} present)", device,
                          n);
    std::unique_ptr<cuda_context> ctx(new cuda_context());
    ctx->s_         = std::make_unique<cuda_context_state>();
    ctx->s_->device = device;
    GPTQ_CUDA_CHECK(cudaSetDevice(device));
    cudaDeviceProp prop{};
    GPTQ_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    ctx->s_->sm = prop.major * 10 + prop.minor;
    GPTQ_CUDA_CHECK(cudaStreamCreateWithFlags(&ctx->s_->stream, cudaStreamNonBlocking));
    GPTQ_CUBLAS_CHECK(cublasCreate(&ctx->s_->blas));
    GPTQ_CUBLAS_CHECK(cublasSetStream(ctx->s_->blas, ctx->s_->stream));
    GPTQ_ASSIGN_OR_RETURN(ctx->s_->counters, cuda_buffer::alloc(size_t(k_context_counters) * sizeof(unsigned)));
    GPTQ_CUDA_CHECK(cudaMemset(ctx->s_->counters.data(), 0, size_t(k_context_counters) * sizeof(unsigned)));
    return ctx;
}

unsigned* cuda_context::counters(int64_t n) {
    return n >= 0 && n <= k_context_counters ? s_->counters.as<unsigned>() : nullptr;
}

cuda_context::~cuda_context() {
    if (!s_) return;
    if (s_->side) cudaStreamSynchronize(s_->side);
    for (auto& d : s_->dq) {
        if (d.ready) cudaEventDestroy(d.ready);
        if (d.used) cudaEventDestroy(d.used);
    }
    if (s_->side) cudaStreamDestroy(s_->side);
    if (s_->blas) cublasDestroy(s_->blas);
    if (s_->stream) cudaStreamDestroy(s_->stream);
}

int cuda_context::device() const {
    return s_->device;
}
int cuda_context::sm_version() const {
    return s_->sm;
}
cudaStream_t cuda_context::stream() const {
    return s_->stream;
}
cublasHandle_t cuda_context::blas() const {
    return s_->blas;
}
status cuda_context::synchronize() const {
    GPTQ_CUDA_CHECK(cudaStreamSynchronize(s_->stream));
    return status::ok();
}

result<void*> cuda_context::scratch(size_t bytes) {
    if (s_->scratch.bytes() < bytes) {
        GPTQ_TRY(synchronize());  // the old scratch may still be in use by queued work
        auto b = cuda_buffer::alloc(bytes);
        if (!b) return b.error();
        s_->scratch = std::move(*b);
    }
    return s_->scratch.data();
}

namespace {
// Grows a dequantize slot: whatever may still read or write it (both streams) has run first.
status dequant_slot_grow(cuda_context_state& s, cuda_dequant_slot_state& d, size_t bytes) {
    if (d.buf.bytes() >= bytes) return status::ok();
    GPTQ_CUDA_CHECK(cudaStreamSynchronize(s.stream));
    if (s.side) GPTQ_CUDA_CHECK(cudaStreamSynchronize(s.side));
    d.buf    = cuda_buffer{};
    auto buf = cuda_buffer::alloc(bytes);
    if (!buf) return buf.error();
    d.buf = std::move(*buf);
    return status::ok();
}

status dequant_events(cuda_dequant_slot_state& d) {
    if (!d.ready) GPTQ_CUDA_CHECK(cudaEventCreateWithFlags(&d.ready, cudaEventDisableTiming));
    if (!d.used) GPTQ_CUDA_CHECK(cudaEventCreateWithFlags(&d.used, cudaEventDisableTiming));
    return status::ok();
}
}  // namespace

result<cuda_context::dequant_slot> cuda_context::dequant_take(const void* key, size_t bytes) {
    auto& s = *s_;
    for (auto& d : s.dq) {
        if (d.ahead && d.key == key && d.buf.bytes() >= bytes) {
            GPTQ_CUDA_CHECK(cudaStreamWaitEvent(s.stream, d.ready, 0));
            d.ahead = false, d.busy = true, d.stamp = ++s.dq_clock;
            return dequant_slot{d.buf.as<uint16_t>(), true};
        }
    }
    // A slot to fill on the stream: one without work queued ahead, preferring one already large
    // enough, else one to grow rather than a second allocation (without dequantize-ahead only one
    // slot is ever allocated: no more memory than the scratch this path used before), then the least
    // recently used; with both queued ahead (the pass took them in another order), the older one.
    auto better = [bytes](const cuda_dequant_slot_state& a, const cuda_dequant_slot_state& b) {
        if (a.ahead != b.ahead) return !a.ahead;
        const bool fits_a = a.buf.bytes() >= bytes, fits_b = b.buf.bytes() >= bytes;
        if (fits_a != fits_b) return fits_a;
        if (!fits_a && (a.buf.bytes() > 0) != (b.buf.bytes() > 0)) return a.buf.bytes() > 0;  // grow, not a second
        return a.stamp < b.stamp;
    };
    cuda_dequant_slot_state* pick = nullptr;
    for (auto& d : s.dq)
        if (!d.busy && (!pick || better(d, *pick))) pick = &d;
    if (!pick) return make_error(status_code::STATUS_INTERNAL, "dequant_take: both slots taken");
    GPTQ_TRY(dequant_events(*pick));
    if (pick->side_wrote) GPTQ_CUDA_CHECK(cudaStreamWaitEvent(s.stream, pick->ready, 0));  // its fill is over
    GPTQ_TRY(dequant_slot_grow(s, *pick, bytes));
    pick->key = key, pick->ahead = false, pick->busy = true, pick->side_wrote = false, pick->stamp = ++s.dq_clock;
    return dequant_slot{pick->buf.as<uint16_t>(), false};
}

status cuda_context::dequant_release(const void* key) {
    for (auto& d : s_->dq) {
        if (d.busy && d.key == key) {
            GPTQ_CUDA_CHECK(cudaEventRecord(d.used, s_->stream));
            d.busy = false, d.key = nullptr;
            return status::ok();
        }
    }
    return make_error(status_code::STATUS_INTERNAL, "dequant_release: no slot taken for this key");
}

status cuda_context::dequant_ahead(const void* key, size_t                                               bytes,
                                   status (*fill)(const void* arg, cudaStream_t, uint16_t*), const void* arg) {
    auto&                   s  = *s_;
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    GPTQ_CUDA_CHECK(cudaStreamIsCapturing(s.stream, &cs));
    if (cs != cudaStreamCaptureStatusNone) return status::ok();
    cuda_dequant_slot_state* pick = nullptr;
    for (auto& d : s.dq) {
        if (d.ahead && d.key == key) return status::ok();
        if (!d.busy && !d.ahead && (!pick || d.stamp < pick->stamp)) pick = &d;
    }
    if (!pick) return status::ok();
    if (!s.side) GPTQ_CUDA_CHECK(cudaStreamCreateWithFlags(&s.side, cudaStreamNonBlocking));
    GPTQ_TRY(dequant_events(*pick));
    if (pick->buf.bytes() < bytes && !dequant_slot_grow(s, *pick, bytes).is_ok()) {
        cudaGetLastError();  // out of memory: this linear dequantizes on the stream when taken
        return status::ok();
    }
    GPTQ_CUDA_CHECK(cudaStreamWaitEvent(s.side, pick->used, 0));  // the ops that read it last have run
    GPTQ_TRY(fill(arg, s.side, pick->buf.as<uint16_t>()));
    GPTQ_CUDA_CHECK(cudaEventRecord(pick->ready, s.side));
    pick->key = key, pick->ahead = true, pick->side_wrote = true, pick->stamp = ++s.dq_clock;
    return status::ok();
}

void cuda_context::dequant_forget() {
    for (auto& d : s_->dq)
        if (d.ahead) d.ahead = false, d.key = nullptr;  // side_wrote stays: a take waits for the fill
}

result<void*> cuda_context::zeroed_workspace(size_t bytes) {
    if (s_->zeroed.bytes() < bytes) {
        GPTQ_TRY(synchronize());
        auto b = cuda_buffer::alloc(bytes);
        if (!b) return b.error();
        GPTQ_CUDA_CHECK(cudaMemset(b->data(), 0, bytes));
        s_->zeroed = std::move(*b);
    }
    return s_->zeroed.data();
}

result<cuda_memory_info> cuda_memory_info_get(const cuda_context& ctx) {
    GPTQ_CUDA_CHECK(cudaSetDevice(ctx.device()));
    cuda_memory_info m;
    GPTQ_CUDA_CHECK(cudaMemGetInfo(&m.free, &m.total));
    return m;
}

status cuda_copy_to_device_async(cuda_context& ctx, void* dst, const void* src, size_t bytes) {
    return copy_h2d(dst, src, bytes, ctx.stream(), /*wait=*/false);
}

status cuda_zero_async(cuda_context& ctx, void* dst, size_t bytes) {
    if (bytes) GPTQ_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, ctx.stream()));
    return status::ok();
}

status cuda_copy_device_async(cuda_context& ctx, void* dst, const void* src, size_t bytes) {
    if (bytes) GPTQ_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, ctx.stream()));
    return status::ok();
}

status cuda_copy_to_host(cuda_context& ctx, void* dst, const void* src, size_t bytes) {
    GPTQ_TRY(copy_d2h(dst, src, bytes, ctx.stream()));
    return ctx.synchronize();
}

// ---- offload: pinned host memory, streams, events ------------------------------------------------

cuda_host_buffer::~cuda_host_buffer() {
    if (p_) cudaFreeHost(p_);
}
cuda_host_buffer::cuda_host_buffer(cuda_host_buffer&& o) noexcept
    : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
cuda_host_buffer& cuda_host_buffer::operator=(cuda_host_buffer&& o) noexcept {
    if (this != &o) {
        if (p_) cudaFreeHost(p_);
        p_ = std::exchange(o.p_, nullptr);
        n_ = std::exchange(o.n_, 0);
    }
    return *this;
}

result<cuda_host_buffer> cuda_host_buffer::alloc(size_t bytes) {
    cuda_host_buffer b;
    if (bytes == 0) return b;
    const cudaError_t err = cudaHostAlloc(&b.p_, bytes, cudaHostAllocDefault);
    if (err != cudaSuccess) {
        cudaGetLastError();
        b.p_ = nullptr;
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "cudaHostAlloc of {} bytes ({:.1f} MiB) of pinned host memory failed: {}", bytes,
                          bytes / 1048576.0, cudaGetErrorString(err));
    }
    b.n_ = bytes;
    return b;
}

cuda_stream::~cuda_stream() {
    if (s_) {
        cudaStreamSynchronize(s_);
        cudaStreamDestroy(s_);
    }
}
cuda_stream::cuda_stream(cuda_stream&& o) noexcept : s_(std::exchange(o.s_, nullptr)) {}
cuda_stream& cuda_stream::operator=(cuda_stream&& o) noexcept {
    if (this != &o) {
        this->~cuda_stream();
        s_ = std::exchange(o.s_, nullptr);
    }
    return *this;
}

result<cuda_stream> cuda_stream::create(const cuda_context& ctx) {
    GPTQ_CUDA_CHECK(cudaSetDevice(ctx.device()));
    cuda_stream s;
    GPTQ_CUDA_CHECK(cudaStreamCreateWithFlags(&s.s_, cudaStreamNonBlocking));
    return s;
}

status cuda_stream::synchronize() const {
    if (s_) GPTQ_CUDA_CHECK(cudaStreamSynchronize(s_));
    return status::ok();
}

cuda_event::~cuda_event() {
    if (e_) cudaEventDestroy(static_cast<cudaEvent_t>(e_));
}
cuda_event::cuda_event(cuda_event&& o) noexcept : e_(std::exchange(o.e_, nullptr)) {}
cuda_event& cuda_event::operator=(cuda_event&& o) noexcept {
    if (this != &o) {
        this->~cuda_event();
        e_ = std::exchange(o.e_, nullptr);
    }
    return *this;
}

result<cuda_event> cuda_event::create() {
    cuda_event  e;
    cudaEvent_t ev = nullptr;
    GPTQ_CUDA_CHECK(cudaEventCreateWithFlags(&ev, cudaEventDisableTiming));
    e.e_ = ev;
    return e;
}

result<cuda_event> cuda_event::create_timing() {
    cuda_event  e;
    cudaEvent_t ev = nullptr;
    GPTQ_CUDA_CHECK(cudaEventCreate(&ev));
    e.e_ = ev;
    return e;
}

result<double> cuda_event::elapsed_seconds(const cuda_event& start, const cuda_event& end) {
    GPTQ_CUDA_CHECK(cudaEventSynchronize(static_cast<cudaEvent_t>(end.e_)));
    float ms = 0.0f;
    GPTQ_CUDA_CHECK(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.e_), static_cast<cudaEvent_t>(end.e_)));
    return double(ms) * 1e-3;
}

status cuda_event::record(cudaStream_t s) const {
    GPTQ_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(e_), s));
    return status::ok();
}

status cuda_event::wait_on(cudaStream_t s) const {
    GPTQ_CUDA_CHECK(cudaStreamWaitEvent(s, static_cast<cudaEvent_t>(e_), 0));
    return status::ok();
}

status cuda_copy_to_device_on(cudaStream_t s, void* dst, const void* src, size_t bytes) {
    if (bytes) GPTQ_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, s));
    return status::ok();
}

// ---- cuda_graph --------------------------------------------------------------------------------

cuda_graph::~cuda_graph() {
    if (exec_) cudaGraphExecDestroy(static_cast<cudaGraphExec_t>(exec_));
    if (graph_) cudaGraphDestroy(static_cast<cudaGraph_t>(graph_));
}
cuda_graph::cuda_graph(cuda_graph&& o) noexcept
    : graph_(std::exchange(o.graph_, nullptr)), exec_(std::exchange(o.exec_, nullptr)) {}
cuda_graph& cuda_graph::operator=(cuda_graph&& o) noexcept {
    if (this != &o) {
        this->~cuda_graph();
        graph_ = std::exchange(o.graph_, nullptr);
        exec_  = std::exchange(o.exec_, nullptr);
    }
    return *this;
}

status cuda_graph::capture_begin(cuda_context& ctx) {
    // Thread-local mode: other threads' CUDA calls are not affected by this capture.
    GPTQ_CUDA_CHECK(cudaStreamBeginCapture(ctx.stream(), cudaStreamCaptureModeThreadLocal));
    return status::ok();
}

result<cuda_graph> cuda_graph::capture_end(cuda_context& ctx, bool captured_ok) {
    cudaGraph_t       g   = nullptr;
    const cudaError_t err = cudaStreamEndCapture(ctx.stream(), &g);
    cuda_graph        out;
    out.graph_ = g;
    if (!captured_ok) {
        cudaGetLastError();
        return make_error(status_code::STATUS_INTERNAL, "CUDA graph capture abandoned (an op failed while capturing)");
    }
    GPTQ_CUDA_CHECK(err);
    cudaGraphExec_t exec = nullptr;
    GPTQ_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
    out.exec_ = exec;
    return out;
}

status cuda_graph::launch(cuda_context& ctx) const {
    GPTQ_ASSERT(exec_);
    GPTQ_CUDA_CHECK(cudaGraphLaunch(static_cast<cudaGraphExec_t>(exec_), ctx.stream()));
    return status::ok();
}

// ---- element-wise ------------------------------------------------------------------------------

status op_cuda_rms_norm(cuda_context& ctx, const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t n_rows,
                        int64_t dim, float eps) {
    return cuda::rms_norm_f16(x, w, y, n_rows, dim, dim, dim, eps, ctx.stream());
}

status op_cuda_rope(cuda_context& ctx, uint16_t* x, const float* cos, const float* sin, int64_t n_tokens,
                    int64_t n_heads, int64_t head_dim, int64_t row_stride) {
    GPTQ_ASSERT(row_stride >= n_heads * head_dim);
    return cuda::rope_f16(x, cos, sin, n_tokens, n_heads, head_dim, row_stride, ctx.stream());
}

status op_cuda_silu_mul(cuda_context& ctx, const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows,
                        int64_t n, int64_t gate_stride, int64_t up_stride, int64_t y_stride, const int32_t* perm,
                        int64_t block) {
    return cuda::silu_mul_f16(gate, up, y, n_rows, n, gate_stride, up_stride, y_stride, ctx.stream(), perm, block);
}

status op_cuda_gelu_tanh_mul(cuda_context& ctx, const uint16_t* gate, const uint16_t* up, uint16_t* y, int64_t n_rows,
                             int64_t n, int64_t gate_stride, int64_t up_stride, int64_t y_stride, const int32_t* perm,
                             int64_t block) {
    return cuda::gelu_tanh_mul_f16(gate, up, y, n_rows, n, gate_stride, up_stride, y_stride, ctx.stream(), perm, block);
}

status op_cuda_softcap(cuda_context& ctx, float* x, int64_t n, float cap) {
    return cuda::softcap_f32(x, n, cap, ctx.stream());
}

status op_cuda_logits_top(cuda_context& ctx, const float* logits, int64_t rows, int64_t n_vocab, int64_t k,
                          const float* inv_temp, int32_t* ids, float* vals, double* sums) {
    return cuda::logits_top_f32(logits, rows, n_vocab, k, inv_temp, ids, vals, sums, ctx.stream());
}

status op_cuda_add_rms_norm(cuda_context& ctx, uint16_t* h, const uint16_t* add, const uint16_t* w, uint16_t* y,
                            int64_t n_rows, int64_t dim, float eps, const int32_t* perm) {
    return cuda::add_rms_norm_f16(h, add, w, y, perm, n_rows, dim, dim, dim, dim, eps, ctx.stream());
}

status op_cuda_rope_kv_store(cuda_context& ctx, uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t q_stride,
                             int64_t kv_stride, const float* cos, const float* sin, int64_t n_tokens, int64_t n_head,
                             int64_t n_head_kv, int64_t head_dim, uint16_t* cache_k, uint16_t* cache_v,
                             const int32_t* pos_dev, const int32_t* seq_dev, const cuda_kv_pages& pages,
                             int64_t n_ctx) {
    const cuda::kv_page_map m{pages.pages, pages.page_size, pages.pages_stride};
    return cuda::rope_kv_store_f16(q, k, v, q_stride, kv_stride, cos, sin, n_tokens, n_head, n_head_kv, head_dim,
                                   cache_k, cache_v, pos_dev, seq_dev, m, n_ctx, ctx.stream());
}

status op_cuda_add(cuda_context& ctx, uint16_t* x, const uint16_t* y, int64_t n) {
    return cuda::add_f16(x, y, n, ctx.stream());
}

status op_cuda_add_bias(cuda_context& ctx, uint16_t* x, const uint16_t* bias, int64_t n_rows, int64_t n) {
    return cuda::add_bias_f16(x, bias, n_rows, n, n, ctx.stream());
}

static_assert(sizeof(cuda_lora_slot) == sizeof(cuda::lora_slot) &&
                  offsetof(cuda_lora_slot, a) == offsetof(cuda::lora_slot, a) &&
                  offsetof(cuda_lora_slot, b) == offsetof(cuda::lora_slot, b) &&
                  offsetof(cuda_lora_slot, r) == offsetof(cuda::lora_slot, r) &&
                  offsetof(cuda_lora_slot, scale) == offsetof(cuda::lora_slot, scale),
              "cuda_lora_slot is the kernel's lora_slot");

status op_cuda_lora_add(cuda_context& ctx, const uint16_t* x, uint16_t* y, int64_t n_rows, int64_t n_in, int64_t n_out,
                        const int32_t* row_adapter, const cuda_lora_slot* slots, int32_t max_r) {
    return cuda::lora_add_f16(x, y, n_rows, n_in, n_out, n_out, row_adapter,
                              reinterpret_cast<const cuda::lora_slot*>(slots), max_r, ctx.stream());
}

status op_cuda_kv_store(cuda_context& ctx, const uint16_t* k, const uint16_t* v, uint16_t* cache_k, uint16_t* cache_v,
                        const int32_t* pos_dev, int64_t n_tokens, int64_t kv_dim, int64_t n_ctx) {
    return cuda::kv_store_f16(k, v, kv_dim, cache_k, cache_v, pos_dev, n_tokens, kv_dim, n_ctx, ctx.stream());
}

status op_cuda_embedding(cuda_context& ctx, const uint16_t* table, const int32_t* ids, uint16_t* out, int64_t n_tokens,
                         int64_t vocab, int64_t dim, float scale) {
    return cuda::embedding_f16(table, ids, out, n_tokens, vocab, dim, dim, ctx.stream(), scale);
}

// ---- attention ---------------------------------------------------------------------------------

bool op_cuda_attention_is_decode(const cuda_attention_args& a) {
    constexpr int64_t k_decode_max_q = 16;  // beyond this the prefill tiles (16 queries) are as good
    return a.q_pos_dev || (a.n_q <= k_decode_max_q && a.q_stride % 2 == 0 && a.kv_stride % 2 == 0);
}

bool decode_attention_one_launch() {
    static const bool on = [] {
        const char* e = std::getenv("GPTQ_DECODE_FUSE");
        return !(e && std::strcmp(e, "0") == 0);
    }();
    return on;
}

status op_cuda_attention(cuda_context& ctx, const cuda_attention_args& a) {
    cuda::attention_params p;
    p.q = a.q, p.k = a.k, p.v = a.v, p.out = a.out;
    p.n_q = a.n_q, p.n_kv = a.n_kv, p.q_pos0 = a.q_pos0;
    p.n_head = a.n_head, p.n_head_kv = a.n_head_kv, p.head_dim = a.head_dim;
    p.window = a.window, p.scale = a.scale, p.softcap = a.softcap;
    p.q_stride = a.q_stride, p.kv_stride = a.kv_stride, p.out_stride = a.out_stride;
    p.kv_pages  = {a.kv_pages.pages, a.kv_pages.page_size, a.kv_pages.pages_stride};
    p.q_pos_dev = a.q_pos_dev;
    p.q_seq_dev = a.q_seq_dev;
    p.out_col   = a.out_col;
    p.k_new = a.k_new, p.v_new = a.v_new, p.new_stride = a.new_stride;
    p.rope_cos = a.rope_cos, p.rope_sin = a.rope_sin, p.n_ctx = a.n_ctx;
    if (op_cuda_attention_is_decode(a)) {
        const int64_t floats = cuda::attention_decode_workspace_floats(a.n_q, a.n_kv, a.n_head, a.head_dim);
        auto          ws     = ctx.scratch(size_t(floats) * sizeof(float));
        if (!ws) return ws.error();
        // One launch: the key chunks merged by each (query, head)'s last block, with the context's
        // counters (left zero); more (query, head) pairs than counters, or GPTQ_DECODE_FUSE=0: the
        // combine kernel, the reference.
        unsigned* counters =
            decode_attention_one_launch() ? ctx.counters(cuda::attention_decode_counters(a.n_q, a.n_head)) : nullptr;
        return cuda::attention_decode_f16(p, static_cast<float*>(*ws), floats, ctx.stream(), counters);
    }
    return cuda::attention_prefill_f16(p, ctx.stream());
}

// ---- linear ------------------------------------------------------------------------------------

status op_cuda_linear_dense(cuda_context& ctx, const uint16_t* x, const uint16_t* w, uint16_t* y, int64_t m, int64_t n,
                            int64_t k, bool bf16) {
    return cuda::gemm(ctx.blas(), bf16 ? cuda::gemm_dtype::bf16 : cuda::gemm_dtype::f16, x, w, y, m, n, k, k, k, n,
                      1.0f, 0.0f, ctx.stream());
}

status op_cuda_linear_dense_f32_out(cuda_context& ctx, const uint16_t* x, const uint16_t* w, float* y, int64_t m,
                                    int64_t n, int64_t k) {
    return cuda::gemm_f32_out(ctx.blas(), cuda::gemm_dtype::f16, x, w, y, m, n, k, k, k, n, ctx.stream());
}

result<cuda_gptq_linear> cuda_gptq_linear_load(cuda_context& ctx, const gptq_host_tensors& t, bool allow_fast) {
    if (t.bits != 2 && t.bits != 3 && t.bits != 4 && t.bits != 8)
        return make_error(status_code::STATUS_UNSUPPORTED, "GPTQ layer: bits {} not in 2, 3, 4, 8", t.bits);
    if (t.n_in <= 0 || t.n_out <= 0 || t.n_groups <= 0 || (t.n_in * t.bits) % 32 || (t.n_out * t.bits) % 32)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "GPTQ layer: n_in {} / n_out {} / n_groups {} do not fit {}-bit packing", t.n_in, t.n_out,
                          t.n_groups, t.bits);
    cuda_gptq_linear L;
    L.n_out = t.n_out, L.n_in = t.n_in, L.n_groups = t.n_groups, L.group_size = t.group_size;
    L.bits = t.bits, L.zero_add = t.zero_add;
    const size_t qw_bytes = size_t(t.n_in * t.bits / 32 * t.n_out) * 4;
    const size_t qz_bytes = size_t(t.n_groups * (t.n_out * t.bits / 32)) * 4;
    const size_t sc_bytes = size_t(t.n_groups * t.n_out) * 2;
    if (t.bias) {
        auto b = cuda_buffer::from_host(t.bias, size_t(t.n_out) * 2);
        if (!b) return b.error();
        L.bias = std::move(*b);
    }

    // Fast path: 4 bits, a layout that fits, groups contiguous after the act-order sort, sm_80+.
    std::vector<int32_t> perm;
    auto                 lay = cuda::int4_layout_for(t.n_out, t.n_in, t.group_size);
    L.fast = allow_fast && t.bits == 4 && ctx.sm_version() >= 80 && lay.is_ok() && (lay->n_groups == t.n_groups) &&
             cuda::int4_act_order_perm(t.g_idx, t.n_in, t.group_size, perm).is_ok();
    if (L.fast) {
        auto qw = cuda_buffer::from_host(t.qweight, qw_bytes);
        auto qz = cuda_buffer::from_host(t.qzeros, qz_bytes);
        auto sc = cuda_buffer::from_host(t.scales, sc_bytes);
        auto w  = cuda_buffer::alloc(size_t(lay->weight_bytes));
        auto sz = cuda_buffer::alloc(size_t(lay->sz_bytes));
        for (const auto* r : {&qw, &qz, &sc, &w, &sz})
            if (!*r) return r->error();
        if (!perm.empty()) {
            auto p = cuda_buffer::from_host(perm.data(), perm.size() * 4);
            if (!p) return p.error();
            L.perm = std::move(*p);
            std::vector<int32_t> inv(perm.size());
            for (size_t i = 0; i < perm.size(); ++i) inv[size_t(perm[i])] = int32_t(i);
            auto pi = cuda_buffer::from_host(inv.data(), inv.size() * 4);
            if (!pi) return pi.error();
            L.perm_inv = std::move(*pi);
        }
        (void)cuda::int4_gemm_has_wgmma();  // the probe runs here, at load, never during a graph capture
        GPTQ_TRY(cuda::int4_repack(*lay, qw->as<int32_t>(), qz->as<int32_t>(), sc->as<uint16_t>(), L.perm.as<int32_t>(),
                                   t.zero_add, w->data(), sz->data(), ctx.stream()));
        GPTQ_TRY(ctx.synchronize());  // the checkpoint copies are freed on return
        L.weights = std::move(*w);
        L.sz      = std::move(*sz);
        return L;
    }
    auto qw = cuda_buffer::from_host(t.qweight, qw_bytes);
    auto qz = cuda_buffer::from_host(t.qzeros, qz_bytes);
    auto sc = cuda_buffer::from_host(t.scales, sc_bytes);
    auto gi = cuda_buffer::from_host(t.g_idx, size_t(t.n_in) * 4);
    for (const auto* r : {&qw, &qz, &sc, &gi})
        if (!*r) return r->error();
    L.qweight = std::move(*qw);
    L.qzeros  = std::move(*qz);
    L.scales  = std::move(*sc);
    L.g_idx   = std::move(*gi);
    return L;
}

// The prefill dispatch table. m <= 16: the decode GEMV (its mma column tiles are 8 tokens, at most
// two per launch). 16 < m < k_dequant_min_m: the fused GEMM (its own m-bucket tile table in
// gptq_int4_gemm.cu). Larger m: dequantize + cuBLAS, which writes the layer once as F16 (2 bytes per
// weight, in the context's scratch: 180 MB for Llama-2-7B's gate_up) and then runs at cuBLAS speed.
// H100, Llama-2-7B shapes summed (docs/perf-notes.md, session 4, runs 1-3): fused ahead up to m = 128
// (at 128: 282 vs 373 us), even at 192 (396 vs 388 us), dequantize + cuBLAS ahead from 256 on (401
// vs >= 440 us for the best fused tile and split per shape; 2048: 1.2-1.3 ms vs 2.4 ms).
// With the Hopper wgmma tiles in the table (cuda::int4_gemm_wgmma_in_table) the fused GEMM keeps m up
// to k_dequant_min_m_wgmma, with the warp-streamed tiles (cuda::int4_gemm_ws_in_table) up to
// k_dequant_min_m_ws (first guesses, until a device sweep).
gptq_prefill_path gptq_prefill_path_for(int64_t m, int64_t n_out, int64_t n_in) {
    (void)n_out, (void)n_in;
    constexpr int64_t k_gemv_max_m          = 16;
    constexpr int64_t k_dequant_min_m_mma   = 192;  // 7B shapes: about equal at 192, dequantize ahead from 256 on
    constexpr int64_t k_dequant_min_m_wgmma = 1024;
    constexpr int64_t k_dequant_min_m_ws    = 512;
    if (m <= k_gemv_max_m) return gptq_prefill_path::GPTQ_PREFILL_GEMV;
    const int64_t k_dequant_min_m = cuda::int4_gemm_ws_in_table()      ? k_dequant_min_m_ws
                                    : cuda::int4_gemm_wgmma_in_table() ? k_dequant_min_m_wgmma
                                                                       : k_dequant_min_m_mma;
    if (m < k_dequant_min_m) return gptq_prefill_path::GPTQ_PREFILL_FUSED;
    return gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS;
}

int gptq_gemm_tile_count() {
    return cuda::int4_gemm_tile_count;
}

bool gptq_gemm_tile_usable(int gemm_tile) {
    if (gemm_tile <= 0 || gemm_tile >= cuda::int4_gemm_tile_count) return false;
    return !cuda::int4_gemm_tile_is_wgmma(static_cast<cuda::int4_gemm_tile>(gemm_tile)) || cuda::int4_gemm_has_wgmma();
}

gptq_gemm_plan_info gptq_gemm_plan_describe(int64_t m, int64_t n_in, int gemm_tile, int gemm_splits) {
    const auto p = cuda::int4_gemm_plan_for(m, n_in, {static_cast<cuda::int4_gemm_tile>(gemm_tile), gemm_splits});
    return {cuda::int4_gemm_tile_name(p.tile), p.splits};
}

namespace {
bool stream_capturing(const cuda_context& ctx) {
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    return cudaStreamIsCapturing(ctx.stream(), &cs) == cudaSuccess && cs != cudaStreamCaptureStatusNone;
}

// Rows per dequantize + cuBLAS chunk for w (a multiple of 32), or 0 for the whole linear at once.
int64_t dequant_chunk_rows(const cuda_gptq_linear& w) {
    static const int64_t env_mb = [] {
        const char* e = std::getenv("GPTQ_DEQUANT_CHUNK_MB");
        return e ? std::max<int64_t>(0, std::atoll(e)) : int64_t(0);
    }();
    int64_t rows = w.dequant_chunk_rows;
    if (rows < 0) rows = env_mb > 0 ? env_mb * (int64_t(1) << 20) / (2 * w.n_in) : 0;
    if (rows <= 0) return 0;
    rows = (rows + 31) / 32 * 32;
    return rows < w.n_out ? rows : 0;
}

// y[:, rows of the slice] = xin W_slice^T, W_slice dequantized into w16 first; y has n_out columns.
status dequant_cublas_rows(cuda_context& ctx, const cuda_gptq_linear& w, const cuda::int4_layout& lay,
                           const uint16_t* xin, uint16_t* y, int64_t m, uint16_t* w16, int64_t tile0, int64_t tiles,
                           float beta) {
    const auto sl = cuda::int4_layout_rows(lay, tile0, tiles);
    GPTQ_TRY(cuda::int4_dequant_f16(sl.L, static_cast<const char*>(w.weights.data()) + sl.weight_offset,
                                    static_cast<const char*>(w.sz.data()) + sl.sz_offset, w16, w.n_in, ctx.stream()));
    return cuda::gemm(ctx.blas(), cuda::gemm_dtype::f16, xin, w16, y + 32 * tile0, m, sl.L.n_out, w.n_in, w.n_in,
                      w.n_in, w.n_out, 1.0f, beta, ctx.stream());
}

// Dequantize + cuBLAS: w16 (n_out x n_in F16, or chunk_rows x n_in) filled here unless `filled`
// (dequantized ahead, never chunked).
status dequant_cublas(cuda_context& ctx, const cuda_gptq_linear& w, const cuda::int4_layout& lay, const uint16_t* xin,
                      const uint16_t* bias, uint16_t* y, int64_t m, uint16_t* w16, bool filled, int64_t chunk_rows) {
    if (!filled && chunk_rows == 0)
        GPTQ_TRY(cuda::int4_dequant_f16(lay, w.weights.data(), w.sz.data(), w16, w.n_in, ctx.stream()));
    // A bias enters the GEMM as C = bias rows with beta = 1. Where cuBLAS adds C before rounding,
    // the output is rounded to F16 once, as in the fused kernel; the H100's cuBLAS does not always
    // (issue 18's OpPrefillPaths one-off, session 10: x W^T rounded to F16 first, 7 ulps of the
    // output where the bias cancels it, as the FP16 model's dense linear + bias), so this path is
    // within half an ulp of |x W^T| more (test_cuda_gemm's bound says so).
    if (bias) {
        GPTQ_TRY(cuda_zero_async(ctx, y, size_t(m * w.n_out) * 2));
        GPTQ_TRY(op_cuda_add_bias(ctx, y, bias, m, w.n_out));
    }
    if (!filled && chunk_rows > 0) {
        for (int64_t t0 = 0; t0 < lay.n_tiles; t0 += chunk_rows / 32)
            GPTQ_TRY(dequant_cublas_rows(ctx, w, lay, xin, y, m, w16, t0, std::min(chunk_rows / 32, lay.n_tiles - t0),
                                         bias ? 1.0f : 0.0f));
        return status::ok();
    }
    return cuda::gemm(ctx.blas(), cuda::gemm_dtype::f16, xin, w16, y, m, w.n_out, w.n_in, w.n_in, w.n_in, w.n_out, 1.0f,
                      bias ? 1.0f : 0.0f, ctx.stream());
}

status dequant_fill(const void* arg, cudaStream_t stream, uint16_t* w16) {
    const auto& w   = *static_cast<const cuda_gptq_linear*>(arg);
    auto        lay = cuda::int4_layout_for(w.n_out, w.n_in, w.group_size);
    if (!lay) return lay.error();
    return cuda::int4_dequant_f16(*lay, w.weights.data(), w.sz.data(), w16, w.n_in, stream);
}

}  // namespace

status op_cuda_gptq_dequant_ahead(cuda_context& ctx, const cuda_gptq_linear& w, int64_t m) {
    if (!w.fast || m <= 16) return status::ok();
    const gptq_prefill_path path =
        w.prefill != gptq_prefill_path::GPTQ_PREFILL_AUTO ? w.prefill : gptq_prefill_path_for(m, w.n_out, w.n_in);
    if (path != gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS || dequant_chunk_rows(w) > 0) return status::ok();
    return ctx.dequant_ahead(w.weights.data(), size_t(w.n_out * w.n_in) * 2, dequant_fill, &w);
}

void op_cuda_dequant_forget(cuda_context& ctx) {
    ctx.dequant_forget();
}

status op_cuda_gptq_linear(cuda_context& ctx, const cuda_gptq_linear& w, const uint16_t* x, uint16_t* y, int64_t m,
                           bool x_permuted) {
    if (m <= 0) return status::ok();
    const uint16_t* bias = w.bias.bytes() ? w.bias.as<uint16_t>() : nullptr;
    if (w.fast) {
        auto lay = cuda::int4_layout_for(w.n_out, w.n_in, w.group_size);
        if (!lay) return lay.error();
        gptq_prefill_path path = gptq_prefill_path::GPTQ_PREFILL_GEMV;
        if (m > 16)
            path = w.prefill != gptq_prefill_path::GPTQ_PREFILL_AUTO ? w.prefill
                                                                     : gptq_prefill_path_for(m, w.n_out, w.n_in);
        // Scratch: the permuted x (act-order), then the dequantized weights (dequantize + cuBLAS).
        const bool   permute = w.perm.bytes() && !x_permuted;
        const size_t x_bytes = permute ? (size_t(m * w.n_in) * 2 + 255) / 256 * 256 : 0;
        // The dequantized weights go to one of the context's two slots (dequantize ahead), or, while
        // capturing a graph, to the scratch (no cross-stream events there).
        // In chunks, the chunk's buffer is scratch too.
        const bool    deq       = path == gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS;
        const int64_t chunk     = deq ? dequant_chunk_rows(w) : 0;
        const bool    in_slot   = deq && chunk == 0 && !stream_capturing(ctx);
        const size_t  w16_bytes = deq && !in_slot ? size_t((chunk ? chunk : w.n_out) * w.n_in) * 2 : 0;
        char*         scratch   = nullptr;
        if (x_bytes + w16_bytes > 0) {
            auto sp = ctx.scratch(x_bytes + w16_bytes);
            if (!sp) return sp.error();
            scratch = static_cast<char*>(*sp);
        }
        const uint16_t* xin = x;
        if (permute) {
            GPTQ_TRY(cuda::gptq_permute_cols_f16(x, w.perm.as<int32_t>(), reinterpret_cast<uint16_t*>(scratch), m,
                                                 w.n_in, w.n_in, w.n_in, ctx.stream()));
            xin = reinterpret_cast<const uint16_t*>(scratch);
        }
        // The fused GEMM copies x in 16-byte pieces; an x that is not 16-byte aligned (never from
        // this project's activation buffers) takes the GEMV, which needs 4 bytes.
        if (path == gptq_prefill_path::GPTQ_PREFILL_FUSED && reinterpret_cast<uintptr_t>(xin) % 16 != 0)
            path = gptq_prefill_path::GPTQ_PREFILL_GEMV;
        if (path == gptq_prefill_path::GPTQ_PREFILL_FUSED) {
            const cuda::int4_gemm_plan plan{static_cast<cuda::int4_gemm_tile>(w.gemm_tile), w.gemm_splits};
            const int64_t              ws_bytes = cuda::int4_gemm_workspace_bytes(*lay, m, plan);
            auto                       ws       = ctx.zeroed_workspace(size_t(ws_bytes));
            if (!ws) return ws.error();
            return cuda::int4_gemm_f16(*lay, w.weights.data(), w.sz.data(), xin, bias, y, m, w.n_in, w.n_out, *ws,
                                       ws_bytes, ctx.stream(), plan);
        }
        if (deq) {
            uint16_t* w16    = reinterpret_cast<uint16_t*>(scratch + x_bytes);
            bool      filled = false;
            if (in_slot) {
                auto slot = ctx.dequant_take(w.weights.data(), size_t(w.n_out * w.n_in) * 2);
                if (!slot) return slot.error();
                w16 = slot->w, filled = slot->filled;
            }
            const status st = dequant_cublas(ctx, w, *lay, xin, bias, y, m, w16, filled, chunk);
            if (in_slot) GPTQ_TRY(ctx.dequant_release(w.weights.data()));  // also after a failure
            return st;
        }
        const int64_t ws_bytes = cuda::int4_gemv_workspace_bytes(*lay, w.splits);
        auto          ws       = ctx.zeroed_workspace(size_t(ws_bytes));
        if (!ws) return ws.error();
        return cuda::int4_gemv_f16(*lay, w.weights.data(), w.sz.data(), xin, bias, y, m, w.n_in, w.n_out, *ws, ws_bytes,
                                   ctx.stream(), w.unroll, w.splits);
    }
    cuda::gptq_linear_params p;
    p.qweight = w.qweight.as<int32_t>(), p.qzeros = w.qzeros.as<int32_t>(), p.scales = w.scales.as<uint16_t>();
    p.g_idx = w.g_idx.as<int32_t>(), p.bias = bias;
    p.n_out = w.n_out, p.n_in = w.n_in, p.n_groups = w.n_groups, p.bits = w.bits, p.zero_add = w.zero_add;
    return cuda::gptq_linear_generic_f16(p, x, y, m, w.n_in, w.n_out, ctx.stream());
}

namespace {
// Rows per dequantize + cuBLAS chunk of the F32-output path (a multiple of 32, at most the layer's
// tiles): w.dequant_chunk_rows when > 0, else about 64 MiB of F16 weights (a 128k x 4096 lm_head is
// 1 GiB as F16: never dequantized whole).
int64_t f32_out_chunk_rows(const cuda_gptq_linear& w, const cuda::int4_layout& lay) {
    constexpr int64_t k_chunk_bytes = int64_t(64) << 20;
    const int64_t     rows          = w.dequant_chunk_rows > 0 ? (w.dequant_chunk_rows + 31) / 32 * 32
                                                               : std::max<int64_t>(32, k_chunk_bytes / (2 * w.n_in) / 32 * 32);
    return std::min(rows, 32 * lay.n_tiles);
}

// y32's m rows [n_out] = bias in F32 (exact widening): row 0 converted, then copied in doublings.
status bias_rows_f32(cuda_context& ctx, const uint16_t* bias, float* y32, int64_t m, int64_t n_out) {
    GPTQ_TRY(op_cuda_f16_to_f32(ctx, bias, y32, n_out));
    for (int64_t r = 1; r < m; r *= 2)  // rows [0, r) hold the bias
        GPTQ_TRY(cuda_copy_device_async(ctx, y32 + r * n_out, y32, size_t(std::min(r, m - r) * n_out) * 4));
    return status::ok();
}
}  // namespace

status op_cuda_gptq_linear_f32_out(cuda_context& ctx, const cuda_gptq_linear& w, const uint16_t* x, float* y32,
                                   int64_t m) {
    if (m <= 0) return status::ok();
    if (!w.fast)
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "GPTQ linear {} x {} with F32 output: not on the int4 layout (bits {}, group size {})",
                          w.n_out, w.n_in, w.bits, w.group_size);
    auto lay = cuda::int4_layout_for(w.n_out, w.n_in, w.group_size);
    if (!lay) return lay.error();
    const uint16_t* bias  = w.bias.bytes() ? w.bias.as<uint16_t>() : nullptr;
    const bool      deq   = m > 16 && (w.prefill == gptq_prefill_path::GPTQ_PREFILL_DEQUANT_CUBLAS ||
                                (w.prefill != gptq_prefill_path::GPTQ_PREFILL_GEMV && m > k_gptq_f32_out_gemv_max_m));
    const int64_t   chunk = deq ? f32_out_chunk_rows(w, *lay) : 0;
    // Scratch: the permuted x (act-order), then the chunk's F16 weights.
    const size_t x_bytes   = w.perm.bytes() ? (size_t(m * w.n_in) * 2 + 255) / 256 * 256 : 0;
    const size_t w16_bytes = size_t(chunk * w.n_in) * 2;
    char*        scratch   = nullptr;
    if (x_bytes + w16_bytes > 0) {
        auto sp = ctx.scratch(x_bytes + w16_bytes);
        if (!sp) return sp.error();
        scratch = static_cast<char*>(*sp);
    }
    const uint16_t* xin = x;
    if (w.perm.bytes()) {
        GPTQ_TRY(cuda::gptq_permute_cols_f16(x, w.perm.as<int32_t>(), reinterpret_cast<uint16_t*>(scratch), m, w.n_in,
                                             w.n_in, w.n_in, ctx.stream()));
        xin = reinterpret_cast<const uint16_t*>(scratch);
    }
    if (!deq) {  // the F32 GEMV, 16 rows per launch
        for (int64_t r = 0; r < m; r += 16)
            GPTQ_TRY(cuda::int4_gemv_f32out(*lay, w.weights.data(), w.sz.data(), xin + r * w.n_in, bias,
                                            y32 + r * w.n_out, std::min<int64_t>(16, m - r), w.n_in, w.n_out,
                                            ctx.stream()));
        return status::ok();
    }
    // Dequantize + cuBLAS, chunk by chunk of output rows: each chunk's F16 weights, then its column
    // block of y32 (ldc n_out), the bias in y32 first and added by the GEMM (beta 1) in F32.
    if (bias) GPTQ_TRY(bias_rows_f32(ctx, bias, y32, m, w.n_out));
    uint16_t* w16 = reinterpret_cast<uint16_t*>(scratch + x_bytes);
    for (int64_t t0 = 0; t0 < lay->n_tiles; t0 += chunk / 32) {
        const auto sl = cuda::int4_layout_rows(*lay, t0, std::min(chunk / 32, lay->n_tiles - t0));
        GPTQ_TRY(cuda::int4_dequant_f16(sl.L, static_cast<const char*>(w.weights.data()) + sl.weight_offset,
                                        static_cast<const char*>(w.sz.data()) + sl.sz_offset, w16, w.n_in,
                                        ctx.stream()));
        GPTQ_TRY(cuda::gemm_f32_out(ctx.blas(), cuda::gemm_dtype::f16, xin, w16, y32 + 32 * t0, m, sl.L.n_out, w.n_in,
                                    w.n_in, w.n_in, w.n_out, ctx.stream(), bias ? 1.0f : 0.0f));
    }
    return status::ok();
}

namespace {
cuda::int4_gemv_fusion int4_fusion_of(const cuda_gptq_linear& w, const cuda_gptq_fusion& f) {
    cuda::int4_gemv_fusion k;
    k.norm_w       = f.norm_w;
    k.eps          = f.eps;
    k.perm         = f.norm_w && w.perm.bytes() ? w.perm.as<int32_t>() : nullptr;
    k.residual     = f.residual;
    k.silu         = f.silu;
    k.out_norm_w   = f.out_norm_w;
    k.out_eps      = f.out_eps;
    k.out_perm     = f.out_perm;
    k.x_out        = f.x_out;
    k.x_out_stride = w.n_out;
    return k;
}
}  // namespace

bool op_cuda_gptq_fused_ok(const cuda_gptq_linear& w, int64_t m, const cuda_gptq_fusion& f) {
    if (!w.fast || m < 1) return false;
    auto lay = cuda::int4_layout_for(w.n_out, w.n_in, w.group_size);
    return lay.is_ok() && cuda::int4_gemv_fused_check(*lay, m, int4_fusion_of(w, f)).is_ok();
}

status op_cuda_gptq_linear_fused(cuda_context& ctx, const cuda_gptq_linear& w, const uint16_t* x, uint16_t* y,
                                 int64_t m, const cuda_gptq_fusion& f, bool x_permuted) {
    if (!w.fast)
        return make_error(status_code::STATUS_UNSUPPORTED, "fused GPTQ linear {} x {}: not on the int4 layout", w.n_out,
                          w.n_in);
    if (f.norm_w && x_permuted)
        return make_error(status_code::STATUS_INVALID_ARGUMENT,
                          "fused GPTQ linear: the norm reads the residual stream, never permuted");
    auto lay = cuda::int4_layout_for(w.n_out, w.n_in, w.group_size);
    if (!lay) return lay.error();
    cuda::int4_gemv_fusion k    = int4_fusion_of(w, f);
    const uint16_t*        bias = w.bias.bytes() ? w.bias.as<uint16_t>() : nullptr;
    // The output norm takes the context's first counter: the kernels of a stream run one after
    // another, and each last block leaves it zero for the next.
    if (f.out_norm_w) {
        k.counter = ctx.counters(1);
        if (!k.counter) return make_error(status_code::STATUS_INTERNAL, "fused GPTQ linear: no device counter");
    }
    const uint16_t* xin = x;
    if (!f.norm_w && w.perm.bytes() && !x_permuted) {  // act-order input, as op_cuda_gptq_linear permutes it
        auto sp = ctx.scratch(size_t(m * w.n_in) * 2);
        if (!sp) return sp.error();
        GPTQ_TRY(cuda::gptq_permute_cols_f16(x, w.perm.as<int32_t>(), static_cast<uint16_t*>(*sp), m, w.n_in, w.n_in,
                                             w.n_in, ctx.stream()));
        xin = static_cast<const uint16_t*>(*sp);
    }
    return cuda::int4_gemv_fused_f16(*lay, w.weights.data(), w.sz.data(), xin, bias, y, m, w.n_in,
                                     f.silu ? w.n_out / 2 : w.n_out, k, ctx.stream());
}

}  // namespace gptq
