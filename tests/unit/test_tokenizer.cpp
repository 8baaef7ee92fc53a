// tokenizer: exact ids against Hugging Face goldens (tests/data/tokenizer, made by
// scripts/make_tokenizer_goldens.py), llama.cpp's vocab test vectors, UTF-8/NFC helpers, the
// streaming decoder, error messages for malformed files, and `gptq tokenize` end to end.
// Tokenizers under ../shared are present in CI, not in a user's clone: those tests skip.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode_nfc.h"
#include "tokenizer/utf8.h"

using namespace gptq;
using json = nlohmann::json;

namespace {

const std::string source_dir = GPTQ_SOURCE_DIR;
const std::string shared_dir = source_dir + "/../shared";
const std::string toks_dir   = shared_dir + "/tokenizers";
const std::string data_dir   = source_dir + "/tests/data/tokenizer";

bool exists(const std::string& p) {
    struct stat st {};
    return ::stat(p.c_str(), &st) == 0;
}

std::string read_file(const std::string& p) {
    std::ifstream      in(p, std::ios::binary);
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
}

void write_file(const std::string& p, const std::string& s) {
    std::ofstream out(p, std::ios::binary);
    out << s;
}

std::string temp_dir(const std::string& tag) {
    std::string tmpl = ::testing::TempDir() + "gptq_tok_" + tag + "_XXXXXX";
    char*       d    = ::mkdtemp(tmpl.data());
    return d ? std::string(d) : std::string();
}

// The bundled model's folder: models/<name> in the repo, else ../shared/models/<name>.
std::string model_dir(const std::string& name) {
    if (exists(source_dir + "/models/" + name + "/tokenizer.json")) return source_dir + "/models/" + name;
    if (exists(shared_dir + "/models/" + name + "/tokenizer.json")) return shared_dir + "/models/" + name;
    return {};
}

uint64_t fnv1a64_bytes(const uint8_t* p, size_t n, uint64_t h = 0xcbf29ce484222325ull) {
    for (size_t i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}
std::string fnv_hex(uint64_t h) {
    char buf[17];
    std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(h));
    return buf;
}
std::string fnv_ids(const std::vector<int32_t>& ids) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (int32_t id : ids) {
        const auto    u    = static_cast<uint32_t>(id);
        const uint8_t b[4] = {uint8_t(u), uint8_t(u >> 8), uint8_t(u >> 16), uint8_t(u >> 24)};
        h                  = fnv1a64_bytes(b, 4, h);
    }
    return fnv_hex(h);
}

