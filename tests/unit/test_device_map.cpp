// The device-map planner (model/device_map.h, docs/multi-gpu.md): --max-memory parsing, map files
// with prefixes, auto placement on the Llama 2 7B shape (dense and 4-bit GPTQ), refusals with the
// shortfall, JSON round trips, and `gptq plan` on the bundled tiny model.
#include <gtest/gtest.h>

#include <climits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "gptq/make_random.h"
#include "gptq/plan.h"
#include "io/gptq_config.h"
#include "io/hf_config.h"
#include "io/json_file.h"
#include "model/device_map.h"
#include "model/llama.h"
#include "test_util.h"

using namespace gptq;
using namespace gptq::test;

namespace {

constexpr uint64_t GiB = 1ull << 30;
constexpr uint64_t MiB = 1ull << 20;

llama_hparams hparams_of(const std::string& name) {
    auto s = make_random_shape(name);
    EXPECT_TRUE(s.is_ok()) << s.error().message();
    auto j = json_parse(make_random_config_json(*s, "float16", 0), "config.json");
    EXPECT_TRUE(j.is_ok());
    auto cfg = model_config_parse(*j, "config.json");
    EXPECT_TRUE(cfg.is_ok()) << cfg.error().message();
    auto hp = llama_hparams_from_config(*cfg);
    EXPECT_TRUE(hp.is_ok()) << hp.error().message();
    return *hp;
}

gptq_config gptq_4bit() {
    auto q = gptq_config_parse(json::parse(R"({"bits": 4, "group_size": 128, "desc_act": false, "sym": true})"),
                               "quantize_config.json");
    EXPECT_TRUE(q.is_ok()) << q.error().message();
    return *q;
}

device_map_costs costs_7b(const gptq_config* q = nullptr) {
    return device_map_costs_llama(hparams_of("llama-2-7b"), q, {.n_ctx = 4096, .batch = 1});
}

max_memory mem_of(const std::string& s) {
    auto m = max_memory_parse(s);
    EXPECT_TRUE(m.is_ok()) << m.error().message();
    return m.is_ok() ? *m : max_memory{};
}

int rank(int device) {
    return device == k_device_cpu ? INT_MAX : device;
}

// Every device within its limit; modules in pipeline order (device ranks never go back).
void expect_valid(const device_plan& p) {
    for (const auto& d : p.devices)
        EXPECT_FALSE(d.over()) << device_map_device_name(d.device) << " holds " << d.total() << " > " << d.limit_bytes;
    for (size_t i = 1; i < p.modules.size(); ++i)
        EXPECT_LE(rank(p.modules[i - 1].device), rank(p.modules[i].device)) << p.modules[i].name;
}

// The "X.Y GiB" (or MiB, KiB, B) after "needs " in a refusal, in bytes; *half_unit: the rounding.
uint64_t shortfall_bytes(const std::string& msg, uint64_t* half_unit = nullptr) {
    const size_t at = msg.find("needs ");
    EXPECT_NE(at, std::string::npos) << msg;
    EXPECT_NE(msg.find(" more than --max-memory allows"), std::string::npos) << msg;
    if (at == std::string::npos) return 0;
    size_t       pos  = 0;
    const double x    = std::stod(msg.substr(at + 6), &pos);
    const auto   unit = msg.substr(at + 6 + pos + 1, 3);
    const double mult = unit == "GiB" ? double(GiB) : unit == "MiB" ? double(MiB) : unit == "KiB" ? 1024.0 : 1.0;
    if (half_unit) *half_unit = static_cast<uint64_t>(0.05 * mult) + 1;
    return static_cast<uint64_t>(x * mult);
}

}  // namespace

// ---- --max-memory -------------------------------------------------------------------------------------

