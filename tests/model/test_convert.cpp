// Zero-point formats end to end on the bundled tiny-llama (format.md 1.4): `quantize --no-sym`
// writes v1; a checkpoint whose label disagrees with its zeros loads to the same perplexity as the
// correctly labelled one, with one warning; `gptq convert` v1 -> v2 -> v1 gives back the same
// bytes and the same perplexity, rewrites both configs, refuses (or with --clamp-zeros repairs) a
// zero of 0 that v1 cannot store, and never leaves a partial output.
#include <gtest/gtest.h>

#include <filesystem>
#include <nlohmann/json.hpp>

#include "core/dtype.h"
#include "gptq/convert.h"
#include "gptq/ppl.h"
#include "gptq/quantize.h"
#include "io/gptq_checkpoint.h"
#include "io/gptq_zero_format.h"
#include "io/tensor_source.h"
#include "test_util.h"

using namespace gptq;
namespace fs = std::filesystem;
using json   = nlohmann::json;
using F      = gptq_checkpoint_format;

namespace {

// RTN (no calibration: fast) of the bundled tiny-llama.
std::string quantize_rtn(const std::string& out, bool sym, const std::string& format = "",
                         uint64_t max_shard_bytes = 4ull << 30) {
    quantize_params p;
    p.model_path      = test::source_path("models/tiny-llama");
    p.output_path     = out;
    p.method          = "rtn";
    p.sym             = sym;
    p.format          = format;
    p.n_threads       = 2;
    p.max_shard_bytes = max_shard_bytes;
    auto r            = quantize_model(p);
    EXPECT_TRUE(r.is_ok()) << r.error().message();
    return out;
}

double ppl_of(const std::string& path) {
    ppl_params p;
    p.model_path  = path;
    p.seqlen      = 128;
    p.max_windows = 4;
    p.n_threads   = 2;
    p.progress    = false;
    auto r        = ppl_run(p);
    EXPECT_TRUE(r.is_ok()) << path << ": " << r.error().message();
    return r.is_ok() ? r->ppl : -1.0;
}

json read_json(const std::string& path) {
    return json::parse(test::read_file(path));
}

// Set checkpoint_format in both config files (what a mislabelled upload looks like).
void relabel(const std::string& dir, const std::string& format) {
    json q                 = read_json(dir + "/quantize_config.json");
    q["checkpoint_format"] = format;
    test::write_file(dir + "/quantize_config.json", q.dump(2));
    json c                                        = read_json(dir + "/config.json");
    c["quantization_config"]["checkpoint_format"] = format;
    test::write_file(dir + "/config.json", c.dump(2));
}

void copy_dir(const std::string& from, const std::string& to) {
    fs::copy(from, to, fs::copy_options::recursive);
}

// The raw bytes of every .qzeros tensor, in name order.
std::string qzeros_bytes(const std::string& dir) {
    auto        src = tensor_source::open(dir);
    std::string out;
    EXPECT_TRUE(src.is_ok());
    for (const auto& name : (*src)->names())
        if (name.ends_with(".qzeros")) {
            const tensor_entry* e = (*src)->find(name);
            std::string         b(e->info->nbytes(), '\0');
            e->file->copy_to(*e->info, b.data());
            out += b;
        }
    return out;
}

size_t count(const std::string& text, const std::string& what) {
    size_t n = 0;
    for (size_t p = text.find(what); p != std::string::npos; p = text.find(what, p + 1)) ++n;
    return n;
}

// Nothing but `keep` in `dir` (no temporary folder left behind).
std::vector<std::string> entries(const std::string& dir) {
    std::vector<std::string> v;
    for (const auto& e : fs::directory_iterator(dir)) v.push_back(e.path().filename().string());
    std::sort(v.begin(), v.end());
    return v;
}

}  // namespace

TEST(zero_format, quantize_no_sym_writes_v1_by_default) {
    test::temp_dir    dir("zf-default");
    const std::string out = quantize_rtn(dir.file("asym"), /*sym=*/false);
    EXPECT_EQ(read_json(out + "/quantize_config.json")["checkpoint_format"], "gptq");
    EXPECT_EQ(read_json(out + "/config.json")["quantization_config"]["checkpoint_format"], "gptq");
    EXPECT_EQ(read_json(out + "/quantize_config.json")["sym"], false);
    auto src = tensor_source::open(out);
    ASSERT_TRUE(src.is_ok());
    gptq_config cfg;
    cfg.format = F::GPTQ_FORMAT_V1;
    auto ev    = gptq_zero_format_detect(**src, cfg);
    ASSERT_TRUE(ev.is_ok());
    EXPECT_TRUE(ev->decided) << ev->basis;
    EXPECT_EQ(ev->format, F::GPTQ_FORMAT_V1) << ev->basis;
    EXPECT_EQ(ev->n_wrap, 0);
    // --format gptq_v2 still writes v2.
    const std::string v2 = quantize_rtn(dir.file("asym-v2"), false, "gptq_v2");
    EXPECT_EQ(read_json(v2 + "/quantize_config.json")["checkpoint_format"], "gptq_v2");
}

