// io: safetensors round trips (every dtype, single file and sharded, checked by an independent
// Python reader), header validation of hostile files, the index, and the crash-safe writer.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <map>
#include <random>

#include "core/error.h"
#include "io/json_file.h"
#include "io/safetensors.h"
#include "io/tensor_source.h"
#include "test_util.h"

using namespace gptq;
using gptq::test::temp_dir;

namespace {

std::string fnv1a64_hex(const uint8_t* p, size_t n) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001B3ull;
    char buf[17];
    std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(h));
    return buf;
}

struct random_tensor {
    safetensors_decl     decl;
    std::vector<uint8_t> bytes;
};

// Random tensors of every dtype with assorted shapes: scalar, empty, odd, 1-d, 3-d.
std::vector<random_tensor> make_random_tensors(uint32_t seed) {
    std::mt19937                            rng(seed);
    const std::vector<std::vector<int64_t>> shapes = {{}, {0}, {1}, {7}, {3, 5}, {2, 3, 4}, {17, 1}, {0, 4}, {64, 33}};
    std::vector<random_tensor>              out;
    for (int d = 0; d < static_cast<int>(dtype::DTYPE_COUNT); ++d) {
        for (size_t s = 0; s < shapes.size(); s += 1 + (d % 2)) {
            random_tensor t;
            t.decl.name = "layer." + std::to_string(d) + "." + std::string(dtype_name(static_cast<dtype>(d))) + "." +
                          std::to_string(s);
            t.decl.type  = static_cast<dtype>(d);
            t.decl.shape = shapes[s];
            int64_t n    = 1;
            for (int64_t x : t.decl.shape) n *= x;
            t.bytes.resize(static_cast<size_t>(n) * dtype_size(t.decl.type));
            for (auto& b : t.bytes) b = static_cast<uint8_t>(rng());
            out.push_back(std::move(t));
        }
    }
    return out;
}

std::vector<named_buffer> as_buffers(const std::vector<random_tensor>& ts) {
    std::vector<named_buffer> out;
    for (const auto& t : ts) out.push_back({t.decl, t.bytes.data()});
    return out;
}

void expect_round_trip(const std::string& path, const std::vector<random_tensor>& ts) {
    auto src = tensor_source::open(path);
    ASSERT_TRUE(src.is_ok()) << src.error().message();
    ASSERT_EQ((*src)->names().size(), ts.size());
    for (const auto& t : ts) {
        auto e = (*src)->get(t.decl.name);
        ASSERT_TRUE(e.is_ok()) << e.error().message();
        EXPECT_EQ(e->info->type, t.decl.type) << t.decl.name;
        EXPECT_EQ(e->info->shape, t.decl.shape) << t.decl.name;
        ASSERT_EQ(e->info->nbytes(), t.bytes.size()) << t.decl.name;
        EXPECT_TRUE(e->file->is_aligned(*e->info)) << t.decl.name;
        if (!t.bytes.empty())
            EXPECT_EQ(0, std::memcmp(e->file->bytes(*e->info), t.bytes.data(), t.bytes.size())) << t.decl.name;
        auto v = e->file->view(*e->info);
        EXPECT_EQ(v.numel(), e->info->numel());
    }
    for (size_t i = 0; i < (*src)->n_files(); ++i) {
        const auto& f = (*src)->file(i);
        ASSERT_EQ(f.metadata().count("format"), 1u);
        EXPECT_EQ(f.metadata().at("format"), "pt");
    }
}

// Run the independent Python reader over `path` against the expected names, dtypes, shapes, hashes.
void expect_python_agrees(const std::string& path, const std::vector<random_tensor>& ts, const temp_dir& dir) {
    if (std::system("python3 --version >/dev/null 2>&1") != 0) GTEST_SKIP() << "python3 not found";
    json manifest = json::object();
    for (const auto& t : ts)
        manifest[t.decl.name] = {{"dtype", std::string(dtype_name(t.decl.type))},
                                 {"shape", t.decl.shape},
                                 {"fnv1a64", fnv1a64_hex(t.bytes.data(), t.bytes.size())}};
    const std::string mf = dir.file("manifest.json");
    test::write_file(mf, manifest.dump());
    auto r = test::run_command("python3 " + test::source_path("scripts/check_safetensors.py") + " " + path +
                               " --expect " + mf);
    EXPECT_EQ(r.exit_code, 0) << r.err << r.out;
}

}  // namespace

