// `gptq serve` (include/gptq/serve.h): the HTTP layer over cpp-httplib. Each request runs on one of
// httplib's worker threads: it parses the body (serve_api.h), tokenizes, submits to the scheduler
// (serve_scheduler.h, one thread owning the model_session) and sends the events it gets back, as
// one JSON response or as server-sent events. docs/serve.md describes the design.
#include "gptq/serve.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <httplib.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <thread>

#include "context_limit.h"
#include "core/error.h"
#include "core/log.h"
#include "eos_ids.h"
#include "gptq/device.h"
#include "host_memory.h"  // human_bytes
#include "io/hf_config.h"
#include "model_session.h"
#include "serve_api.h"
#include "serve_plan.h"
#include "serve_scheduler.h"
#include "tokenizer/tokenizer.h"

namespace gptq {

namespace {
using namespace std::chrono_literals;
using ojson                 = nlohmann::ordered_json;
constexpr status_code E_ARG = status_code::STATUS_INVALID_ARGUMENT;

// JSON text; invalid UTF-8 (a prompt's bytes echoed in a message) becomes U+FFFD instead of throwing.
std::string json_text(const ojson& j) {
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

// ---- the tokenizer as the scheduler sees it ---------------------------------------------------------

class tokenizer_decoder : public serve_decoder {
public:
    // The prompt's last token goes first, its text dropped: the new text is decoded in context.
    tokenizer_decoder(const tokenizer& tok, int32_t last_prompt_id) : dec_(tok, /*skip_special=*/true) {
        (void)dec_.step(last_prompt_id);
    }
    std::string step(int32_t id) override { return dec_.step(id); }
    std::string finish() override { return dec_.finish(); }

private:
    incremental_decoder dec_;
};

class tokenizer_vocab : public serve_vocab {
public:
    tokenizer_vocab(const tokenizer& tok, std::vector<int32_t> eos) : tok_(tok), eos_(std::move(eos)) {}
    std::unique_ptr<serve_decoder> new_decoder(int32_t last_prompt_id) const override {
        return std::make_unique<tokenizer_decoder>(tok_, last_prompt_id);
    }
    const std::vector<int32_t>& eos_ids() const override { return eos_; }

private:
    const tokenizer&     tok_;
    std::vector<int32_t> eos_;
};

// ---- startup: model, context, KV plan -----------------------------------------------------------------

result<std::string> chat_template_of(const serve_options& o, const tokenizer& tok) {
    if (o.chat_template_file.empty()) return tok.config().chat_template;
    return chat_template_file_read(o.chat_template_file);
}

// The KV plan (serve_plan.h) for this session: the budget is --kv-memory in bytes, or that
// fraction of the memory still available after the weights (model_session::memory_available).
result<serve_plan> plan_kv(const serve_options& o, const model_session& s) {
    serve_kv_inputs in;
    const int64_t   model_ctx = model_context_limit(s.hparams());
    in.n_ctx                  = o.n_ctx > 0 ? o.n_ctx : (model_ctx > 0 ? std::min<int64_t>(model_ctx, 4096) : 4096);
    if (model_ctx > 0 && in.n_ctx > model_ctx)
        return make_error(E_ARG, "--ctx {} is more than the model's context of {} positions (max_position_embeddings)",
                          in.n_ctx, model_ctx);
    if (o.max_seqs < 1) return make_error(E_ARG, "--max-seqs is {}, expected >= 1", o.max_seqs);
    // A backend without ragged steps (model_session::ragged; both backends have them now) would
    // serve one sequence at a time: slot 0 alone, prefill chunks and decode tokens at any position.
    in.max_seqs = s.ragged() ? o.max_seqs : 1;
    if (!s.ragged() && o.max_seqs > 1)
        GPTQ_LOG_WARN(
            "serve: {} runs lockstep batches only, not the ragged steps of continuous batching: serving one "
            "sequence at a time (docs/serve.md)",
            s.device());
    in.per_position = s.kv_bytes_per_position();
    in.paged        = s.kv_page_size() > 0;
    in.page_size    = in.paged ? s.kv_page_size() : o.page_size;
    in.budget       = o.kv_memory_bytes;
    in.budget_of    = "--kv-memory";
    if (in.budget == 0) {
        if (!(o.kv_memory_frac > 0.0 && o.kv_memory_frac <= 1.0))
            return make_error(E_ARG, "--kv-memory {} is not a fraction in (0, 1] nor a size in bytes",
                              o.kv_memory_frac);
        const uint64_t avail = s.memory_available();  // host or device memory still free
        in.budget =
            avail > 0 ? static_cast<uint64_t>(static_cast<double>(avail) * o.kv_memory_frac)
                      : in.per_position * uint64_t(in.n_ctx) * uint64_t(in.max_seqs);  // unknown: what --max-seqs asks
        in.budget_of = avail > 0
                           ? fmt::format("--kv-memory {:g} of the {} available", o.kv_memory_frac, human_bytes(avail))
                           : "--max-seqs (free memory unknown)";
    }
    return serve_kv_plan(in);
}

// ---- the server ---------------------------------------------------------------------------------------

class server {
public:
    server(const serve_options& o, model_session& s, const tokenizer& tok, serve_scheduler& sch, std::string tmpl,
           std::string name)
        : o_(o), session_(s), tok_(tok), sch_(sch), template_(std::move(tmpl)), name_(std::move(name)) {
        const std::vector<int32_t> a = tok_.encode("a", /*add_special=*/false);
        anchor_                      = a.empty() ? 0 : a.back();
        anchor_text_                 = tok_.decode(std::vector<int32_t>{anchor_}, false);
    }

    void    install(httplib::Server& svr);
    void    stop_admitting() { draining_ = true; }
    int64_t in_flight() const { return in_flight_; }

private:
    struct in_flight_guard;
    bool                     authorized(const httplib::Request& req, httplib::Response& res);
    void                     send_error(httplib::Response& res, const api_error& e);
    void                     handle_generate(const httplib::Request& req, httplib::Response& res, api_kind kind);
    std::optional<api_error> prompt_ids(api_request& r);
    std::string              metrics_text();
    std::vector<api_token>   tokens_of(const std::vector<token_logprob>& lps) const;
    std::string              token_text(int32_t id) const;
    void                     respond_whole(httplib::Response& res, const api_request& r, const api_response_head& head,
                                           serve_stream& stream);
    void                     respond_stream(httplib::Response& res, api_request r, const api_response_head& head,
                                            std::shared_ptr<serve_stream> stream, std::shared_ptr<in_flight_guard> guard);
    void                     count(int status) {
                            std::lock_guard lk(mu_);
                            ++requests_[status];
    }

    const serve_options&   o_;
    model_session&         session_;
    const tokenizer&       tok_;
    serve_scheduler&       sch_;
    std::string            template_, name_;
    int32_t                anchor_ = 0;  // a plain token that token_text decodes in front of another
    std::string            anchor_text_;
    std::atomic<bool>      draining_{false};
    std::atomic<int64_t>   in_flight_{0};
    std::atomic<int64_t>   next_id_{0};
    std::mutex             mu_;
    std::map<int, int64_t> requests_;  // by HTTP status
    std::mt19937_64        seeds_{std::random_device{}()};
};

// One request in flight (streams keep theirs until the last byte is sent).
struct server::in_flight_guard {
    std::atomic<int64_t>& n;
    explicit in_flight_guard(std::atomic<int64_t>& c) : n(c) { ++n; }
    ~in_flight_guard() { --n; }
};

void server::send_error(httplib::Response& res, const api_error& e) {
    res.status = e.http_status;
    res.set_content(json_text(api_error_json(e)), "application/json");
    count(e.http_status);
}

bool server::authorized(const httplib::Request& req, httplib::Response& res) {
    if (o_.api_key.empty()) return true;
    if (req.get_header_value("Authorization") == "Bearer " + o_.api_key) return true;
    send_error(res, {401, "invalid or missing API key (send \"Authorization: Bearer <key>\")", "invalid_request_error",
                     "", "invalid_api_key"});
    return false;
}

// The prompt as token ids: a completions prompt (text with BOS, or ids as given), or the chat
// messages rendered with the chat template (which places BOS itself).
std::optional<api_error> server::prompt_ids(api_request& r) {
    const int64_t n_vocab = session_.n_vocab();
    if (r.kind == api_kind::API_CHAT) {
        if (template_.empty())
            return api_error{400,
                             fmt::format("the model {} has no chat template; start the server with --chat-template "
                                         "FILE or use /v1/completions",
                                         name_),
                             "invalid_request_error", "messages", ""};
        chat_template_vars v;
        v.bos_token             = tok_.config().bos_token.value_or("");
        v.eos_token             = tok_.config().eos_token.value_or("");
        v.add_generation_prompt = true;
        auto text               = chat_template_render(template_, r.messages, v);
        if (!text) return api_error{400, text.error().message(), "invalid_request_error", "messages", ""};
        r.run.prompt = tok_.encode(*text, /*add_special=*/false);
    } else if (r.prompt_is_ids) {
        for (int32_t id : r.prompt_ids)
            if (id >= n_vocab)
                return api_error{400,
                                 fmt::format("prompt token id {} is outside the vocabulary (0 .. {})", id, n_vocab - 1),
                                 "invalid_request_error", "prompt", ""};
        r.run.prompt = r.prompt_ids;
    } else {
        r.run.prompt = tok_.encode(r.prompt_text, /*add_special=*/true);
    }
    if (r.truncate_prompt > 0 && static_cast<int64_t>(r.run.prompt.size()) > r.truncate_prompt)
        r.run.prompt.erase(r.run.prompt.begin(), r.run.prompt.end() - r.truncate_prompt);
    const int64_t n   = static_cast<int64_t>(r.run.prompt.size());
    const int64_t ctx = sch_.n_ctx();
    const char*   p   = r.kind == api_kind::API_CHAT ? "messages" : "prompt";
    if (n == 0) return api_error{400, "the prompt is empty (no tokens)", "invalid_request_error", p, ""};
    if (n >= ctx)
        return api_error{400,
                         fmt::format("the prompt is {} tokens and the context is {} positions: no room to generate "
                                     "(shorten the prompt)",
                                     n, ctx),
                         "invalid_request_error", p, "context_length_exceeded"};
    if (!r.max_tokens_given && r.kind == api_kind::API_CHAT) r.run.max_tokens = ctx - n;
    return std::nullopt;
}

// A token's text as it reads inside a sequence (" will", not "will": a SentencePiece decoder strips
// the first space of a text): decode(anchor, id) without decode(anchor).
std::string server::token_text(int32_t id) const {
    const std::string both = tok_.decode({anchor_, id}, false);
    return both.size() >= anchor_text_.size() ? both.substr(anchor_text_.size()) : tok_.decode({id}, false);
}

std::vector<api_token> server::tokens_of(const std::vector<token_logprob>& lps) const {
    std::vector<api_token> out;
    for (const token_logprob& lp : lps) {
        api_token t;
        t.lp   = lp;
        t.text = token_text(lp.id);
        for (const auto& [id, v] : lp.top) t.top.emplace_back(token_text(id), v);
        out.push_back(std::move(t));
    }
    return out;
}

void server::handle_generate(const httplib::Request& req, httplib::Response& res, api_kind kind) {
    auto guard = std::make_shared<in_flight_guard>(in_flight_);
    if (!authorized(req, res)) return;
    if (draining_) return send_error(res, {503, "the server is shutting down", "server_error", "", "shutting_down"});
    const int64_t limit = o_.max_connections > 0 ? o_.max_connections : 4 * o_.max_seqs;
    if (in_flight_ > limit) {
        res.set_header("Retry-After", "1");
        return send_error(res, {503,
                                fmt::format("the server is busy ({} requests in flight, at most {}); retry later",
                                            in_flight_.load(), limit),
                                "server_error", "", "overloaded"});
    }
    api_request r;
    if (auto e = api_request_parse(req.body, kind, r)) return send_error(res, *e);
    // "model": the base model's name (or none) runs without adapter; a LoRA adapter's name with it.
    if (!r.model.empty() && r.model != name_) {
        const auto& loras = session_.lora_names();
        const auto  it    = std::find(loras.begin(), loras.end(), r.model);
        if (it == loras.end())
            return send_error(
                res,
                {404,
                 fmt::format("the model '{}' does not exist; this server serves '{}'{}", r.model, name_,
                             loras.empty() ? "" : fmt::format(" and the LoRA adapters '{}'", fmt::join(loras, "', '"))),
                 "invalid_request_error", "model", "model_not_found"});
        r.run.lora = static_cast<int32_t>(it - loras.begin());
    }
    if (auto e = prompt_ids(r)) return send_error(res, *e);
    if (!r.seed_given) {
        std::lock_guard lk(mu_);
        r.run.sampling.seed = seeds_();
    }
    auto submitted = sch_.submit(r.run);
    if (!submitted) {
        const bool stopping = submitted.error().code() == status_code::STATUS_CANCELLED;
        return send_error(res, {stopping ? 503 : 400, submitted.error().message(),
                                stopping ? "server_error" : "invalid_request_error", "", ""});
    }
    std::shared_ptr<serve_stream> stream = *submitted;
    api_response_head             head;
    head.id = fmt::format("{}-{}", kind == api_kind::API_CHAT ? "chatcmpl" : "cmpl", next_id_++);
    head.created =
        std::chrono::duration_cast<std::chrono::seconds>(std::chrono::system_clock::now().time_since_epoch()).count();
    head.model = name_;

    if (!r.stream) return respond_whole(res, r, head, *stream);
    respond_stream(res, std::move(r), head, stream, guard);
}

// The whole response once the sequence finished (a client that leaves is not seen before the end).
void server::respond_whole(httplib::Response& res, const api_request& r, const api_response_head& head,
                           serve_stream& stream) {
    std::string            text;
    std::vector<api_token> lps;
    serve_event            e;
    for (;;) {
        if (!stream.next(e, 1s)) continue;
        text += e.text;
        if (r.run.logprobs >= 0) {
            auto t = tokens_of(e.logprobs);
            lps.insert(lps.end(), t.begin(), t.end());
        }
        if (e.finished) break;
    }
    if (e.finish_reason == "error")
        return send_error(res, {500, "generation failed: " + e.error, "server_error", "", ""});
    if (e.finish_reason == "cancelled")
        return send_error(res, {503, "the request was cancelled (the server is stopping)", "server_error", "", ""});
    const ojson j = api_response_json(r, head, text, e.finish_reason, {e.n_prompt, e.n_generated},
                                      r.run.logprobs >= 0 ? &lps : nullptr);
    res.set_content(json_text(j), "application/json");
    count(200);
}

void server::respond_stream(httplib::Response& res, api_request r, const api_response_head& head,
                            std::shared_ptr<serve_stream> stream, std::shared_ptr<in_flight_guard> guard) {
    // Server-sent events: a chunk per step with new text, the last one with the finish reason,
    // the usage chunk when asked, then [DONE]. A failed write (the client left) cancels.
    count(200);
    struct stream_state {
        std::shared_ptr<serve_stream>    stream;
        std::shared_ptr<in_flight_guard> guard;
        api_request                      r;
        api_response_head                head;
        bool                             first = true, over = false;
    };
    auto st = std::make_shared<stream_state>(stream_state{stream, guard, std::move(r), head});
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, st](size_t, httplib::DataSink& sink) {
            auto send = [&](const ojson& j) {
                const std::string s = "data: " + json_text(j) + "\n\n";
                return sink.write(s.data(), s.size());
            };
            if (st->over) return false;
            serve_event e;
            if (!st->stream->next(e, 1s)) return true;  // nothing yet: called again
            const std::vector<api_token> lps =
                st->r.run.logprobs >= 0 ? tokens_of(e.logprobs) : std::vector<api_token>{};
            bool ok = true;
            if (!e.text.empty() || !lps.empty() || (st->first && st->r.kind == api_kind::API_CHAT)) {
                ok        = send(api_chunk_json(st->r, st->head, e.text, std::nullopt, st->first, &lps));
                st->first = false;
            }
            if (ok && e.finished) {
                if (e.finish_reason == "error" || e.finish_reason == "cancelled")
                    ok = send(api_error_json(
                        {500,
                         e.finish_reason == "error" ? "generation failed: " + e.error : "the request was cancelled",
                         "server_error", "", ""}));
                else
                    ok = send(api_chunk_json(st->r, st->head, "", e.finish_reason, st->first, nullptr));
                if (ok && st->r.include_usage)
                    ok = send(api_usage_chunk_json(st->r, st->head, {e.n_prompt, e.n_generated}));
                static const char done[] = "data: [DONE]\n\n";
                if (ok) ok = sink.write(done, sizeof(done) - 1);
                st->over = true;
                if (ok) sink.done();
                return ok;
            }
            if (!ok) st->stream->cancel();
            return ok;
        },
        [st](bool success) {
            if (!success) st->stream->cancel();  // the client left: free the sequence at the next step
        });
}

std::string server::metrics_text() {
    const serve_metrics m = sch_.metrics();
    std::string         s;
    auto                metric = [&](const char* name, const char* type, const char* help, const std::string& lines) {
        s += fmt::format("# HELP {} {}\n# TYPE {} {}\n{}", name, help, name, type, lines);
    };
    auto one = [](const char* name, double v) { return fmt::format("{} {}\n", name, v); };
    {
        std::lock_guard lk(mu_);
        std::string     lines;
        for (const auto& [code, n] : requests_)
            lines += fmt::format("gptq_requests_total{{code=\"{}\"}} {}\n", code, n);
        metric("gptq_requests_total", "counter", "HTTP requests to /v1/completions and /v1/chat/completions, by status",
               lines);
    }
    metric("gptq_prompt_tokens_total", "counter", "prompt tokens run",
           one("gptq_prompt_tokens_total", m.prompt_tokens));
    metric("gptq_generation_tokens_total", "counter", "tokens generated",
           one("gptq_generation_tokens_total", m.generated_tokens));
    metric("gptq_requests_finished_total", "counter", "sequences finished, by reason",
           fmt::format("gptq_requests_finished_total{{reason=\"stop\"}} {}\n"
                       "gptq_requests_finished_total{{reason=\"length\"}} {}\n"
                       "gptq_requests_finished_total{{reason=\"cancelled\"}} {}\n"
                       "gptq_requests_finished_total{{reason=\"error\"}} {}\n",
                       m.finished_stop, m.finished_length, m.finished_cancelled, m.finished_error));
    metric("gptq_sampled_whole_rows_total", "counter",
           "tokens sampled from the whole logits row (the step's top candidates did not decide them)",
           one("gptq_sampled_whole_rows_total", m.sampled_whole_rows));
    metric("gptq_running_sequences", "gauge", "sequences in the batch", one("gptq_running_sequences", m.running));
    metric("gptq_waiting_sequences", "gauge", "requests waiting for a slot or KV pages",
           one("gptq_waiting_sequences", m.waiting));
    metric("gptq_kv_pages_used", "gauge", "KV pages holding cached positions", one("gptq_kv_pages_used", m.pages_used));
    metric("gptq_kv_pages_reserved", "gauge", "KV pages reserved by running sequences (prompt + max_tokens)",
           one("gptq_kv_pages_reserved", m.pages_reserved));
    metric("gptq_kv_pages_total", "gauge", "KV pages in all", one("gptq_kv_pages_total", m.pages_total));
    metric("gptq_steps_total", "counter", "forward steps run", one("gptq_steps_total", m.steps));
    auto histogram = [&](const char* name, const char* help, const serve_histogram& h) {
        std::string lines;
        int64_t     cum = 0;
        for (size_t i = 0; i < h.bounds.size(); ++i) {
            cum += i < h.counts.size() ? h.counts[i] : 0;
            lines += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, h.bounds[i], cum);
        }
        lines += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, h.count, name, h.sum, name,
                             h.count);
        metric(name, "histogram", help, lines);
    };
    histogram("gptq_time_to_first_token_seconds", "submit to first token", m.ttft);
    histogram("gptq_time_per_output_token_seconds", "time between two tokens of a sequence", m.tpot);
    return s;
}