TEST(zero_format, mislabelled_checkpoints_load_to_the_same_ppl_with_one_warning) {
    if (!fs::exists(test::gptq_binary())) GTEST_SKIP() << "gptq binary not built";
    test::temp_dir dir("zf-mislabel");
    // A symmetric v1 checkpoint labelled gptq_v2, and an asymmetric v2 one labelled gptq.
    const std::string sym  = quantize_rtn(dir.file("sym"), true);
    const std::string asym = quantize_rtn(dir.file("asym-v2"), false, "gptq_v2");
    copy_dir(sym, dir.file("sym-as-v2"));
    relabel(dir.file("sym-as-v2"), "gptq_v2");
    copy_dir(asym, dir.file("asym-v2-as-v1"));
    relabel(dir.file("asym-v2-as-v1"), "gptq");
    auto ppl = [&](const std::string& path) {
        return test::run_command(test::gptq_binary() + " ppl " + path +
                                 " --seqlen 128 --max-windows 4 --threads 2 --json");
    };
    for (auto [right, wrong, data] :
         {std::tuple{sym, dir.file("sym-as-v2"), "'gptq'"}, std::tuple{asym, dir.file("asym-v2-as-v1"), "'gptq_v2'"}}) {
        auto a = ppl(right), b = ppl(wrong);
        ASSERT_EQ(a.exit_code, 0) << a.err;
        ASSERT_EQ(b.exit_code, 0) << b.err;
        EXPECT_EQ(json::parse(a.out)["ppl"], json::parse(b.out)["ppl"]) << wrong;
        EXPECT_EQ(count(a.err, "checkpoint_format says"), 0u) << a.err;
        EXPECT_EQ(count(b.err, "checkpoint_format says"), 1u) << b.err;
        EXPECT_NE(b.err.find(wrong + "/quantize_config.json: checkpoint_format says"), std::string::npos) << b.err;
        EXPECT_NE(b.err.find(std::string("the zero points are ") + data), std::string::npos) << b.err;
    }
}

TEST(zero_format, convert_round_trip_is_byte_identical) {
    test::temp_dir dir("zf-round");
    // Asymmetric v1 (the default), sharded: shards and index are kept as they are.
    const std::string v1 = quantize_rtn(dir.file("v1"), false, "", 2 << 20);
    ASSERT_TRUE(fs::exists(v1 + "/model.safetensors.index.json"));
    convert_params p;
    p.input_path  = v1;
    p.output_path = dir.file("v2");
    p.format      = "gptq_v2";
    auto to_v2    = convert_checkpoint(p);
    ASSERT_TRUE(to_v2.is_ok()) << to_v2.error().message();
    EXPECT_EQ(to_v2->format_in, "gptq");
    EXPECT_EQ(to_v2->n_modules, 28);
    EXPECT_GT(to_v2->n_files, 1);
    p.input_path  = dir.file("v2");
    p.output_path = dir.file("v1-again");
    p.format      = "gptq";
    auto back     = convert_checkpoint(p);
    ASSERT_TRUE(back.is_ok()) << back.error().message();
    EXPECT_EQ(back->format_in, "gptq_v2");

    EXPECT_NE(qzeros_bytes(v1), qzeros_bytes(dir.file("v2")));
    EXPECT_EQ(qzeros_bytes(v1), qzeros_bytes(dir.file("v1-again")));
    EXPECT_EQ(entries(v1), entries(dir.file("v2")));
    for (const auto& f : entries(v1)) {
        if (f.ends_with(".safetensors") || f == "model.safetensors.index.json" || f.rfind("tokenizer", 0) == 0 ||
            f == "generation_config.json")
            EXPECT_EQ(test::read_file(v1 + "/" + f), test::read_file(dir.file("v1-again") + "/" + f)) << f;
    }
    // Both configs relabelled, nothing else changed.
    for (const char* f : {"quantize_config.json", "config.json"}) {
        json  a = read_json(v1 + "/" + f), b = read_json(dir.file("v2") + "/" + f);
        json& qa = std::string(f) == "config.json" ? a["quantization_config"] : a;
        json& qb = std::string(f) == "config.json" ? b["quantization_config"] : b;
        EXPECT_EQ(qb["checkpoint_format"], "gptq_v2") << f;
        qb["checkpoint_format"] = qa["checkpoint_format"];
        EXPECT_EQ(a, b) << f;
        EXPECT_EQ(read_json(v1 + "/" + f), read_json(dir.file("v1-again") + "/" + f)) << f;
    }
    const double ppl = ppl_of(v1);
    EXPECT_EQ(ppl_of(dir.file("v2")), ppl);
    EXPECT_EQ(ppl_of(dir.file("v1-again")), ppl);
    // A mislabelled input is converted from what its data says: relabel v2 as v1, convert to v1.
    copy_dir(dir.file("v2"), dir.file("v2-as-v1"));
    relabel(dir.file("v2-as-v1"), "gptq");
    p.input_path  = dir.file("v2-as-v1");
    p.output_path = dir.file("fixed");
    auto fixed    = convert_checkpoint(p);
    ASSERT_TRUE(fixed.is_ok()) << fixed.error().message();
    EXPECT_EQ(fixed->label_in, "gptq");
    EXPECT_EQ(fixed->format_in, "gptq_v2");
    EXPECT_EQ(qzeros_bytes(dir.file("fixed")), qzeros_bytes(v1));
}