std::string from_hex(const std::string& hex) {
    std::string out;
    for (size_t i = 0; i + 1 < hex.size(); i += 2)
        out.push_back(static_cast<char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
    return out;
}

std::string ids_str(const std::vector<int32_t>& ids) {
    std::string s;
    for (int32_t id : ids) {
        if (!s.empty()) s += ' ';
        s += std::to_string(id);
    }
    return s;
}

// The GPT-2 vocab.json + merges.txt as a tokenizer.json dict, exactly as the golden script does.
json gpt2_base_json() {
    json               vocab  = json::parse(read_file(toks_dir + "/gpt2/vocab.json"));
    json               merges = json::array();
    std::string        text   = read_file(toks_dir + "/gpt2/merges.txt");
    std::istringstream in(text);
    std::string        line;
    for (int k = 0; std::getline(in, line); ++k) {
        if (line.empty() || (k == 0 && line.rfind("#version", 0) == 0)) continue;
        merges.push_back(line);
    }
    return json{{"version", "1.0"},
                {"added_tokens", json::array()},
                {"normalizer", nullptr},
                {"pre_tokenizer", nullptr},
                {"post_processor", nullptr},
                {"decoder", nullptr},
                {"model",
                 {{"type", "BPE"},
                  {"dropout", nullptr},
                  {"unk_token", nullptr},
                  {"continuing_subword_prefix", nullptr},
                  {"end_of_word_suffix", nullptr},
                  {"fuse_unk", false},
                  {"byte_fallback", false},
                  {"ignore_merges", false},
                  {"vocab", vocab},
                  {"merges", merges}}}};
}

// Build the tokenizer a golden file describes; "" in *skip when its files are absent.
std::unique_ptr<tokenizer> build_tokenizer(const json& build, std::string* skip) {
    const std::string kind = build["kind"];
    std::string       path;
    if (kind == "file") {
        if (!exists(toks_dir)) {
            *skip = toks_dir + " is absent (it exists in CI only)";
            return nullptr;
        }
        path = toks_dir + "/" + build["path"].get<std::string>();
    } else if (kind == "model") {
        const std::string rel  = build["path"];
        const std::string name = rel.substr(0, rel.find('/'));
        const std::string mdir = model_dir(name);
        if (mdir.empty()) {
            *skip = "model folder " + name + " is absent";
            return nullptr;
        }
        path = mdir + rel.substr(name.size());
    } else {  // variant
        if (!exists(toks_dir)) {
            *skip = toks_dir + " is absent (it exists in CI only)";
            return nullptr;
        }
        const std::string base = build["base"];
        json              j    = base == "gpt2" ? gpt2_base_json() : json::parse(read_file(toks_dir + "/" + base));
        for (auto it = build["top"].begin(); it != build["top"].end(); ++it) j[it.key()] = it.value();
        for (auto it = build["model"].begin(); it != build["model"].end(); ++it) j["model"][it.key()] = it.value();
        if (build.value("merges_as_pairs", false)) {
            json pairs = json::array();
            for (const auto& m : j["model"]["merges"]) {
                const std::string s = m;
                pairs.push_back({s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1)});
            }
            j["model"]["merges"] = pairs;
        }
        const std::string dir = temp_dir("variant");
        write_file(dir + "/tokenizer.json", j.dump());
        path = dir;
    }
    auto r = tokenizer::load(path);
    EXPECT_TRUE(r.is_ok()) << r.error().message();
    if (!r) return nullptr;
    return std::move(r).value();
}

class golden_test : public ::testing::TestWithParam<std::string> {};

TEST_P(golden_test, ids_and_decode_match_hugging_face) {
    const json  golden = json::parse(read_file(data_dir + "/" + GetParam() + ".json"));
    const json  inputs = json::parse(read_file(data_dir + "/inputs.json"))["inputs"];
    std::string skip;
    auto        tok = build_tokenizer(golden["build"], &skip);
    if (!skip.empty()) GTEST_SKIP() << skip;
    ASSERT_TRUE(tok);
    const auto& cases    = golden["cases"];
    const int   n_prefix = golden["n_prefix"];
    ASSERT_EQ(cases.size(), inputs.size());

    int n_ok = 0, n_bad = 0;
    for (size_t k = 0; k < cases.size(); ++k) {
        const json&              in   = inputs[k];
        const json&              c    = cases[k];
        const std::string        text = in.contains("hex") ? from_hex(in["hex"]) : in["text"].get<std::string>();
        const auto               ids  = tok->encode(text, true);
        std::vector<std::string> errors;
        if (c.contains("ids")) {
            const auto want = c["ids"].get<std::vector<int32_t>>();
            if (ids != want) errors.push_back("ids " + ids_str(ids) + "\n   want " + ids_str(want));
        } else {
            if (static_cast<int>(ids.size()) != c["n_ids"].get<int>() || fnv_ids(ids) != c["fnv"])
                errors.push_back("ids " + ids_str(ids) + " (" + std::to_string(ids.size()) +
                                 ") differ from the hash; want " + std::to_string(c["n_ids"].get<int>()) + " ids");
        }
        if (in["kind"] == "hard") {
            const auto           plain = tok->encode(text, false);
            std::vector<int32_t> want_plain;
            if (c.contains("ids_plain"))
                want_plain = c["ids_plain"].get<std::vector<int32_t>>();
            else if (c.contains("ids"))
                want_plain.assign(c["ids"].begin() + n_prefix, c["ids"].end());
            if (plain != want_plain)
                errors.push_back("ids_plain " + ids_str(plain) + "\n   want " + ids_str(want_plain));
            const auto dec = tok->decode(ids, false);
            if (dec != c["decode"].get<std::string>())
                errors.push_back("decode '" + dec + "' want '" + c["decode"].get<std::string>() + "'");
        }
        const std::string skip_dec = tok->decode(ids, true);
        // Inputs with invalid bytes: HF saw the U+FFFD-replaced text, so that is what comes back.
        const std::string ref_text = in.contains("hex") ? utf8_sanitize(text) : text;
        if (c.contains("decode_skip_fnv")) {
            const std::string h =
                fnv_hex(fnv1a64_bytes(reinterpret_cast<const uint8_t*>(skip_dec.data()), skip_dec.size()));
            if (h != c["decode_skip_fnv"]) errors.push_back("decode_skip '" + skip_dec + "' differs from the hash");
        } else {
            const std::string want = c.contains("decode_skip") ? c["decode_skip"].get<std::string>() : ref_text;
            if (skip_dec != want) errors.push_back("decode_skip '" + skip_dec + "' want '" + want + "'");
        }
        if (errors.empty()) {
            ++n_ok;
        } else if (++n_bad <= 8) {
            std::string msg = "input " + std::to_string(k) + " " + json(ref_text).dump() + ":";
            for (auto& e : errors) msg += "\n  " + e;
            ADD_FAILURE() << msg;
        }
    }
    EXPECT_EQ(n_bad, 0);
    std::printf("[ golden ] %s: %d/%zu inputs match\n", GetParam().c_str(), n_ok, cases.size());
}

