#include "core/thread_pool.h"

#include <algorithm>
#include <exception>

namespace gptq {

namespace {
thread_local bool t_inside_pool = false;

void chunk_of(int64_t n, int n_chunks, int i, int64_t* begin, int64_t* end) {
    const int64_t base = n / n_chunks, rem = n % n_chunks;
    *begin = i * base + std::min<int64_t>(i, rem);
    *end   = *begin + base + (i < rem ? 1 : 0);
}
}  // namespace

thread_pool::thread_pool(int n_threads) {
    if (n_threads <= 0) n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    for (int i = 0; i + 1 < n_threads; ++i) workers_.emplace_back([this, i] { worker_loop(i); });
}

thread_pool::~thread_pool() {
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

void thread_pool::worker_loop(int index) {
    uint64_t seen = 0;
    for (;;) {
        const std::function<void(int64_t, int64_t)>* job;
        int64_t                                      n;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            cv_work_.wait(lock, [&] { return stop_ || generation_ != seen; });
            if (stop_) return;
            seen = generation_;
            job  = job_;
            n    = job_n_;
        }
        int64_t begin, end;
        chunk_of(n, n_threads(), index + 1, &begin, &end);
        std::exception_ptr err;
        t_inside_pool = true;
        try {
            if (begin < end) (*job)(begin, end);
        } catch (...) {  // an exception leaving a thread's function would std::terminate the process
            err = std::current_exception();
        }
        t_inside_pool = false;
        {
            std::lock_guard<std::mutex> lock(mutex_);
            if (err && !error_) error_ = err;
            if (--pending_ == 0) cv_done_.notify_one();
        }
    }
}

void thread_pool::parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn) {
    if (n <= 0) return;
    if (workers_.empty() || t_inside_pool || n == 1) {
        fn(0, n);
        return;
    }
    std::unique_lock<std::mutex> lock(mutex_);
    if (busy_) {  // another thread is using the pool: run serially rather than wait
        lock.unlock();
        fn(0, n);
        return;
    }
    busy_    = true;
    job_     = &fn;
    job_n_   = n;
    pending_ = static_cast<int>(workers_.size());
    ++generation_;
    lock.unlock();
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

    lock.lock();
    cv_done_.wait(lock, [&] { return pending_ == 0; });
    if (!err) err = error_;
    error_ = nullptr;
    busy_  = false;
    job_   = nullptr;
    lock.unlock();
    if (err) std::rethrow_exception(err);
}

}  // namespace gptq
