// gptq report (docs/quantize.md, "Report"): a quantize --report JSON read back, the per-layer
// table and an SVG of the error GPTQ left against RTN's, layer by layer, with each module's bits.
// Also a scatter of labelled points in series (ppl against file size, docs/results.md). The SVGs are
// written by hand (a handful of rect/line/text elements): no plotting library.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <utility>
#include <vector>

#include "core/error.h"
#include "gptq/quantize.h"

namespace gptq {

namespace {

constexpr auto E_PARSE = status_code::STATUS_PARSE_ERROR;

// "model.layers.12.mlp.down_proj" -> 12; "lm_head" -> n_layers (a last column).
int64_t layer_of(const std::string& name, int64_t n_layers) {
    long i = -1;
    if (std::sscanf(name.c_str(), "model.layers.%ld.", &i) == 1) return i;
    return n_layers;
}

std::string xml_escape(const std::string& s) {
    std::string out;
    for (char c : s) {
        switch (c) {
            case '<':
                out += "&lt;";
                break;
            case '>':
                out += "&gt;";
                break;
            case '&':
                out += "&amp;";
                break;
            case '"':
                out += "&quot;";
                break;
            default:
                out += c;
        }
    }
    return out;
}

// Tick positions for an axis over [lo, hi]: steps of 1, 2 or 5 x 10^k giving 4..10 ticks (linear,
// and a log axis spanning less than a decade), or the decades and their 2x and 5x (log).
std::vector<double> ticks_of(double lo, double hi, bool log) {
    std::vector<double> t;
    if (log && hi / lo >= 10) {
        for (double d = std::floor(std::log10(lo)); d <= std::ceil(std::log10(hi)); d += 1)
            for (double m : {1.0, 2.0, 5.0}) {
                const double x = m * std::pow(10.0, d);
                if (x >= lo * (1 - 1e-9) && x <= hi * (1 + 1e-9)) t.push_back(x);
            }
        return t;
    }
    const double span = hi - lo, mag = std::pow(10.0, std::floor(std::log10(span)));
    double       step = mag;
    for (double m : {0.1, 0.2, 0.5, 1.0, 2.0, 5.0})
        if (span / (m * mag) <= 10) {
            step = m * mag;
            break;
        }
    for (double x = std::ceil(lo / step) * step; x <= hi + step * 1e-9; x += step) t.push_back(x);
    return t;
}

// An axis's range: the data's, widened by 5 % each side (in log units on a log axis); a single
// value gets +-1 (x 0.5 .. x 2 on a log axis).
std::pair<double, double> range_of(const std::vector<double>& xs, bool log) {
    double lo = *std::min_element(xs.begin(), xs.end()), hi = *std::max_element(xs.begin(), xs.end());
    if (log) {
        const double a = std::log10(lo), b = std::log10(hi), pad = b > a ? 0.05 * (b - a) : std::log10(2.0);
        return {std::pow(10.0, a - pad), std::pow(10.0, b + pad)};
    }
    const double pad = hi > lo ? 0.05 * (hi - lo) : 1.0;
    return {lo - pad, hi + pad};
}

const char* series_colour(size_t k) {
    static const char* c[] = {"#2c7fb8", "#d7301f", "#1a9850", "#756bb1", "#ff7f00", "#636363"};
    return c[k % (sizeof c / sizeof c[0])];
}
}  // namespace

result<quantize_report_view> quantize_report_read(const std::string& json_text, const std::string& where) {
    nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object())
        return make_error(E_PARSE, "{}: not a JSON object (expected a `gptq quantize --report` file)", where);
    if (!j.contains("linears") || !j["linears"].is_array())
        return make_error(E_PARSE, "{}: no \"linears\" array (expected a `gptq quantize --report` file)", where);
    quantize_report_view v;
    v.method     = j.value("method", "");
    v.bits       = j.value("bits", 0);
    v.group_size = j.value("group_size", 0);
    v.n_layers   = j.value("n_layers", int64_t(0));
    size_t k     = 0;
    for (const auto& l : j["linears"]) {
        if (!l.is_object() || !l.contains("name") || !l["name"].is_string() || !l.contains("error_gptq") ||
            !l["error_gptq"].is_number() || !l.contains("error_rtn") || !l["error_rtn"].is_number())
            return make_error(E_PARSE, "{}: linears[{}] lacks a name, error_gptq or error_rtn", where, k);
        quantize_linear_report r;
        r.name       = l["name"].get<std::string>();
        r.n_out      = l.value("n_out", int64_t(0));
        r.n_in       = l.value("n_in", int64_t(0));
        r.bits       = l.value("bits", v.bits);
        r.group_size = l.value("group_size", v.group_size);
        r.error_gptq = l["error_gptq"].get<double>();
        r.error_rtn  = l["error_rtn"].get<double>();
        if (!std::isfinite(r.error_gptq) || !std::isfinite(r.error_rtn) || r.error_gptq < 0 || r.error_rtn < 0)
            return make_error(E_PARSE, "{}: {} has errors {} / {}, expected finite and >= 0", where, r.name,
                              r.error_gptq, r.error_rtn);
        long i = -1;
        if (std::sscanf(r.name.c_str(), "model.layers.%ld.", &i) == 1)
            v.n_layers = std::max<int64_t>(v.n_layers, i + 1);
        v.linears.push_back(r);
        ++k;
    }
    if (v.linears.empty()) return make_error(E_PARSE, "{}: \"linears\" is empty", where);
    return v;
}

