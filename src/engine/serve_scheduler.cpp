// serve_scheduler (serve_scheduler.h): the step loop of `gptq serve`.
#include "serve_scheduler.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/log.h"
#include "stop_text.h"

namespace gptq {

namespace {
constexpr status_code E_ARG = status_code::STATUS_INVALID_ARGUMENT;
using clock_type            = std::chrono::steady_clock;

double seconds_between(clock_type::time_point a, clock_type::time_point b) {
    return std::chrono::duration<double>(b - a).count();
}

int64_t pages_for(int64_t positions, int64_t page_size) {
    return (positions + page_size - 1) / page_size;
}

// Log-softmax of logits[n] at `id`, and the `n_top` most likely ids with theirs (ties: lower id).
token_logprob logprobs_of(const float* logits, int64_t n, int32_t id, int32_t n_top) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t i = 0; i < n; ++i) m = std::max(m, static_cast<double>(logits[i]));
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += std::exp(static_cast<double>(logits[i]) - m);
    const double  lse = m + std::log(sum);
    token_logprob out;
    out.id      = id;
    out.logprob = static_cast<float>(logits[id] - lse);
    if (n_top > 0) {
        std::vector<int32_t> order(static_cast<size_t>(n));
        for (int64_t i = 0; i < n; ++i) order[static_cast<size_t>(i)] = static_cast<int32_t>(i);
        const size_t k = std::min<size_t>(static_cast<size_t>(n_top), order.size());
        auto better = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
        std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(k), order.end(), better);
        for (size_t i = 0; i < k; ++i) out.top.emplace_back(order[i], static_cast<float>(logits[order[i]] - lse));
    }
    return out;
}
// The same from a row's candidates (ops/logits_top.h), which hold `id` and n_top <= k: the row's
// log-sum-exp is max + log(sum_exp), as logprobs_of computes it.
token_logprob logprobs_of_top(const int32_t* ids, const float* logits, int64_t k, double sum_exp, int32_t id,
                              int32_t n_top) {
    const double  lse = static_cast<double>(logits[0]) + std::log(sum_exp);
    token_logprob out;
    out.id = id;
    for (int64_t i = 0; i < k; ++i)
        if (ids[i] == id) out.logprob = static_cast<float>(logits[i] - lse);
    for (int64_t i = 0; i < std::min<int64_t>(n_top, k); ++i)
        out.top.emplace_back(ids[i], static_cast<float>(logits[i] - lse));
    return out;
}
}  // namespace

// ---- serve_stream ---------------------------------------------------------------------------------

bool serve_stream::next(serve_event& out, std::chrono::milliseconds timeout) {
    std::unique_lock lk(mu_);
    if (!cv_.wait_for(lk, timeout, [&] { return !events_.empty(); })) return false;
    out = std::move(events_.front());
    events_.pop_front();
    return true;
}

void serve_stream::push(serve_event e) {
    {
        std::lock_guard lk(mu_);
        events_.push_back(std::move(e));
    }
    cv_.notify_all();
}

void serve_histogram::observe(double v) {
    if (counts.size() != bounds.size() + 1) counts.assign(bounds.size() + 1, 0);
    size_t i = 0;
    while (i < bounds.size() && v > bounds[i]) ++i;
    ++counts[i];
    sum += v;
    ++count;
}

// ---- the scheduler --------------------------------------------------------------------------------

struct serve_scheduler::sequence {
    std::shared_ptr<serve_stream>  out;
    serve_request                  req;
    int64_t                        slot    = -1;
    int64_t                        max_new = 0;  // max_tokens capped to the context
    int64_t                        n_read  = 0;  // prompt tokens run through the model
    int64_t                        pages   = 0;  // reserved
    std::vector<int32_t>           history;      // prompt + generated
    std::unique_ptr<sampler>       smp;
    std::unique_ptr<serve_decoder> dec;
    std::unique_ptr<stop_text>     text;
    clock_type::time_point         submitted, last_token;
    bool                           done = false;