// All of WikiText-2 test as one string (1.3 MB): long-input paths (SentencePiece-style files see
// whole lines as one BPE word) against HF's count and hash.
TEST_P(golden_test, whole_wikitext_matches_hugging_face) {
    const std::string wiki = shared_dir + "/data/wikitext2/wiki.test.raw";
    if (!exists(wiki)) GTEST_SKIP() << wiki << " is absent (it exists in CI only)";
    const json  golden = json::parse(read_file(data_dir + "/" + GetParam() + ".json"));
    std::string skip;
    auto        tok = build_tokenizer(golden["build"], &skip);
    if (!skip.empty()) GTEST_SKIP() << skip;
    ASSERT_TRUE(tok);
    const auto ids = tok->encode(read_file(wiki), true);
    EXPECT_EQ(ids.size(), golden["whole_wikitext"]["n_ids"].get<size_t>());
    EXPECT_EQ(fnv_ids(ids), golden["whole_wikitext"]["fnv"].get<std::string>());
}

INSTANTIATE_TEST_SUITE_P(tokenizer, golden_test,
                         ::testing::Values("llama2-json", "llama2-spm", "mistral-v1-json", "mistral-v1-spm",
                                           "gptqkit-8k-json", "gptqkit-8k-spm", "gpt2-files", "tiny-llama-json",
                                           "tiny-llama-spm", "bytelevel-llama3", "bytelevel-qwen2", "llama2-metaspace"),
                         [](const auto& info) {
                             std::string n = info.param;
                             for (auto& ch : n)
                                 if (ch == '-') ch = '_';
                             return n;
                         });

// llama.cpp's vocab test vectors: .inp holds strings separated by "\n__ggml_vocab_test__\n", .out
// one line of ids per string (HF encode without special tokens).
void check_gguf_vectors(const std::string& stem, const std::string& tokenizer_path) {
    const std::string inp_path = toks_dir + "/gguf-vocab/" + stem + ".gguf.inp";
    if (!exists(inp_path)) GTEST_SKIP() << inp_path << " is absent (it exists in CI only)";
    auto r = tokenizer::load(tokenizer_path);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    const std::string        sep = "\n__ggml_vocab_test__\n";
    const std::string        inp = read_file(inp_path);
    std::vector<std::string> texts;
    for (size_t pos = 0; pos < inp.size();) {
        size_t e = inp.find(sep, pos);
        if (e == std::string::npos) e = inp.size();
        texts.push_back(inp.substr(pos, e - pos));
        pos = e + sep.size();
    }
    std::istringstream       out(read_file(toks_dir + "/gguf-vocab/" + stem + ".gguf.out"));
    std::vector<std::string> lines;
    for (std::string line; std::getline(out, line);) lines.push_back(line);
    ASSERT_EQ(texts.size(), lines.size());
    int n_ok = 0;
    for (size_t k = 0; k < texts.size(); ++k) {
        std::vector<int32_t> want;
        std::istringstream   ls(lines[k]);
        for (int32_t id; ls >> id;) want.push_back(id);
        const auto got = (*r)->encode(texts[k], false);
        EXPECT_EQ(ids_str(got), ids_str(want)) << "string " << k << ": " << json(texts[k]).dump();
        n_ok += got == want;
    }
    std::printf("[ gguf ] %s: %d/%zu strings match\n", stem.c_str(), n_ok, texts.size());
}

