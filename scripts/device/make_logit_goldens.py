#!/usr/bin/env python3
"""Golden logits for the C++ model runtime, computed with transformers (F32 compute).

For each real model (the bundled tiny-llama and the models in ../shared/models) it feeds a few
fixed token-id sequences (ids directly, no tokenizer) and saves the full logits at a few positions
plus the hidden state after decoder layer 0. It also builds small random-weight checkpoints that
cover what the trained models do not (Qwen2 q/k/v biases and sliding window, Mistral sliding
window, attention biases, untied embeddings, head_dim != hidden/heads, RoPE scaling linear /
dynamic / llama3, F32/F16/BF16 storage) and saves their full logits.

Outputs go to OUT (default $OUT): <model>.golden.safetensors, rand-*/ folders, wikitext ids, and a
log with perplexities. Fixture files are written with plain struct + json (no safetensors package).

Run on a machine with torch + transformers 5, e.g. the device machine:
  python3 scripts/device/make_logit_goldens.py --models models/tiny-llama .device-carry/models/small-llama
"""
import argparse
import json
import math
import os
import struct
import sys
import time
import traceback

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

DTYPES = {torch.float32: "F32", torch.int32: "I32", torch.float16: "F16", torch.bfloat16: "BF16"}


def save_safetensors(path, tensors, metadata):
    """Minimal safetensors writer: header JSON padded to 8 bytes, then the raw tensors."""
    header = {"__metadata__": {k: str(v) for k, v in metadata.items()}}
    blobs = []
    offset = 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype in (torch.float16, torch.bfloat16):
            raw = t.view(torch.int16).numpy().tobytes()
        else:
            raw = t.numpy().tobytes()
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    hj = json.dumps(header, separators=(",", ":")).encode()
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


def fixed_sequences(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for n in (7, 33, 100):
        ids = torch.randint(3, vocab, (n,), generator=g, dtype=torch.int64)
        ids[0] = 1  # BOS, as the tokenizer would put it
        seqs.append(ids)
    return seqs


@torch.no_grad()
def forward_f32(model, ids):
    out = model(input_ids=ids.unsqueeze(0), output_hidden_states=True, use_cache=False)
    return out.logits[0].float(), [h[0].float() for h in out.hidden_states]


def load_f32(path, device="cpu"):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    return m.to(device).eval()


def golden_real_model(path, out_dir, log):
    name = os.path.basename(os.path.normpath(path))
    model = load_f32(path)
    vocab = model.config.vocab_size
    tensors = {}
    for k, ids in enumerate(fixed_sequences(vocab, 1234)):
        logits, hidden = forward_f32(model, ids)
        n = ids.numel()
        pos = sorted({0, n // 2, n - 1}) if n < 100 else [50, n - 1]
        tensors[f"seq{k}.ids"] = ids.to(torch.int32)
        tensors[f"seq{k}.positions"] = torch.tensor(pos, dtype=torch.int32)
        tensors[f"seq{k}.logits"] = logits[pos].contiguous()
        if k == 1:
            tensors[f"seq{k}.hidden_after_layer0"] = hidden[1].contiguous()
        log(f"{name} seq{k} n={n} logits[{pos[-1]}][:4]={logits[pos[-1], :4].tolist()}")
    save_safetensors(os.path.join(out_dir, f"{name}.golden.safetensors"), tensors,
                     {"model": name, "source": "transformers F32 eager"})
    return model


@torch.no_grad()
def wikitext_ppl(model, ids, seqlen, max_windows=None, device="cpu"):
    n_windows = ids.numel() // seqlen
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    nll_sum = 0.0
    count = 0
    model = model.to(device)
    for w in range(n_windows):
        x = ids[w * seqlen:(w + 1) * seqlen].unsqueeze(0).to(device)
        logits = model(input_ids=x, use_cache=False).logits[0].double()
        lp = torch.log_softmax(logits[:-1], dim=-1)
        nll = -lp.gather(1, x[0, 1:].unsqueeze(1)).sum().item()
        nll_sum += nll
        count += seqlen - 1
    return math.exp(nll_sum / count), n_windows, count


def random_models():
    """(name, config class, kwargs, storage dtype, seq len) for the random-weight checkpoints."""
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, hidden_act="silu",
                  bos_token_id=1, eos_token_id=2, initializer_range=0.25)
    return [
        ("rand-qwen2", "Qwen2", dict(common, max_position_embeddings=64, tie_word_embeddings=False,
                                     use_sliding_window=True, sliding_window=6, max_window_layers=1,
                                     rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
         torch.bfloat16, 20),
        ("rand-mistral", "Mistral", dict(common, max_position_embeddings=64, tie_word_embeddings=True,
                                         sliding_window=5, head_dim=8,
                                         rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                          "rope_theta": 10000.0}),
         torch.float32, 20),
        ("rand-llama3", "Llama", dict(common, max_position_embeddings=64, tie_word_embeddings=False,
                                      attention_bias=True, head_dim=16,
                                      rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 32,
                                                       "rope_theta": 10000.0}),
         torch.float16, 24),
        ("rand-dynamic", "Llama", dict(common, max_position_embeddings=16, tie_word_embeddings=True,
                                       rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                        "rope_theta": 10000.0}),
         torch.float16, 24),
    ]


