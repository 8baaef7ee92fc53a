#include "core/thread_pool.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <string_view>

namespace gptq {

namespace {
thread_local bool t_inside_pool = false;

void chunk_of(int64_t n, int n_chunks, int i, int64_t* begin, int64_t* end) {
    const int64_t base = n / n_chunks, rem = n % n_chunks;
    *begin = i * base + std::min<int64_t>(i, rem);
    *end   = *begin + base + (i < rem ? 1 : 0);
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    asm volatile("yield");
#endif
}
}  // namespace

int thread_pool::default_spin_us() {
    static const int us = [] {
        const char* e = std::getenv("GPTQ_POOL_SPIN_US");
        if (!e || !*e) return k_default_spin_us;
        char*      end = nullptr;
        const long v   = std::strtol(e, &end, 10);
        return (*end == '\0' && v >= 0 && v <= 100000) ? static_cast<int>(v) : k_default_spin_us;
    }();
    return us;
}

thread_pool::thread_pool(int n_threads, int spin_us) : spin_us_(spin_us < 0 ? default_spin_us() : spin_us) {
    if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    for (int i = 0; i + 1 < n_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

bool thread_pool::stats_enabled() {
    static const bool on = [] {
        const char* e = std::getenv("GPTQ_POOL_STATS");
        return e && *e && std::string_view(e) != "0";
    }();
    return on;
}

thread_pool::stats thread_pool::get_stats() const {
    stats s;
    s.calls            = st_calls_.load();
    s.serial_calls     = st_serial_.load();
    s.ns_calls         = st_ns_calls_.load();
    s.ns_caller_wait   = st_ns_wait_.load();
    s.ns_worker_late   = st_ns_late_.load();
    s.worker_sleeps    = st_worker_sleeps_.load();
    s.caller_sleeps    = st_caller_sleeps_.load();
    s.quiet_periods    = st_quiet_.load();
    s.contention_signs = st_signs_.load();
    return s;
}

thread_pool::~thread_pool() {
    if (stats_enabled() && !workers_.empty()) {
        const stats s = get_stats();
        std::fprintf(
            stderr,
            "pool stats: threads %d spin_us %d: parallel_for %llu dispatched (%llu serial), %.3f ms inside "
            "them, caller waiting for workers %.3f ms, workers' start latency %.3f us per dispatch and worker, "
            "worker sleeps %llu, caller sleeps %llu, contention signs %llu, quiet periods %llu\n",
            n_threads(), spin_us_, static_cast<unsigned long long>(s.calls),
            static_cast<unsigned long long>(s.serial_calls), s.ns_calls / 1e6, s.ns_caller_wait / 1e6,
            s.calls ? s.ns_worker_late / 1e3 / static_cast<double>(s.calls * workers_.size()) : 0.0,
            static_cast<unsigned long long>(s.worker_sleeps), static_cast<unsigned long long>(s.caller_sleeps),
            static_cast<unsigned long long>(s.contention_signs), static_cast<unsigned long long>(s.quiet_periods));
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        stop_ = true;
    }
    cv_work_.notify_all();
    for (auto& w : workers_) w.join();
}

thread_pool& thread_pool::global() {
    static thread_pool pool(0);
    return pool;
}

namespace {
int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
}
}  // namespace

template <class Pred>
bool thread_pool::spin_until(Pred pred, bool timeout_is_contention) {
    if (spin_us_ <= 0) return pred();
    int64_t t = now_ns();
    if (t < quiet_until_ns_.load(std::memory_order_relaxed)) return pred();
    const int64_t end = t + int64_t(spin_us_) * 1000;
    for (;;) {
        for (int i = 0; i < 64; ++i) {  // a clock read costs more than a pause: one every 64 (~1 us)
            if (pred()) return true;
            cpu_relax();
        }
        const int64_t prev = t;
        t                  = now_ns();
        if (t - prev > k_preempted_ns) {  // off the CPU in between
            contention(t, t - prev);
            return pred();
        }
        if (t >= end) {
            if (timeout_is_contention && !pred()) contention(t, int64_t(spin_us_) * 1000);
            return pred();
        }
    }
}

bool contention_window::add(int64_t t, int64_t lost) {
    if (!started || t - start_ns > k_window_ns) {
        start_ns = t;
        lost_ns  = 0;
        started  = true;
    }
    lost_ns += lost > 0 ? lost : 0;
    if (lost_ns * k_den < k_window_ns) return false;
    started = false;  // the next sign starts a new window
    return true;
}

void thread_pool::contention(int64_t t, int64_t lost) {
    // Enough time lost in the window (contention_window): a quiet period. Contention soon after the
    // last one ended: the next is twice as long (up to 2^6 x k_quiet_ns = 3.2 s), so a machine that
    // stays oversubscribed rarely pays for a probe. GPTQ_POOL_QUIET=0: never (for A/B runs on
    // machines whose cores are ours); the signs and would-be periods still count.
    static const bool enabled = [] {
        const char* e = std::getenv("GPTQ_POOL_QUIET");
        return !(e && std::string_view(e) == "0");
    }();
    std::lock_guard<std::mutex> lock(quiet_mutex_);
    const int64_t               last_end = quiet_until_ns_.load(std::memory_order_relaxed);
    if (t < last_end) return;  // another thread already did
    if (stats_enabled()) st_signs_.fetch_add(1, std::memory_order_relaxed);
    if (!window_.add(t, lost)) return;
    if (stats_enabled()) st_quiet_.fetch_add(1, std::memory_order_relaxed);
    if (!enabled) return;
    quiet_level_ = t - last_end < k_quiet_memory_ns ? std::min(quiet_level_ + 1, 6) : 0;
    quiet_until_ns_.store(t + (k_quiet_ns << quiet_level_), std::memory_order_relaxed);
}

void thread_pool::worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
        auto has_work = [&] { return stop_.load() || generation_.load(std::memory_order_acquire) != seen; };
        if (!spin_until(has_work, false)) {  // an idle pool times out: no sign of contention
            // Every change of generation_ / stop_ is followed by a lock of mutex_ and a notify,
            // so checking the predicate under the lock cannot miss one.
            if (stats_enabled()) st_worker_sleeps_.fetch_add(1, std::memory_order_relaxed);
            std::unique_lock<std::mutex> lock(mutex_);
            cv_work_.wait(lock, has_work);
        }
        if (stop_) return;
        seen = generation_.load(std::memory_order_acquire);
        if (stats_enabled())
            st_ns_late_.fetch_add(now_ns() - job_start_ns_.load(std::memory_order_relaxed), std::memory_order_relaxed);
        const std::function<void(int64_t, int64_t)>* job = job_;
        const int64_t                                n   = job_n_;
        int64_t                                      begin, end;
        chunk_of(n, n_threads(), index + 1, &begin, &end);
        std::exception_ptr err;
        t_inside_pool = true;
        try {
            if (begin < end) (*job)(begin, end);
        } catch (...) {  // an exception leaving a thread's function would std::terminate the process
            err = std::current_exception();
        }
        t_inside_pool = false;
        if (err) {
            std::lock_guard<std::mutex> lock(mutex_);
            if (!error_) error_ = err;
        }
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
            // The last one: wake the caller if it sleeps (the lock orders this after its check).
            { std::lock_guard<std::mutex> lock(mutex_); }
            cv_done_.notify_one();
        }
    }
}

