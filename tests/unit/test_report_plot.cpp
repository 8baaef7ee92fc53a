// gptq report (engine/report_plot.cpp): a --report JSON read back, errors summed per layer with
// lm_head last, the SVG's bars and bit cells, and clear errors for files that are not reports.
#include <gtest/gtest.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "gptq/quantize.h"
#include "test_util.h"

using namespace gptq;

namespace {

size_t count(const std::string& s, const std::string& what) {
    size_t n = 0;
    for (size_t p = s.find(what); p != std::string::npos; p = s.find(what, p + 1)) ++n;
    return n;
}

const char* k_report = R"({"method": "gptq", "bits": 4, "group_size": 128, "n_layers": 2, "linears": [
  {"name": "model.layers.0.self_attn.q_proj", "bits": 4, "group_size": 128, "error_gptq": 1.0, "error_rtn": 2.0},
  {"name": "model.layers.0.mlp.down_proj", "bits": 3, "group_size": 64, "error_gptq": 3.0, "error_rtn": 6.0},
  {"name": "model.layers.1.self_attn.q_proj", "error_gptq": 10.0, "error_rtn": 40.0},
  {"name": "lm_head", "bits": 8, "group_size": 128, "error_gptq": 0.5, "error_rtn": 0.75}]})";

}  // namespace

TEST(report_plot, layers_are_summed_and_lm_head_comes_last) {
    auto v = quantize_report_read(k_report, "r.json");
    ASSERT_TRUE(v.is_ok()) << v.error().message();
    EXPECT_EQ(v->n_layers, 2);
    EXPECT_EQ(v->linears[2].bits, 4) << "a linear without bits has the base bits";
    const auto layers = quantize_report_layers(*v);
    ASSERT_EQ(layers.size(), 3u);
    EXPECT_EQ(layers[0].label, "0");
    EXPECT_DOUBLE_EQ(layers[0].error_gptq, 4.0);
    EXPECT_DOUBLE_EQ(layers[0].error_rtn, 8.0);
    EXPECT_EQ(layers[0].modules.size(), 2u);
    EXPECT_EQ(layers[2].label, "lm_head");
    EXPECT_EQ(layers[2].modules[0].bits, 8);

    const std::string svg = quantize_report_svg(*v, "t <&> \"x\"");
    EXPECT_EQ(svg.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0), 0u);
    EXPECT_NE(svg.find("</svg>\n"), std::string::npos);
    EXPECT_NE(svg.find("t &lt;&amp;&gt; &quot;x&quot;"), std::string::npos) << "the title is escaped";
    // background + (RTN, GPTQ) per layer + one cell per module + 4 legend swatches
    EXPECT_EQ(count(svg, "<rect"), 1u + 2 * 3 + 4 + 4);
    EXPECT_EQ(count(svg, "<rect"), count(svg, "/>") + count(svg, "</rect>") - count(svg, "<line"));
    EXPECT_NE(svg.find(">0.50<"), std::string::npos) << "layer 0's ratio";
    EXPECT_NE(svg.find(">0.25<"), std::string::npos) << "layer 1's ratio";
    EXPECT_NE(svg.find("model.layers.0.mlp.down_proj 3-bit g64"), std::string::npos);
}

TEST(report_plot, files_that_are_not_reports_are_refused) {
    auto a = quantize_report_read("not json", "a.json");
    ASSERT_FALSE(a.is_ok());
    EXPECT_NE(a.error().message().find("a.json: not a JSON object"), std::string::npos);
    auto b = quantize_report_read(R"({"bits": 4})", "b.json");
    ASSERT_FALSE(b.is_ok());
    EXPECT_NE(b.error().message().find("no \"linears\""), std::string::npos);
    auto c = quantize_report_read(R"({"linears": [{"name": "x", "error_gptq": 1}]})", "c.json");
    ASSERT_FALSE(c.is_ok());
    EXPECT_NE(c.error().message().find("linears[0]"), std::string::npos);
    auto d = quantize_report_read(R"({"linears": [{"name": "x", "error_gptq": -1, "error_rtn": 1}]})", "d.json");
    ASSERT_FALSE(d.is_ok());
    EXPECT_NE(d.error().message().find("x has errors"), std::string::npos);
}

