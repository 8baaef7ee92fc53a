// A small fixed-size thread pool with a blocking parallel_for.
//
// parallel_for splits [0, n) into contiguous chunks, one per worker (the calling thread takes
// one too), and returns when all are done. Nested calls from inside a task run serially.
// An exception thrown by fn in any thread (std::bad_alloc above all) is rethrown by parallel_for in
// the calling thread once every chunk has finished (the first one, if several threw), so callers
// turn it into an error as they would in serial code instead of the process terminating.
#pragma once

#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace gptq {

class thread_pool {
public:
    explicit thread_pool(int n_threads);  // n_threads <= 0: hardware concurrency
    ~thread_pool();
    thread_pool(const thread_pool&)            = delete;
    thread_pool& operator=(const thread_pool&) = delete;

    int n_threads() const { return static_cast<int>(workers_.size()) + 1; }

    // fn(begin, end) over disjoint ranges covering [0, n).
    void parallel_for(int64_t n, const std::function<void(int64_t, int64_t)>& fn);

    static thread_pool& global();  // lazily created with hardware concurrency

private:
    void worker_loop(int index);

    std::vector<std::thread>                     workers_;
    std::mutex                                   mutex_;
    std::condition_variable                      cv_work_;
    std::condition_variable                      cv_done_;
    const std::function<void(int64_t, int64_t)>* job_        = nullptr;
    int64_t                                      job_n_      = 0;
    uint64_t                                     generation_ = 0;
    int                                          pending_    = 0;
    bool                                         stop_       = false;
    bool                                         busy_       = false;
    std::exception_ptr                           error_;  // first exception of a worker in this job
};

}  // namespace gptq
