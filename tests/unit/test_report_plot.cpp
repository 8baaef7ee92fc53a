// gptq report (engine/report_plot.cpp): a --report JSON read back, errors summed per layer with
// lm_head last, the SVG's bars and bit cells, and clear errors for files that are not reports.
#include <gtest/gtest.h>

#include <string>

#include "gptq/quantize.h"

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