TEST(safetensors, round_trip_single_file_every_dtype) {
    temp_dir dir("st-single");
    auto     ts = make_random_tensors(1);
    ASSERT_TRUE(safetensors_save(dir.path(), as_buffers(ts), 1ull << 40).is_ok());
    EXPECT_TRUE(std::filesystem::exists(dir.file("model.safetensors")));
    EXPECT_FALSE(std::filesystem::exists(dir.file("model.safetensors.index.json")));
    expect_round_trip(dir.path(), ts);
    expect_round_trip(dir.file("model.safetensors"), ts);
    expect_python_agrees(dir.file("model.safetensors"), ts, dir);
    // Header length is a multiple of 8 so the data region is aligned.
    const std::string bytes = test::read_file(dir.file("model.safetensors"));
    uint64_t          n     = 0;
    std::memcpy(&n, bytes.data(), 8);
    EXPECT_EQ(n % 8, 0u);
}

TEST(safetensors, round_trip_sharded_every_dtype) {
    temp_dir dir("st-sharded");
    auto     ts = make_random_tensors(2);
    ASSERT_TRUE(safetensors_save(dir.path(), as_buffers(ts), 512).is_ok());
    ASSERT_TRUE(std::filesystem::exists(dir.file("model.safetensors.index.json")));
    auto idx = json_read_file(dir.file("model.safetensors.index.json"));
    ASSERT_TRUE(idx.is_ok());
    std::set<std::string> shards;
    for (auto& [k, s] : (*idx)["weight_map"].items()) shards.insert(s.get<std::string>());
    EXPECT_GT(shards.size(), 2u);
    EXPECT_TRUE(shards.count(fmt::format("model-00001-of-{:05}.safetensors", shards.size())));
    expect_round_trip(dir.path(), ts);
    expect_python_agrees(dir.path(), ts, dir);
}

TEST(safetensors, reads_the_shared_models) {
    if (!test::shared_available()) GTEST_SKIP() << "../shared/models not present (only in CI and dev machines)";
    auto small = tensor_source::open(test::shared_path("models/small-llama"));
    ASSERT_TRUE(small.is_ok()) << small.error().message();
    EXPECT_EQ((*small)->n_files(), 4u);
    EXPECT_EQ((*small)->total_params(), 23075328u);
    std::vector<float> norm(512);
    ASSERT_TRUE((*small)->read_f32("model.norm.weight", norm.data(), {512}).is_ok());
    auto bad = (*small)->read_f32("model.norm.weight", norm.data(), {256});
    ASSERT_FALSE(bad.is_ok());
    EXPECT_NE(bad.message().find("has shape [512], expected [256]"), std::string::npos) << bad.message();
}

// ---- hostile headers -----------------------------------------------------------------------------

namespace {

std::string make_file(const std::string& header, const std::string& data, int64_t len_override = -1) {
    std::string    out(8, '\0');
    const uint64_t n = len_override >= 0 ? static_cast<uint64_t>(len_override) : header.size();
    for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>((n >> (8 * i)) & 0xff);
    return out + header + data;
}

struct bad_case {
    const char* name;
    std::string bytes;
    const char* expect;  // substring of the message
};

std::vector<bad_case> bad_cases() {
    const std::string ok_hdr = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
    const std::string data8(8, 'x');
    return {
        {"empty", "", "too short"},
        {"short_len", std::string(5, '\0'), "too short"},
        {"header_beyond_file", make_file(ok_hdr, data8, 1000), "header length 1000 is larger than the file"},
        {"header_huge", make_file(ok_hdr, data8, int64_t(1) << 40), "exceeds the limit"},
        {"truncated_data", make_file(ok_hdr, "xxxx"), "data_offsets [0, 8] lie outside the data region of 4 bytes"},
        {"not_json", make_file("{not json}", ""), "not valid JSON"},
        {"not_object", make_file("[1,2,3]", ""), "does not start with '{'"},
        {"unknown_dtype", make_file(R"({"a":{"dtype":"Q9","shape":[2],"data_offsets":[0,8]}})", data8),
         "unknown dtype 'Q9'"},
        {"shape_mismatch", make_file(R"({"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", data8),
         "shape [3] of F32 (12 bytes) but data_offsets span 8 bytes"},
        {"negative_shape", make_file(R"({"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", data8),
         "invalid shape [-2]"},
        {"overflow_shape",
         make_file(R"({"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}})", data8),
         "data_offsets span 8 bytes"},
        {"overlap",
         make_file(
             R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
             std::string(12, 'x')),
         "overlap tensor 'a'"},
        {"hole",
         make_file(
             R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
             std::string(12, 'x')),
         "(hole)"},
        {"trailing", make_file(ok_hdr, std::string(12, 'x')), "trailing bytes"},
        {"out_of_range", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[100,108]}})", data8),
         "outside the data region"},
        {"end_before_begin", make_file(R"({"a":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", data8),
         "end before begin"},
        {"bad_offsets", make_file(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", data8),
         "invalid data_offsets"},
        {"duplicate_key",
         make_file(
             R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
             data8),
         "duplicate key 'a'"},
        {"metadata_not_strings", make_file(R"({"__metadata__":{"format":1}})", ""), "__metadata__ value of 'format'"},
        {"entry_not_object", make_file(R"({"a":5})", ""), "header entry 'a' is 5"},
        {"bad_utf8", make_file("{\"a\xff\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", data8),
         "not valid JSON"},
    };
}

}  // namespace

