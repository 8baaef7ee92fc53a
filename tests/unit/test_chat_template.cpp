// Chat templates: the Jinja subset (src/engine/jinja.cpp) against Jinja2's renderings of the
// Llama-2, Llama-3, Llama-3.1, Mistral, Qwen2 and Qwen2.5 templates and of two templates that
// exercise trim_blocks / lstrip_blocks and the rest of the subset
// (tests/data/generate/chat_templates.json, made by scripts/make_chat_goldens.py), plus errors.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "gptq/chat.h"
#include "test_util.h"

namespace gptq {
namespace {

nlohmann::json load_templates() {
    return nlohmann::json::parse(test::read_file(test::source_path("tests/data/generate/chat_templates.json")));
}

TEST(ChatTemplate, MatchesJinja2OnPublishedAndTestTemplates) {
    const auto data      = load_templates();
    int        n_checked = 0;
    for (const auto& t : data["templates"]) {
        const std::string name = t["name"];
        const std::string tmpl = t["template"];
        for (const auto& c : t["cases"]) {
            std::vector<chat_message> msgs;
            for (const auto& m : c["messages"]) msgs.push_back({m["role"], m["content"]});
            chat_template_vars v;
            v.bos_token             = data["bos_token"];
            v.eos_token             = data["eos_token"];
            v.add_generation_prompt = c["add_generation_prompt"];
            auto              r     = chat_template_render(tmpl, msgs, v);
            const std::string what  = name + " (" + std::to_string(msgs.size()) + " messages, add_generation_prompt " +
                                     (v.add_generation_prompt ? "true" : "false") + ")";
            if (t.contains("unsupported")) {
                ASSERT_FALSE(r.is_ok()) << what << " rendered a construct outside the subset";
                EXPECT_NE(r.error().message().find("'" + t["unsupported"].get<std::string>() + "'"), std::string::npos)
                    << what << ": " << r.error().message();
            } else if (c.contains("error")) {
                ASSERT_FALSE(r.is_ok()) << what << ": Jinja2 raised " << c["error"] << " but we rendered " << *r;
                EXPECT_NE(r.error().message().find("chat template raised an error"), std::string::npos)
                    << r.error().message();
            } else {
                ASSERT_TRUE(r.is_ok()) << what << ": " << r.error().message();
                EXPECT_EQ(*r, c["expected"].get<std::string>()) << what;
            }
            ++n_checked;
        }
    }
    EXPECT_GE(n_checked, 80);
}

result<std::string> render(const std::string& tmpl, std::vector<chat_message> msgs = {{"user", "hi"}}) {
    return chat_template_render(tmpl, msgs, {"<s>", "</s>", true});
}

TEST(ChatTemplate, ErrorsNameTheConstructAndLine) {
    struct bad_case {
        const char* tmpl;
        const char* needle;
    };
    const bad_case cases[] = {
        {"line one\n{% include 'x.j2' %}", "unsupported tag 'include' at line 2"},
        {"{% raw %}x{% endraw %}", "unsupported tag 'raw'"},
        {"{% if true %}never closed", "'if' at line 1 is never closed"},
        {"{{ messages | wordcount }}", "unsupported filter 'wordcount'"},
        {"{{ messages[0].content.title() }}", "unsupported method 'title'"},
        {"{{ cycler(1, 2) }}", "unsupported function 'cycler'"},
        {"{{ 3 is divisibleby(3) }}", "unsupported test 'divisibleby'"},
        {"{{ (1, 2) }}", "tuples are not supported"},
        {"{{ 'unterminated }}", "unterminated string at line 1"},
        {"{{ 1 + }}", "unexpected 'end of expression'"},
        {"{{ 'a' + 1 }}", "'+' between a string and a int"},
        {"{{ raise_exception('no system role') }}", "chat template raised an error: no system role"},
        {"{{ 99999999999999999999999 }}", "out of range"},
        {"{% set x %}block{% endset %}", "block 'set'"},
        {"{% for i in range(100000000) %}{% endfor %}", "range() of 100000000 items"},
        {"{{ 'ab' * 100000000 }}", "string repeated 100000000 times"},
        // Integer arithmetic past int64 is an error, not undefined behaviour (UBSan would abort).
        {"{{ 9223372036854775807 + 1 }}", "integer overflow in 9223372036854775807 + 1"},
        {"{{ -9223372036854775807 - 2 }}", "integer overflow"},
        {"{{ 4294967296 * 4294967296 }}", "integer overflow"},
        {"{{ 3 ** 40 }}", "integer overflow in 3 ** 40"},
        {"{{ messages[] }}", "empty subscript"},
        // Hostile nesting is an error, not a stack overflow (found by fuzz_chat_template).
        {"{{ ((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((1)))))))))))))))))))))))))))))))))))))"
         ")))))))))))))))))))))))))))))))) }}",
         "nested more than"},
        {"{% set ns = namespace(a=0) %}{% set ns.a = ns %}", "a namespace cannot hold a namespace"},
        // Work and output caps (a fuzzed template with nested loops took 17 s under ASan).
        {"{% for i in range(2000) %}{% for j in range(2000) %}{% endfor %}{% endfor %}",
         "more than 262144 evaluation steps"},
        {"{% for i in range(100) %}{{ 'x' * 1000000 }}{% endfor %}", "passes 16777216 bytes"},
        {"{% set ns = namespace(a=[]) %}{% for i in range(100) %}{% set ns.a = [ns.a] %}{% endfor %}",
         "nested more than 64 deep"},
        {"{{ messages[0 1] }}", "expected ']'"},
        {"{{ (-9223372036854775807 - 1) // -1 }}", "integer overflow"},
        {"{{ -(-9223372036854775807 - 1) }}", "integer overflow"},
        {"{% for i in range(-9223372036854775807, 9223372036854775807, 2) %}{% endfor %}", "more than"},
    };
    std::string long_sum = "{{ 1", deep_ifs;
    for (int i = 0; i < 600; ++i) long_sum += " + 1";
    long_sum += " }}";
    for (int i = 0; i < 100; ++i) deep_ifs = "{% if true %}" + deep_ifs + "{% endif %}";
    for (const auto& [t, needle] : {std::pair<std::string, const char*>{long_sum, "more than 512"},
                                    {deep_ifs, "blocks nested more than 64 deep"}}) {
        auto r = render(t);
        ASSERT_FALSE(r.is_ok()) << needle;
        EXPECT_NE(r.error().message().find(needle), std::string::npos) << r.error().message();
    }
    for (const auto& c : cases) {
        auto r = render(c.tmpl);
        ASSERT_FALSE(r.is_ok()) << c.tmpl << " rendered as " << *r;
        EXPECT_NE(r.error().message().find(c.needle), std::string::npos) << c.tmpl << " -> " << r.error().message();
    }
}

TEST(ChatTemplate, IntegerArithmeticIsExactAndFloorsLikePython) {
    auto r = render(
        "{{ 9223372036854775806 + 1 }} {{ 2 ** 62 }} {{ (-1) ** 3 }} {{ 0 ** 0 }} {{ -7 // 2 }} "
        "{{ -7 % 3 }} {{ 7 % -3 }} {{ 2 ** -1 }} {{ range(9223372036854775805, 9223372036854775807) "
        "| list | length }} {{ {'a': 1} | tojson(indent=-5) }}");
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_EQ(*r, "9223372036854775807 4611686018427387904 -1 1 -4 2 -2 0.5 2 {\"a\": 1}");
}

TEST(ChatTemplate, UnsupportedConstructInABranchNotTakenIsFine) {
    // Llama-3.1's template uses reject() only when builtin_tools is defined.
    auto r = render("{% if builtin_tools is defined %}{{ builtin_tools | reject('equalto', 'x') }}{% endif %}ok");
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_EQ(*r, "ok");
}

TEST(ChatTemplate, WhitespaceControlAndStringsWithDelimiters) {
    auto r = render("a  {{- ' %} }} ' -}}  b\n{%- for m in messages %} {{ m.role }}{% endfor %}\n{# c #}\nz");
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_EQ(*r, "a %} }} b userz");  // as Jinja2 renders it
}

}  // namespace
}  // namespace gptq
