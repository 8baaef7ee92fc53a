// gptq merge-lora BASE LORA[:SCALE]... -o OUT: PEFT LoRA adapters merged into an FP16/BF16/F32
// model (W + scale * B A), written as a new model folder (docs/lora.md).
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "gptq/lora.h"

namespace gptq::cli {

command register_merge_lora(CLI::App& app) {
    auto o    = std::make_shared<merge_lora_params>();
    auto args = std::make_shared<std::vector<std::string>>();
    auto sub  = app.add_subcommand("merge-lora",
                                   "merge PEFT LoRA adapters into an FP16/BF16 model (W + scale * B A), to quantize or "
                                    "run without the adapter");
    sub->add_option("base", o->base_path, "the FP16/BF16/F32 model folder (not a GPTQ checkpoint)")->required();
    sub->add_option("lora", *args,
                    "adapter folder(s), DIR or DIR:SCALE (scale multiplies lora_alpha / r); several "
                    "are summed")
        ->required();
    sub->add_option("-o,--output", o->out_path, "output model folder (must not exist)")->required();
    return {sub, [o, args] {
                for (const std::string& a : *args) {
                    auto s = lora_spec_parse(a);
                    if (!s) return report_error(s.error());
                    o->loras.push_back(*s);
                }
                if (auto st = merge_lora_run(*o); !st) return report_error(st);
                std::printf("%s\n", o->out_path.c_str());
                return 0;
            }};
}

}  // namespace gptq::cli
