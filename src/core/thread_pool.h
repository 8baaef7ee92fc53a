// A small fixed-size thread pool with a blocking parallel_for.
//
// parallel_for splits [0, n) into contiguous chunks, one per worker (the calling thread takes
// one too), and returns when all are done. Nested calls from inside a task run serially.
// An exception thrown by fn in any thread (std::bad_alloc above all) is rethrown by parallel_for in
// the calling thread once every chunk has finished (the first one, if several threads threw), so
// callers turn it into an error as they would in serial code instead of the process terminating.
//
// Wake-up (docs/model-runtime.md "Threading"): a worker that finishes a chunk spins (pause) for
// up to spin_us microseconds waiting for the next job before it sleeps on a condition variable,
// and the caller spins as long for the workers' chunks before it sleeps; a decode step's ~60
// calls, a few microseconds apart, then find the workers awake instead of paying a futex wake-up
// and the scheduler's latency each (tens of microseconds). Idle for longer than spin_us, every
// thread sleeps: an idle pool burns no core. spin_us 0: sleep at once (the pool before issue 22).
// On oversubscribed cores (other processes want them too) spinning is a loss, 4x slower decode
// on the shared 2-core VM (load 6). Signs of contention: a spinning thread that notices it was
// preempted (the time it was off the CPU is lost), a caller whose wait for the workers outlasts the
// spin (spin_us lost). When the lost time within a 100 ms window reaches 10 % of it
// (contention_window), the pool stops spinning for 50 ms, then tries again; contention again within
// a second doubles the pause (up to 3.2 s). A single preemption (a hypervisor's 50-500 us hiccup on
// a quiet VM) no longer pauses the pool: on a quiet 2-vCPU VM that did, and every dispatch of the
// following pause paid a futex wake-up, 2-thread decode 3x slower than 1 thread (docs/perf-notes.md,
// session 12). GPTQ_POOL_QUIET=0 turns the pause off (A/B runs on machines whose cores are ours).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace gptq {

// The lost-time rule of the pool's contention check: add() each sign of contention at time t with
// the time it lost; true when the lost time within the current window (started by the first sign
// after the previous window ended) reaches window_ns / den; the window then starts over.
struct contention_window {
    static constexpr int64_t k_window_ns = 100'000'000;
    static constexpr int64_t k_den       = 10;
    int64_t                  start_ns    = 0;
    int64_t                  lost_ns     = 0;
    bool                     started     = false;
    bool                     add(int64_t t, int64_t lost);
};

class thread_pool {
public:
    // The spin of every pool made without one: GPTQ_POOL_SPIN_US when set (0 .. 100000), else
    // k_default_spin_us.
    static constexpr int k_default_spin_us = 100;
    static int           default_spin_us();

    explicit thread_pool(int n_threads, int spin_us = -1);  // n_threads <= 0: hardware concurrency; -1: default
    ~thread_pool();
    thread_pool(const thread_pool&)            = delete;
    thread_pool& operator=(const thread_pool&) = delete;

    int n_threads() const { return static_cast<int>(workers_.size()) + 1; }
    int spin_us() const { return spin_us_; }

    // fn(begin, end) over disjoint ranges covering [0, n).
    void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

    static thread_pool& global();  // lazily created with hardware concurrency

    // Counters of parallel_for, kept when GPTQ_POOL_STATS is set in the environment (off: no clock
    // reads) and printed to stderr by the destructor (docs/model-runtime.md "Threading"): what a
    // decode step pays per dispatch on a given machine, measured there.
    struct stats {
        uint64_t calls = 0, serial_calls = 0;  // dispatched to the workers / run by the caller alone
        int64_t  ns_calls       = 0;           // caller's wall time inside dispatched calls
        int64_t  ns_caller_wait = 0;           // of which: after its own chunk, waiting for the workers
        int64_t  ns_worker_late = 0;           // sum over workers of dispatch -> start of their chunk
        uint64_t worker_sleeps = 0, caller_sleeps = 0, quiet_periods = 0;
        uint64_t contention_signs = 0;  // preemptions seen while spinning, callers' spins that timed out
    };
    stats       get_stats() const;
    static bool stats_enabled();

private:
    void worker_loop(int index);
    // Spins until pred() or spin_us_ have passed; whether pred() held. Signs of oversubscribed
    // cores turn spinning off for every thread of the pool for a while (quiet): a spin that finds
    // itself preempted (k_preempted_ns between two checks about 1 us apart), and, with
    // timeout_is_contention (the caller waiting for the workers' chunks), a spin that times out.
    template <class Pred>
    bool                     spin_until(Pred pred, bool timeout_is_contention);
    void                     contention(int64_t now_ns, int64_t lost_ns);  // a sign: maybe quiet
    static constexpr int64_t k_preempted_ns    = 50'000;
    static constexpr int64_t k_quiet_ns        = 50'000'000;     // the first quiet period
    static constexpr int64_t k_quiet_memory_ns = 1'000'000'000;  // contention this soon after one: twice as long

    std::vector<std::thread> workers_;
    int                      spin_us_ = 0;
    std::mutex               mutex_;
    std::condition_variable  cv_work_;
    std::condition_variable  cv_done_;
    // The job: written by parallel_for before generation_ is advanced (release), read by the
    // workers after they see the new generation (acquire).
    const std::function<void(int64_t, int64_t)>* job_   = nullptr;
    int64_t                                      job_n_ = 0;
    std::atomic<uint64_t>                        generation_{0};
    std::atomic<int>                             pending_{0};  // workers still running the job
    std::atomic<bool>                            stop_{false};
    std::atomic<bool>                            busy_{false};
    std::atomic<int64_t>                         quiet_until_ns_{0};  // steady clock: no spinning before it
    std::mutex                                   quiet_mutex_;
    int                                          quiet_level_ = 0;  // quiet_mutex_
    contention_window                            window_;           // quiet_mutex_
    std::exception_ptr                           error_;            // first exception of a worker in this job (mutex_)
    // GPTQ_POOL_STATS counters (relaxed atomics: written by the caller and the workers).
    std::atomic<int64_t>  job_start_ns_{0};
    std::atomic<uint64_t> st_calls_{0}, st_serial_{0}, st_worker_sleeps_{0}, st_caller_sleeps_{0}, st_quiet_{0},
        st_signs_{0};
    std::atomic<int64_t> st_ns_calls_{0}, st_ns_wait_{0}, st_ns_late_{0};
};

}  // namespace gptq
