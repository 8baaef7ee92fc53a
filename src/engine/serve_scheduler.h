// The engine of `gptq serve` (docs/serve.md): one thread owns a model_session and runs it step
// after step over a ragged batch of every running sequence: each step admits waiting requests
// while sequence slots and KV pages allow, runs the decode token of every sequence that has one
// plus chunks of prompts still being read (chunked prefill, at most prefill_chunk prompt tokens a
// step), samples, hands each request its new text, and frees the sequences that finished. HTTP
// threads submit requests and read their events from a serve_stream.
//
//     GPTQ_TRY(session->reserve(n_slots, n_ctx));
//     serve_scheduler sch(*session, vocab, {.page_size = 16, .prefill_chunk = 256});
//     GPTQ_ASSIGN_OR_RETURN(auto stream, sch.submit(request));
//     for (serve_event e; !e.finished;)
//         if (stream->next(e, 1s)) send(e.text);   // e.finished: finish_reason, usage
//
// KV accounting (docs/serve.md "KV pages"): positions are counted in pages of page_size; a request
// is admitted when a slot is free and the pages for its prompt + max_tokens are free (reserved up
// front, so a running sequence never waits for memory); pages_used counts the pages holding
// cached positions. Both return to 0 when nothing runs.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "core/status.h"
#include "gptq/sampler.h"
#include "model_session.h"

namespace gptq {

// One request as the scheduler runs it (the HTTP layer has checked the values).
struct serve_request {
    std::vector<int32_t>     prompt;           // >= 1 token
    int64_t                  max_tokens = 16;  // >= 1; capped to the context (finish_reason "length")
    sampling_params          sampling;
    std::vector<std::string> stop;             // the text ends before the first that appears
    int32_t                  logprobs   = -1;  // -1: none; else the alternatives per token (0 .. 20)
    bool                     ignore_eos = false;
    int32_t                  lora       = -1;  // the session's LoRA adapter (the model name asked for), -1 none
};

struct token_logprob {
    int32_t                                id      = 0;
    float                                  logprob = 0.0f;  // log-softmax of the model's logits
    std::vector<std::pair<int32_t, float>> top;             // the most likely ids, best first
};

// What a request gets after a step: its new final text, and at the end why it finished.
struct serve_event {
    std::string                text;  // new text (maybe empty: held back for a stop string or UTF-8)
    std::vector<int32_t>       tokens;
    std::vector<token_logprob> logprobs;  // one per token when logprobs >= 0
    bool                       finished = false;
    std::string                finish_reason;  // "stop", "length"; "cancelled", "error" (with error)
    std::string                error;
    int64_t                    n_prompt    = 0;  // usage, filled on the finished event
    int64_t                    n_generated = 0;
};

// The channel between the scheduler and the thread serving one request.
class serve_stream {
public:
    // The next event, waiting up to `timeout`; false when none came.
    bool next(serve_event& out, std::chrono::milliseconds timeout);
    // Cancel the request: the scheduler drops it at its next step (a finished event follows).
    void cancel() { cancelled_ = true; }
    bool cancelled() const { return cancelled_; }

    void push(serve_event e);  // scheduler side

private:
    std::mutex              mu_;
    std::condition_variable cv_;
    std::deque<serve_event> events_;
    std::atomic<bool>       cancelled_{false};
};

// Text of token ids, per sequence (the tokenizer's incremental decoder; a double in tests).
class serve_decoder {
public:
    virtual ~serve_decoder()             = default;
    virtual std::string step(int32_t id) = 0;  // text that became final
    virtual std::string finish()         = 0;  // what is still held back
};

class serve_vocab {
public:
    virtual ~serve_vocab() = default;
    // A decoder for a sequence whose prompt ends with `last_prompt_id`: the new text reads as the
    // prompt's continuation (" will", where a decode of the new ids alone strips the space).
    virtual std::unique_ptr<serve_decoder> new_decoder(int32_t last_prompt_id) const = 0;
    virtual const std::vector<int32_t>&    eos_ids() const                           = 0;
};

struct serve_scheduler_options {
    int64_t page_size     = 16;   // positions per KV page
    int64_t n_pages       = 0;    // KV pages in all; 0: every slot's full context
    int64_t prefill_chunk = 256;  // prompt tokens run per step at most (all prefilling sequences)
};

// Prometheus-style histogram: counts of observations <= each bound, their sum and count.
struct serve_histogram {
    std::vector<double>  bounds;
    std::vector<int64_t> counts;  // cumulative is computed when printed; per bucket here (+Inf last)
    double               sum   = 0.0;
    int64_t              count = 0;
    void                 observe(double v);
};

struct serve_metrics {
    int64_t         running = 0, waiting = 0;
    int64_t         n_slots = 0, pages_total = 0, pages_used = 0, pages_reserved = 0;
    int64_t         prompt_tokens = 0, generated_tokens = 0, steps = 0;
    int64_t         finished_stop = 0, finished_length = 0, finished_cancelled = 0, finished_error = 0;
    int64_t         sampled_whole_rows = 0;  // tokens the candidates did not decide (the whole row fetched)
    serve_histogram ttft, tpot;              // seconds: submit -> first token; between tokens of a sequence
};

class serve_scheduler {
public:
    // `session` has been reserved (its n_seq() slots of n_ctx() positions are the scheduler's).
    serve_scheduler(model_session& session, const serve_vocab& vocab, const serve_scheduler_options& options);
    ~serve_scheduler();  // cancels what runs and joins the thread

    // Queue a request. Errors: STATUS_INVALID_ARGUMENT (prompt empty, as long as the context, more
    // pages than exist, an id outside the vocabulary), STATUS_CANCELLED (draining).
    result<std::shared_ptr<serve_stream>> submit(serve_request request);

    // Stop admitting new requests (submit errors); the queued and running ones finish. Returns
    // when nothing is left.
    void drain();

    serve_metrics metrics() const;
    int64_t       n_ctx() const { return n_ctx_; }
    int64_t       page_size() const { return opts_.page_size; }

private:
    struct sequence;
    void loop();
    void admit_locked();
    bool run_step();  // false when nothing ran
    void accept(sequence& q, int64_t row);
    void finish(sequence& q, const std::string& reason, const std::string& error = "");

    model_session&          session_;
    const serve_vocab&      vocab_;
    serve_scheduler_options opts_;
    int64_t                 n_ctx_ = 0, n_vocab_ = 0;

    mutable std::mutex                     mu_;  // guards the members below up to running_
    std::condition_variable                cv_;
    std::deque<std::unique_ptr<sequence>>  waiting_;
    bool                                   draining_ = false, stopping_ = false;
    serve_metrics                          metrics_;
    std::vector<int64_t>                   free_slots_;
    std::vector<std::unique_ptr<sequence>> running_;  // the scheduler thread's (admitted under mu_)

    // Candidates per row (logits_top.h): enough for logprobs' 20 alternatives and most top-k.
    static constexpr int64_t k_candidates = 64;
    logits_top               top_;  // scheduler thread only
    std::vector<float>       inv_temp_, logits_, work_;
    std::vector<int32_t>     ids_;
    std::thread              thread_;
};

}  // namespace gptq
