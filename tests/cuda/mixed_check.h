// A check the GPU model tests share (test_llama_cuda, test_moe_cuda, test_lora_cuda): mixed steps
// (llama_cuda_model::step_mixed: prompt chunks beside decode tokens in one forward pass, docs/cuda.md
// "Mixed passes") against the same steps run through the separate passes on a second model
// (prefill_seq per chunk, then decode_seqs for the one-token sequences), every logits row.
//
// The bound is the summation-order one (test_llama_cuda's k_graph_rel_tol, 5e-3 of the row's max
// |logit|): RoPE, the KV store and every attention launch get the same arguments as in the separate
// passes (a chunk's prefill launch over its slot's pages from its position, the decode tokens'
// ragged launch), and the norms and activations are per row; what differs is the row count m of
// every linear and of the lm_head: cuBLAS may pick another algorithm (split-K, tile order) for
// another m, and a GPTQ int4 linear takes another path by m (the GEMV up to 16 rows, then the fused
// GEMM or F16 dequantization + cuBLAS), which sums the same F16 products in another order (and, for
// dequantization + cuBLAS, rounds each dequantized weight to F16 once: 2^-11 relative per weight,
// of random sign, averaging down over a dot product). The same difference the graph vs op by op and
// ragged vs alone checks hold to this bound.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <vector>

#include "cuda_test_util.h"
#include "model/llama_cuda.h"

