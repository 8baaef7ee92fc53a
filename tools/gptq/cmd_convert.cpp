// gptq convert IN -o OUT --format gptq|gptq_v2 [--force] [--clamp-zeros]
#include <cstdio>
#include <memory>

#include "commands.h"
#include "gptq/convert.h"

namespace gptq::cli {

command register_convert(CLI::App& app) {
    auto o   = std::make_shared<convert_params>();
    auto sub = app.add_subcommand("convert",
                                  "rewrite a GPTQ checkpoint's zero points as v1 (gptq) or v2 (gptq_v2), configs too");
    sub->add_option("input", o->input_path, "GPTQ checkpoint folder")->required();
    sub->add_option("-o,--output", o->output_path, "output folder (must not exist unless --force)")->required();
    sub->add_option("--format", o->format,
                    "gptq (v1: stored zero - 1, read by every GPTQ reader) or gptq_v2 (stored zero, GPTQModel)")
        ->required()
        ->check(CLI::IsMember({"gptq", "gptq_v2"}));
    sub->add_flag("--force", o->force, "replace an existing output folder (once the new one is complete)");
    sub->add_flag("--clamp-zeros", o->clamp_zeros,
                  "to gptq: store zero points of 0 as 1, moving their codes up by one (weights whose code is "
                  "2^bits - 1 lose one scale step); without it such a checkpoint is refused");
    return {sub, [o] {
                auto r = convert_checkpoint(*o);
                if (!r) return report_error(r.error());
                std::fputs(convert_report_summary(*r).c_str(), stdout);
                return 0;
            }};
}

}  // namespace gptq::cli