TEST(safetensors, hostile_headers_give_clear_errors) {
    temp_dir dir("st-bad");
    for (const auto& c : bad_cases()) {
        const std::string path = dir.file(std::string(c.name) + ".safetensors");
        test::write_file(path, c.bytes);
        auto f = safetensors_file::open(path);
        ASSERT_FALSE(f.is_ok()) << c.name;
        const std::string& msg = f.error().message();
        EXPECT_NE(msg.find(path), std::string::npos) << c.name << ": " << msg;
        EXPECT_NE(msg.find(c.expect), std::string::npos) << c.name << ": " << msg;
        EXPECT_EQ(msg.find('\n'), std::string::npos) << c.name << ": one line";
    }
}

TEST(safetensors, every_truncation_of_a_valid_file_is_rejected) {
    temp_dir dir("st-trunc");
    auto     ts = make_random_tensors(3);
    ts.resize(6);
    ASSERT_TRUE(safetensors_save(dir.path(), as_buffers(ts), 1ull << 40).is_ok());
    const std::string full = test::read_file(dir.file("model.safetensors"));
    for (size_t cut = 0; cut < full.size(); cut += 1 + cut / 16) {
        const std::string path = dir.file("cut.safetensors");
        test::write_file(path, full.substr(0, cut));
        auto f = safetensors_file::open(path);
        EXPECT_FALSE(f.is_ok()) << "cut at " << cut;
    }
}

TEST(safetensors, index_problems_are_named) {
    temp_dir dir("st-index");
    auto     ts = make_random_tensors(4);
    ASSERT_TRUE(safetensors_save(dir.path(), as_buffers(ts), 256).is_ok());
    const std::string index_path = dir.file("model.safetensors.index.json");
    auto              idx        = json_read_file(index_path);
    ASSERT_TRUE(idx.is_ok());

    // A tensor named in the index but absent from its shard.
    json missing                          = *idx;
    missing["weight_map"]["ghost.weight"] = missing["weight_map"].begin().value();
    test::write_file(index_path, missing.dump());
    auto src = tensor_source::open(dir.path());
    ASSERT_FALSE(src.is_ok());
    EXPECT_NE(src.error().message().find("'ghost.weight'"), std::string::npos) << src.error().message();
    EXPECT_NE(src.error().message().find(index_path), std::string::npos) << src.error().message();

    // A shard file that does not exist.
    json no_shard                          = *idx;
    no_shard["weight_map"]["extra.weight"] = "model-00099-of-00099.safetensors";
    test::write_file(index_path, no_shard.dump());
    src = tensor_source::open(dir.path());
    ASSERT_FALSE(src.is_ok());
    EXPECT_NE(src.error().message().find("model-00099-of-00099.safetensors"), std::string::npos);

    // A shard name that escapes the folder.
    json escape                          = *idx;
    escape["weight_map"]["extra.weight"] = "../x.safetensors";
    test::write_file(index_path, escape.dump());
    src = tensor_source::open(dir.path());
    ASSERT_FALSE(src.is_ok());
    EXPECT_NE(src.error().message().find("../x.safetensors"), std::string::npos);

    // Invalid JSON in the index.
    test::write_file(index_path, "{\"weight_map\": ");
    src = tensor_source::open(dir.path());
    ASSERT_FALSE(src.is_ok());
    EXPECT_NE(src.error().message().find("invalid JSON"), std::string::npos) << src.error().message();
}