    int64_t n_prompt() const { return static_cast<int64_t>(req.prompt.size()); }
    int64_t n_generated() const { return static_cast<int64_t>(history.size()) - n_prompt(); }
};

serve_scheduler::serve_scheduler(model_session& session, const serve_vocab& vocab,
                                 const serve_scheduler_options& options)
    : session_(session), vocab_(vocab), opts_(options) {
    n_ctx_   = session_.n_ctx();
    n_vocab_ = session_.n_vocab();
    if (opts_.page_size < 1) opts_.page_size = 16;
    if (opts_.prefill_chunk < 1) opts_.prefill_chunk = 256;
    const int64_t full = session_.n_seq() * pages_for(n_ctx_, opts_.page_size);
    if (opts_.n_pages <= 0 || opts_.n_pages > full) opts_.n_pages = full;
    metrics_.n_slots     = session_.n_seq();
    metrics_.pages_total = opts_.n_pages;
    metrics_.ttft.bounds = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
    metrics_.tpot.bounds = {0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28};
    for (int64_t s = session_.n_seq() - 1; s >= 0; --s) free_slots_.push_back(s);
    thread_ = std::thread([this] { loop(); });
}

serve_scheduler::~serve_scheduler() {
    {
        std::lock_guard lk(mu_);
        stopping_ = draining_ = true;
        for (auto& q : waiting_) q->out->cancel();
    }
    cv_.notify_all();
    if (thread_.joinable()) thread_.join();
}

result<std::shared_ptr<serve_stream>> serve_scheduler::submit(serve_request request) {
    const int64_t n = static_cast<int64_t>(request.prompt.size());
    if (n == 0) return make_error(E_ARG, "the prompt is empty (no tokens)");
    if (n >= n_ctx_)
        return make_error(
            E_ARG, "the prompt is {} tokens, the context is {} positions: no room to generate; shorten it", n, n_ctx_);
    for (int32_t id : request.prompt)
        if (id < 0 || id >= n_vocab_)
            return make_error(E_ARG, "token id {} is outside the vocabulary (0 .. {})", id, n_vocab_ - 1);
    if (request.max_tokens < 1) return make_error(E_ARG, "max_tokens is {}, expected >= 1", request.max_tokens);
    auto q       = std::make_unique<sequence>();
    q->max_new   = std::min(request.max_tokens, n_ctx_ - n);
    q->pages     = pages_for(n + q->max_new, opts_.page_size);
    q->history   = request.prompt;
    q->smp       = std::make_unique<sampler>(request.sampling);
    q->dec       = vocab_.new_decoder(request.prompt.back());
    q->text      = std::make_unique<stop_text>(request.stop);
    q->submitted = clock_type::now();
    q->req       = std::move(request);
    q->out       = std::make_shared<serve_stream>();
    if (q->pages > opts_.n_pages)
        return make_error(E_ARG, "the prompt and max_tokens need {} KV pages of {} positions, the server has {}",
                          q->pages, opts_.page_size, opts_.n_pages);
    auto out = q->out;
    {
        std::lock_guard lk(mu_);
        if (draining_)
            return make_error(status_code::STATUS_CANCELLED, "the server is shutting down and admits no new requests");
        waiting_.push_back(std::move(q));
        metrics_.waiting = static_cast<int64_t>(waiting_.size());
    }
    cv_.notify_all();
    return out;
}

void serve_scheduler::drain() {
    std::unique_lock lk(mu_);
    draining_ = true;
    cv_.notify_all();
    cv_.wait(lk, [&] { return waiting_.empty() && metrics_.running == 0; });
}

serve_metrics serve_scheduler::metrics() const {
    std::lock_guard lk(mu_);
    return metrics_;
}

