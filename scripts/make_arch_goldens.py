#!/usr/bin/env python3
"""Golden fixtures of the architecture families (docs/architectures.md), made with transformers' own classes.

For each family it builds a small seeded random-weight model (a few layers, the family's real
ratios: GQA, head_dim, fused tensors, ...; vocab 512), saves it with save_pretrained to
tests/data/arch/<name>/ in the family's shipping dtype, and writes next to it:

  config.json          transformers 5 dialect (as save_pretrained writes it)
  config.v4.json       the same config in the transformers 4 dialect (torch_dtype, top-level
                       rope_theta, rope_scaling) for the config parser's tests
  model.safetensors    the weights (F16/BF16)
  golden.safetensors   the goldens, computed in F32 (eager attention), layout below

golden.safetensors (the layout of scripts/device/make_logit_goldens.py, extended; tests/common/
golden.h reads it):
  seq<k>.ids         I32 [n]          a fixed token sequence (ids, no tokenizer), k = 0, 1, ...
  seq<k>.positions   I32 [r]          the rows whose logits are kept
  seq<k>.logits      F32 [r, n_vocab] logits at those positions (one forward over all n ids)
  seq<k>.greedy      I32 [g]          greedy continuation of seq<k>.ids, g new tokens: argmax of a
                                      full forward, token after token (= generate with its KV cache,
                                      checked, except LongRoPE past the switch: see make_one)
  ppl.ids            I32 [n]          the ppl sequence
  ppl.value          F32 [1]          exp(mean NLL of ids[1:] given the prefix), one forward, in double
  __metadata__       model, architecture, source, torch and transformers versions

Run (CPU, a minute): /work/venv/bin/python scripts/make_arch_goldens.py [--only NAME ...]
Deterministic: fixed seeds, F32 CPU compute; rerunning rewrites identical files.
"""
import argparse
import copy
import json
import math
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "device"))
from make_logit_goldens import save_safetensors  # noqa: E402  (the one minimal safetensors writer)

torch.backends.cuda.matmul.allow_tf32 = False
VOCAB = 512