namespace gptq::test {

// Summation order only (see above); test_llama_cuda's k_graph_rel_tol.
constexpr double k_mixed_rel_tol = 5e-3;

struct mixed_step_plan {
    int64_t                                  reset = -1;  // a slot reset before the step (-1: none)
    std::vector<std::pair<int64_t, int64_t>> segs;        // {slot, tokens} in the order listed
};

// 4 slots: two chunks alone; chunks beside decode tokens in every listed order; a step of decode
// tokens only (no chunk); a chunk of more than 16 tokens (the tensor-core prefill kernel where
// head_dim allows) and of 2 (the decode kernel over one sequence); a slot reset and reused; two long
// chunks in one step. Positions reach 30 of the context's 64, so chunks cross page boundaries for
// page sizes up to 16.
inline std::vector<mixed_step_plan> mixed_default_plan() {
    return {
        {-1, {{0, 7}, {2, 5}}},
        {-1, {{1, 9}, {0, 1}, {2, 1}}},
        {-1, {{0, 1}, {3, 6}, {2, 3}, {1, 1}}},
        {-1, {{3, 1}, {1, 1}, {0, 1}, {2, 1}}},
        {-1, {{1, 17}, {3, 1}, {0, 1}}},
        {2, {{2, 4}, {0, 1}, {1, 1}, {3, 1}}},
        {-1, {{0, 2}, {1, 1}, {2, 1}, {3, 1}}},
        {-1, {{3, 20}, {2, 16}, {0, 1}}},
    };
}

inline double mixed_row_rel_error(const float* got, const float* want, int64_t n) {
    double max_diff = 0, max_ref = 0;
    for (int64_t i = 0; i < n; ++i) {
        max_diff = std::max(max_diff, std::fabs(double(got[i]) - double(want[i])));
        max_ref  = std::max(max_ref, std::fabs(double(want[i])));
    }
    return max_ref > 0 ? max_diff / max_ref : max_diff;
}

// Runs `plan` with step_mixed on one model and through the separate passes on another (both opened
// with o, 4 slots of 64 positions); slot_lora[s]: slot s's LoRA adapter (set again after a reset;
// empty: none). Every row within k_mixed_rel_tol; *worst gets the largest error seen.
inline void check_mixed_steps(const std::string& dir, const llama_cuda_options& o,
                              const std::vector<int32_t>& slot_lora, double* worst = nullptr,
                              const std::vector<mixed_step_plan>& plan = mixed_default_plan()) {
    const int64_t n_slots = 4, n_ctx = 64;
    auto          m = llama_cuda_model::open(dir, o), r = llama_cuda_model::open(dir, o);
    ASSERT_TRUE(m.is_ok()) << m.error().message();
    ASSERT_TRUE(r.is_ok()) << r.error().message();
    const int64_t V = (*m)->hparams().n_vocab;
    for (auto* x : {&*m, &*r}) {
        GPTQ_EXPECT_OK((*x)->kv_reserve(n_slots, n_ctx));
        for (size_t s = 0; s < slot_lora.size(); ++s) GPTQ_EXPECT_OK((*x)->seq_lora_set(int64_t(s), slot_lora[s]));
    }
    // Token ids: a function of the slot, its position and how often it was reset.
    std::vector<int64_t> gen(size_t(n_slots), 0);
    auto                 id_of = [&](int64_t slot, int64_t pos) {
        return int32_t((31 * pos + 7 * slot + 101 * gen[size_t(slot)] + 3) % V);
    };
    double max_err = 0;
    for (size_t j = 0; j < plan.size(); ++j) {
        const mixed_step_plan& st = plan[j];
        if (st.reset >= 0) {
            ++gen[size_t(st.reset)];
            for (auto* x : {&*m, &*r}) {
                (*x)->seq_reset(st.reset);
                if (size_t(st.reset) < slot_lora.size())
                    GPTQ_EXPECT_OK((*x)->seq_lora_set(st.reset, slot_lora[size_t(st.reset)]));
            }
        }
        const size_t                      n_seg = st.segs.size();
        std::vector<std::vector<int32_t>> ids(n_seg);
        std::vector<llama_cuda_segment>   segs;
        for (size_t i = 0; i < n_seg; ++i) {
            const auto [slot, n] = st.segs[i];
            const int64_t pos    = (*m)->seq_pos(slot);
            ASSERT_EQ(pos, (*r)->seq_pos(slot)) << dir << " step " << j << " slot " << slot;
            for (int64_t t = 0; t < n; ++t) ids[i].push_back(id_of(slot, pos + t));
            segs.push_back({.seq = slot, .ids = ids[i].data(), .n = n});
        }
        std::vector<float> got(n_seg * size_t(V)), want(n_seg * size_t(V));
        GPTQ_EXPECT_OK((*m)->step_mixed(segs.data(), int64_t(n_seg), got.data()));
        // The separate passes: each chunk through prefill_seq, then the one-token ones together.
        std::vector<int32_t> dec_ids;
        std::vector<int64_t> dec_seqs;
        std::vector<size_t>  dec_rows;
        for (size_t i = 0; i < n_seg; ++i) {
            if (segs[i].n > 1) {
                GPTQ_EXPECT_OK((*r)->prefill_seq(segs[i].seq, segs[i].ids, segs[i].n, want.data() + i * size_t(V),
                                                 /*all_logits=*/false));
            } else {
                dec_ids.push_back(segs[i].ids[0]);
                dec_seqs.push_back(segs[i].seq);
                dec_rows.push_back(i);
            }
        }
        if (!dec_ids.empty()) {
            std::vector<float> rows(dec_ids.size() * size_t(V));
            GPTQ_EXPECT_OK((*r)->decode_seqs(dec_ids.data(), dec_seqs.data(), int64_t(dec_ids.size()), rows.data()));
            for (size_t k = 0; k < dec_rows.size(); ++k)
                std::copy_n(rows.data() + k * size_t(V), V, want.data() + dec_rows[k] * size_t(V));
        }
        for (size_t i = 0; i < n_seg; ++i) {
            const double e = mixed_row_rel_error(got.data() + i * size_t(V), want.data() + i * size_t(V), V);
            max_err        = std::max(max_err, e);
            EXPECT_LE(e, k_mixed_rel_tol) << dir << " page " << o.page_size << " step " << j << " row " << i
                                          << " (slot " << segs[i].seq << ", " << segs[i].n << " tokens)";
            EXPECT_EQ((*m)->seq_pos(segs[i].seq), (*r)->seq_pos(segs[i].seq));
        }
        EXPECT_EQ((*m)->kv_pages_used(), (*r)->kv_pages_used()) << dir << " step " << j;
    }
    std::printf("[ mixed ] %s (page %lld): max rel error mixed vs separate passes %.3g\n", dir.c_str(),
                static_cast<long long>(o.page_size), max_err);
    if (worst) *worst = std::max(*worst, max_err);
}

}  // namespace gptq::test