// FIFO: the oldest waiting request first; a request that does not fit holds back those behind it
// (no starvation of long prompts). Cancelled waiting requests leave here.
void serve_scheduler::admit_locked() {
    for (auto it = waiting_.begin(); it != waiting_.end();) {
        if ((*it)->out->cancelled()) {
            serve_event e;
            e.finished      = true;
            e.finish_reason = "cancelled";
            e.n_prompt      = (*it)->n_prompt();
            (*it)->out->push(std::move(e));
            ++metrics_.finished_cancelled;
            it = waiting_.erase(it);
        } else {
            ++it;
        }
    }
    while (!waiting_.empty() && !free_slots_.empty() &&
           metrics_.pages_reserved + waiting_.front()->pages <= opts_.n_pages) {
        auto q  = std::move(waiting_.front());
        q->slot = free_slots_.back();
        free_slots_.pop_back();
        waiting_.pop_front();
        metrics_.pages_reserved += q->pages;
        session_.seq_reset(q->slot);
        running_.push_back(std::move(q));
    }
    metrics_.waiting = static_cast<int64_t>(waiting_.size());
    metrics_.running = static_cast<int64_t>(running_.size());
}

void serve_scheduler::loop() {
    for (;;) {
        {
            std::unique_lock lk(mu_);
            cv_.wait(lk, [&] { return stopping_ || !waiting_.empty() || !running_.empty(); });
            if (stopping_) {
                for (auto& q : running_) q->out->cancel();
                for (auto& q : waiting_) q->out->cancel();
            }
            admit_locked();
            if (stopping_ && running_.empty() && waiting_.empty()) break;
        }
        try {
            run_step();
        } catch (const std::exception& ex) {  // out of memory in a step: its sequences fail, the server lives
            GPTQ_LOG_ERROR("serve: a step failed: {}", ex.what());
            for (auto& q : running_) finish(*q, "error", ex.what());
        }
        {
            std::lock_guard lk(mu_);
            running_.erase(std::remove_if(running_.begin(), running_.end(), [](const auto& q) { return q->done; }),
                           running_.end());
            int64_t used = 0;
            for (const auto& q : running_) used += pages_for(session_.seq_pos(q->slot), opts_.page_size);
            metrics_.pages_used = used;
            metrics_.running    = static_cast<int64_t>(running_.size());
            ++metrics_.steps;
        }
        cv_.notify_all();  // drain() waits for running to reach 0
    }
}

// One forward over every running sequence: its pending token (decode) or the next chunk of its
// prompt (prefill, within the step's prefill budget); then sample where a prompt is complete.
bool serve_scheduler::run_step() {
    std::vector<seq_step>  steps;
    std::vector<sequence*> rows;
    std::vector<int64_t>   offsets;
    ids_.clear();
    int64_t budget = opts_.prefill_chunk;
    for (auto& qp : running_) {
        sequence& q = *qp;
        if (q.out->cancelled()) {
            finish(q, "cancelled");
            continue;
        }
        if (q.n_read < q.n_prompt()) {
            const int64_t n = std::min(q.n_prompt() - q.n_read, budget);
            if (n == 0) continue;
            budget -= n;
            offsets.push_back(static_cast<int64_t>(ids_.size()));
            ids_.insert(ids_.end(), q.req.prompt.begin() + q.n_read, q.req.prompt.begin() + q.n_read + n);
            steps.push_back({.seq = q.slot, .ids = nullptr, .n_tokens = n, .lora = q.req.lora});
        } else {
            offsets.push_back(static_cast<int64_t>(ids_.size()));
            ids_.push_back(q.history.back());
            steps.push_back({.seq = q.slot, .ids = nullptr, .n_tokens = 1, .lora = q.req.lora});
        }
        rows.push_back(&q);
    }
    if (steps.empty()) return false;
    for (size_t i = 0; i < steps.size(); ++i) steps[i].ids = ids_.data() + offsets[i];  // ids_ no longer grows
    inv_temp_.resize(steps.size());
    for (size_t i = 0; i < rows.size(); ++i) {
        const sampling_params& sp = rows[i]->req.sampling;
        inv_temp_[i]              = sp.greedy() ? 1.0f : 1.0f / sp.temperature;
    }
    const status st = session_.step_top(steps, k_candidates, inv_temp_.data(), &top_);
    if (!st) {
        GPTQ_LOG_ERROR("serve: a step over {} sequences failed: {}", steps.size(), st.message());
        for (sequence* q : rows) finish(*q, "error", st.message());
        return true;
    }
    for (size_t i = 0; i < rows.size(); ++i) {
        sequence& q = *rows[i];
        if (q.n_read < q.n_prompt()) {
            q.n_read += steps[i].n_tokens;
            std::lock_guard lk(mu_);
            metrics_.prompt_tokens += steps[i].n_tokens;
            if (q.n_read < q.n_prompt()) continue;  // more prompt chunks to come
        }
        accept(q, static_cast<int64_t>(i));
    }
    return true;
}

