// gptq report REPORT.json [--plot out.svg]: a `gptq quantize --report` file as a per-layer table
// (errors of GPTQ and RTN, their ratio, the modules' bits), and optionally as an SVG plot; or a points
// file ({"points": [...]}, e.g. ppl against file size) drawn as a scatter with --plot.
#include <fmt/format.h>

#include <cstdio>
#include <fstream>
#include <memory>
#include <sstream>

#include "commands.h"
#include "gptq/quantize.h"

namespace gptq::cli {

namespace {

int write_file(const std::string& path, const std::string& text) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << text;
    out.close();
    if (!out) return report_error(status(status_code::STATUS_IO_ERROR, path + ": cannot write"));
    std::fputs(fmt::format("wrote {}\n", path).c_str(), stdout);
    return 0;
}

// A points file: its points as a table, and the scatter with --plot.
int points_plot(const std::string& text, const std::string& path, const std::string& plot) {
    auto v = scatter_read(text, path);
    if (!v) return report_error(v.error());
    std::fputs(fmt::format("{:<20} {:<24} {:>12} {:>12}\n", "series", "label", "x", "y").c_str(), stdout);
    for (const auto& p : v->points)
        std::fputs(fmt::format("{:<20} {:<24} {:>12.6g} {:>12.6g}\n", p.series, p.label, p.x, p.y).c_str(), stdout);
    return plot.empty() ? 0 : write_file(plot, scatter_svg(*v));
}

}  // namespace

command register_report(CLI::App& app) {
    auto path = std::make_shared<std::string>();
    auto plot = std::make_shared<std::string>();
    auto sub  = app.add_subcommand("report", "show a `gptq quantize --report` file per layer; --plot writes an SVG");
    sub->add_option("report", *path,
                    "the JSON written by gptq quantize --report, or a points file ({\"points\": [{\"series\", "
                    "\"label\", \"x\", \"y\"}, ...], \"title\", \"x_label\", \"y_label\", \"x_log\", \"y_log\"}) to "
                    "draw as a scatter")
        ->required();
    sub->add_option("--plot", *plot,
                    "write an SVG here: the per-layer error (GPTQ against RTN) and bits, or the points' scatter");
    return {sub, [path, plot] {
                std::ifstream in(*path, std::ios::binary);
                if (!in) return report_error(status(status_code::STATUS_NOT_FOUND, *path + ": cannot open"));
                std::stringstream text;
                text << in.rdbuf();
                if (is_points_file(text.str())) return points_plot(text.str(), *path, *plot);
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
                    return write_file(*plot, svg);
                }
                return 0;
            }};
}

}  // namespace gptq::cli
