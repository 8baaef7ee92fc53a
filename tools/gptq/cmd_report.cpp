// gptq report REPORT.json [--plot out.svg]: a `gptq quantize --report` file as a per-layer table
// (errors of GPTQ and RTN, their ratio, the modules' bits), and optionally as an SVG plot.
#include <fmt/format.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include "commands.h"
#include "gptq/quantize.h"

namespace gptq::cli {

command register_report(CLI::App& app) {
    auto path = std::make_shared<std::string>();
    auto plot = std::make_shared<std::string>();
    auto sub  = app.add_subcommand("report", "show a `gptq quantize --report` file per layer; --plot writes an SVG");
    sub->add_option("report", *path, "the JSON written by gptq quantize --report")->required();
    sub->add_option("--plot", *plot, "write an SVG of the per-layer error (GPTQ against RTN) and bits here");
    return {sub, [path, plot] {
                std::ifstream in(*path, std::ios::binary);
                if (!in) return report_error(status(status_code::STATUS_NOT_FOUND, *path + ": cannot open"));
                std::stringstream text;
                text << in.rdbuf();
                auto v = quantize_report_read(text.str(), *path);
                if (!v) return report_error(v.error());
                std::fputs(fmt::format("{:>8} {:>12} {:>12} {:>7}  bits\n", "layer", "GPTQ", "RTN", "ratio").c_str(),
                           stdout);
                for (const auto& e : quantize_report_layers(*v)) {
                    std::string bits;
                    for (const auto& m : e.modules) bits += fmt::format("{}{}", bits.empty() ? "" : " ", m.bits);
                    std::fputs(fmt::format("{:>8} {:>12.5g} {:>12.5g} {:>7.3f}  {}\n", e.label, e.error_gptq,
                                           e.error_rtn, e.error_rtn > 0 ? e.error_gptq / e.error_rtn : 0.0, bits)
                                   .c_str(),
                               stdout);
                }
                if (!plot->empty()) {
                    const std::string svg = quantize_report_svg(
                        *v, fmt::format("{}: {} {}-bit g{}", *path, v->method, v->bits, v->group_size));
                    std::ofstream out(*plot, std::ios::binary | std::ios::trunc);
                    out << svg;
                    out.close();
                    if (!out) return report_error(status(status_code::STATUS_IO_ERROR, *plot + ": cannot write"));
                    std::fputs(fmt::format("wrote {}\n", *plot).c_str(), stdout);
                }
                return 0;
            }};
}

}  // namespace gptq::cli