// Sample the next token of q from row `row` of the step's candidates (the whole logits row only
// where they do not decide it), pass its text on, finish q when it ends.
void serve_scheduler::accept(sequence& q, int64_t row) {
    const bool                        ignore_eos = q.req.ignore_eos;
    const auto&                       eos        = vocab_.eos_ids();
    static const std::vector<int32_t> none;
    const std::vector<int32_t>&       banned   = ignore_eos ? eos : none;
    const size_t                      n_prompt = static_cast<size_t>(q.n_prompt());
    const int64_t                     k        = top_.k;
    const int32_t*                    cand_ids = top_.ids.data() + row * k;
    const float*                      cand_l   = top_.logits.data() + row * k;
    int32_t                           id       = 0;
    bool                              whole    = false;  // logits_ holds the row
    if (!q.smp->sample_top(cand_ids, cand_l, k, n_vocab_, top_.sum_exp_t[static_cast<size_t>(row)], q.history, banned,
                           n_prompt, &id)) {
        logits_.resize(static_cast<size_t>(n_vocab_));
        const status st = session_.step_row_logits(row, logits_.data());
        if (!st) {
            finish(q, "error", st.message());
            return;
        }
        work_.assign(logits_.begin(), logits_.end());  // the sampler changes its logits
        id    = q.smp->sample(work_.data(), n_vocab_, q.history, banned, n_prompt);
        whole = true;
        std::lock_guard lk(mu_);
        ++metrics_.sampled_whole_rows;
    }
    const auto now = clock_type::now();
    {
        std::lock_guard lk(mu_);
        ++metrics_.generated_tokens;
        if (q.n_generated() == 0)
            metrics_.ttft.observe(seconds_between(q.submitted, now));
        else
            metrics_.tpot.observe(seconds_between(q.last_token, now));
    }
    q.last_token = now;
    q.history.push_back(id);

    serve_event e;
    e.tokens.push_back(id);
    if (q.req.logprobs >= 0)
        e.logprobs.push_back(
            whole ? logprobs_of(logits_.data(), n_vocab_, id, q.req.logprobs)
                  : logprobs_of_top(cand_ids, cand_l, k, top_.sum_exp[static_cast<size_t>(row)], id, q.req.logprobs));
    const std::string piece  = q.dec->step(id);
    const bool        is_eos = !ignore_eos && std::find(eos.begin(), eos.end(), id) != eos.end();
    const bool        at_end = is_eos || q.n_generated() >= q.max_new;
    e.text                   = q.text->push(at_end ? piece + q.dec->finish() : piece, at_end);
    std::string reason;
    if (q.text->stopped() || is_eos)
        reason = "stop";
    else if (at_end)
        reason = "length";
    q.out->push(std::move(e));
    if (!reason.empty()) finish(q, reason);
}

void serve_scheduler::finish(sequence& q, const std::string& reason, const std::string& error) {
    if (q.done) return;
    q.done = true;
    serve_event e;
    e.finished      = true;
    e.finish_reason = reason;
    e.error         = error;
    e.n_prompt      = q.n_prompt();
    e.n_generated   = q.n_generated();
    session_.seq_reset(q.slot);
    {
        std::lock_guard lk(mu_);
        free_slots_.push_back(q.slot);
        metrics_.pages_reserved -= q.pages;
        if (reason == "stop") ++metrics_.finished_stop;
        if (reason == "length") ++metrics_.finished_length;
        if (reason == "cancelled") ++metrics_.finished_cancelled;
        if (reason == "error") ++metrics_.finished_error;
    }
    q.out->push(std::move(e));
}

}  // namespace gptq
