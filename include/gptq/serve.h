// `gptq serve`: an OpenAI-compatible HTTP server (completions, chat completions, streaming) over
// one model, with continuous batching (src/engine/serve_scheduler.h). docs/serve.md describes the
// design, the endpoints and what is not done yet.
//
//     serve_options o;  o.model_path = "models/tiny-llama";  o.port = 8080;
//     GPTQ_TRY(serve_run(o));   // returns after SIGTERM / SIGINT, once running requests finished
#pragma once

#include <cstdint>
#include <string>

#include <vector>

#include "gptq/lora.h"
#include "gptq/status.h"

namespace gptq {

struct serve_options {
    std::string model_path;
    std::string device    = "cpu";       // "cpu", "cuda", "cuda:N"
    int         n_threads = 0;           // CPU threads, 0 = all cores
    std::string device_map, max_memory;  // --device cuda placement (gptq/plan.h), empty: all on the GPU

    std::string host = "127.0.0.1";
    int         port = 8080;  // 0: any free port (the URL line says which)
    std::string api_key;      // non-empty: /v1/* need "Authorization: Bearer <key>"
    std::string model_name;   // the name clients send as "model"; "": the model folder's name
    // LoRA adapters (docs/lora.md), each served as a model named after its folder: a request whose
    // "model" is that name runs with the adapter, the base model's name without.
    std::vector<lora_spec> loras;

    int64_t     max_seqs        = 64;   // sequences running at once at most
    int64_t     n_ctx           = 0;    // positions per sequence; 0: the model's (at most 4096)
    double      kv_memory_frac  = 0.9;  // of the memory left after the weights, for the KV cache
    uint64_t    kv_memory_bytes = 0;    // non-zero: this many bytes instead
    int64_t     prefill_chunk   = 256;  // prompt tokens per step at most
    int64_t     page_size       = 16;   // KV positions per page (cuda: the GPU pool's too, a power of two)
    std::string chat_template_file;     // Jinja text (or a tokenizer_config.json) replacing the model's

    int64_t  max_connections = 0;        // requests in flight at most (503 beyond); 0: 4 x max_seqs
    uint64_t max_body_bytes  = 1 << 20;  // larger request bodies: 413
    int      timeout_s       = 60;       // socket read / write timeout (slow clients)
};

// Load the model, print the memory plan and the URL (stdout), serve until SIGTERM or SIGINT, then
// stop admitting, let the running requests finish, and return ok.
status serve_run(const serve_options& options);

}  // namespace gptq
