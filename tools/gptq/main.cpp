// gptq: the command-line tool. Parses flags into the public params structs, calls one library
// function per subcommand and decides the exit code (0 ok, 1 error, 2 usage error).
#include <algorithm>
#include <cctype>
#include <cerrno>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
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

void add_lora_option(CLI::App* sub, std::vector<lora_spec>* out, const std::string& what) {
    sub->add_option_function<std::vector<std::string>>(
           "--lora",
           [out](const std::vector<std::string>& args) {
               for (const std::string& a : args) {
                   auto s = lora_spec_parse(a);
                   if (!s) throw CLI::ValidationError("--lora", s.error().message());
                   out->push_back(*s);
               }
           },
           "a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), applied unmerged; :SCALE "
           "multiplies its lora_alpha / r; repeatable: " +
               what)
        ->type_name("DIR[:SCALE]")
        ->allow_extra_args(false);
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

namespace {

// A value as quoted in a message: never the whole of a 300-digit argument.
std::string quote_value(const std::string& v) {
    constexpr size_t k_max = 24;
    if (v.size() <= k_max) return "'" + v + "'";
    return "'" + v.substr(0, 12) + "...' (" + std::to_string(v.size()) + " characters)";
}

// What is wrong with `text` as the value of an option of CLI11 type INT, UINT or FLOAT (what
// CLI11 itself would convert: base-0 integers, strtod floats); "" when nothing. CLI11 alone
// would take 1e400 as inf and clamp an overflowing 64-bit integer silently.
std::string number_problem(const std::string& type, const std::string& text) {
    if (type != "INT" && type != "UINT" && type != "FLOAT") return "";
    const char* b   = text.c_str();
    char*       end = nullptr;
    errno           = 0;
    if (type == "FLOAT") {
        const double v = std::strtod(b, &end);
        if (text.empty() || end != b + text.size()) return "is not a number";
        if (errno == ERANGE && std::fabs(v) > 1.0) return "is out of range";
        if (!std::isfinite(v)) return "is not a finite number";
        return "";
    }
    if (text.empty()) return "is not a whole number";
    if (type == "UINT") {
        if (text.find('-') != std::string::npos) return "must not be negative";
        (void)std::strtoull(b, &end, 0);
    } else {
        (void)std::strtoll(b, &end, 0);
    }
    if (end != b + text.size()) return "is not a whole number";
    if (errno == ERANGE) return "is out of range";
    return "";
}

std::string base_type(const CLI::Option* opt) {
    const std::string t = opt->get_type_name();
    return t.substr(0, t.find(':'));
}

std::vector<CLI::App*> all_subcommands(CLI::App& app) {
    return app.get_subcommands([](CLI::App*) { return true; });
}

// Every numeric option of every subcommand refuses what number_problem finds.
void add_number_checks(CLI::App& app) {
    for (CLI::App* sub : all_subcommands(app))
        for (CLI::Option* opt : sub->get_options()) {
            const std::string type = base_type(opt);
            if (type != "INT" && type != "UINT" && type != "FLOAT") continue;
            opt->check(CLI::Validator(
                [type](std::string& v) {
                    const std::string why = number_problem(type, v);
                    return why.empty() ? why : quote_value(v) + " " + why;
                },
                "", "number"));
        }
}

// One line for a CLI11 parse error: a bad number names its option and says what is wrong, without
// echoing a huge value; anything else is CLI11's message with long words cut.
std::string parse_error_message(CLI::App& app, const CLI::ParseError& e) {
    for (CLI::App* sub : all_subcommands(app))
        for (const CLI::Option* opt : sub->get_options())
            for (const std::string& v : opt->results())
                if (const std::string why = number_problem(base_type(opt), v); !why.empty())
                    return opt->get_name() + ": " + quote_value(v) + " " + why;
    std::string msg = e.what();
    // A valid number that CLI11 could not convert does not fit the option's type.
    const std::string conv = "Could not convert: ";
    if (msg.rfind(conv, 0) == 0 && msg.find(" = ") != std::string::npos) {
        const size_t eq = msg.find(" = ");
        return msg.substr(conv.size(), eq - conv.size()) + ": " + quote_value(msg.substr(eq + 3)) + " is out of range";
    }
    std::string out, word;
    for (size_t i = 0; i <= msg.size(); ++i) {
        if (i == msg.size() || msg[i] == ' ' || msg[i] == '\n') {
            out += word.size() > 24 ? quote_value(word) : word;
            if (i < msg.size()) out += msg[i] == '\n' ? ' ' : msg[i];
            word.clear();
        } else {
            word += msg[i];
        }
    }
    return out;
}

// Optimal string alignment distance: edits, with a swap of two neighbours counting as one.
size_t edit_distance(const std::string& a, const std::string& b) {
    std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1, 0));
    for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
    for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
    for (size_t i = 1; i <= a.size(); ++i)
        for (size_t j = 1; j <= b.size(); ++j) {
            d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1])});
            if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
                d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
        }
    return d[a.size()][b.size()];
}

