// gptq: the command-line tool. Parses flags into the public params structs, calls one library
// function per subcommand and decides the exit code (0 ok, 1 error, 2 usage error).
#include <cstdio>
#include <vector>

#include "commands.h"
#include "gptq/runtime.h"

namespace gptq::cli {

int report_error(const status& st) {
    std::fprintf(stderr, "gptq: error: %s\n", st.message().c_str());
    return 1;
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