TEST(tokenizer, gguf_vectors_llama_spm) {
    check_gguf_vectors("ggml-vocab-llama-spm", toks_dir + "/llama2/tokenizer.json");
}
TEST(tokenizer, gguf_vectors_gpt2) {
    check_gguf_vectors("ggml-vocab-gpt-2", toks_dir + "/gpt2");
}

TEST(tokenizer, utf8_sanitize_replaces_maximal_subparts) {
    EXPECT_EQ(utf8_sanitize("abc"), "abc");
    EXPECT_EQ(utf8_sanitize("a\xff"
                            "b"),
              "a\xEF\xBF\xBD"
              "b");
    EXPECT_EQ(utf8_sanitize("\xe2\x82"), "\xEF\xBF\xBD");                              // truncated 3-byte: one U+FFFD
    EXPECT_EQ(utf8_sanitize("\xed\xa0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");  // surrogate: 3
    EXPECT_EQ(utf8_sanitize("\xf0\x9f\x98"), "\xEF\xBF\xBD");
    EXPECT_EQ(utf8_sanitize("\xc0\xaf"), "\xEF\xBF\xBD\xEF\xBF\xBD");  // overlong
    EXPECT_TRUE(utf8_is_valid("\xf0\x9f\x98\x80"));
    EXPECT_FALSE(utf8_is_valid("\xf4\x90\x80\x80"));  // above U+10FFFF
}

TEST(tokenizer, nfc_composes_and_orders) {
    EXPECT_EQ(unicode_nfc("e\xCC\x81"), "\xC3\xA9");                                 // e + acute -> é
    EXPECT_EQ(unicode_nfc("\xE2\x84\xAB"), "\xC3\x85");                              // Angstrom sign -> Å
    EXPECT_EQ(unicode_nfc("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");  // jamo -> 각
    // a + dot above (230) + dot below (220): reordered, then a+dot below composes to ạ, + dot above.
    EXPECT_EQ(unicode_nfc("a\xCC\x87\xCC\xA3"), "\xE1\xBA\xA1\xCC\x87");
    EXPECT_EQ(unicode_nfc("plain ascii"), "plain ascii");
}

TEST(tokenizer, incremental_decode_never_splits_a_character) {
    const std::string dir = model_dir("tiny-llama");
    if (dir.empty()) GTEST_SKIP() << "models/tiny-llama is absent";
    auto r = tokenizer::load(dir);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    const tokenizer&  tok  = **r;
    const std::string text = "Streaming 😀 emoji, 中文, café and <s> specials\n  indented 👨‍👩‍👧 end";
    const auto        ids  = tok.encode(text, true);
    for (bool skip : {true, false}) {
        incremental_decoder dec(tok, skip);
        std::string         all;
        for (int32_t id : ids) {
            const std::string piece = dec.step(id);
            EXPECT_TRUE(utf8_is_valid(piece));
            EXPECT_EQ(piece.find("\xEF\xBF\xBD"), std::string::npos) << "broken character in step output";
            all += piece;
        }
        all += dec.finish();
        EXPECT_EQ(all, tok.decode(ids, skip));
    }
}

TEST(tokenizer, api_for_perplexity) {
    const std::string dir = model_dir("tiny-llama");
    if (dir.empty()) GTEST_SKIP() << "models/tiny-llama is absent";
    auto r = tokenizer::load(dir);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    const tokenizer& tok = **r;
    EXPECT_EQ(tok.kind(), tokenizer_kind::TOKENIZER_KIND_HF_JSON);
    EXPECT_EQ(tok.vocab_size(), 8192);
    EXPECT_EQ(tok.bos_id(), 1);
    EXPECT_TRUE(tok.adds_bos());
    ASSERT_FALSE(tok.eos_ids().empty());
    EXPECT_EQ(tok.eos_ids()[0], 2);
    const auto ids = tok.encode("Hello world", true);
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids[0], 1);
    EXPECT_EQ(tok.encode("Hello world", false), std::vector<int32_t>(ids.begin() + 1, ids.end()));
    EXPECT_EQ(tok.decode(ids, true), "Hello world");
    EXPECT_EQ(tok.encode("", true), std::vector<int32_t>{1});
}

// ---- errors -----------------------------------------------------------------------------------

std::string load_error(const std::string& path) {
    auto r = tokenizer::load(path);
    EXPECT_FALSE(r.is_ok());
    return r ? std::string() : r.error().message();
}

std::string write_tokenizer_json(const std::string& tag, const std::string& text) {
    const std::string dir = temp_dir(tag);
    write_file(dir + "/tokenizer.json", text);
    return dir;
}

const char* minimal_json = R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}})";

