// Our GPTQ checkpoints of the new families (issue 16 part 2: Qwen3, Mistral-Nemo head_dim, Phi-3
// fused qkv_proj/gate_up_proj, Gemma 2, Gemma 3 text) read by the peers' own readers: each
// fixture under tests/data/interop/families/<family>-<config>/ is a checkpoint written by
// `gptq quantize` from tests/data/arch/<family>/, next to golden-<reader>.safetensors, the logits
// that reader computed from the same files on the family's fixed sequences and its ppl of the
// ppl sequence (scripts/interop/families.py; layout tests/common/golden.h). Ours must give the
// same logits: a wrong tensor name, fused split, group or zero point would move them by far
// more than the bounds below. docs/interop.md "New families".
//
// GPTQ_INTEROP_FAMILIES_DIR=<folder> runs the same check on every checkpoint folder of another
// work folder (what families.py --work made) instead of the committed fixtures.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <vector>

#include "core/thread_pool.h"
#include "golden.h"
#include "io/safetensors.h"
#include "model/llama.h"
#include "model/perplexity.h"
#include "test_util.h"

using namespace gptq;
namespace fs = std::filesystem;

namespace {

struct reader_bound {
    const char* name;
    double      logit_rel;  // max |ours - theirs| / max |theirs| per row
    double      ppl_rel;
};

// transformers + optimum + GPTQModel's torch kernel runs F32 activations, but its dequantization
// multiplies the F16 scales by the codes in F16 (its modules keep scales F16 under dtype=float32):
// every weight rounded to F16 (2^-11 relative), measured 4.9e-4 .. 2.2e-3 on these fixtures
// (Gemma 3 the most). GPTQModel.load runs F16 only (its torch kernel refuses F32): F16 activations
// as well, measured 1.4e-3 .. 8.1e-3. A wrong tensor, split, group or zero point, or a dropped
// Gemma soft-cap (transformers' sdpa attention, measured 4 - 6 %), is far beyond both.
constexpr reader_bound k_readers[] = {
    {"transformers", 5e-3, 1e-4},
    {"gptqmodel", 2e-2, 2e-3},
};

ops_context ctx() {
    static thread_pool pool(2);
    return ops_context{&pool, false};
}

std::vector<fs::path> checkpoints() {
    const char*           env  = std::getenv("GPTQ_INTEROP_FAMILIES_DIR");
    const fs::path        root = env ? fs::path(env) : fs::path(GPTQ_SOURCE_DIR) / "tests/data/interop/families";
    std::vector<fs::path> out;
    if (!fs::is_directory(root)) return out;
    for (const auto& e : fs::directory_iterator(root))
        if (fs::is_regular_file(e.path() / "quantize_config.json")) out.push_back(e.path());
    std::sort(out.begin(), out.end());
    return out;
}

void check_reader(llama_model& m, const fs::path& dir, const reader_bound& rb, int& n_checked) {
    const fs::path gpath = dir / (std::string("golden-") + rb.name + ".safetensors");
    if (!fs::exists(gpath)) return;  // that reader refused this family: docs/interop.md says why
    const llama_hparams& hp = m.hparams();
    const auto           g  = test::golden_load_file(gpath.string());
    ASSERT_FALSE(g.seqs.empty()) << gpath;
    double worst = 0;
    for (const auto& s : g.seqs) {
        const int64_t      n = static_cast<int64_t>(s.ids.size());
        std::vector<float> logits(static_cast<size_t>(n * hp.n_vocab));
        ASSERT_TRUE(m.forward(ctx(), s.ids.data(), n, nullptr, logits.data()).is_ok());
        for (size_t r = 0; r < s.positions.size(); ++r) {
            const double e = test::row_rel_error(logits.data() + s.positions[r] * hp.n_vocab,
                                                 s.logits.data() + static_cast<int64_t>(r) * hp.n_vocab, hp.n_vocab);
            worst          = std::max(worst, e);
            EXPECT_LE(e, rb.logit_rel) << gpath << ": seq of " << n << " tokens, position " << s.positions[r];
        }
    }
    const int64_t n_ppl = static_cast<int64_t>(g.ppl_ids.size());
    auto          p     = perplexity_evaluate(m, ctx(), g.ppl_ids, n_ppl, 1);
    ASSERT_TRUE(p.is_ok()) << p.error().message();
    EXPECT_NEAR(p->ppl(), g.ppl, rb.ppl_rel * g.ppl) << gpath;
    std::printf("[ interop  ] %s vs %s: max rel error logits %.3g, ppl %.6f (theirs %.6f, %+.5f %%)\n",
                dir.filename().c_str(), rb.name, worst, p->ppl(), g.ppl, 100.0 * (p->ppl() - g.ppl) / g.ppl);
    ++n_checked;
}

TEST(InteropFamilies, OurCheckpointsMatchThePeersReaders) {
    const auto dirs = checkpoints();
    if (dirs.empty())
        GTEST_SKIP() << "no checkpoint folders (tests/data/interop/families or $GPTQ_INTEROP_FAMILIES_DIR)";
    for (const auto& dir : dirs) {
        auto m = llama_model::open(dir.string(), {.strict = true});
        ASSERT_TRUE(m.is_ok()) << dir << ": " << m.error().message();
        int n_checked = 0;
        for (const auto& rb : k_readers) check_reader(**m, dir, rb, n_checked);
        EXPECT_GT(n_checked, 0) << dir << ": no golden-<reader>.safetensors";
    }
}

// The module's GPTQ tensors cut by output rows into parts (format.md 1.2: output features are the
// last dimension of qweight, scales and qzeros, 8 4-bit zeros per qzeros word; g_idx shared).
struct part {
    std::string module;
    int64_t     rows;
};
void write_split(const safetensors_file& in, const std::string& fused, const std::vector<part>& parts,
                 std::vector<safetensors_decl>* decls, std::vector<std::pair<std::string, std::string>>* data) {
    for (const char* suffix : {".qweight", ".scales", ".qzeros", ".g_idx"}) {
        const auto* t = in.find(fused + suffix);
        ASSERT_NE(t, nullptr) << fused << suffix;
        std::string bytes(t->nbytes(), '\0');
        in.copy_to(*t, bytes.data());
        const int64_t elem = static_cast<int64_t>(dtype_size(t->type));
        const int64_t per  = std::string(suffix) == ".qzeros" ? 8 : 1;  // 4-bit zeros packed 8 a word
        int64_t       col0 = 0;
        for (const part& p : parts) {
            auto shape = t->shape;
            if (std::string(suffix) == ".g_idx") {
                decls->push_back({p.module + suffix, t->type, shape});
                data->push_back({p.module + suffix, bytes});
                continue;
            }
            const int64_t n_rows = shape[0], n_cols = shape[1], w = p.rows / per;
            std::string   out;
            for (int64_t r = 0; r < n_rows; ++r)
                out += bytes.substr(static_cast<size_t>((r * n_cols + col0) * elem), static_cast<size_t>(w * elem));
            shape[1] = w;
            decls->push_back({p.module + suffix, t->type, shape});
            data->push_back({p.module + suffix, out});
            col0 += w;
        }
    }
}

// GPTQModel 7.6 writes Phi-3 with mlp.gate_proj and mlp.up_proj apart (it splits gate_up_proj
// before quantizing) and qkv_proj fused; transformers' layout and ours keep both fused. The same
// codes in either layout must give the same logits, bit for bit: ours quantized, rewritten here
// with every fused module split (q/k/v and gate/up), read by the same loader.
TEST(InteropFamilies, Phi3SplitModulesReadAsFused) {
    const std::string fused_dir = std::string(GPTQ_SOURCE_DIR) + "/tests/data/interop/families/phi3-w4-g32";
    if (!fs::exists(fused_dir + "/model.safetensors")) GTEST_SKIP() << fused_dir << " is absent";
    auto fused = llama_model::open(fused_dir, {.strict = true});
    ASSERT_TRUE(fused.is_ok()) << fused.error().message();
    const llama_hparams hp = (*fused)->hparams();
    ASSERT_TRUE(hp.fused_qkv && hp.fused_gate_up);

    test::temp_dir tmp("phi3-split");
    for (const char* f : {"config.json", "quantize_config.json"}) fs::copy_file(fused_dir + "/" + f, tmp.file(f));
    auto in = safetensors_file::open(fused_dir + "/model.safetensors");
    ASSERT_TRUE(in.is_ok()) << in.error().message();
    std::vector<safetensors_decl>                    decls;
    std::vector<std::pair<std::string, std::string>> data;
    for (const auto& t : (*in)->tensors()) {
        if (t.name.find(".qkv_proj.") != std::string::npos || t.name.find(".gate_up_proj.") != std::string::npos)
            continue;
        std::string bytes(t.nbytes(), '\0');
        (*in)->copy_to(t, bytes.data());
        decls.push_back({t.name, t.type, t.shape});
        data.push_back({t.name, bytes});
    }
    for (int64_t i = 0; i < hp.n_layer; ++i) {
        const std::string p = "model.layers." + std::to_string(i);
        write_split(**in, p + ".self_attn.qkv_proj",
                    {{p + ".self_attn.q_proj", hp.q_dim()},
                     {p + ".self_attn.k_proj", hp.kv_dim()},
                     {p + ".self_attn.v_proj", hp.kv_dim()}},
                    &decls, &data);
        write_split(**in, p + ".mlp.gate_up_proj", {{p + ".mlp.gate_proj", hp.n_ff}, {p + ".mlp.up_proj", hp.n_ff}},
                    &decls, &data);
    }
    {
        auto w = safetensors_writer::create(tmp.file("model.safetensors"), decls);
        ASSERT_TRUE(w.is_ok()) << w.error().message();
        for (const auto& [name, bytes] : data) ASSERT_TRUE((*w)->write(name, bytes.data(), bytes.size()).is_ok());
        ASSERT_TRUE((*w)->finish().is_ok());
    }
    auto split = llama_model::open(tmp.path(), {.strict = true});
    ASSERT_TRUE(split.is_ok()) << split.error().message();
    EXPECT_FALSE((*split)->hparams().fused_qkv);
    EXPECT_FALSE((*split)->hparams().fused_gate_up);

    const std::vector<int32_t> ids = {1, 17, 300, 42, 7, 511, 256, 3, 99, 128, 64, 200};
    const int64_t              n   = static_cast<int64_t>(ids.size());
    std::vector<float>         a(static_cast<size_t>(n * hp.n_vocab)), b(a.size());
    ASSERT_TRUE((*fused)->forward(ctx(), ids.data(), n, nullptr, a.data()).is_ok());
    ASSERT_TRUE((*split)->forward(ctx(), ids.data(), n, nullptr, b.data()).is_ok());
    EXPECT_EQ(a, b);

    // Half split (gate_proj present, up_proj missing) is not a layout: the missing part is named.
    fs::remove(tmp.file("model.safetensors"));
    {
        std::vector<safetensors_decl> d2;
        for (const auto& d : decls)
            if (d.name.find(".mlp.up_proj.") == std::string::npos) d2.push_back(d);
        auto w = safetensors_writer::create(tmp.file("model.safetensors"), d2);
        ASSERT_TRUE(w.is_ok());
        for (const auto& [name, bytes] : data) {
            if (name.find(".mlp.up_proj.") != std::string::npos) continue;
            ASSERT_TRUE((*w)->write(name, bytes.data(), bytes.size()).is_ok());
        }
        ASSERT_TRUE((*w)->finish().is_ok());
    }
    auto half = llama_model::open(tmp.path(), {.strict = true});
    ASSERT_FALSE(half.is_ok());
    EXPECT_NE(half.error().message().find("gate_up_proj"), std::string::npos) << half.error().message();
}

}  // namespace