// The scatter of `gptq report POINTS.json --plot` (ppl against file size, docs/results.md).
TEST(report_plot, points_file_is_drawn_as_series_in_x_order) {
    const char* k_points = R"({"title": "ppl <vs> size", "x_label": "MiB", "y_label": "ppl", "y_log": true,
      "points": [{"series": "ours", "label": "W4", "x": 17.5, "y": 116.3},
                 {"series": "llama.cpp", "label": "Q4_K_M", "x": 16.0, "y": 112.0},
                 {"series": "ours", "label": "W3", "x": 15.2, "y": 127.0},
                 {"series": "llama.cpp", "label": "Q2_K", "x": 11.0, "y": 300.0}]})";
    EXPECT_TRUE(is_points_file(k_points));
    EXPECT_FALSE(is_points_file(k_report));
    auto v = scatter_read(k_points, "p.json");
    ASSERT_TRUE(v.is_ok()) << v.error().message();
    EXPECT_TRUE(v->y_log);
    EXPECT_FALSE(v->x_log);
    ASSERT_EQ(v->points.size(), 4u);
    EXPECT_EQ(v->points[1].label, "Q4_K_M");
    const std::string svg = scatter_svg(*v);
    EXPECT_EQ(svg.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0), 0u);
    EXPECT_NE(svg.find("</svg>\n"), std::string::npos);
    EXPECT_NE(svg.find("ppl &lt;vs&gt; size"), std::string::npos) << "the title is escaped";
    EXPECT_EQ(count(svg, "<polyline"), 2u) << "one line per series";
    EXPECT_EQ(count(svg, "<circle"), 4u) << "one marker per point";
    EXPECT_NE(svg.find("ppl (log scale)"), std::string::npos);
    // The series "ours" is joined in x order: W3 (15.2) before W4 (17.5), whatever the file's order.
    const size_t line = svg.find("<polyline points=\"");
    ASSERT_NE(line, std::string::npos);
    const std::string pts = svg.substr(line, svg.find('"', line + 18) - line);
    double            ax = 0, ay = 0, bx = 0, by = 0;
    ASSERT_EQ(std::sscanf(pts.c_str(), "<polyline points=\"%lf,%lf %lf,%lf", &ax, &ay, &bx, &by), 4);
    EXPECT_LT(ax, bx) << "x grows along the line";
    EXPECT_LT(ay, by) << "W3 has the higher ppl: higher on the plot, so a smaller SVG y";
    // Every marker lies inside the plot area (x 80..730, y 60..430).
    for (size_t p = svg.find("<circle cx=\""); p != std::string::npos; p = svg.find("<circle cx=\"", p + 1)) {
        double cx = 0, cy = 0;
        ASSERT_EQ(std::sscanf(svg.c_str() + p, "<circle cx=\"%lf\" cy=\"%lf\"", &cx, &cy), 2);
        EXPECT_GT(cx, 80);
        EXPECT_LT(cx, 730);
        EXPECT_GT(cy, 60);
        EXPECT_LT(cy, 430);
    }
}

TEST(report_plot, bad_points_files_are_refused) {
    auto a = scatter_read(R"({"points": []})", "a.json");
    ASSERT_FALSE(a.is_ok());
    EXPECT_NE(a.error().message().find("a.json: no \"points\""), std::string::npos);
    auto b = scatter_read(R"({"points": [{"series": "s", "x": 1}]})", "b.json");
    ASSERT_FALSE(b.is_ok());
    EXPECT_NE(b.error().message().find("points[0] lacks"), std::string::npos);
    auto c = scatter_read(R"({"y_log": true, "points": [{"series": "s", "label": "q", "x": 1, "y": 0}]})", "c.json");
    ASSERT_FALSE(c.is_ok());
    EXPECT_NE(c.error().message().find("points[0] (q) has x 1 y 0"), std::string::npos);
}

// The CLI: `gptq report POINTS.json --plot out.svg` writes the scatter; a bad point is an error
// naming the file and the point, with a non-zero exit and no SVG.
TEST(report_plot, cli_draws_a_points_file) {
    test::temp_dir    tmp("report-points");
    const std::string good = tmp.path() + "/points.json", bad = tmp.path() + "/bad.json";
    const std::string svg = tmp.path() + "/out.svg", svg_bad = tmp.path() + "/bad.svg";
    test::write_file(good, R"({"x_label": "MiB", "y_label": "ppl", "points": [{"series": "a", "label": "p", "x": 1,
        "y": 2}, {"series": "a", "label": "q", "x": 2, "y": 3}]})");
    test::write_file(bad, R"({"points": [{"series": "a", "x": 1, "y": 2}, {"series": "a", "label": "q", "x": "1"}]})");
    auto r = test::run_command(test::gptq_binary() + " report " + good + " --plot " + svg);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("wrote " + svg), std::string::npos) << r.out;
    EXPECT_NE(test::read_file(svg).find("<polyline"), std::string::npos);
    r = test::run_command(test::gptq_binary() + " report " + bad + " --plot " + svg_bad);
    EXPECT_NE(r.exit_code, 0);
    EXPECT_NE(r.err.find(bad + ": points[1] lacks a series, x or y"), std::string::npos) << r.err;
    EXPECT_FALSE(std::filesystem::exists(svg_bad));
}