TEST(tokenizer, minimal_file_works) {
    auto r = tokenizer::load(write_tokenizer_json("min", minimal_json));
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_EQ((*r)->encode("abab", true), (std::vector<int32_t>{2, 2}));
    EXPECT_EQ((*r)->encode("aba", true), (std::vector<int32_t>{2, 0}));
}

TEST(tokenizer, errors_name_the_file_and_the_component) {
    EXPECT_NE(load_error("/nonexistent/model").find("/nonexistent/model: no such file or folder"), std::string::npos);
    const std::string empty = temp_dir("empty");
    EXPECT_NE(load_error(empty).find("no tokenizer files"), std::string::npos);

    std::string msg = load_error(write_tokenizer_json("corrupt", "{\"model\": {\"type\": \"BPE\", "));
    EXPECT_NE(msg.find("tokenizer.json: invalid JSON at byte"), std::string::npos) << msg;

    json j             = json::parse(minimal_json);
    j["pre_tokenizer"] = {{"type", "Whitespace"}};
    msg                = load_error(write_tokenizer_json("ws", j.dump()));
    EXPECT_NE(msg.find("tokenizer.json: unsupported pre_tokenizer type 'Whitespace'"), std::string::npos) << msg;

    j                  = json::parse(minimal_json);
    j["model"]["type"] = "WordPiece";
    msg                = load_error(write_tokenizer_json("wp", j.dump()));
    EXPECT_NE(msg.find("unsupported model type 'WordPiece'"), std::string::npos) << msg;

    j               = json::parse(minimal_json);
    j["normalizer"] = {{"type", "Sequence"}, {"normalizers", {{{"type", "NFKC"}}}}};
    msg             = load_error(write_tokenizer_json("nfkc", j.dump()));
    EXPECT_NE(msg.find("unsupported normalizer type 'NFKC'"), std::string::npos) << msg;

    j            = json::parse(minimal_json);
    j["decoder"] = {{"type", "WordPiece"}};
    msg          = load_error(write_tokenizer_json("dec", j.dump()));
    EXPECT_NE(msg.find("unsupported decoder type 'WordPiece'"), std::string::npos) << msg;

    j                   = json::parse(minimal_json);
    j["post_processor"] = {{"type", "RobertaProcessing"}};
    msg                 = load_error(write_tokenizer_json("post", j.dump()));
    EXPECT_NE(msg.find("unsupported post_processor type 'RobertaProcessing'"), std::string::npos) << msg;

    j                    = json::parse(minimal_json);
    j["model"]["merges"] = {"a c"};
    msg                  = load_error(write_tokenizer_json("merge", j.dump()));
    EXPECT_NE(msg.find("merge \"a c\" uses a token that is not in the vocab"), std::string::npos) << msg;

    j                  = json::parse(minimal_json);
    j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
    msg                = load_error(write_tokenizer_json("regex", j.dump()));
    EXPECT_NE(msg.find("does not compile"), std::string::npos) << msg;

    j                 = json::parse(minimal_json);
    j["added_tokens"] = {{{"id", 0}, {"content", "a"}, {"single_word", true}}};
    msg               = load_error(write_tokenizer_json("sw", j.dump()));
    EXPECT_NE(msg.find("unsupported option single_word"), std::string::npos) << msg;

    const std::string bad_model = temp_dir("spm");
    write_file(bad_model + "/tokenizer.model", "not a protobuf at all");
    msg = load_error(bad_model);
    EXPECT_NE(msg.find("tokenizer.model: not a SentencePiece model"), std::string::npos) << msg;
}