TEST(safetensors, writer_is_crash_safe) {
    temp_dir           dir("st-writer");
    const std::string  path = dir.file("model.safetensors");
    std::vector<float> a(10, 1.0f), b(3, 2.0f);
    {
        auto w = safetensors_writer::create(path, {{"a", dtype::DTYPE_F32, {10}}, {"b", dtype::DTYPE_F32, {3}}});
        ASSERT_TRUE(w.is_ok());
        ASSERT_TRUE((*w)->write("a", a.data(), 40).is_ok());
        EXPECT_FALSE(std::filesystem::exists(path)) << "nothing at the final name before finish()";
        auto st = (*w)->finish();
        EXPECT_FALSE(st.is_ok()) << "b was never written";
        EXPECT_NE(st.message().find("'b'"), std::string::npos);
        EXPECT_FALSE((*w)->write("c", b.data(), 12).is_ok()) << "undeclared";
        EXPECT_FALSE((*w)->write("b", b.data(), 8).is_ok()) << "wrong size";
        EXPECT_FALSE((*w)->write("a", a.data(), 40).is_ok()) << "twice";
    }  // destroyed unfinished: the temporary file goes away
    EXPECT_FALSE(std::filesystem::exists(path));
    EXPECT_TRUE(std::filesystem::is_empty(dir.path())) << "temporary file left behind";

    auto w = safetensors_writer::create(path, {{"b", dtype::DTYPE_F32, {3}}, {"a", dtype::DTYPE_F32, {10}}},
                                        {{"note", "x"}});
    ASSERT_TRUE(w.is_ok());
    ASSERT_TRUE((*w)->write("b", b.data(), 12).is_ok());  // any order
    ASSERT_TRUE((*w)->write("a", a.data(), 40).is_ok());
    ASSERT_TRUE((*w)->finish().is_ok());
    auto f = safetensors_file::open(path);
    ASSERT_TRUE(f.is_ok()) << f.error().message();
    EXPECT_EQ((*f)->metadata().at("note"), "x");
    EXPECT_EQ((*f)->metadata().at("format"), "pt");
    std::vector<float> back(10);
    ASSERT_TRUE((*f)->read_f32(*(*f)->find("a"), back.data()).is_ok());
    EXPECT_EQ(back, a);

    auto dup = safetensors_writer::create(dir.file("dup.safetensors"),
                                          {{"a", dtype::DTYPE_F32, {1}}, {"a", dtype::DTYPE_F32, {1}}});
    EXPECT_FALSE(dup.is_ok());
}

TEST(safetensors, read_f32_converts_half_types_exactly) {
    temp_dir              dir("st-f32");
    std::vector<uint16_t> h = {0x3c00, 0xc000, 0x0001, 0x7bff}, bf = {0x3f80, 0xc040};
    ASSERT_TRUE(safetensors_save(
                    dir.path(), {{{"h", dtype::DTYPE_F16, {4}}, h.data()}, {{"bf", dtype::DTYPE_BF16, {2}}, bf.data()}},
                    1ull << 40)
                    .is_ok());
    auto src = tensor_source::open(dir.path());
    ASSERT_TRUE(src.is_ok());
    std::vector<float> out(4);
    ASSERT_TRUE((*src)->read_f32("h", out.data()).is_ok());
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], -2.0f);
    EXPECT_EQ(out[2], std::ldexp(1.0f, -24));
    EXPECT_EQ(out[3], 65504.0f);
    ASSERT_TRUE((*src)->read_f32("bf", out.data()).is_ok());
    EXPECT_EQ(out[0], 1.0f);
    EXPECT_EQ(out[1], -3.0f);
    EXPECT_FALSE((*src)->get("nope").is_ok());
    EXPECT_EQ((*src)->get("nope").error().code(), status_code::STATUS_NOT_FOUND);
}