void server::install(httplib::Server& svr) {
    svr.Get("/health", [this](const httplib::Request&, httplib::Response& res) {
        res.status = draining_ ? 503 : 200;
        res.set_content(draining_ ? R"({"status":"shutting down"})" : R"({"status":"ok"})", "application/json");
    });
    svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
        res.set_content(metrics_text(), "text/plain; version=0.0.4");
    });
    svr.Get("/v1/models", [this](const httplib::Request& req, httplib::Response& res) {
        if (!authorized(req, res)) return;
        // The base model, then each LoRA adapter (its "parent" the base, as vLLM lists them).
        ojson data = ojson::array();
        auto  add  = [&](const std::string& id, const std::string& parent) {
            ojson m;
            m["id"]            = id;
            m["object"]        = "model";
            m["created"]       = 0;
            m["owned_by"]      = "gptqkit";
            m["max_model_len"] = sch_.n_ctx();
            if (!parent.empty()) m["parent"] = parent;
            data.push_back(std::move(m));
        };
        add(name_, "");
        for (const std::string& l : session_.lora_names()) add(l, name_);
        res.set_content(json_text(ojson{{"object", "list"}, {"data", data}}), "application/json");
    });
    svr.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
        handle_generate(req, res, api_kind::API_COMPLETIONS);
    });
    svr.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) {
        handle_generate(req, res, api_kind::API_CHAT);
    });
    // An exception out of a handler (a bug, or out of memory): a 500 with the OpenAI body, never a
    // dead server.
    svr.set_exception_handler([this](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
        std::string what = "unknown exception";
        try {
            std::rethrow_exception(ep);
        } catch (const std::exception& ex) {
            what = ex.what();
        } catch (...) {
        }
        GPTQ_LOG_ERROR("serve: a request handler failed: {}", what);
        send_error(res, {500, "internal error: " + what, "server_error", "", ""});
    });
    // Errors that httplib itself answers (no route, body too large, bad request line) get the
    // OpenAI error body too.
    svr.set_error_handler([this](const httplib::Request& req, httplib::Response& res) {
        if (!res.body.empty()) return;
        api_error e{res.status, "", res.status >= 500 ? "server_error" : "invalid_request_error", "", ""};
        if (res.status == 404)
            e.message = fmt::format("no such endpoint: {} {}", req.method, req.path);
        else if (res.status == 413)
            e.message = fmt::format("the request body is larger than {} bytes", o_.max_body_bytes);
        else
            e.message = fmt::format("HTTP {}", res.status);
        res.set_content(json_text(api_error_json(e)), "application/json");
        if (res.status == 413) count(413);
    });
}