TEST(max_memory, parses_devices_and_units) {
    auto m = mem_of("0=40GiB,1=40GiB,cpu=200GiB");
    ASSERT_EQ(m.entries.size(), 3u);
    EXPECT_EQ(m.entries[0].device, 0);
    EXPECT_EQ(m.entries[0].bytes, 40 * GiB);
    EXPECT_EQ(m.entries[1].device, 1);
    EXPECT_EQ(m.entries[2].device, k_device_cpu);
    EXPECT_EQ(m.entries[2].bytes, 200 * GiB);
    EXPECT_EQ(m.gpus(), (std::vector<int>{0, 1}));
    EXPECT_EQ(max_memory_format(m), "0=40GiB,1=40GiB,cpu=200GiB");

    // Units: decimal, binary, case-insensitive, none = bytes; cuda:N; spaces; any order (sorted).
    auto u = mem_of(" cpu = 1.5GB , cuda:3=2kb, 1=7KiB ,2=123, 0=2mib, 4=1gIb, 5=3B, 6=1TB, 7=1tib");
    EXPECT_EQ(u.gpus(), (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
    EXPECT_EQ(u.find(k_device_cpu)->bytes, 1'500'000'000u);
    EXPECT_EQ(u.find(3)->bytes, 2000u);
    EXPECT_EQ(u.find(1)->bytes, 7u * 1024);
    EXPECT_EQ(u.find(2)->bytes, 123u);
    EXPECT_EQ(u.find(0)->bytes, 2 * MiB);
    EXPECT_EQ(u.find(4)->bytes, GiB);
    EXPECT_EQ(u.find(5)->bytes, 3u);
    EXPECT_EQ(u.find(6)->bytes, 1'000'000'000'000u);
    EXPECT_EQ(u.find(7)->bytes, 1024 * GiB);
    EXPECT_EQ(u.entries.back().device, k_device_cpu);
    EXPECT_EQ(u.find(8), nullptr);
}

TEST(max_memory, errors_quote_the_bad_item) {
    struct bad {
        const char* in;
        const char* quoted;
    };
    const bad cases[] = {
        {"", "empty"},
        {"0=40GiB,,1=40GiB", "empty item"},
        {"0=40GiB,", "empty item"},
        {"0:40GiB", "'0:40GiB'"},
        {"gpu0=40GiB", "'gpu0'"},
        {"cuda:x=1GB", "'cuda:x'"},
        {"-1=1GB", "'-1'"},
        {"0=", "'0='"},
        {"0=GiB", "'0=GiB'"},
        {"0=40XB", "'0=40XB'"},
        {"0=-3GB", "'0=-3GB'"},
        {"0=1e3GB", "'0=1e3GB'"},
        {"0=5EB", "'0=5EB'"},
        {"0=99999999999TiB", "'0=99999999999TiB'"},
        {"0=1GB,1=2GB,0=3GB", "'0=3GB'"},
        {"cpu=1GB,CPU=2GB", "'CPU=2GB'"},
    };
    const std::string huge = "0=" + std::string(400, '9');  // beyond double's range
    EXPECT_FALSE(max_memory_parse(huge).is_ok());
    for (const auto& c : cases) {
        auto m = max_memory_parse(c.in);
        ASSERT_FALSE(m.is_ok()) << c.in;
        EXPECT_EQ(m.error().code(), status_code::STATUS_INVALID_ARGUMENT) << c.in;
        EXPECT_NE(m.error().message().find(c.quoted), std::string::npos) << c.in << " -> " << m.error().message();
    }
}

// ---- costs ----------------------------------------------------------------------------------------------

TEST(device_map_costs, llama_7b_dense_and_gptq_by_hand) {
    const auto c = costs_7b();
    ASSERT_EQ(c.modules.size(), 35u);  // embeddings, 32 layers, norm, lm_head
    EXPECT_EQ(c.modules[0].name, "model.embed_tokens");
    EXPECT_EQ(c.modules[1].name, "model.layers.0");
    EXPECT_EQ(c.modules[32].name, "model.layers.31");
    EXPECT_EQ(c.modules[33].name, "model.norm");
    EXPECT_EQ(c.modules[34].name, "lm_head");
    // F16: 32000 x 4096 embeddings; a layer is 4 x 4096^2 + 3 x 4096 x 11008 weights + 2 norms.
    EXPECT_EQ(c.modules[0].weight_bytes, 2ull * 32000 * 4096);
    const uint64_t layer = 2ull * (4ull * 4096 * 4096 + 3ull * 4096 * 11008 + 2 * 4096);
    EXPECT_EQ(c.modules[1].weight_bytes, layer);
    // KV cache: K and V, 4096 positions x 4096 values, F16; logits 4096 x 32000 F32.
    EXPECT_EQ(c.modules[1].cache_bytes, 2ull * 4096 * 4096 * 2);
    EXPECT_EQ(c.modules[34].cache_bytes, 4ull * 4096 * 32000);
    EXPECT_EQ(c.modules[33].weight_bytes, 2ull * 4096);

    // 4-bit, group 128, the larger of: the checkpoint tensors (qweight n_in/8 x n_out I32, qzeros
    // n_in/128 x n_out/8 I32, scales n_in/128 x n_out F16, g_idx n_in I32) and the fast int4
    // layout (n_out x n_in / 2 bytes of codes, a (scale, zero) F16 pair per output and group).
    const gptq_config q   = gptq_4bit();
    const auto        cq  = costs_7b(&q);
    auto              lin = [](uint64_t n_out, uint64_t n_in) {
        const uint64_t ckpt = n_in / 8 * n_out * 4 + n_in / 128 * n_out / 8 * 4 + n_in / 128 * n_out * 2 + n_in * 4;
        const uint64_t fast = n_out * n_in / 2 + n_out * n_in / 128 * 4;
        EXPECT_GT(fast, ckpt);
        return std::max(ckpt, fast);
    };
    EXPECT_EQ(cq.modules[1].weight_bytes, 4 * lin(4096, 4096) + 2 * lin(11008, 4096) + lin(4096, 11008) + 2 * 2 * 4096);
    EXPECT_EQ(cq.modules[0].weight_bytes, c.modules[0].weight_bytes);    // embeddings stay F16
    EXPECT_EQ(cq.modules[34].weight_bytes, c.modules[34].weight_bytes);  // lm_head too (not GPTQ: "lm_head" false)
    EXPECT_EQ(cq.gpu_reserve_bytes, c.gpu_reserve_bytes);
    EXPECT_LT(cq.modules[1].weight_bytes * 3, c.modules[1].weight_bytes);
    // 8 bits, one group per row: no fast layout, the checkpoint tensors exactly.
    auto q8 = gptq_config_parse(json::parse(R"({"bits": 8, "group_size": -1})"), "quantize_config.json");
    ASSERT_TRUE(q8.is_ok());
    auto lin8 = [](uint64_t n_out, uint64_t n_in) {
        return n_in / 4 * n_out * 4 + n_out / 4 * 4 + n_out * 2 + n_in * 4;
    };
    EXPECT_EQ(costs_7b(&*q8).modules[1].weight_bytes,
              4 * lin8(4096, 4096) + 2 * lin8(11008, 4096) + lin8(4096, 11008) + 2 * 2 * 4096);

    // GPTQModel `dynamic`: layer 1 at 8 bits g-1, layer 2's o_proj dense F16; the others as the base.
    auto qd = gptq_config_parse(json::parse(R"({"bits": 4, "group_size": 128, "sym": true, "dynamic": {
        "+:model\\.layers\\.1\\.": {"bits": 8, "group_size": -1}, "-:model\\.layers\\.2\\.self_attn\\.o_proj": {}}})"),
                                "quantize_config.json");
    ASSERT_TRUE(qd.is_ok()) << qd.error().message();
    const auto cd = costs_7b(&*qd);
    EXPECT_EQ(cd.modules[1].weight_bytes, cq.modules[1].weight_bytes);  // layer 0
    EXPECT_EQ(cd.modules[2].weight_bytes, costs_7b(&*q8).modules[2].weight_bytes);
    EXPECT_EQ(cd.modules[3].weight_bytes, cq.modules[3].weight_bytes - lin(4096, 4096) + 2 * 4096 * 4096);

    // A GPTQ lm_head ("lm_head": true): on the int4 layout at 4 bits (llama_cuda keeps it there), its
    // F16 copy otherwise (8 bits: dequantized at load).
    auto qh = gptq_config_parse(json::parse(R"({"bits": 4, "group_size": 128, "sym": true, "lm_head": true})"),
                                "quantize_config.json");
    ASSERT_TRUE(qh.is_ok()) << qh.error().message();
    EXPECT_EQ(costs_7b(&*qh).modules[34].weight_bytes, lin(32000, 4096));
    auto qh8 =
        gptq_config_parse(json::parse(R"({"bits": 8, "group_size": -1, "lm_head": true})"), "quantize_config.json");
    ASSERT_TRUE(qh8.is_ok()) << qh8.error().message();
    EXPECT_EQ(costs_7b(&*qh8).modules[34].weight_bytes, c.modules[34].weight_bytes);
}

// ---- auto ------------------------------------------------------------------------------------------------

TEST(device_map_auto, llama_7b_two_gpus_spill_to_cpu) {
    const auto c    = costs_7b();
    const auto mem  = mem_of("0=8GiB,1=8GiB,cpu=64GiB");
    auto       plan = device_map_auto(c, mem);
    ASSERT_TRUE(plan.is_ok()) << plan.error().message();
    expect_valid(*plan);
    ASSERT_EQ(plan->modules.size(), c.modules.size());
    for (size_t i = 0; i < c.modules.size(); ++i) EXPECT_EQ(plan->modules[i].name, c.modules[i].name);

    // Pipeline split: embeddings on GPU 0, layers across both GPUs in order, the tail on cpu.
    EXPECT_EQ(plan->modules.front().device, 0);
    const auto* g0  = plan->usage(0);
    const auto* g1  = plan->usage(1);
    const auto* cpu = plan->usage(k_device_cpu);
    ASSERT_TRUE(g0 && g1 && cpu);
    EXPECT_GT(g0->n_modules, 8);
    EXPECT_GT(g1->n_modules, 8);
    EXPECT_GT(cpu->n_modules, 0);
    EXPECT_EQ(plan->n_offloaded(), cpu->n_modules);
    EXPECT_EQ(g0->n_modules + g1->n_modules + cpu->n_modules, 35);
    EXPECT_EQ(plan->modules.back().device, k_device_cpu);  // lm_head is in the spilled tail
    EXPECT_EQ(plan->exec_device, 1);

    // Spills counted: cpu holds the offloaded weights; GPU 1 their KV cache/logits and staging.
    uint64_t off_w = 0, off_c = 0, max_w = 0, w_all = 0;
    for (const auto& m : plan->modules) {
        w_all += m.weight_bytes;
        if (m.device != k_device_cpu) continue;
        off_w += m.weight_bytes;
        off_c += m.cache_bytes;
        max_w = std::max(max_w, m.weight_bytes);
    }
    EXPECT_EQ(cpu->weight_bytes, off_w);
    EXPECT_EQ(g1->staging_bytes, 2 * max_w);
    EXPECT_GE(g1->cache_bytes, off_c);
    EXPECT_EQ(g0->staging_bytes, 0u);
    EXPECT_EQ(g0->weight_bytes + g1->weight_bytes + cpu->weight_bytes, w_all);
    EXPECT_EQ(g0->reserve_bytes, c.gpu_reserve_bytes);
    EXPECT_EQ(cpu->reserve_bytes, 0u);

    // Greedy: GPU 0 was full, i.e. the first module of GPU 1 did not fit beside it.
    size_t first1 = 0;
    while (plan->modules[first1].device == 0) ++first1;
    EXPECT_GT(g0->total() + c.modules[first1].weight_bytes + c.modules[first1].cache_bytes, 8 * GiB);

    // Round trip: JSON -> map -> plan -> the same JSON, the same totals.
    const std::string js   = device_plan_json(*plan);
    auto              spec = device_map_spec_parse(js, "plan.json");
    ASSERT_TRUE(spec.is_ok()) << spec.error().message();
    auto again = device_map_apply(c, *spec, mem, "plan.json");
    ASSERT_TRUE(again.is_ok()) << again.error().message();
    EXPECT_EQ(device_plan_json(*again), js);
    ASSERT_EQ(again->devices.size(), plan->devices.size());
    for (size_t i = 0; i < plan->devices.size(); ++i) EXPECT_EQ(again->devices[i].total(), plan->devices[i].total());
    EXPECT_EQ(json::parse(js).at("model.embed_tokens"), 0);
    EXPECT_EQ(json::parse(js).at("lm_head"), "cpu");

    // The table names every device with its limit.
    const std::string t = device_plan_table(*plan);
    EXPECT_NE(t.find("cuda:0"), std::string::npos) << t;
    EXPECT_NE(t.find("cuda:1"), std::string::npos) << t;
    EXPECT_NE(t.find("offloaded to cpu (streamed to cuda:1)"), std::string::npos) << t;
    EXPECT_NE(t.find("8.0 GiB"), std::string::npos) << t;
    EXPECT_NE(t.find("model.layers.0-"), std::string::npos) << t;
}

TEST(device_map_auto, gptq_4bit_7b_fits_one_8gib_gpu) {
    const gptq_config q    = gptq_4bit();
    const auto        c    = costs_7b(&q);
    auto              plan = device_map_auto(c, mem_of("0=8GiB"));
    ASSERT_TRUE(plan.is_ok()) << plan.error().message();
    expect_valid(*plan);
    EXPECT_EQ(plan->n_offloaded(), 0);
    ASSERT_EQ(plan->devices.size(), 1u);
    EXPECT_EQ(plan->devices[0].n_modules, 35);
    EXPECT_EQ(plan->exec_device, k_device_cpu);  // nothing offloaded
    // The dense model does not fit there.
    auto dense = device_map_auto(costs_7b(), mem_of("0=8GiB"));
    ASSERT_FALSE(dense.is_ok());
    EXPECT_EQ(dense.error().code(), status_code::STATUS_OUT_OF_MEMORY);
}

TEST(device_map_auto, refusal_says_by_how_much) {
    const auto c   = costs_7b();
    auto       bad = device_map_auto(c, mem_of("0=8GiB,1=8GiB"));
    ASSERT_FALSE(bad.is_ok());
    EXPECT_EQ(bad.error().code(), status_code::STATUS_OUT_OF_MEMORY);
    const std::string msg = bad.error().message();
    EXPECT_EQ(msg.rfind("needs ", 0), 0u) << msg;
    EXPECT_NE(msg.find("cpu=SIZE"), std::string::npos) << msg;
    uint64_t       half = 0;
    const uint64_t x    = shortfall_bytes(msg, &half);
    EXPECT_GT(x, 100 * MiB);
    EXPECT_NE(msg.find("34 of 35 modules fit (lm_head does not)"), std::string::npos) << msg;
    // The figure is what the last GPU lacks: that much more (rounding aside) fits, less does not.
    const uint64_t more = x + half;
    const uint64_t less = x - half;
    max_memory     m;
    m.entries = {{0, 8 * GiB}, {1, 8 * GiB + more}};
    EXPECT_TRUE(device_map_auto(c, m).is_ok());
    m.entries = {{0, 8 * GiB}, {1, 8 * GiB + less}};
    EXPECT_FALSE(device_map_auto(c, m).is_ok());

    // 70B in F16 on two 40 GiB GPUs: short by at least what it needs beyond 80 GiB.
    const auto c70 = device_map_costs_llama(hparams_of("llama-2-70b"), nullptr, {.n_ctx = 4096, .batch = 1});
    auto       b70 = device_map_auto(c70, mem_of("0=40GiB,1=40GiB"));
    ASSERT_FALSE(b70.is_ok());
    uint64_t need = 2 * c70.gpu_reserve_bytes;
    for (const auto& m : c70.modules) need += m.weight_bytes + m.cache_bytes;
    const uint64_t x70 = shortfall_bytes(b70.error().message(), &half);
    EXPECT_GE(x70 + half, need - 80 * GiB) << b70.error().message();
    EXPECT_LT(x70, need - 80 * GiB + 2 * c70.modules[1].weight_bytes);  // fragmentation: under one layer per GPU

    // Offloading into too little host memory: the cpu line says it.
    auto small_cpu = device_map_auto(c, mem_of("0=8GiB,cpu=1GiB"));
    ASSERT_FALSE(small_cpu.is_ok());
    EXPECT_NE(small_cpu.error().message().find("cpu needs"), std::string::npos) << small_cpu.error().message();
    shortfall_bytes(small_cpu.error().message());
    // A GPU whose limit is below its reserve takes nothing; the next one does.
    const gptq_config q    = gptq_4bit();
    auto              skip = device_map_auto(costs_7b(&q), mem_of("0=100MiB,1=8GiB"));
    ASSERT_TRUE(skip.is_ok()) << skip.error().message();
    EXPECT_EQ(skip->modules.front().device, 1);
}

TEST(device_map_auto, cpu_only_and_tied_lm_head) {
    // Only cpu: everything offloaded, the CPU runtime runs it (no execution GPU).
    auto cpu = device_map_auto(costs_7b(), mem_of("cpu=64GiB"));
    ASSERT_TRUE(cpu.is_ok()) << cpu.error().message();
    EXPECT_EQ(cpu->n_offloaded(), 35);
    EXPECT_EQ(cpu->exec_device, k_device_cpu);

    // Tied embeddings (the tiny shape): lm_head shares the table on the embeddings' device.
    auto hp           = hparams_of("tiny");
    hp.tie_embeddings = true;  // as the bundled tiny-llama
    const auto c      = device_map_costs_llama(hp, nullptr, {.n_ctx = 2048, .batch = 1});
    auto       plan   = device_map_auto(c, mem_of("0=1GiB"));
    ASSERT_TRUE(plan.is_ok()) << plan.error().message();
    expect_valid(*plan);
    EXPECT_EQ(plan->modules.back().weight_bytes, 0u);
    EXPECT_EQ(plan->devices.size(), 1u);
    // Split by hand across two devices: lm_head then holds its own copy.
    auto spec = device_map_spec_parse(R"({"model": 0, "lm_head": 1})", "m.json");
    ASSERT_TRUE(spec.is_ok());
    auto split = device_map_apply(c, *spec, max_memory{}, "m.json");
    ASSERT_TRUE(split.is_ok()) << split.error().message();
    EXPECT_EQ(split->modules.back().weight_bytes, c.modules.back().weight_bytes);
    EXPECT_FALSE(split->devices[0].has_limit);
}

// ---- map files -------------------------------------------------------------------------------------------

TEST(device_map_file, prefixes_longest_first) {
    const auto c    = costs_7b();
    auto       spec = device_map_spec_parse(
              R"({"model": 0, "model.layers": "cuda:1", "model.layers.31": "cpu", "model.layers.30": "CPU", "lm_head": 1})",
              "map.json");
    ASSERT_TRUE(spec.is_ok()) << spec.error().message();
    auto plan = device_map_apply(c, *spec, max_memory{}, "map.json");
    ASSERT_TRUE(plan.is_ok()) << plan.error().message();
    EXPECT_EQ(plan->modules[0].device, 0);  // model.embed_tokens <- "model"
    for (int i = 1; i <= 30; ++i) EXPECT_EQ(plan->modules[size_t(i)].device, 1) << i;
    EXPECT_EQ(plan->modules[31].device, k_device_cpu);
    EXPECT_EQ(plan->modules[32].device, k_device_cpu);
    EXPECT_EQ(plan->modules[33].device, 0);  // model.norm <- "model"
    EXPECT_EQ(plan->modules[34].device, 1);
    EXPECT_EQ(plan->exec_device, 1);
    EXPECT_EQ(plan->usage(k_device_cpu)->n_modules, 2);

    // "" covers everything; "cuda" is GPU 0.
    auto all = device_map_apply(c, *device_map_spec_parse(R"({"": "cuda"})", "m.json"), max_memory{}, "m.json");
    ASSERT_TRUE(all.is_ok()) << all.error().message();
    EXPECT_EQ(all->usage(0)->n_modules, 35);

    // A map is checked against --max-memory and refused with the shortfall.
    auto over = device_map_apply(c, *spec, mem_of("0=1GiB,1=8GiB"), "map.json");
    ASSERT_FALSE(over.is_ok());
    EXPECT_EQ(over.error().code(), status_code::STATUS_OUT_OF_MEMORY);
    EXPECT_NE(over.error().message().find("the device map map.json needs"), std::string::npos)
        << over.error().message();
    EXPECT_NE(over.error().message().find("cuda:1 needs"), std::string::npos) << over.error().message();
    shortfall_bytes(over.error().message());
}

TEST(device_map_file, missing_unknown_and_bad_values) {
    const auto c     = costs_7b();
    auto       apply = [&](const char* text) -> status {
        auto spec = device_map_spec_parse(text, "map.json");
        if (!spec) return spec.error();
        return device_map_apply(c, *spec, max_memory{}, "map.json").to_status();
    };
    // Missing modules are named (layer runs as ranges).
    status st = apply(R"({"model.embed_tokens": 0, "model.layers": 0})");
    ASSERT_FALSE(st.is_ok());
    EXPECT_NE(st.message().find("no device given for model.norm, lm_head"), std::string::npos) << st.message();
    st = apply(R"({"model.embed_tokens": 0, "model.layers.0": 0, "model.norm": 0, "lm_head": 0})");
    EXPECT_NE(st.message().find("model.layers.1-31"), std::string::npos) << st.message();

    // Unknown names are named.
    st = apply(R"({"model": 0, "lm_head": 0, "model.layers.32": 1, "transformer.h": 0})");
    ASSERT_FALSE(st.is_ok());
    EXPECT_EQ(st.code(), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_NE(st.message().find("model.layers.32"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("transformer.h"), std::string::npos) << st.message();
    EXPECT_EQ(apply(R"({"model": 0, "lm_head": 0, "model.layer": 1})").code(), status_code::STATUS_INVALID_ARGUMENT);

    // Below the module granularity: unsupported, naming the module.
    st = apply(R"({"": 0, "model.layers.3.mlp": 1})");
    EXPECT_EQ(st.code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_NE(st.message().find("'model.layers.3'"), std::string::npos) << st.message();

    // "disk" is refused as unsupported with a clear error.
    st = apply(R"({"model": 0, "lm_head": "disk"})");
    EXPECT_EQ(st.code(), status_code::STATUS_UNSUPPORTED);
    EXPECT_NE(st.message().find("disk offload is not supported"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find("'lm_head'"), std::string::npos) << st.message();

    // Bad values and shapes.
    for (const char* bad : {R"({"": -1})", R"({"": "gpu"})", R"({"": true})", R"({"": 1.5})", R"({"": "cuda:x"})",
                            R"({"": null})", R"([0, 1])", R"({"": "mps"})"}) {
        st = apply(bad);
        EXPECT_EQ(st.code(), status_code::STATUS_INVALID_ARGUMENT) << bad << " " << st.message();
        EXPECT_NE(st.message().find("map.json"), std::string::npos) << st.message();
    }
    EXPECT_EQ(apply("{\"\": 0").code(), status_code::STATUS_PARSE_ERROR);
    EXPECT_EQ(device_map_spec_load("/nonexistent/map.json").to_status().code(), status_code::STATUS_NOT_FOUND);
}

// ---- engine and CLI on the bundled tiny model --------------------------------------------------------

TEST(plan_model, tiny_fits_one_gpu_and_file_round_trip) {
    plan_params p;
    p.model_path = source_path("models/tiny-llama");
    p.max_memory = "0=1GiB,1=1GiB";
    auto r       = plan_model(p);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_EQ(r->n_gpus, 1);
    EXPECT_EQ(r->n_offloaded, 0);
    EXPECT_EQ(r->n_modules, 4 + 3);
    EXPECT_NE(r->table.find("n_ctx 2048"), std::string::npos) << r->table;  // max_position_embeddings

    temp_dir d("plan");
    write_file(d.file("map.json"), r->json);
    p.device_map = d.file("map.json");
    auto again   = plan_model(p);
    ASSERT_TRUE(again.is_ok()) << again.error().message();
    EXPECT_EQ(again->json, r->json);

    plan_params none;
    none.model_path = p.model_path;
    EXPECT_EQ(plan_model(none).to_status().code(), status_code::STATUS_INVALID_ARGUMENT);  // auto needs limits
    none.max_memory = "0=1GiB";
    none.batch      = 0;
    EXPECT_FALSE(plan_model(none).is_ok());
    none.batch = 1;
    none.n_ctx = int64_t(1) << 40;
    EXPECT_NE(plan_model(none).to_status().message().find("--ctx 1099511627776"), std::string::npos);
}

TEST(cli_plan, refuses_and_fits) {
    const std::string base = gptq_binary() + " plan " + source_path("models/tiny-llama");
    auto              bad  = run_command(base + " --max-memory 0=1MiB");
    EXPECT_EQ(bad.exit_code, 1) << bad.err;
    EXPECT_NE(bad.err.find("more than --max-memory allows"), std::string::npos) << bad.err;
    EXPECT_NE(bad.err.find("gptq: error: needs "), std::string::npos) << bad.err;

    auto ok = run_command(base + " --max-memory 0=1GiB --ctx 512 --batch 2");
    EXPECT_EQ(ok.exit_code, 0) << ok.err;
    EXPECT_NE(ok.out.find("cuda:0"), std::string::npos) << ok.out;
    EXPECT_NE(ok.out.find("n_ctx 512, batch 2"), std::string::npos) << ok.out;

    auto js = run_command(base + " --max-memory 0=1GiB,cpu=1GiB --json");
    ASSERT_EQ(js.exit_code, 0) << js.err;
    const json j = json::parse(js.out);
    EXPECT_EQ(j.size(), 7u);
    EXPECT_EQ(j.at("model.layers.3"), 0);

    auto no_mem = run_command(base);
    EXPECT_EQ(no_mem.exit_code, 1);
    EXPECT_NE(no_mem.err.find("needs --max-memory"), std::string::npos) << no_mem.err;
    auto bad_item = run_command(base + " --max-memory 0=1GiB,x=2GiB");
    EXPECT_EQ(bad_item.exit_code, 1);
    EXPECT_NE(bad_item.err.find("'x=2GiB'"), std::string::npos) << bad_item.err;
}
