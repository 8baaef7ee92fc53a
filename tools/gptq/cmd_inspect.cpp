// gptq inspect PATH [--tensors] [--json] [--check]
#include <cstdio>
#include <memory>

#include "commands.h"
#include "gptq/inspect.h"

namespace gptq::cli {

command register_inspect(CLI::App& app) {
    struct opts {
        std::string path;
        bool        tensors = false;
        bool        json    = false;
        bool        check   = false;
    };
    auto o   = std::make_shared<opts>();
    auto sub = app.add_subcommand("inspect", "show a model's architecture, size, dtypes and GPTQ settings");
    sub->add_option("path", o->path, "model folder or .safetensors file")->required();
    sub->add_flag("--tensors", o->tensors, "also list every tensor (name, dtype, shape, bytes, file)");
    sub->add_flag("--json", o->json, "print one JSON object instead of text");
    sub->add_flag("--check", o->check,
                  "list every problem of the checkpoint (configs vs tensors, config files that disagree, files not "
                  "read); exit 1 when one is an error");
    return {sub, [o] {
                auto r = inspect_model(o->path, {.check = o->check});
                if (!r) return report_error(r.error());
                if (o->check) {
                    const std::string out = o->json ? inspect_findings_json(*r) + "\n" : inspect_findings_text(*r);
                    std::fputs(out.c_str(), stdout);
                    return r->has_errors ? 1 : 0;
                }
                const std::string out =
                    o->json ? inspect_report_json(*r, o->tensors) + "\n" : inspect_report_text(*r, o->tensors);
                std::fputs(out.c_str(), stdout);
                return 0;
            }};
}

}  // namespace gptq::cli