std::vector<quantize_layer_errors> quantize_report_layers(const quantize_report_view& v) {
    std::map<int64_t, quantize_layer_errors> by;
    for (const auto& l : v.linears) {
        const int64_t i = layer_of(l.name, v.n_layers);
        auto&         e = by[i];
        e.layer         = i;
        e.label         = i == v.n_layers ? "lm_head" : std::to_string(i);
        e.error_gptq += l.error_gptq;
        e.error_rtn += l.error_rtn;
        e.modules.push_back(l);
    }
    std::vector<quantize_layer_errors> out;
    for (auto& [i, e] : by) out.push_back(std::move(e));
    return out;
}

std::string quantize_report_svg(const quantize_report_view& v, const std::string& title) {
    const auto layers = quantize_report_layers(v);
    // Layout: a log-scale bar chart (RTN grey, GPTQ blue per layer) over a strip of the modules'
    // bits (one cell per module, coloured by bits).
    const double W = std::max(640.0, 90.0 + 46.0 * double(layers.size())), H = 440;
    const double x0 = 70, x1 = W - 20, y0 = 50, y1 = 300;  // plot area
    double       lo = INFINITY, hi = 0;
    for (const auto& e : layers)
        for (double x : {e.error_gptq, e.error_rtn})
            if (x > 0) {
                lo = std::min(lo, x);
                hi = std::max(hi, x);
            }
    if (!(hi > 0)) {
        lo = 1e-3;
        hi = 1;
    }
    const double d0 = std::floor(std::log10(lo)), d1 = std::max(d0 + 1, std::ceil(std::log10(hi)));
    auto         y_of = [&](double x) {
        const double l = x > 0 ? std::log10(x) : d0;
        return y1 - (l - d0) / (d1 - d0) * (y1 - y0);
    };
    std::string s = fmt::format(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" viewBox=\"0 0 {:.0f} {:.0f}\" "
        "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        W, H, W, H);
    s += fmt::format("<text x=\"{:.0f}\" y=\"24\" font-size=\"15\">{}</text>\n", x0, xml_escape(title));
    s += fmt::format(
        "<text x=\"{:.0f}\" y=\"40\" fill=\"#555\">Hessian-weighted error per layer (sum over its linears, log "
        "scale): RTN grey, GPTQ blue; ratio GPTQ/RTN above</text>\n",
        x0);
    for (double d = d0; d <= d1; d += 1) {  // decades
        const double y = y_of(std::pow(10.0, d));
        s += fmt::format("<line x1=\"{:.1f}\" y1=\"{:.1f}\" x2=\"{:.1f}\" y2=\"{:.1f}\" stroke=\"#ddd\"/>\n", x0, y, x1,
                         y);
        s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">1e{:.0f}</text>\n", x0 - 6, y + 4, d);
    }
    s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"black\"/>\n", x0, y0,
                     y1);
    const double slot = (x1 - x0) / double(layers.size()), bw = std::min(18.0, slot * 0.35);
    auto         bits_colour = [](int b) {
        switch (b) {
            case 2:
                return "#d7301f";
            case 3:
                return "#fc8d59";
            case 4:
                return "#4575b4";
            case 8:
                return "#1a9850";
            default:
                return "#999999";
        }
    };
    for (size_t k = 0; k < layers.size(); ++k) {
        const auto&  e  = layers[k];
        const double cx = x0 + slot * (double(k) + 0.5);
        const double yr = y_of(e.error_rtn), yg = y_of(e.error_gptq);
        s += fmt::format(
            "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"#bbbbbb\"><title>layer {} RTN "
            "{:.4g}</title></rect>\n",
            cx - bw, yr, bw, y1 - yr, e.label, e.error_rtn);
        s += fmt::format(
            "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"#2c7fb8\"><title>layer {} GPTQ "
            "{:.4g}</title></rect>\n",
            cx, yg, bw, y1 - yg, e.label, e.error_gptq);
        if (e.error_rtn > 0)
            s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\" font-size=\"10\">{:.2f}</text>\n",
                             cx, std::min(yr, yg) - 4, e.error_gptq / e.error_rtn);
        s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n", cx, y1 + 16,
                         xml_escape(e.label));
        // The bits strip: one cell per module of the layer.
        const double cw = std::max(2.0, (slot * 0.9) / double(e.modules.size()));
        for (size_t m = 0; m < e.modules.size(); ++m) {
            const auto& l = e.modules[m];
            s += fmt::format(
                "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"28\" fill=\"{}\" stroke=\"white\"><title>{} "
                "{}-bit g{}</title></rect>\n",
                cx - slot * 0.45 + cw * double(m), y1 + 34, cw, bits_colour(l.bits), xml_escape(l.name), l.bits,
                l.group_size);
        }
    }
    s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">bits</text>\n", x0 - 6, y1 + 52);
    double lx = x0;
    for (int b : {2, 3, 4, 8}) {
        s += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"14\" height=\"14\" fill=\"{}\"/>", lx, H - 40,
                         bits_colour(b));
        s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\">{}-bit</text>\n", lx + 18, H - 28, b);
        lx += 70;
    }
    s += fmt::format(
        "<text x=\"{:.1f}\" y=\"{:.1f}\" fill=\"#555\">layer (x axis); cells: modules in report order</text>\n",
        lx + 10, H - 28);
    s += "</svg>\n";
    return s;
}