def make_random_model(name, family, kwargs, store_dtype, n_tokens, out_dir, log):
    import transformers
    cfg_cls = getattr(transformers, f"{family}Config")
    model_cls = getattr(transformers, f"{family}ForCausalLM")
    try:
        cfg = cfg_cls(**kwargs)
    except TypeError:
        kw = dict(kwargs)
        rp = kw.pop("rope_parameters")
        kw["rope_theta"] = rp.pop("rope_theta")
        if rp["rope_type"] != "default":
            kw["rope_scaling"] = rp
        cfg = cfg_cls(**kw)
    torch.manual_seed(sum(name.encode()))  # fixed: hash() is salted per process
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif "norm" in pname:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    folder = os.path.join(out_dir, name)
    model.to(store_dtype).save_pretrained(folder, safe_serialization=True)
    log(f"{name}: config {open(os.path.join(folder, 'config.json')).read()}")
    ref = load_f32(folder)
    log(f"{name}: rope_type used = {getattr(ref.model.rotary_emb, 'rope_type', '?')}, "
        f"layer_types = {getattr(ref.config, 'layer_types', None)}, "
        f"sliding_window = {getattr(ref.config, 'sliding_window', None)}")
    g = torch.Generator().manual_seed(77)
    ids = torch.randint(3, kwargs["vocab_size"], (n_tokens,), generator=g, dtype=torch.int64)
    ids[0] = 1
    logits, hidden = forward_f32(ref, ids)
    save_safetensors(os.path.join(folder, "golden.safetensors"),
                     {"seq0.ids": ids.to(torch.int32),
                      "seq0.positions": torch.arange(n_tokens, dtype=torch.int32),
                      "seq0.logits": logits.contiguous(),
                      "seq0.hidden_after_layer0": hidden[1].contiguous()},
                     {"model": name, "source": "transformers F32 eager", "transformers": transformers.__version__})
    for f in os.listdir(folder):
        if f not in ("config.json", "model.safetensors", "golden.safetensors"):
            os.remove(os.path.join(folder, f))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", required=True)
    ap.add_argument("--wikitext", default="data/wikitext2/wiki.test.raw.gptq_join.txt")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    log_f = open(os.path.join(args.out, "goldens.log"), "w")

    def log(msg):
        print(msg, flush=True)
        log_f.write(msg + "\n")
        log_f.flush()

    import transformers
    log(f"torch {torch.__version__} transformers {transformers.__version__}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {}
    for path in args.models:
        name = os.path.basename(os.path.normpath(path))
        try:
            t0 = time.time()
            model = golden_real_model(path, args.out, log)
            log(f"{name}: goldens in {time.time() - t0:.1f} s")
        except Exception:
            log(f"{name}: FAILED goldens\n{traceback.format_exc()}")
            continue
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(path)
            text = open(args.wikitext, encoding="utf-8").read()
            ids = tok(text, return_tensors="pt").input_ids[0]
            log(f"{name}: tokenizer {type(tok).__name__}, {ids.numel()} tokens, first {ids[:12].tolist()}")
            ids_path = os.path.join(args.out, "wikitext2.ids.i32")
            if os.path.exists(ids_path):
                same = open(ids_path, "rb").read() == ids.to(torch.int32).numpy().tobytes()
                log(f"{name}: wikitext ids identical to the previous model's: {same}")
            else:
                with open(ids_path, "wb") as f:
                    f.write(ids.to(torch.int32).numpy().tobytes())
            r = {"n_tokens": ids.numel()}
            for seqlen, mw in ((512, 4), (512, None), (2048, None), (128, 3)):
                t0 = time.time()
                ppl, nw, cnt = wikitext_ppl(model, ids, seqlen, mw, device)
                key = f"ppl_seqlen{seqlen}" + (f"_windows{mw}" if mw else "")
                r[key] = ppl
                log(f"{name}: {key} = {ppl:.6f} ({nw} windows, {cnt} predicted, {time.time() - t0:.1f} s)")
            results[name] = r
        except Exception:
            log(f"{name}: FAILED ppl\n{traceback.format_exc()}")
    for spec in random_models():
        try:
            make_random_model(*spec, args.out, log)
        except Exception:
            log(f"{spec[0]}: FAILED\n{traceback.format_exc()}")
    with open(os.path.join(args.out, "ppl.json"), "w") as f:
        json.dump(results, f, indent=1)
    log(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
