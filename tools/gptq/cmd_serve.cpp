// gptq serve MODEL [--device cpu|cuda|cuda:N] [--host 127.0.0.1] [--port 8080] [--api-key KEY]
//                  [--max-seqs 64] [--ctx N] [--kv-memory 0.9|BYTES] [--chat-template FILE]
//                  [--prefill-chunk 256] [--max-connections N] [--max-body BYTES] [--timeout S] [--threads N]
//                  [--lora DIR[:SCALE]]...
// An OpenAI-compatible HTTP server (docs/serve.md). Prints the memory plan and the URL, serves
// until SIGTERM / Ctrl-C, then finishes the running requests and exits 0.
#include <cstdlib>
#include <memory>
#include <string>

#include "commands.h"
#include "gptq/serve.h"

namespace gptq::cli {

namespace {
struct serve_cli {
    serve_options o;
    std::string   kv_memory = "0.9";
    std::string   max_body  = "1MiB";
};

int run_serve(serve_cli& c) {
    // --kv-memory: a fraction (0, 1] of the memory left after the weights, or a size ("8GiB").
    char*        end  = nullptr;
    const double frac = std::strtod(c.kv_memory.c_str(), &end);
    if (end && *end == '\0' && frac > 0.0 && frac <= 1.0) {
        c.o.kv_memory_frac = frac;
    } else if (const uint64_t bytes = parse_size(c.kv_memory); bytes > 1) {
        c.o.kv_memory_bytes = bytes;
    } else {
        return report_error(
            status(status_code::STATUS_INVALID_ARGUMENT,
                   "--kv-memory '" + c.kv_memory + "': expected a fraction in (0, 1] or a size such as 8GiB"));
    }
    c.o.max_body_bytes = parse_size(c.max_body);
    if (c.o.max_body_bytes == 0)
        return report_error(status(status_code::STATUS_INVALID_ARGUMENT,
                                   "--max-body '" + c.max_body + "': expected a size such as 1MiB"));
    if (auto st = serve_run(c.o); !st) return report_error(st);
    return 0;
}
}  // namespace

command register_serve(CLI::App& app) {
    auto  c   = std::make_shared<serve_cli>();
    auto& o   = c->o;
    auto  sub = app.add_subcommand("serve",
                                   "an OpenAI-compatible HTTP server (completions, chat, streaming) with "
                                    "continuous batching");
    sub->add_option("model", o.model_path, "model folder (FP16/BF16/F32 or GPTQ checkpoint)")->required();
    sub->add_option("--device", o.device, "cpu, cuda or cuda:N")->capture_default_str();
    add_offload_options(sub, &o.device_map, &o.max_memory);
    add_lora_option(sub, &o.loras,
                    "each is a model named after its folder, chosen by a request's \"model\" (the base model's name: "
                    "no adapter)");
    sub->add_option("--threads", o.n_threads, "CPU threads (0: all cores)")
        ->capture_default_str()
        ->check(CLI::NonNegativeNumber);
    sub->add_option("--host", o.host, "address to listen on (0.0.0.0: every interface)")->capture_default_str();
    sub->add_option("--port", o.port, "port (0: any free one; the URL line says which)")
        ->capture_default_str()
        ->check(CLI::Range(0, 65535));
    sub->add_option("--api-key", o.api_key, "require \"Authorization: Bearer KEY\" on /v1/*");
    sub->add_option("--model-name", o.model_name, "the name clients send as \"model\" (default: the folder's name)");
    sub->add_option("--max-seqs", o.max_seqs, "sequences running at once at most")
        ->capture_default_str()
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
    sub->add_option("--ctx", o.n_ctx, "positions per sequence, prompt + output (default: the model's, at most 4096)")
        ->check(CLI::Range(int64_t{2}, int64_t{1} << 24));
    sub->add_option("--kv-memory", c->kv_memory,
                    "KV cache budget: a fraction of the memory left after the weights, or a size (8GiB)")
        ->capture_default_str();
    sub->add_option("--chat-template", o.chat_template_file,
                    "a Jinja chat template file (or a tokenizer_config.json) instead of the model's");
    sub->add_option("--prefill-chunk", o.prefill_chunk, "prompt tokens per step at most (chunked prefill)")
        ->capture_default_str()
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 20));
    sub->add_option("--page-size", o.page_size,
                    "KV positions per page: the scheduler's accounting, and on cuda the GPU pool's pages (a power of "
                    "two; docs/serve.md)")
        ->capture_default_str()
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 16));
    sub->add_option("--max-connections", o.max_connections,
                    "requests in flight at most, more get 503 with Retry-After (default: 4 x --max-seqs)")
        ->check(CLI::Range(int64_t{1}, int64_t{1} << 16));
    sub->add_option("--max-body", c->max_body, "larger request bodies get 413")->capture_default_str();
    sub->add_option("--timeout", o.timeout_s, "seconds a socket read or write may wait (slow clients)")
        ->capture_default_str()
        ->check(CLI::Range(1, 3600));
    return {sub, [c] { return run_serve(*c); }};
}

}  // namespace gptq::cli
