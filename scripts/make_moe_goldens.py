#!/usr/bin/env python3
"""Golden fixtures of the mixture-of-experts families (docs/architectures.md "Mixture of experts").

Small seeded random-weight models built with transformers' own MixtralForCausalLM,
Qwen2MoeForCausalLM and Qwen3MoeForCausalLM, saved with save_pretrained (transformers 5.17 writes
one linear per expert, the names GPTQModel keeps: block_sparse_moe.experts.E.w1/w2/w3,
mlp.experts.E.gate_proj/up_proj/down_proj, never its in-memory stacked experts.gate_up_proj) to
tests/data/moe/<name>/, with the goldens of scripts/make_arch_goldens.py (its make_one: logits
of fixed sequences, greedy continuations, ppl; layout in its docstring) and config.v4.json, the
transformers 4 dialect (num_experts for Qwen3-MoE instead of 5's num_local_experts).

The routers are drawn wider than the initializer (std 0.5) so that the top-k choice of every
token is decided by a clear margin (a near tie would make the goldens depend on summation order).

Run (CPU, < 1 minute): /work/venv/bin/python scripts/make_moe_goldens.py [--only NAME ...]
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_arch_goldens as arch  # noqa: E402


def families():
    common = dict(vocab_size=arch.VOCAB, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, initializer_range=0.05,
                  tie_word_embeddings=False, max_position_embeddings=256)
    return [
        # Mixtral: 8 experts, top-2 renormalised, GQA 2:1, no sliding window.
        ("mixtral", "Mixtral", dict(common, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=8,
                                    num_experts_per_tok=2, sliding_window=None,
                                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
         torch.bfloat16, (7, 33, 64), 8),
        # Qwen2-MoE: 8 experts top-2 without renormalisation, a shared expert with its sigmoid gate,
        # q/k/v biases, layer 1 dense (mlp_only_layers) with intermediate_size.
        ("qwen2-moe", "Qwen2Moe", dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, num_experts=8,
                                       num_experts_per_tok=2, moe_intermediate_size=32,
                                       shared_expert_intermediate_size=96, norm_topk_prob=False,
                                       mlp_only_layers=[1], decoder_sparse_step=1,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
         torch.bfloat16, (7, 33, 64), 8),
        # Qwen3-MoE: q/k norms, head_dim 32 with hidden 64, 8 experts top-4 renormalised
        # (norm_topk_prob, as Qwen3-30B-A3B), every other layer sparse (decoder_sparse_step 2).
        ("qwen3-moe", "Qwen3Moe", dict(common, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                       num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
                                       norm_topk_prob=True, decoder_sparse_step=2,
                                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
         torch.bfloat16, (7, 33, 64), 8),
    ]


def config_v4(cfg5):
    c = arch.config_v4(cfg5)
    if c.get("model_type") == "qwen3_moe" and "num_local_experts" in c:
        c["num_experts"] = c.pop("num_local_experts")
    return c


@torch.no_grad()
def widen_routers(model):
    g = torch.Generator().manual_seed(7)
    for name, p in model.named_parameters():
        if name.endswith(("mlp.gate.weight", "block_sparse_moe.gate.weight", "shared_expert_gate.weight")):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                  "data", "moe"))
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic F32 sums
    for spec in families():
        if args.only and spec[0] not in args.only:
            continue
        arch.make_one(*spec, args.out, tweak=widen_routers, v4=config_v4)


if __name__ == "__main__":
    main()