bool is_points_file(const std::string& json_text) {
    nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
    return !j.is_discarded() && j.is_object() && j.contains("points") && j["points"].is_array();
}

result<scatter_view> scatter_read(const std::string& json_text, const std::string& where) {
    nlohmann::json j = nlohmann::json::parse(json_text, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) return make_error(E_PARSE, "{}: not a JSON object", where);
    if (!j.contains("points") || !j["points"].is_array() || j["points"].empty())
        return make_error(E_PARSE, "{}: no \"points\" array, or an empty one", where);
    scatter_view v;
    auto text = [&](const char* key) { return j.contains(key) && j[key].is_string() ? j[key].get<std::string>() : ""; };
    v.title   = text("title");
    v.x_label = text("x_label");
    v.y_label = text("y_label");
    v.x_log   = j.value("x_log", false);
    v.y_log   = j.value("y_log", false);
    size_t k  = 0;
    for (const auto& p : j["points"]) {
        if (!p.is_object() || !p.contains("series") || !p["series"].is_string() || !p.contains("x") ||
            !p["x"].is_number() || !p.contains("y") || !p["y"].is_number())
            return make_error(E_PARSE, "{}: points[{}] lacks a series, x or y", where, k);
        plot_point q;
        q.series = p["series"].get<std::string>();
        q.label  = p.contains("label") && p["label"].is_string() ? p["label"].get<std::string>() : "";
        q.x      = p["x"].get<double>();
        q.y      = p["y"].get<double>();
        if (!std::isfinite(q.x) || !std::isfinite(q.y) || (v.x_log && q.x <= 0) || (v.y_log && q.y <= 0))
            return make_error(E_PARSE, "{}: points[{}] ({}) has x {} y {}, expected finite (and > 0 on a log axis)",
                              where, k, q.label, q.x, q.y);
        v.points.push_back(q);
        ++k;
    }
    return v;
}

