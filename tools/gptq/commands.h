// Each subcommand registers its flags on the CLI11 app and returns the callback that runs it.
// A callback returns the process exit code: 0 success, 1 error (message already printed).
#pragma once

#include <CLI/CLI.hpp>
#include <cstdint>
#include <functional>
#include <string>

#include <vector>

#include "gptq/lora.h"
#include "gptq/status.h"

namespace gptq::cli {

using command_fn = std::function<int()>;

struct command {
    CLI::App*  sub = nullptr;  // the subcommand, to know which one was given
    command_fn run;
};

command register_inspect(CLI::App& app);
command register_tokenize(CLI::App& app);
command register_ppl(CLI::App& app);
command register_quantize(CLI::App& app);
command register_generate(CLI::App& app);
command register_make_random(CLI::App& app);
command register_bench(CLI::App& app);
command register_plan(CLI::App& app);
command register_convert(CLI::App& app);
command register_serve(CLI::App& app);
command register_report(CLI::App& app);
command register_merge_lora(CLI::App& app);
command register_finetune(CLI::App& app);
// More subcommands add a line here and in main.cpp.

// Print "gptq: error: <message>" on stderr and return 1.
int report_error(const status& st);

// --device-map and --max-memory of the commands that run a model on the GPU (ppl, generate, bench).
void add_offload_options(CLI::App* sub, std::string* device_map, std::string* max_memory);

// --lora DIR[:SCALE], repeatable, of the commands that run a model (ppl, generate, bench, serve);
// `what` says what several of them do.
void add_lora_option(CLI::App* sub, std::vector<lora_spec>* out, const std::string& what);

// "4GB", "500MB", "1.5GiB", "123" (bytes) -> bytes; 0 on a malformed value.
uint64_t parse_size(const std::string& s);

}  // namespace gptq::cli