// SIGTERM / SIGINT write their number to a pipe that serve_run waits on (a handler may run on
// any thread, OpenBLAS's included, and write() is async-signal-safe); the listener thread writes 0
// there if it stops on its own.
int g_signal_pipe[2] = {-1, -1};

extern "C" void on_stop_signal(int sig) {
    const unsigned char            b = static_cast<unsigned char>(sig);
    [[maybe_unused]] const ssize_t n = write(g_signal_pipe[1], &b, 1);
}

int wait_for_stop() {
    unsigned char b = 0;
    while (read(g_signal_pipe[0], &b, 1) < 0 && errno == EINTR) {
    }
    return b;
}

}  // namespace

status serve_run(const serve_options& o) {
    if (g_signal_pipe[0] < 0 && pipe(g_signal_pipe) != 0)
        return make_error(status_code::STATUS_IO_ERROR, "serve: cannot create the signal pipe");
    signal(SIGPIPE, SIG_IGN);  // a client that left: a failed write, not a dead server

    if (o.page_size < 1) return make_error(E_ARG, "--page-size is {}, expected >= 1", o.page_size);
    if (o.prefill_chunk < 1) return make_error(E_ARG, "--prefill-chunk is {}, expected >= 1", o.prefill_chunk);
    GPTQ_ASSIGN_OR_RETURN(const device_spec dev, device_parse(o.device));
    GPTQ_ASSIGN_OR_RETURN(auto tok, tokenizer::load(o.model_path));
    GPTQ_ASSIGN_OR_RETURN(std::string tmpl, chat_template_of(o, *tok));
    model_session_options so;
    so.model_path   = o.model_path;
    so.device       = dev;
    so.n_threads    = o.n_threads;
    so.n_ctx_hint   = o.n_ctx;
    so.kv_page_size = o.page_size;  // the GPU's pages are the scheduler's
    so.device_map   = o.device_map;
    so.max_memory   = o.max_memory;
    so.loras        = o.loras;
    so.lora_stack   = false;  // each adapter a model of its own, chosen per request
    GPTQ_ASSIGN_OR_RETURN(auto session, model_session_open(so));
    GPTQ_ASSIGN_OR_RETURN(const serve_plan plan, plan_kv(o, *session));
    const uint64_t weights = session->memory_used();  // before the KV cache
    GPTQ_TRY(session->reserve_paged(plan.n_slots, plan.n_ctx, plan.paged ? plan.n_pages : 0));
    {  // the GPU's activations at the largest step and a decode graph per batch size, before any request
        const auto t0 = std::chrono::steady_clock::now();
        GPTQ_ASSIGN_OR_RETURN(const int64_t n_warm,
                              session->warm_up(plan.n_slots, std::min(o.prefill_chunk, plan.n_ctx)));
        if (n_warm > 0)
            std::printf("warm-up: %lld step shapes in %.2f s\n", static_cast<long long>(n_warm),
                        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    GPTQ_ASSIGN_OR_RETURN(const generation_config gc, generation_config_load(o.model_path));
    tokenizer_vocab vocab(*tok, generation_eos_ids(gc, session->model().config(), session->n_vocab(), *tok));

    std::string name = o.model_name;
    if (name.empty()) name = std::filesystem::path(o.model_path).lexically_normal().filename().string();
    if (name.empty()) name = std::filesystem::path(o.model_path).lexically_normal().parent_path().filename().string();

    serve_scheduler sch(*session, vocab,
                        {.page_size = o.page_size, .n_pages = plan.n_pages, .prefill_chunk = o.prefill_chunk});
    server          srv(o, *session, *tok, sch, tmpl, name);
    httplib::Server svr;
    const int64_t   max_conn = o.max_connections > 0 ? o.max_connections : 4 * o.max_seqs;
    svr.new_task_queue       = [max_conn] { return new httplib::ThreadPool(static_cast<size_t>(max_conn + 8)); };
    svr.set_payload_max_length(o.max_body_bytes);
    svr.set_read_timeout(o.timeout_s, 0);
    svr.set_write_timeout(o.timeout_s, 0);
    svr.set_keep_alive_timeout(5);
    srv.install(svr);
    const int port = o.port == 0 ? svr.bind_to_any_port(o.host) : (svr.bind_to_port(o.host, o.port) ? o.port : -1);
    if (port < 0)
        return make_error(status_code::STATUS_IO_ERROR, "cannot listen on {}:{} (in use, or not an address here)",
                          o.host, o.port);

    std::printf("gptq serve: %s on %s; %s\n", name.c_str(), session->device().c_str(), session->describe().c_str());
    const std::string kv_line =
        plan.paged ? fmt::format(
                         "KV pool {} = {} pages of {} positions ({} a position), shared by {} sequence slots "
                         "of up to {} positions",
                         human_bytes(plan.kv_bytes), plan.n_pages, plan.page_size, human_bytes(plan.per_position),
                         plan.n_slots, plan.n_ctx)
                   : fmt::format("KV cache {} = {} sequences x {} positions ({} a position), {} pages of {} positions",
                                 human_bytes(plan.kv_bytes), plan.n_slots, plan.n_ctx, human_bytes(plan.per_position),
                                 plan.n_pages, plan.page_size);
    const std::string plan_line = fmt::format(
        "memory plan: weights {} ({}); {} (--max-seqs {}); the KV budget ({}) holds {} full-context sequences",
        human_bytes(weights), session->memory_kind(), kv_line, o.max_seqs, human_bytes(plan.budget), plan.n_fit);
    std::printf("%s\n", plan_line.c_str());
    std::printf(
        "listening on http://%s:%d (POST /v1/completions, /v1/chat/completions; GET /v1/models, /health, "
        "/metrics)\n",
        o.host.c_str(), port);
    std::fflush(stdout);

    struct sigaction sa {};
    sa.sa_handler = on_stop_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, nullptr);
    sigaction(SIGINT, &sa, nullptr);
    std::thread listener([&svr] {
        svr.listen_after_bind();
        on_stop_signal(0);  // wakes wait_for_stop if the listener stopped on its own
    });
    const int   sig = wait_for_stop();
    signal(SIGTERM, SIG_DFL);  // a second one ends the process at once
    signal(SIGINT, SIG_DFL);
    if (sig != 0) {
        GPTQ_LOG_INFO("serve: {}: admitting no new requests; finishing the running ones", strsignal(sig));
        srv.stop_admitting();
        sch.drain();
        for (int i = 0; i < 600 && srv.in_flight() > 0; ++i) std::this_thread::sleep_for(50ms);  // last bytes out
    }
    svr.stop();
    listener.join();
    GPTQ_LOG_INFO("serve: stopped");
    return status::ok();
}

}  // namespace gptq
