// gptq generate MODEL (-p PROMPT | --prompts FILE | --chat) [-n N] [--do-sample] [--temperature T]
//                [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R] [--seed 0] [--stop STR]...
//                [--ignore-eos] [--device cpu|cuda|cuda:N] [--device-map auto|FILE] [--max-memory SPEC]
//                [--threads N] [-o FILE] [--lora DIR[:SCALE]]...
// -p streams the new text to stdout; --prompts writes one JSON line per prompt; --chat wraps prompts
// in the model's chat template, and without -p reads user turns from stdin (interactive on a
// terminal). Speeds go to stderr. The decoding settings are the model's (generation_config.json,
// as transformers' generate()); only the flags given override them (docs/generate.md "Defaults").
#include <unistd.h>

#include <cstdio>
#include <iostream>
#include <memory>
#include <string>

#include "commands.h"
#include "gptq/generate.h"

namespace gptq::cli {

namespace {
status usage_error(const std::string& msg) {
    return status(status_code::STATUS_INVALID_ARGUMENT, msg);
}

struct generate_cli {
    generator_options open;
    generate_params   params;  // the flags' values: those given override the model's defaults
    bool              do_sample = false;
    std::string       prompt;
    std::string       prompts_file;
    std::string       output;
    std::string       system;
    bool              chat = false;
    // The options whose absence means "the model's default".
    CLI::Option *opt_n = nullptr, *opt_do_sample = nullptr, *opt_temperature = nullptr, *opt_top_k = nullptr,
                *opt_top_p = nullptr, *opt_min_p = nullptr, *opt_penalty = nullptr;
};

// The model's defaults (generation_config.json, as transformers) with the flags given on top.
generate_params effective_params(const generate_cli& o, const generator& g) {
    generate_params  p     = g.default_params();
    sampling_params& sp    = p.sampling;
    const auto&      flags = o.params;
    auto             given = [](const CLI::Option* opt) { return opt->count() > 0; };
    if (given(o.opt_n)) {  // as transformers: max_new_tokens overrides max_length
        p.max_new_tokens = flags.max_new_tokens;
        p.max_length     = 0;
    }
    if (given(o.opt_do_sample)) sp.do_sample = true;
    if (given(o.opt_temperature)) {  // a temperature is a choice: > 0 samples, 0 is greedy
        sp.temperature = flags.sampling.temperature;
        sp.do_sample   = sp.temperature > 0.0f;
    }
    if (given(o.opt_top_k)) sp.top_k = flags.sampling.top_k;
    if (given(o.opt_top_p)) sp.top_p = flags.sampling.top_p;
    if (given(o.opt_min_p)) sp.min_p = flags.sampling.min_p;
    if (given(o.opt_penalty)) sp.repetition_penalty = flags.sampling.repetition_penalty;
    sp.seed       = flags.sampling.seed;
    p.stop        = flags.stop;
    p.ignore_eos  = flags.ignore_eos;
    p.add_special = flags.add_special;
    return p;
}

// As transformers' warning for sampling-only settings in greedy mode (flags only: the model's own
// generation_config.json may hold them harmlessly).
void warn_unused_sampling_flags(const generate_cli& o, const generate_params& p) {
    if (p.sampling.greedy() && (o.opt_top_k->count() || o.opt_top_p->count() || o.opt_min_p->count()))
        std::fprintf(stderr,
                     "warning: --top-k, --top-p and --min-p have no effect with greedy decoding (the model's default); "
                     "add --do-sample or --temperature T to sample\n");
}

void print_stats(const generate_stats& s, const char* finish) {
    std::fprintf(stderr,
                 "%s%s%sprefill %lld tokens in %.3f s (%.1f tokens/s), decode %lld tokens in %.3f s (%.1f tokens/s), "
                 "%lld sequence%s, %d threads\n",
                 finish ? "finish: " : "", finish ? finish : "", finish ? ", " : "",
                 static_cast<long long>(s.n_prefill_tokens), s.prefill_seconds, s.prefill_tokens_per_second(),
                 static_cast<long long>(s.n_decode_tokens), s.decode_seconds, s.decode_tokens_per_second(),
                 static_cast<long long>(s.n_sequences), s.n_sequences == 1 ? "" : "s", s.n_threads);
}

void stream_piece(const std::string& piece) {
    std::fwrite(piece.data(), 1, piece.size(), stdout);
    std::fflush(stdout);
}

int run_generate(generate_cli& o) {
    const int n_modes = !o.prompt.empty() + !o.prompts_file.empty();
    if (n_modes > 1) return report_error(usage_error("give either -p PROMPT or --prompts FILE, not both"));
    if (n_modes == 0 && !o.chat)
        return report_error(usage_error("nothing to generate from: give -p PROMPT, --prompts FILE or --chat"));
    auto gen = generator::open(o.open);
    if (!gen) return report_error(gen.error());
    generator& g    = **gen;
    auto       wrap = [&](const std::string& user) -> result<std::string> {
        std::vector<chat_message> m;
        if (!o.system.empty()) m.push_back({"system", o.system});
        m.push_back({"user", user});
        return g.chat_render(m, true);
    };
    if (o.chat) o.params.add_special = false;  // the template places BOS itself
    const generate_params params = effective_params(o, g);
    if (auto st = generator::check_params(params); !st) return report_error(st);
    warn_unused_sampling_flags(o, params);

    if (!o.prompts_file.empty()) {
        auto prompts = prompts_file_read(o.prompts_file);
        if (!prompts) return report_error(prompts.error());
        if (o.chat)
            for (auto& p : *prompts) {
                auto r = wrap(p);
                if (!r) return report_error(r.error());
                p = *r;
            }
        g.log_settings(params);
        generate_stats st;
        auto           res = g.generate_batch(*prompts, params, &st);
        if (!res) return report_error(res.error());
        FILE* out = stdout;
        if (!o.output.empty() && !(out = std::fopen(o.output.c_str(), "wb")))
            return report_error(usage_error("-o " + o.output + ": cannot open for writing"));
        for (const auto& r : *res) std::fprintf(out, "%s\n", generate_result_json(r).c_str());
        if (out != stdout && std::fclose(out) != 0)
            return report_error(usage_error("-o " + o.output + ": write failed"));
        print_stats(st, nullptr);
        return 0;
    }

    if (!o.prompt.empty()) {
        std::string text = o.prompt;
        if (o.chat) {
            auto r = wrap(o.prompt);
            if (!r) return report_error(r.error());
            text = *r;
        }
        g.log_settings(params);
        generate_stats st;
        auto           r = g.generate(text, params, stream_piece, &st);
        if (!r) return report_error(r.error());
        std::fputs("\n", stdout);
        std::fflush(stdout);
        print_stats(st, r->finish_reason.c_str());
        return 0;
    }

    // --chat without -p: user turns from stdin, one per line; interactive on a terminal.
    if (!g.has_chat_template())
        return report_error(usage_error(
            o.open.model_path + ": the model has no chat template (tokenizer_config.json has no chat_template)"));
    const bool                tty = isatty(STDIN_FILENO);
    std::vector<chat_message> messages;
    if (!o.system.empty()) messages.push_back({"system", o.system});
    g.log_settings(params);
    if (tty) std::fprintf(stderr, "chat with %s; an empty line or Ctrl-D ends it\n", o.open.model_path.c_str());
    std::string line;
    for (;;) {
        if (tty) {
            std::fputs("> ", stderr);
            std::fflush(stderr);
        }
        if (!std::getline(std::cin, line) || (tty && line.empty())) break;
        if (line.empty()) continue;
        messages.push_back({"user", line});
        auto text = g.chat_render(messages, true);
        if (!text) return report_error(text.error());
        generate_stats st;
        auto           r = g.generate(*text, params, stream_piece, &st);
        if (!r) return report_error(r.error());
        std::fputs("\n", stdout);
        std::fflush(stdout);
        if (tty) print_stats(st, r->finish_reason.c_str());
        messages.push_back({"assistant", r->text});
    }
    return 0;
}
}  // namespace

command register_generate(CLI::App& app) {
    auto o   = std::make_shared<generate_cli>();
    auto sub = app.add_subcommand("generate", "generate text from a prompt, a file of prompts (one batch) or a chat");
    sub->add_option("model", o->open.model_path, "model folder (FP16/BF16/F32 or GPTQ checkpoint)")->required();
    sub->add_option("-p,--prompt", o->prompt, "the prompt; the new text streams to stdout");
    sub->add_option("--prompts", o->prompts_file,
                    "file of prompts (one per line, or JSON Lines with \"prompt\"), generated as one batch; "
                    "one JSON line per prompt on stdout");
    sub->add_option("-o,--output", o->output, "with --prompts: write the JSON lines here instead of stdout");
    sub->add_flag("--chat", o->chat,
                  "apply the model's chat template; without -p/--prompts, read user turns from stdin "
                  "(interactive on a terminal)");
    sub->add_option("--system", o->system, "with --chat: a system message");
    // No defaults shown: they are the model's (generation_config.json, else transformers').
    o->opt_n = sub->add_option("-n,--max-new-tokens", o->params.max_new_tokens,
                               "tokens to generate at most (default: generation_config.json's max_new_tokens or "
                               "max_length, else 200); generation also stops at the model's context");
    o->opt_do_sample =
        sub->add_flag("--do-sample", o->do_sample, "sample (default: generation_config.json's do_sample, else greedy)");
    o->opt_temperature =
        sub->add_option("--temperature", o->params.sampling.temperature, "> 0: sample at this temperature; 0: greedy");
    o->opt_top_k   = sub->add_option("--top-k", o->params.sampling.top_k, "when sampling; 0 = off (transformers: 50)");
    o->opt_top_p   = sub->add_option("--top-p", o->params.sampling.top_p, "when sampling; 1 = off");
    o->opt_min_p   = sub->add_option("--min-p", o->params.sampling.min_p, "when sampling; 0 = off");
    o->opt_penalty = sub->add_option("--repetition-penalty", o->params.sampling.repetition_penalty, "1 = off");
    sub->add_option("--seed", o->params.sampling.seed, "sampler seed (every prompt's sampler starts from it)")
        ->capture_default_str();
    sub->add_option("--stop", o->params.stop, "stop when the text contains this string (repeatable; not printed)")
        ->allow_extra_args(false);
    sub->add_flag("--ignore-eos", o->params.ignore_eos, "never stop at EOS (its logit is set to -inf)");
    sub->add_option("--device", o->open.device, "cpu, cuda or cuda:N (the GPU runs --prompts one at a time)")
        ->capture_default_str();
    add_offload_options(sub, &o->open.device_map, &o->open.max_memory);
    add_lora_option(sub, &o->open.loras, "several are summed");
    sub->add_option("--threads", o->open.n_threads, "CPU threads (0: all cores)")->capture_default_str();
    sub->add_flag("--strict", o->open.strict, "tensors the model does not use are an error (default: a warning)");
    sub->add_flag("--exact-activations", o->open.exact_activations,
                  "CPU: decode GPTQ linears with F32 activations (default: int8 per block of 128, faster)");
    return {sub, [o] { return run_generate(*o); }};
}

}  // namespace gptq::cli
