// generator (include/gptq/generate.h): the model (a model_session, model_session.h) and tokenizer
// loaded once; each call tokenizes its prompts, runs one prefill step over them, then decode steps
// that batch the sequences still running, one token each: all prompts at once on a ragged session
// (the CPU), one at a time otherwise (the GPU). Per sequence: a slot of prompt + its token limit
// (-n, max_length, the model's context) positions, a sampler, an incremental decoder and the
// stop-string scan. The defaults come from generation_config.json (load_defaults).
#include "gptq/generate.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <new>
#include <nlohmann/json.hpp>
#include <thread>

#include "context_limit.h"
#include "core/error.h"
#include "core/log.h"
#include "eos_ids.h"
#include "model/llama.h"
#include "model_session.h"
#include "stop_text.h"
#include "tokenizer/tokenizer.h"

namespace gptq {

namespace {
constexpr status_code E_ARG = status_code::STATUS_INVALID_ARGUMENT;

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// One sequence being generated.
struct sequence {
    generate_result                      res;
    std::unique_ptr<sampler>             smp;
    std::unique_ptr<incremental_decoder> dec;
    std::vector<int32_t>                 history;      // prompt + generated: what the repetition penalty sees
    std::unique_ptr<stop_text>           text;         // decoded so far, cut at a stop string
    int64_t                              max_new = 0;  // tokens to generate at most (-n, max_length, context)
    bool                                 done    = false;
};
}  // namespace

struct generator::impl {
    generator_options              opts;
    std::unique_ptr<model_session> session;
    std::unique_ptr<tokenizer>     tok;
    generate_params                defaults;
    std::string                    defaults_source;  // the generation_config.json read, or ""
    std::vector<int32_t>           eos;              // ids that end a sequence

    const llama_model& model() const { return session->model(); }

    status                       load_defaults();
    result<std::vector<int64_t>> token_limits(const std::vector<int64_t>& n_prompt, const generate_params& p) const;
    bool                         is_eos(int32_t id) const { return std::find(eos.begin(), eos.end(), id) != eos.end(); }