namespace {

// A one-module GPTQ checkpoint (no architecture needed by convert) whose zero at group 0, column 5
// is 0 (v2), with codes 0..15 in that cell; returns the module as written.
gptq_linear_data write_zero_zero_checkpoint(const std::string& dir) {
    fs::create_directories(dir);
    gptq_linear_data d;
    d.n_out = 64, d.n_in = 256, d.bits = 4, d.n_groups = 2;
    d.codes.resize(size_t(64 * 256));
    d.zeros.assign(size_t(2 * 64), 8);
    d.scales.assign(size_t(2 * 64), f32_to_f16(0.01f));
    d.g_idx.resize(256);
    for (int k = 0; k < 256; ++k) d.g_idx[size_t(k)] = k / 128;
    for (int n = 0; n < 64; ++n)
        for (int k = 0; k < 256; ++k) d.codes[size_t(n * 256 + k)] = uint8_t((n * 7 + k * 3) % 16);
    d.zeros[5] = 0;
    auto w = safetensors_writer::create(dir + "/model.safetensors", gptq_linear_decls("m.proj", 64, 256, 2, 4, false));
    EXPECT_TRUE(w.is_ok());
    EXPECT_TRUE(gptq_linear_write(**w, "m.proj", d, F::GPTQ_FORMAT_V2).is_ok());
    EXPECT_TRUE((*w)->finish().is_ok());
    test::write_file(
        dir + "/quantize_config.json",
        R"({"bits": 4, "group_size": 128, "sym": false, "desc_act": false, "checkpoint_format": "gptq_v2"})");
    return d;
}

}  // namespace