// The first word that is not a global option, when it names no subcommand: "unknown command
// 'quantise'; did you mean quantize?" (or the list of commands). "" when it is fine.
std::string unknown_command_message(CLI::App& app, int argc, char** argv) {
    std::string word;
    for (int i = 1; i < argc && word.empty(); ++i)
        if (argv[i][0] != '-') word = argv[i];
    if (word.empty()) return "";
    std::string best, names;
    size_t      best_d = SIZE_MAX;
    for (CLI::App* sub : all_subcommands(app)) {
        const std::string& name = sub->get_name();
        if (name == word) return "";
        names += (names.empty() ? "" : ", ") + name;
        const size_t d = edit_distance(word, name);
        if (d < best_d) best_d = d, best = name;
    }
    if (best_d <= 2 && best_d * 2 < word.size()) return "unknown command '" + word + "'; did you mean " + best + "?";
    return "unknown command " + quote_value(word) + "; the commands are " + names;
}

// A file given where a model folder is expected (the subcommand's positional "model" and bench's
// --compare-fp16): "pass the folder". inspect and tokenize take files too.
std::string folder_expected_message(CLI::App* sub) {
    for (const char* name : {"model", "--compare-fp16"}) {
        const CLI::Option* opt = sub->get_option_no_throw(name);
        if (!opt || opt->count() == 0 || sub->get_name() == "inspect" || sub->get_name() == "tokenize") continue;
        const std::filesystem::path p = opt->as<std::string>();
        std::error_code             ec;
        if (std::filesystem::is_regular_file(p, ec)) {
            const std::string parent = p.has_parent_path() ? p.parent_path().string() : std::string(".");
            return p.string() + " is a file; pass the folder that holds the model (config.json and the weights), " +
                   "e.g. " + parent;
        }
    }
    return "";
}

}  // namespace
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
    commands.push_back(register_serve(app));
    commands.push_back(register_report(app));
    commands.push_back(register_merge_lora(app));
    commands.push_back(register_finetune(app));

    add_number_checks(app);

    // Usage errors: one line, exit 2.
    if (const std::string msg = unknown_command_message(app, argc, argv); !msg.empty()) {
        std::fprintf(stderr, "gptq: error: %s\n", msg.c_str());
        return 2;
    }
    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError& e) {
        if (e.get_exit_code() == 0) return app.exit(e);  // --help
        std::fprintf(stderr, "gptq: error: %s (see --help)\n", parse_error_message(app, e).c_str());
        return 2;
    }
    gptq::set_verbosity(quiet     ? gptq::verbosity::VERBOSITY_QUIET
                        : verbose ? gptq::verbosity::VERBOSITY_DEBUG
                                  : gptq::verbosity::VERBOSITY_NORMAL);
    for (auto& c : commands)
        if (c.sub->parsed()) {
            if (const std::string msg = folder_expected_message(c.sub); !msg.empty())
                return report_error(gptq::status(gptq::status_code::STATUS_INVALID_ARGUMENT, msg));
            return c.run();
        }
    return 2;
}