    result<std::vector<generate_result>> run(const std::vector<std::string>& prompts, const generate_params& p,
                                             const text_callback& on_text, generate_stats* stats);
    result<std::vector<generate_result>> run_unguarded(const std::vector<std::string>& prompts,
                                                       const generate_params& p, const text_callback& on_text,
                                                       generate_stats* stats);
};

generator::generator() : impl_(std::make_unique<impl>()) {}
generator::~generator() = default;

const std::string& generator::model_path() const {
    return impl_->opts.model_path;
}
const generate_params& generator::default_params() const {
    return impl_->defaults;
}
const std::vector<int32_t>& generator::eos_ids() const {
    return impl_->eos;
}
int64_t generator::context_length() const {
    return model_context_limit(impl_->session->hparams());
}

// transformers' generate() reads generation_config.json into a GenerationConfig whose absent keys
// take the defaults of transformers 5's GenerationConfig._get_default_generation_params (greedy,
// temperature 1, top_k 50, top_p 1, repetition_penalty 1); io/hf_config.h applies the same ones.
// The one difference: without max_new_tokens or max_length in the file, 200 new tokens rather
// than transformers' 20 (its "model-agnostic default max_length", which it warns about).
status generator::impl::load_defaults() {
    GPTQ_ASSIGN_OR_RETURN(const generation_config gc, generation_config_load(opts.model_path));
    if (gc.found) defaults_source = (std::filesystem::path(opts.model_path) / "generation_config.json").string();
    sampling_params& sp   = defaults.sampling;
    sp.do_sample          = gc.do_sample;
    sp.temperature        = static_cast<float>(gc.temperature);
    sp.top_k              = static_cast<int32_t>(std::min<int64_t>(gc.top_k, INT32_MAX));
    sp.top_p              = static_cast<float>(gc.top_p);
    sp.min_p              = static_cast<float>(gc.min_p);
    sp.repetition_penalty = static_cast<float>(gc.repetition_penalty);
    if (gc.max_new_tokens) {
        defaults.max_new_tokens = *gc.max_new_tokens;
    } else if (gc.max_length) {  // transformers: max_length counts the prompt; max_new_tokens unset
        defaults.max_new_tokens = *gc.max_length;
        defaults.max_length     = *gc.max_length;
    }
    eos = generation_eos_ids(gc, model().config(), model().hparams().n_vocab, *tok);
    return status::ok();
}

// Tokens each sequence may generate: -n, transformers' max_length (prompt included) and the
// model's context: prompt + generated tokens <= max_position_embeddings (issue 15). Cut by the
// context: a warning, and the sequence ends with finish reason "length".
result<std::vector<int64_t>> generator::impl::token_limits(const std::vector<int64_t>& n_prompt,
                                                           const generate_params&      p) const {
    const int64_t        ctx = model_context_limit(model().hparams());
    std::vector<int64_t> out;
    int64_t              n_cut = 0, first_cut = -1;
    for (size_t s = 0; s < n_prompt.size(); ++s) {
        const int64_t     n     = n_prompt[s];
        const std::string which = n_prompt.size() == 1 ? "the prompt" : fmt::format("prompt {}", s + 1);
        if (ctx > 0 && n >= ctx)
            return make_error(E_ARG,
                              "{} is {} tokens, the model's context is {} positions (max_position_embeddings in "
                              "{}): no room to generate; shorten it",
                              which, n, ctx, model().config().path);
        if (p.max_length > 0 && n >= p.max_length)
            return make_error(E_ARG,
                              "{} is {} tokens, max_length is {} (prompt included; from {}): pass -n N to set the "
                              "number of new tokens instead",
                              which, n, p.max_length, defaults_source.empty() ? "the parameters" : defaults_source);
        int64_t lim = p.max_new_tokens;
        if (p.max_length > 0) lim = std::min(lim, p.max_length - n);
        if (ctx > 0 && lim > ctx - n) {
            lim = ctx - n;
            if (n_cut++ == 0) first_cut = static_cast<int64_t>(s);
        }
        out.push_back(lim);
    }
    if (n_cut == 1 && n_prompt.size() == 1)
        GPTQ_LOG_WARN(
            "the prompt's {} tokens + max_new_tokens {} exceed the model's context of {} positions "
            "(max_position_embeddings): generation stops at the context, after {} new tokens at most (finish reason "
            "\"length\")",
            n_prompt[0], p.max_new_tokens, ctx, out[0]);
    else if (n_cut > 0)
        GPTQ_LOG_WARN(
            "{} of {} prompts (the first: prompt {}, {} tokens) + max_new_tokens {} exceed the model's context of {} "
            "positions (max_position_embeddings): they stop at the context (finish reason \"length\")",
            n_cut, n_prompt.size(), first_cut + 1, n_prompt[static_cast<size_t>(first_cut)], p.max_new_tokens, ctx);
    return out;
}

status generator::check_params(const generate_params& p) {
    const sampling_params& sp = p.sampling;
    if (p.max_new_tokens < 0) return make_error(E_ARG, "-n/--max-new-tokens is {}, expected >= 0", p.max_new_tokens);
    if (p.max_length < 0) return make_error(E_ARG, "max_length is {}, expected >= 0", p.max_length);
    if (!(sp.temperature >= 0.0f) || !std::isfinite(sp.temperature))
        return make_error(E_ARG, "--temperature is {}, expected a finite number >= 0", sp.temperature);
    if (sp.top_k < 0) return make_error(E_ARG, "--top-k is {}, expected >= 0", sp.top_k);
    if (!(sp.top_p > 0.0f && sp.top_p <= 1.0f)) return make_error(E_ARG, "--top-p is {}, expected in (0, 1]", sp.top_p);
    if (!(sp.min_p >= 0.0f && sp.min_p <= 1.0f))
        return make_error(E_ARG, "--min-p is {}, expected in [0, 1]", sp.min_p);
    if (!(sp.repetition_penalty > 0.0f) || !std::isfinite(sp.repetition_penalty))
        return make_error(E_ARG, "--repetition-penalty is {}, expected a finite number > 0", sp.repetition_penalty);
    for (const auto& s : p.stop)
        if (s.empty()) return make_error(E_ARG, "--stop: empty stop string");
    return status::ok();
}

std::string generator::describe(const generate_params& p) const {
    const sampling_params& sp = p.sampling;
    std::string            s  = sp.greedy() ? std::string("greedy")
                                            : fmt::format("sampling (temperature {:g}, top_k {}, top_p {:g}, min_p {:g}, seed {})",
                                                          sp.temperature, sp.top_k, sp.top_p, sp.min_p, sp.seed);
    s += fmt::format(", repetition_penalty {:g}, max_new_tokens {}", sp.repetition_penalty, p.max_new_tokens);
    if (p.max_length > 0) s += fmt::format(", max_length {}", p.max_length);
    s += fmt::format(", eos {}{}", fmt::join(impl_->eos, ","), p.ignore_eos ? " (ignored)" : "");
    if (context_length() > 0) s += fmt::format(", context {}", context_length());
    s += impl_->defaults_source.empty()
             ? " (defaults: transformers', the model has no generation_config.json; flags override)"
             : fmt::format(" (defaults: {}; flags override)", impl_->defaults_source);
    return "generation: " + s;
}

void generator::log_settings(const generate_params& params) const {
    GPTQ_LOG_INFO("{}", describe(params));
}

result<std::unique_ptr<generator>> generator::open(const generator_options& options) {
    model_session_options so;
    so.model_path = options.model_path;
    GPTQ_ASSIGN_OR_RETURN(so.device, device_parse(options.device));
    so.n_threads        = options.n_threads;
    so.strict           = options.strict;
    so.int8_activations = !options.exact_activations;
    so.device_map       = options.device_map;
    so.max_memory       = options.max_memory;
    so.loras            = options.loras;
    std::unique_ptr<generator> g(new generator());
    impl&                      m = *g->impl_;
    m.opts                       = options;
    GPTQ_ASSIGN_OR_RETURN(m.session, model_session_open(so));  // checks the host memory on the CPU
    GPTQ_ASSIGN_OR_RETURN(m.tok, tokenizer::load(options.model_path));
    GPTQ_TRY(m.load_defaults());
    return g;
}

result<std::vector<generate_result>> generator::impl::run(const std::vector<std::string>& prompts,
                                                          const generate_params& p, const text_callback& on_text,
                                                          generate_stats* stats) {
    // Out of host memory beyond the check in run_unguarded: an error, not a crash.
    try {
        return run_unguarded(prompts, p, on_text, stats);
    } catch (const std::bad_alloc&) {
        return make_error(status_code::STATUS_OUT_OF_MEMORY,
                          "out of host memory while generating with {}; lower -n/--max-new-tokens or the batch",
                          opts.model_path);
    }
}

result<std::vector<generate_result>> generator::impl::run_unguarded(const std::vector<std::string>& prompts,
                                                                    const generate_params&          p,
                                                                    const text_callback&            on_text,
                                                                    generate_stats*                 stats) {
    GPTQ_TRY(check_params(p));

    const int64_t         n_seq = static_cast<int64_t>(prompts.size());
    std::vector<sequence> seqs(static_cast<size_t>(n_seq));
    std::vector<int64_t>  lens;
    for (int64_t s = 0; s < n_seq; ++s) {
        sequence& q         = seqs[static_cast<size_t>(s)];
        q.res.prompt        = prompts[static_cast<size_t>(s)];
        q.res.prompt_tokens = tok->encode(q.res.prompt, p.add_special);
        if (q.res.prompt_tokens.empty())
            return make_error(E_ARG, "prompt {} encodes to no tokens (empty prompt and no BOS)", s + 1);
        lens.push_back(static_cast<int64_t>(q.res.prompt_tokens.size()));
    }
    GPTQ_ASSIGN_OR_RETURN(std::vector<int64_t> limits, token_limits(lens, p));
    for (int64_t s = 0; s < n_seq; ++s) {
        sequence& q = seqs[static_cast<size_t>(s)];
        q.max_new   = limits[static_cast<size_t>(s)];
        q.smp       = std::make_unique<sampler>(p.sampling);
        q.dec       = std::make_unique<incremental_decoder>(*tok, /*skip_special=*/true);
        q.history   = q.res.prompt_tokens;
        q.text      = std::make_unique<stop_text>(p.stop);
    }
    const std::vector<int32_t> banned = p.ignore_eos ? eos : std::vector<int32_t>{};

    // Pass on text up to what could still be the start of a stop string (stop_text.h); end at one.
    auto emit = [&](sequence& q, const std::string& piece, bool final) {
        const std::string out = q.text->push(piece, final);
        if (!out.empty() && on_text) on_text(out);
        if (q.text->stopped()) {
            q.done              = true;
            q.res.finish_reason = "stop";
        }
    };
    auto finish = [&](sequence& q, const std::string& piece, const char* reason) {
        emit(q, piece + q.dec->finish(), true);
        q.done = true;
        if (q.res.finish_reason.empty()) q.res.finish_reason = reason;
    };
    auto accept = [&](sequence& q, int32_t id) {
        q.res.tokens.push_back(id);
        q.history.push_back(id);
        // An EOS is decoded too, special tokens skipped (nothing for </s>), as transformers'
        // decode(new_tokens, skip_special_tokens=True): an EOS id that is a plain word keeps its text.
        const std::string piece = q.dec->step(id);
        if (!p.ignore_eos && is_eos(id)) return finish(q, piece, "eos");
        emit(q, piece, false);
        if (q.done) return;
        if (static_cast<int64_t>(q.res.tokens.size()) >= q.max_new) finish(q, "", "length");
    };

    // The sequences run in groups of `group` (up to the GPU's slot count at once on a ragged
    // session, both backends today; one at a time otherwise), each sequence in slot i of its group:
    // one prefill step over the group's prompts, then decode steps over those still running.
    const int64_t         n_vocab = session->n_vocab();
    const int64_t         group   = session->ragged() ? std::clamp<int64_t>(n_seq, 1, k_cuda_session_max_seq) : 1;
    std::vector<float>    logits(static_cast<size_t>(group * n_vocab));
    std::vector<seq_step> steps;                                          // seq: the sequence's index in its group
    const int32_t         lora = session->lora_names().empty() ? -1 : 0;  // the adapters, stacked
    generate_stats        st;
    st.n_sequences = n_seq;
    st.n_threads   = std::max(1, session->n_threads());  // a GPU: the one host thread driving it
    for (int64_t n : lens) st.n_prefill_tokens += n;
    auto run_group = [&](sequence* first, int64_t count) -> status {
        int64_t n_ctx = 0;
        for (int64_t i = 0; i < count; ++i)
            n_ctx = std::max(n_ctx, static_cast<int64_t>(first[i].res.prompt_tokens.size()) + first[i].max_new);
        GPTQ_TRY(session->reserve(count, n_ctx)
                     .with_context(fmt::format("generating {} sequence{} (lower -n/--max-new-tokens, shorten the "
                                               "prompts or generate fewer at once)",
                                               count, count == 1 ? "" : "s")));
        steps.clear();
        for (int64_t i = 0; i < count; ++i) {
            const auto& prompt = first[i].res.prompt_tokens;
            steps.push_back(
                {.seq = i, .ids = prompt.data(), .n_tokens = static_cast<int64_t>(prompt.size()), .lora = lora});
        }
        auto t0 = std::chrono::steady_clock::now();
        GPTQ_TRY(session->step(steps, logits.data()));
        st.prefill_seconds += seconds_since(t0);
        t0 = std::chrono::steady_clock::now();
        for (int64_t i = 0; i < count; ++i)
            accept(first[i], first[i].smp->sample(logits.data() + i * n_vocab, n_vocab, first[i].history, banned));
        for (;;) {
            steps.clear();
            for (int64_t i = 0; i < count; ++i)
                if (!first[i].done)
                    steps.push_back({.seq = i, .ids = &first[i].res.tokens.back(), .n_tokens = 1, .lora = lora});
            if (steps.empty()) break;
            GPTQ_TRY(session->step(steps, logits.data()));
            st.n_decode_tokens += static_cast<int64_t>(steps.size());
            for (size_t j = 0; j < steps.size(); ++j) {
                sequence& q = first[steps[j].seq];
                accept(q, q.smp->sample(logits.data() + static_cast<int64_t>(j) * n_vocab, n_vocab, q.history, banned));
            }
        }
        st.decode_seconds += seconds_since(t0);
        return status::ok();
    };
    if (p.max_new_tokens == 0) {
        for (auto& q : seqs) q.res.finish_reason = "length";
    } else {
        for (int64_t s = 0; s < n_seq; s += group)
            GPTQ_TRY(run_group(&seqs[static_cast<size_t>(s)], std::min(group, n_seq - s)));
    }
    if (stats) *stats = st;
    std::vector<generate_result> out;
    for (auto& q : seqs) {
        q.res.text = q.text->text();
        out.push_back(std::move(q.res));
    }
    return out;
}

result<generate_result> generator::generate(const std::string& prompt, const generate_params& params,
                                            const text_callback& on_text, generate_stats* stats) {
    GPTQ_ASSIGN_OR_RETURN(auto r, impl_->run({prompt}, params, on_text, stats));
    return std::move(r[0]);
}

result<std::vector<generate_result>> generator::generate_batch(const std::vector<std::string>& prompts,
                                                               const generate_params& params, generate_stats* stats) {
    return impl_->run(prompts, params, {}, stats);
}

bool generator::has_chat_template() const {
    return !impl_->tok->config().chat_template.empty();
}

result<std::string> generator::chat_render(const std::vector<chat_message>& messages,
                                           bool                             add_generation_prompt) const {
    const tokenizer_config& c = impl_->tok->config();
    if (c.chat_template.empty())
        return make_error(status_code::STATUS_UNSUPPORTED,
                          "{}: the model has no chat template (tokenizer_config.json has no chat_template)",
                          impl_->opts.model_path);
    chat_template_vars v;
    v.bos_token             = c.bos_token.value_or("");
    v.eos_token             = c.eos_token.value_or("");
    v.add_generation_prompt = add_generation_prompt;
    auto r                  = chat_template_render(c.chat_template, messages, v);
    if (!r) return r.error().with_context(impl_->opts.model_path);
    return r;
}

result<std::vector<std::string>> prompts_file_read(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return make_error(status_code::STATUS_NOT_FOUND, "--prompts {}: cannot open", path);
    std::vector<std::string> out;
    std::string              line;
    int64_t                  i_line = 0;
    int                      jsonl  = -1;  // unknown until the first non-empty line
    while (std::getline(in, line)) {
        ++i_line;
        if (!line.empty() && line.back() == '\r') line.pop_back();
        if (line.find_first_not_of(" \t") == std::string::npos) continue;
        if (jsonl < 0) jsonl = line[line.find_first_not_of(" \t")] == '{';
        if (!jsonl) {
            out.push_back(line);
            continue;
        }
        auto j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
        if (j.is_discarded()) return make_error(E_ARG, "{}:{}: not valid JSON", path, i_line);
        if (!j.is_object() || !j.contains("prompt") || !j["prompt"].is_string())
            return make_error(E_ARG, "{}:{}: expected an object with a string \"prompt\"", path, i_line);
        out.push_back(j["prompt"].get<std::string>());
    }
    if (out.empty()) return make_error(E_ARG, "--prompts {}: no prompts in the file", path);
    return out;
}

std::string generate_result_json(const generate_result& r) {
    nlohmann::ordered_json j;
    j["prompt"]          = r.prompt;
    j["text"]            = r.text;
    j["finish_reason"]   = r.finish_reason;
    j["n_prompt_tokens"] = r.prompt_tokens.size();
    j["n_tokens"]        = r.tokens.size();
    j["tokens"]          = r.tokens;
    return j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

}  // namespace gptq
