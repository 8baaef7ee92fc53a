// CPU offload on one GPU, the CPU side (docs/multi-gpu.md, "CPU offload on one GPU"): a device
// plan -> the one-GPU placement (device_plan_offload_placement), plan_for_device (the plan the
// commands with --device cuda use, with the default cpu limit), the refusal of plans over several
// GPUs, and --device-map / --max-memory refused with --device cpu (engine and CLI). The GPU side
// (the model with offloaded modules against the resident one) is tests/cuda/test_offload_cuda.cpp.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "gptq/plan.h"
#include "gptq/ppl.h"
#include "model/device_map.h"
#include "model/llama.h"
#include "test_util.h"

using namespace gptq;
using namespace gptq::test;

namespace {

const std::string& tiny() {
    static const std::string p = source_path("models/tiny-llama");
    return p;
}

// tiny-llama's costs (4 layers) and a plan from a map file's JSON text.
result<device_plan> plan_from_json(const std::string& json, const std::string& mem_spec = "") {
    auto m = llama_model::open(tiny());
    if (!m) return m.error();
    const device_map_costs costs = device_map_costs_llama((*m)->hparams(), nullptr, {.n_ctx = 256, .batch = 1});
    GPTQ_ASSIGN_OR_RETURN(device_map_spec spec, device_map_spec_parse(json, "test.json"));
    max_memory mem;
    if (!mem_spec.empty()) {
        GPTQ_ASSIGN_OR_RETURN(mem, max_memory_parse(mem_spec));
    }
    return device_map_apply(costs, spec, mem, "test.json");
}

}  // namespace

TEST(offload_placement, cpu_modules_become_the_offloaded_set) {
    auto plan = plan_from_json(R"({"": 0, "model.layers.1": "cpu", "model.layers.3": "cpu", "model.norm": "cpu"})");
    ASSERT_TRUE(plan.is_ok()) << plan.error().message();
    auto p = device_plan_offload_placement(*plan, 0, 4);
    ASSERT_TRUE(p.is_ok()) << p.error().message();
    EXPECT_EQ(p->layers, (std::vector<int64_t>{1, 3}));
    EXPECT_FALSE(p->embed);
    EXPECT_TRUE(p->norm);
    EXPECT_FALSE(p->lm_head);
    EXPECT_EQ(p->n_modules(), 3);
    EXPECT_TRUE(p->any());

    // Everything resident: nothing offloaded.
    auto all0 = plan_from_json(R"({"": 0})");
    ASSERT_TRUE(all0.is_ok());
    auto none = device_plan_offload_placement(*all0, 0, 4);
    ASSERT_TRUE(none.is_ok());
    EXPECT_FALSE(none->any());

    // Everything on cpu (no GPU in the plan): all modules offloaded to the GPU that runs it.
    auto allcpu = plan_from_json(R"({"": "cpu"})");
    ASSERT_TRUE(allcpu.is_ok());
    auto every = device_plan_offload_placement(*allcpu, 2, 4);
    ASSERT_TRUE(every.is_ok()) << every.error().message();
    EXPECT_EQ(every->layers, (std::vector<int64_t>{0, 1, 2, 3}));
    EXPECT_TRUE(every->embed && every->norm && every->lm_head);
    EXPECT_EQ(every->n_modules(), 7);

    // The plan's GPU is the one the command runs on: cuda:1 with --device cuda:1.
    auto on1 = plan_from_json(R"({"": 1, "lm_head": "cpu"})");
    ASSERT_TRUE(on1.is_ok());
    auto p1 = device_plan_offload_placement(*on1, 1, 4);
    ASSERT_TRUE(p1.is_ok()) << p1.error().message();
    EXPECT_TRUE(p1->lm_head);
    EXPECT_TRUE(p1->layers.empty());
}

TEST(offload_placement, another_gpu_is_refused_until_the_pipeline_exists) {
    auto plan = plan_from_json(R"({"": 0, "model.layers.2": 1, "model.layers.3": 1})");
    ASSERT_TRUE(plan.is_ok()) << plan.error().message();
    auto p = device_plan_offload_placement(*plan, 0, 4);
    ASSERT_FALSE(p.is_ok());
    EXPECT_EQ(p.error().code(), status_code::STATUS_UNSUPPORTED);
    const std::string msg = p.error().message();
    EXPECT_NE(msg.find("model.layers.2-3"), std::string::npos) << msg;
    EXPECT_NE(msg.find("cuda:1"), std::string::npos) << msg;
    EXPECT_NE(msg.find("pipeline runtime"), std::string::npos) << msg;
    EXPECT_NE(msg.find("issue #10"), std::string::npos) << msg;

    // All on cuda:0 but the command runs on cuda:1.
    auto all0 = plan_from_json(R"({"": 0})");
    ASSERT_TRUE(all0.is_ok());
    EXPECT_EQ(device_plan_offload_placement(*all0, 1, 4).to_status().code(), status_code::STATUS_UNSUPPORTED);

    // Offloaded modules that the plan runs on cuda:1 (the last GPU of --max-memory), command on cuda:0.
    auto exec1 = plan_from_json(R"({"": "cpu"})", "1=1GiB,cpu=1GiB");
    ASSERT_TRUE(exec1.is_ok()) << exec1.error().message();
    EXPECT_EQ(exec1->exec_device, 1);
    auto pe = device_plan_offload_placement(*exec1, 0, 4);
    ASSERT_FALSE(pe.is_ok());
    EXPECT_NE(pe.error().message().find("runs its offloaded modules on cuda:1"), std::string::npos)
        << pe.error().message();

    // A plan of another model shape.
    EXPECT_EQ(device_plan_offload_placement(*all0, 0, 5).to_status().code(), status_code::STATUS_INVALID_ARGUMENT);
}

