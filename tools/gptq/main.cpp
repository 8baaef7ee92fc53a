// gptq: the command-line tool. Parses flags into the public params structs, calls one library
// function per subcommand and decides the exit code (0 ok, 1 error, 2 usage error).
#include <cctype>
#include <cstdio>
#include <vector>

#include "commands.h"
#include "gptq/runtime.h"

namespace gptq::cli {

int report_error(const status& st) {
    std::fprintf(stderr, "gptq: error: %s\n", st.message().c_str());
    return 1;
}

void add_offload_options(CLI::App* sub, std::string* device_map, std::string* max_memory) {
    sub->add_option("--device-map", *device_map,
                    "with --device cuda: auto (fill the GPU, offload the rest to CPU memory) or a JSON device-map file "
                    "(gptq plan --json); modules on cpu are kept in pinned host memory and copied in when they run");
    sub->add_option("--max-memory", *max_memory,
                    "with --device cuda: memory per device, e.g. 0=8GiB,cpu=32GiB (as gptq plan; without a cpu entry "
                    "the rest is offloaded up to the host memory available, cpu=0 forbids it)");
}

uint64_t parse_size(const std::string& s) {
    size_t pos = 0;
    double v   = 0;
    try {
        v = std::stod(s, &pos);
    } catch (...) {
        return 0;
    }
    std::string unit = s.substr(pos);
    for (auto& c : unit) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    double mult = 1;
    if (unit == "" || unit == "B")
        mult = 1;
    else if (unit == "KB")
        mult = 1e3;
    else if (unit == "MB")
        mult = 1e6;
    else if (unit == "GB")
        mult = 1e9;
    else if (unit == "KIB")
        mult = 1024.0;
    else if (unit == "MIB")
        mult = 1024.0 * 1024;
    else if (unit == "GIB")
        mult = 1024.0 * 1024 * 1024;
    else
        return 0;
    return v > 0 ? static_cast<uint64_t>(v * mult) : 0;
}

}  // namespace gptq::cli

int main(int argc, char** argv) {
    using namespace gptq::cli;
    CLI::App app{"gptqkit: GPTQ quantization and int4 inference for Hugging Face LLMs"};
    app.require_subcommand(1);
    bool quiet = false, verbose = false;
    app.add_flag("-q,--quiet", quiet, "only warnings and errors; no progress bars");
    app.add_flag("-v,--verbose", verbose, "debug output");
    app.add_flag_callback(
        "--version",
        [] {
            std::printf("%s\n", gptq::version_string().c_str());
            std::exit(0);
        },
        "print the version and exit");

    std::vector<command> commands;
    commands.push_back(register_inspect(app));
    commands.push_back(register_tokenize(app));
    commands.push_back(register_ppl(app));
    commands.push_back(register_quantize(app));
    commands.push_back(register_generate(app));
    commands.push_back(register_make_random(app));
    commands.push_back(register_bench(app));
    commands.push_back(register_plan(app));
    commands.push_back(register_convert(app));

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        return app.exit(e) == 0 ? 0 : 2;
    }
    gptq::set_verbosity(quiet     ? gptq::verbosity::VERBOSITY_QUIET
                        : verbose ? gptq::verbosity::VERBOSITY_DEBUG
                                  : gptq::verbosity::VERBOSITY_NORMAL);
    for (auto& c : commands)
        if (c.sub->parsed()) return c.run();
    return 2;
}