std::string scatter_svg(const scatter_view& v) {
    const double        W = 760, H = 520, x0 = 80, x1 = W - 30, y0 = 60, y1 = H - 90;  // plot area
    std::vector<double> xs, ys;
    for (const auto& p : v.points) {
        xs.push_back(p.x);
        ys.push_back(p.y);
    }
    // Plain variables, not structured bindings: clang (the fuzz build) does not capture those in a lambda.
    const auto   xr = range_of(xs, v.x_log), yr = range_of(ys, v.y_log);
    const double xlo = xr.first, xhi = xr.second, ylo = yr.first, yhi = yr.second;
    auto         unit = [](double a, double lo, double hi, bool log) {
        return log ? (std::log10(a) - std::log10(lo)) / (std::log10(hi) - std::log10(lo)) : (a - lo) / (hi - lo);
    };
    auto        px = [&](double x) { return x0 + unit(x, xlo, xhi, v.x_log) * (x1 - x0); };
    auto        py = [&](double y) { return y1 - unit(y, ylo, yhi, v.y_log) * (y1 - y0); };
    std::string s  = fmt::format(
         "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{:.0f}\" height=\"{:.0f}\" viewBox=\"0 0 {:.0f} {:.0f}\" "
          "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
         W, H, W, H);
    s += fmt::format("<text x=\"{:.0f}\" y=\"26\" font-size=\"15\">{}</text>\n", x0, xml_escape(v.title));
    for (double t : ticks_of(xlo, xhi, v.x_log)) {
        s += fmt::format("<line x1=\"{0:.1f}\" y1=\"{1:.1f}\" x2=\"{0:.1f}\" y2=\"{2:.1f}\" stroke=\"#e5e5e5\"/>\n",
                         px(t), y0, y1);
        s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{:g}</text>\n", px(t), y1 + 16, t);
    }
    for (double t : ticks_of(ylo, yhi, v.y_log)) {
        s += fmt::format("<line x1=\"{1:.1f}\" y1=\"{0:.1f}\" x2=\"{2:.1f}\" y2=\"{0:.1f}\" stroke=\"#e5e5e5\"/>\n",
                         py(t), x0, x1);
        s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"end\">{:g}</text>\n", x0 - 6, py(t) + 4, t);
    }
    s += fmt::format(
        "<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"{:.1f}\" height=\"{:.1f}\" fill=\"none\" stroke=\"black\"/>\n", x0, y0,
        x1 - x0, y1 - y0);
    s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" text-anchor=\"middle\">{}</text>\n", (x0 + x1) / 2, y1 + 36,
                     xml_escape(v.x_label + (v.x_log ? " (log scale)" : "")));
    s += fmt::format("<text transform=\"translate(18 {:.1f}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
                     (y0 + y1) / 2, xml_escape(v.y_label + (v.y_log ? " (log scale)" : "")));
    // Series in order of first appearance: a polyline in x order, a marker and a label per point.
    std::vector<std::string> names;
    for (const auto& p : v.points)
        if (std::find(names.begin(), names.end(), p.series) == names.end()) names.push_back(p.series);
    double legend_x = x0;
    for (size_t k = 0; k < names.size(); ++k) {
        std::vector<plot_point> pts;
        for (const auto& p : v.points)
            if (p.series == names[k]) pts.push_back(p);
        std::stable_sort(pts.begin(), pts.end(), [](const plot_point& a, const plot_point& b) { return a.x < b.x; });
        std::string line;
        for (const auto& p : pts) line += fmt::format("{}{:.1f},{:.1f}", line.empty() ? "" : " ", px(p.x), py(p.y));
        s += fmt::format("<polyline points=\"{}\" fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\"/>\n", line,
                         series_colour(k));
        for (const auto& p : pts) {
            s += fmt::format(
                "<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"4\" fill=\"{}\"><title>{}: {} x {:g} y "
                "{:g}</title></circle>\n",
                px(p.x), py(p.y), series_colour(k), xml_escape(p.series), xml_escape(p.label), p.x, p.y);
            if (!p.label.empty())
                s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\" font-size=\"10\" fill=\"{}\">{}</text>\n",
                                 px(p.x) + 6, py(p.y) - 6, series_colour(k), xml_escape(p.label));
        }
        const double lx = legend_x;
        legend_x += 40.0 + 6.5 * double(names[k].size());  // about 6.5 px per character at 12 px
        s += fmt::format("<rect x=\"{:.1f}\" y=\"{:.1f}\" width=\"14\" height=\"14\" fill=\"{}\"/>", lx, H - 30,
                         series_colour(k));
        s += fmt::format("<text x=\"{:.1f}\" y=\"{:.1f}\">{}</text>\n", lx + 18, H - 18, xml_escape(names[k]));
    }
    s += "</svg>\n";
    return s;
}

}  // namespace gptq