TEST(plan_for_device, no_cpu_entry_offloads_the_rest_to_host_memory) {
    // 0=88MiB at n_ctx 256: the reserve (65.9 MiB) and logits (8 MiB) leave room for the embeddings and
    // layer 0 (gptq plan shows it).
    plan_params pp;
    pp.model_path = tiny();
    pp.max_memory = "0=88MiB";
    pp.n_ctx      = 256;
    auto all      = plan_for_device({.model_path = tiny(), .max_memory = "0=1GiB", .n_ctx = 256}, 0);
    ASSERT_TRUE(all.is_ok()) << all.error().message();
    EXPECT_EQ(all->n_offloaded, 0);
    EXPECT_EQ(all->n_modules, 7);
    EXPECT_FALSE(all->note.empty());  // no cpu entry: said, even when nothing needs offloading
    EXPECT_NE(all->table.find("cuda:0"), std::string::npos) << all->table;

    auto r = plan_for_device(pp, 0);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_GT(r->n_offloaded, 0) << r->table;
    EXPECT_LT(r->n_offloaded, 7) << r->table;
    EXPECT_NE(r->note.find("no cpu entry"), std::string::npos) << r->note;
    EXPECT_NE(r->table.find("offloaded to cpu (streamed to cuda:0)"), std::string::npos) << r->table;
    // Sequential fill: the offloaded modules are the tail (lm_head last, then norm, then the last layers).
    EXPECT_TRUE(r->offload_lm_head);
    EXPECT_FALSE(r->offload_embed);
    const int64_t n = int64_t(r->offload_layers.size());
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(r->offload_layers[size_t(i)], 4 - n + i);
    EXPECT_EQ(r->n_offloaded, n + r->offload_norm + r->offload_lm_head + r->offload_embed);

    // cpu=0 forbids offloading: the same budget is refused with the shortfall.
    pp.max_memory = "0=88MiB,cpu=0";
    auto refused  = plan_for_device(pp, 0);
    ASSERT_FALSE(refused.is_ok());
    EXPECT_EQ(refused.error().code(), status_code::STATUS_OUT_OF_MEMORY);
    EXPECT_NE(refused.error().message().find("more than --max-memory allows"), std::string::npos)
        << refused.error().message();

    // Limits for two GPUs that the plan uses both of: refused (one GPU only for now).
    pp.max_memory = "0=88MiB,1=1GiB";
    auto two      = plan_for_device(pp, 0);
    ASSERT_FALSE(two.is_ok());
    EXPECT_EQ(two.error().code(), status_code::STATUS_UNSUPPORTED) << two.error().message();
    EXPECT_NE(two.error().message().find("issue #10"), std::string::npos) << two.error().message();

    // auto without --max-memory: the planner's error.
    pp.max_memory = "";
    EXPECT_EQ(plan_for_device(pp, 0).to_status().code(), status_code::STATUS_INVALID_ARGUMENT);
}

TEST(plan_for_device, map_file_offloads_named_layers) {
    temp_dir          d("offload-plan");
    const std::string map = d.file("map.json");
    write_file(map, R"({"": 0, "model.layers.0": "cpu", "model.layers.2": "cpu", "lm_head": "cpu"})");
    auto r = plan_for_device({.model_path = tiny(), .device_map = map, .n_ctx = 256}, 0);
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    EXPECT_EQ(r->offload_layers, (std::vector<int64_t>{0, 2}));
    EXPECT_TRUE(r->offload_lm_head);
    EXPECT_FALSE(r->offload_norm);
    EXPECT_EQ(r->n_offloaded, 3);
    EXPECT_TRUE(r->note.empty());  // no --max-memory: no limits, no default added
}

TEST(offload_flags, refused_with_device_cpu) {
    ppl_params p;
    p.model_path = tiny();
    p.max_memory = "0=1GiB";
    auto r       = ppl_run(p);
    ASSERT_FALSE(r.is_ok());
    EXPECT_EQ(r.error().code(), status_code::STATUS_INVALID_ARGUMENT);
    EXPECT_NE(r.error().message().find("--device cuda"), std::string::npos) << r.error().message();

    for (const std::string cmd : {"ppl", "bench", "generate -p hi"}) {
        auto c = run_command(gptq_binary() + " " + cmd + " " + tiny() + " --device-map auto --max-memory 0=1GiB");
        EXPECT_NE(c.exit_code, 0) << cmd;
        EXPECT_NE(c.err.find("need --device cuda"), std::string::npos) << cmd << ": " << c.err;
    }
}