def families():
    """(name, transformers family prefix, config kwargs, storage dtype, sequence lengths, greedy tokens)."""
    common = dict(vocab_size=VOCAB, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, initializer_range=0.05)
    return [
        # Qwen3 (dense): q_norm/k_norm, no bias, head_dim from config with heads * head_dim != hidden
        # (as Qwen3-0.6B/4B), GQA 2:1 ... 4:1, tied embeddings as the small Qwen3s.
        ("qwen3", "Qwen3", dict(common, hidden_size=64, intermediate_size=192, num_hidden_layers=3,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                max_position_embeddings=256, tie_word_embeddings=True,
                                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
         torch.bfloat16, (7, 33, 64), 8),
        # Mistral-Nemo style: head_dim 16 with hidden 96 / 4 heads (q_dim 64 < hidden, as Nemo's
        # 4096 < 5120), GQA 2:1, no sliding window, untied.
        ("mistral-nemo", "Mistral", dict(common, hidden_size=96, intermediate_size=224, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=256, tie_word_embeddings=False,
                                         sliding_window=None,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
         torch.bfloat16, (7, 33, 64), 8),
        # Phi-3-mini: fused qkv_proj / gate_up_proj, n_head_kv = n_head, untied, sliding window on
        # every layer, no rope scaling.
        ("phi3", "Phi3", dict(common, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                              tie_word_embeddings=False, sliding_window=24, pad_token_id=0,
                              rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
         torch.bfloat16, (7, 33, 64), 8),
        # Phi-3.5-mini / Phi-3-mini-128k: LongRoPE with short/long factors; original context 32
        # tokens so the sequences cover short (<= 32), long (> 32) and a greedy run crossing 32.
        ("phi3-longrope", "Phi3", dict(common, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                                       original_max_position_embeddings=32, tie_word_embeddings=False,
                                       sliding_window=None, pad_token_id=0,
                                       rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                                        "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                                        "long_factor": [1.0 + 0.9 * i for i in range(8)],
                                                        "original_max_position_embeddings": 32}),
         torch.bfloat16, (28, 32, 48), 10),
        # Gemma 2: (1 + w) norms, sandwich norms, GeGLU tanh, sqrt(hidden) embedding scale,
        # query_pre_attn_scalar, attention and final soft-capping, alternating sliding windows, tied.
        # query_pre_attn_scalar differs from head_dim (as Gemma-2-27B's 144 vs 128) so a scale of
        # 1/sqrt(head_dim) fails; the caps are scaled to this model's activations (scaled scores
        # up to ~0.9, raw logits up to ~1.9) so that both bind (Gemma 2's own 50 and 30 would
        # change these logits by < 1e-4: a missing soft-cap would pass).
        ("gemma2", "Gemma2", dict(common, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  max_position_embeddings=256, query_pre_attn_scalar=24, sliding_window=8,
                                  final_logit_softcapping=1.0, attn_logit_softcapping=0.5, pad_token_id=0,
                                  hidden_activation="gelu_pytorch_tanh",
                                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
         torch.bfloat16, (7, 33, 64), 8),
        # Gemma 3 (text): as Gemma 2 plus q/k norms, 5 local : 1 global layers with a separate
        # local RoPE base, linear RoPE scaling on the global layers only (as Gemma-3-4B+'s factor 8).
        # attn_logit_softcapping is set but transformers' Gemma 3 ignores it (so must we); the final
        # soft-cap binds (raw logits up to ~1.6).
        ("gemma3", "Gemma3Text", dict(common, hidden_size=64, intermediate_size=192, num_hidden_layers=6,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                      max_position_embeddings=256, query_pre_attn_scalar=24, sliding_window=8,
                                      pad_token_id=0, hidden_activation="gelu_pytorch_tanh",
                                      final_logit_softcapping=1.0, attn_logit_softcapping=0.5,
                                      rope_parameters={
                                          "full_attention": {"rope_type": "linear", "factor": 4.0,
                                                             "rope_theta": 1000000.0},
                                          "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
         torch.bfloat16, (7, 33, 64), 8),
    ]


def config_v4(cfg5):
    """The transformers 4 dialect of a transformers 5 config.json (parser tests only)."""
    c = copy.deepcopy(cfg5)
    if "dtype" in c:
        c["torch_dtype"] = c.pop("dtype")
    rp = c.pop("rope_parameters", None)
    if isinstance(rp, dict) and "full_attention" in rp:  # Gemma 3: global and local bases
        c["rope_theta"] = rp["full_attention"].get("rope_theta")
        c["rope_local_base_freq"] = rp["sliding_attention"].get("rope_theta")
        scaling = {k: v for k, v in rp["full_attention"].items() if k != "rope_theta"}
        c["rope_scaling"] = None if scaling.get("rope_type", "default") == "default" else scaling
    elif isinstance(rp, dict):
        rp = dict(rp)
        c["rope_theta"] = rp.pop("rope_theta")
        rp.pop("partial_rotary_factor", None)
        if rp.get("rope_type", "default") == "default":
            c["rope_scaling"] = None
        else:
            rp["type"] = rp.pop("rope_type")  # the older spelling of the key
            c["rope_scaling"] = rp
    c.pop("layer_types", None)
    c["transformers_version"] = "4.46.0"
    return c


def fixed_ids(n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (n,), generator=g, dtype=torch.int64)
    ids[0] = 1  # BOS
    return ids


@torch.no_grad()
def make_one(name, family, kwargs, store_dtype, lengths, n_greedy, out_root, tweak=None, v4=None):
    """tweak(model): changes the random weights before saving; v4(cfg): config.v4.json (default config_v4)."""
    import transformers
    cfg = getattr(transformers, f"{family}Config")(**kwargs)
    model_cls = getattr(transformers, f"{family.replace('Text', '')}ForCausalLM")  # Gemma3TextConfig: Gemma3ForCausalLM
    torch.manual_seed(sum(name.encode()))  # fixed: hash() is salted per process
    model = model_cls(cfg).eval()
    if tweak:
        tweak(model)
    for pname, p in model.named_parameters():  # norms away from their neutral value, so a wrong
        if "norm" in pname:                    # (1 + w) or a missing norm shows in the logits
            base = 0.0 if "Gemma" in family else 1.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    folder = os.path.join(out_root, name)
    os.makedirs(folder, exist_ok=True)
    model.to(store_dtype).save_pretrained(folder, safe_serialization=True)
    for f in os.listdir(folder):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(folder, f))
    cfg5 = json.load(open(os.path.join(folder, "config.json")))
    with open(os.path.join(folder, "config.v4.json"), "w") as f:
        json.dump((v4 or config_v4)(cfg5), f, indent=2)
        f.write("\n")

    ref = model_cls.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    tensors = {}
    for k, n in enumerate(lengths):
        ids = fixed_ids(n, 1000 + k)
        logits = ref(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].float()
        pos = sorted({0, n // 2, n - 1})
        tensors[f"seq{k}.ids"] = ids.to(torch.int32)
        tensors[f"seq{k}.positions"] = torch.tensor(pos, dtype=torch.int32)
        tensors[f"seq{k}.logits"] = logits[pos].contiguous()
        # Greedy = argmax of a full forward over the sequence so far, token after token (no cache).
        # transformers' generate (KV cache) must agree; it does, except Phi-3 LongRoPE past the
        # short/long switch, where transformers 5.17's cache drop in prepare_inputs_for_generation
        # gives other tokens than its own full forward: the full forward is the reference.
        x, greedy = ids.unsqueeze(0), []
        for _ in range(n_greedy):
            nxt = ref(input_ids=x, use_cache=False).logits[0, -1].argmax()
            greedy.append(int(nxt))
            x = torch.cat([x, nxt.view(1, 1)], dim=1)
        gen = ref.generate(ids.unsqueeze(0), max_new_tokens=n_greedy, do_sample=False, min_new_tokens=n_greedy,
                           pad_token_id=0, eos_token_id=None, use_cache=True)[0, n:].tolist()
        if gen != greedy:
            print(f"{name} seq{k}: generate (KV cache) gives {gen}, the full forward {greedy}")
            assert "longrope" in name, "generate and the full forward disagree on a model without LongRoPE"
        gen = torch.tensor(greedy)
        tensors[f"seq{k}.greedy"] = gen.to(torch.int32).contiguous()
        top2 = torch.topk(logits[-1], 2).values
        print(f"{name} seq{k} n={n} greedy={gen.tolist()} last-row top2 margin={float(top2[0] - top2[1]):.4f}")
    ids = fixed_ids(96 if cfg.max_position_embeddings >= 96 else cfg.max_position_embeddings, 4242)
    logits = ref(input_ids=ids.unsqueeze(0), use_cache=False).logits[0].double()
    lp = torch.log_softmax(logits[:-1], dim=-1)
    nll = -lp.gather(1, ids[1:].unsqueeze(1)).sum().item()
    ppl = math.exp(nll / (ids.numel() - 1))
    tensors["ppl.ids"] = ids.to(torch.int32)
    tensors["ppl.value"] = torch.tensor([ppl], dtype=torch.float32)
    print(f"{name}: ppl {ppl:.6f} over {ids.numel()} tokens")
    save_safetensors(os.path.join(folder, "golden.safetensors"), tensors,
                     {"model": name, "architecture": cfg5["architectures"][0],
                      "source": "transformers F32 eager (scripts/make_arch_goldens.py)",
                      "torch": torch.__version__, "transformers": transformers.__version__})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests",
                                                  "data", "arch"))
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic F32 sums
    for spec in families():
        if args.only and spec[0] not in args.only:
            continue
        make_one(*spec, args.out)


if __name__ == "__main__":
    main()