void thread_pool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    if (workers_.empty() || t_inside_pool || n == 1 || busy_.exchange(true, std::memory_order_acquire)) {
        if (stats_enabled() && !workers_.empty()) st_serial_.fetch_add(1, std::memory_order_relaxed);
        fn(0, n);  // serial: no workers, a nested call, or another thread is using the pool
        return;
    }
    const bool    stats = stats_enabled();
    const int64_t t0    = stats ? now_ns() : 0;
    if (stats) job_start_ns_.store(t0, std::memory_order_relaxed);  // published by the release below
    job_   = &fn;
    job_n_ = n;
    pending_.store(static_cast<int>(workers_.size()), std::memory_order_relaxed);
    generation_.fetch_add(1, std::memory_order_release);
    { std::lock_guard<std::mutex> lock(mutex_); }  // a worker between its check and its wait is now waiting
    cv_work_.notify_all();

    int64_t begin, end;
    chunk_of(n, n_threads(), 0, &begin, &end);
    std::exception_ptr err;
    t_inside_pool = true;
    try {
        if (begin < end) fn(begin, end);
    } catch (...) {  // keep it until the workers are done: they still use fn
        err = std::current_exception();
    }
    t_inside_pool = false;

    const int64_t t1   = stats ? now_ns() : 0;
    auto          done = [&] { return pending_.load(std::memory_order_acquire) == 0; };
    if (!spin_until(done, true)) {  // the workers' chunks took as long as ours + spin_us: preempted?
        if (stats) st_caller_sleeps_.fetch_add(1, std::memory_order_relaxed);
        std::unique_lock<std::mutex> lock(mutex_);
        cv_done_.wait(lock, done);
    }
    if (stats) {
        const int64_t t2 = now_ns();
        st_calls_.fetch_add(1, std::memory_order_relaxed);
        st_ns_calls_.fetch_add(t2 - t0, std::memory_order_relaxed);
        st_ns_wait_.fetch_add(t2 - t1, std::memory_order_relaxed);
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (!err) err = error_;
        error_ = nullptr;
        job_   = nullptr;
    }
    busy_.store(false, std::memory_order_release);
    if (err) std::rethrow_exception(err);
}

}  // namespace gptq
