// The device side of gptq bench (bench.cpp): one small adapter per backend. bench.cpp owns the
// protocol (token ids, warm-up, timing, medians, memory peaks, output); an adapter only runs the
// model. Every call returns when its work is finished (a CUDA adapter synchronises its stream),
// so wall-clock time around a call is the call's time.
//
// Adapters: bench_cpu.cpp (llama_model::forward_batch on the host) and bench_cuda.cpp (the GPU
// session of engine_cuda.h, 1-16 sequences); backend_open() in bench.cpp picks one from --device.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "core/error.h"
#include "core/status.h"
#include "engine_cuda.h"
#include "gptq/device.h"

namespace gptq {

class bench_backend {
public:
    virtual ~bench_backend() = default;

    virtual int64_t     n_vocab() const   = 0;
    virtual std::string weights() const   = 0;  // "float16", "gptq-4bit-g128", ...
    virtual std::string device() const    = 0;  // "cpu", "cuda:0"
    virtual std::string machine() const   = 0;  // CPU model or GPU name
    virtual int         n_threads() const = 0;

    // Drop every sequence; make room for n_seq sequences of up to n_ctx positions each.
    virtual status reset(int64_t n_seq, int64_t n_ctx) = 0;
    // Prefill: ids[n_seq * n_tokens], row s = the n_tokens prompt tokens of sequence s; computes
    // the logits of each row's last token.
    virtual status prefill(const int32_t* ids, int64_t n_seq, int64_t n_tokens) = 0;
    // One decode step: ids[n_seq], one new token per sequence; computes their logits.
    virtual status decode_step(const int32_t* ids, int64_t n_seq) = 0;

    // Peak memory in bytes since the last memory_reset_peak() (host RSS on the CPU, device bytes
    // on a GPU), and what it counts.
    virtual uint64_t    memory_used() const = 0;
    virtual void        memory_reset_peak() = 0;
    virtual std::string memory_kind() const = 0;

    // Op-level timing (--profile-ops; the CUDA adapter only): while on, decode steps run uncaptured
    // with an event after each op; op_profile() is what the decode steps since turning it on took.
    virtual status profile_ops(bool) {
        return make_error(status_code::STATUS_UNSUPPORTED, "bench: --profile-ops needs --device cuda");
    }
    virtual gpu_op_profile op_profile() const { return {}; }
};

// The CPU adapter (bench_cpu.cpp): loads every layer at open; n_threads 0 = all cores.
result<std::unique_ptr<bench_backend>> bench_backend_cpu_open(const std::string& model_path, int n_threads);
// The CUDA adapter (bench_cuda.cpp): the GPU model of engine_cuda.h; batches of 1 to 16 sequences.
// n_ctx: the KV-cache positions to open with (the planner's context when placement is given).
result<std::unique_ptr<bench_backend>> bench_backend_cuda_open(const std::string& model_path, const device_spec& dev,
                                                               int64_t n_ctx, const gpu_placement_flags& placement);

}  // namespace gptq