TEST(zero_format, convert_refuses_a_zero_of_zero_unless_clamped) {
    test::temp_dir dir("zf-clamp");
    const auto     d = write_zero_zero_checkpoint(dir.file("in"));
    convert_params p;
    p.input_path  = dir.file("in");
    p.output_path = dir.file("out");
    p.format      = "gptq";
    auto refused  = convert_checkpoint(p);
    ASSERT_FALSE(refused.is_ok());
    EXPECT_NE(refused.error().message().find("1 zero points are 0 (first: m.proj group 0 column 5)"), std::string::npos)
        << refused.error().message();
    EXPECT_NE(refused.error().message().find("--clamp-zeros"), std::string::npos);
    EXPECT_EQ(entries(dir.path()), std::vector<std::string>{"in"}) << "nothing written";

    p.clamp_zeros = true;
    auto r        = convert_checkpoint(p);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    int64_t at_max = 0;
    for (int k = 0; k < 128; ++k) at_max += d.codes[size_t(5 * 256 + k)] == 15 ? 1 : 0;
    EXPECT_EQ(r->n_zeros_clamped, 1);
    EXPECT_EQ(r->n_codes_changed, at_max);
    EXPECT_GT(at_max, 0);
    EXPECT_EQ(read_json(dir.file("out/quantize_config.json"))["checkpoint_format"], "gptq");
    // Every weight keeps its value but those whose code was 15 in the clamped cell (one step less).
    auto src = tensor_source::open(dir.file("out"));
    ASSERT_TRUE(src.is_ok());
    gptq_config cfg;
    cfg.format = F::GPTQ_FORMAT_V1;
    auto back  = gptq_linear_read(**src, "m.proj", 64, 256, cfg);
    ASSERT_TRUE(back.is_ok()) << back.error().message();
    EXPECT_EQ(back->zeros[5], 1);
    std::vector<float> w0(size_t(64 * 256)), w1(w0.size());
    d.dequantize(w0.data());
    back->dequantize(w1.data());
    int64_t changed = 0;
    for (size_t i = 0; i < w0.size(); ++i)
        if (w0[i] != w1[i]) {
            ++changed;
            EXPECT_EQ(i / 256, 5u);
            EXPECT_FLOAT_EQ(w1[i], w0[i] - f16_to_f32(f32_to_f16(0.01f)));
        }
    EXPECT_EQ(changed, at_max);

    // A v1 field of 2^bits - 1 (a wrapped zero of 0: zero 16 for v1 readers) cannot go to v2.
    p.input_path  = dir.file("out");
    p.output_path = dir.file("out2");
    p.format      = "gptq_v2";
    p.clamp_zeros = false;
    ASSERT_TRUE(convert_checkpoint(p).is_ok()) << "no wrapped field yet";
    // Rewrite one field to 15 in a copy of the v1 output.
    copy_dir(dir.file("out"), dir.file("wrapped"));
    {
        auto s = tensor_source::open(dir.file("wrapped"));
        ASSERT_TRUE(s.is_ok());
        const tensor_entry* qz    = (*s)->find("m.proj.qzeros");
        std::string         bytes = test::read_file(dir.file("wrapped/model.safetensors"));
        const size_t        at    = qz->file->data_start() + qz->info->begin;
        bytes[at]                 = static_cast<char>((bytes[at] & 0xF0) | 0x0F);  // field of column 0, group 0
        s->reset();
        test::write_file(dir.file("wrapped/model.safetensors"), bytes);
    }
    p.input_path  = dir.file("wrapped");
    p.output_path = dir.file("out3");
    auto wrapped  = convert_checkpoint(p);
    ASSERT_FALSE(wrapped.is_ok());
    EXPECT_NE(wrapped.error().message().find("m.proj group 0 column 0"), std::string::npos)
        << wrapped.error().message();
    EXPECT_FALSE(fs::exists(dir.file("out3")));
}

TEST(zero_format, convert_is_atomic_and_keeps_an_existing_output) {
    if (!fs::exists(test::gptq_binary())) GTEST_SKIP() << "gptq binary not built";
    test::temp_dir dir("zf-atomic");
    write_zero_zero_checkpoint(dir.file("in"));
    const std::string gptq = test::gptq_binary();
    // An existing output is refused, and left as it was.
    fs::create_directories(dir.file("out"));
    test::write_file(dir.file("out/keep.txt"), "mine");
    auto r = test::run_command(gptq + " convert " + dir.file("in") + " -o " + dir.file("out") + " --format gptq_v2");
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("already exists"), std::string::npos) << r.err;
    EXPECT_EQ(test::read_file(dir.file("out/keep.txt")), "mine");
    // --force replaces it once the new one is complete.
    r = test::run_command(gptq + " convert " + dir.file("in") + " -o " + dir.file("out") + " --format gptq_v2 --force");
    EXPECT_EQ(r.exit_code, 0) << r.err;
    EXPECT_NE(r.out.find("zero points gptq_v2 -> gptq_v2"), std::string::npos) << r.out;
    EXPECT_FALSE(fs::exists(dir.file("out/keep.txt")));
    EXPECT_TRUE(fs::exists(dir.file("out/model.safetensors")));
    // A failure after the copy started (config.json is not an object) leaves no output and no
    // temporary folder.
    test::write_file(dir.file("in/config.json"), "[1, 2]");
    r = test::run_command(gptq + " convert " + dir.file("in") + " -o " + dir.file("new") + " --format gptq_v2");
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("config.json"), std::string::npos) << r.err;
    EXPECT_EQ(entries(dir.path()), (std::vector<std::string>{"in", "out"}));
    // A file passed where the folder is expected.
    r = test::run_command(gptq + " convert " + dir.file("in/model.safetensors") + " -o " + dir.file("x") +
                          " --format gptq");
    EXPECT_EQ(r.exit_code, 1);
    EXPECT_NE(r.err.find("pass the checkpoint folder"), std::string::npos) << r.err;
}