// ---- gptq tokenize, end to end ----------------------------------------------------------------

struct run_result {
    int         code;
    std::string out, err;
};

run_result run_gptq(const std::string& args) {
    const std::string bin      = std::string(GPTQ_BINARY_DIR) + "/bin/gptq";
    const std::string err_path = temp_dir("cli") + "/stderr.txt";
    const std::string cmd      = bin + " " + args + " 2>" + err_path;
    run_result        r;
    FILE*             p = ::popen(cmd.c_str(), "r");
    if (!p) return {-1, "", "popen failed"};
    char   buf[4096];
    size_t n;
    while ((n = std::fread(buf, 1, sizeof(buf), p)) > 0) r.out.append(buf, n);
    const int st = ::pclose(p);
    r.code       = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
    r.err        = read_file(err_path);
    return r;
}

std::string sh_quote(const std::string& s) {
    std::string q = "'";
    for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
    return q + "'";
}

TEST(tokenizer, cli_tokenize) {
    if (!exists(std::string(GPTQ_BINARY_DIR) + "/bin/gptq")) GTEST_SKIP() << "bin/gptq not built";
    const std::string dir = model_dir("tiny-llama");
    if (dir.empty()) GTEST_SKIP() << "models/tiny-llama is absent";
    auto tok = tokenizer::load(dir);
    ASSERT_TRUE(tok.is_ok());

    const std::string text = "Hello world, café 😀";
    auto              r    = run_gptq("tokenize " + sh_quote(dir) + " " + sh_quote(text));
    EXPECT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(r.out, ids_str((*tok)->encode(text, true)) + "\n");

    r = run_gptq("tokenize --no-bos " + sh_quote(dir) + " " + sh_quote(text));
    EXPECT_EQ(r.code, 0) << r.err;
    EXPECT_EQ(r.out, ids_str((*tok)->encode(text, false)) + "\n");

    r = run_gptq("tokenize --pieces " + sh_quote(dir) + " 'Hello world'");
    EXPECT_EQ(r.code, 0) << r.err;
    std::string want;
    for (int32_t id : (*tok)->encode("Hello world", true)) {
        if (!want.empty()) want += ' ';
        want += (*tok)->id_to_piece(id);
    }
    EXPECT_EQ(r.out, want + "\n");
    EXPECT_EQ(r.out.rfind("<s> ", 0), 0u);

    // --file: one output line per input line, the empty line included.
    const std::string tmp   = temp_dir("file");
    const std::string lines = "first line\n\n  third <s> line\nno newline at end";
    write_file(tmp + "/in.txt", lines);
    r = run_gptq("tokenize " + sh_quote(dir) + " --file " + sh_quote(tmp + "/in.txt"));
    EXPECT_EQ(r.code, 0) << r.err;
    want.clear();
    for (const char* l : {"first line", "", "  third <s> line", "no newline at end"})
        want += ids_str((*tok)->encode(l, true)) + "\n";
    EXPECT_EQ(r.out, want);
}

TEST(tokenizer, cli_tokenize_bad_input) {
    if (!exists(std::string(GPTQ_BINARY_DIR) + "/bin/gptq")) GTEST_SKIP() << "bin/gptq not built";
    auto r = run_gptq("tokenize /nonexistent/folder 'x'");
    EXPECT_EQ(r.code, 1);
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err, "gptq: error: /nonexistent/folder: no such file or folder\n");

    const std::string dir = write_tokenizer_json("cli_corrupt", "{\"model\": [1, 2");
    r                     = run_gptq("tokenize " + sh_quote(dir) + " 'x'");
    EXPECT_EQ(r.code, 1);
    EXPECT_EQ(r.out, "");
    EXPECT_EQ(r.err.rfind("gptq: error: " + dir + "/tokenizer.json: invalid JSON at byte", 0), 0u) << r.err;
    EXPECT_EQ(std::count(r.err.begin(), r.err.end(), '\n'), 1) << r.err;

    r = run_gptq("tokenize " + sh_quote(dir) + " --file /nonexistent/lines.txt");
    EXPECT_EQ(r.code, 1);
}

}  // namespace
