#!/usr/bin/env python3
"""Dequantize a Llama GGUF (any llama.cpp type the `gguf` package dequantizes: F16, Q4_0, Q8_0,
Q2_K .. Q6_K, ...) back into a Hugging Face folder with F32 safetensors, so that `gptq ppl` scores
llama.cpp's quantization with our own protocol (issue 20's size-vs-ppl comparison,
scripts/kquant_compare.sh).

    gguf_to_hf.py MODEL.gguf HF_SOURCE_DIR OUT_DIR

HF_SOURCE_DIR gives config.json and the tokenizer files (copied as they are); OUT_DIR gets
model.safetensors with every tensor of the GGUF under its Hugging Face name. llama.cpp's converter
permutes the rows of q_proj and k_proj for its RoPE layout (LlamaModel.permute: per head, the two
halves interleaved); this script applies the inverse, so an F16 GGUF comes back bit-exact. A tied
model's GGUF holds only token_embd (llama-quantize then gives it the output tensor's type); the
dequantized table is written as embed_tokens and, with tie_word_embeddings, serves as lm_head.
Needs numpy, safetensors and gguf (pip install gguf)."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file

LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(gguf_name):
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    if base in TOP_NAMES:
        return f"{TOP_NAMES[base]}.{suffix}"
    raise SystemExit(f"gguf_to_hf: tensor {gguf_name!r} has no Hugging Face Llama name here")


def unpermute(w, n_head):
    """Inverse of llama.cpp's LlamaModel.permute (rows [n_head, 2, d/2] -> [n_head, d/2, 2])."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    gguf_path, src, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    config = json.loads((src / "config.json").read_text())
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    reader = GGUFReader(gguf_path)
    tensors = {}
    for t in reader.tensors:
        # gguf stores dims innermost first; the HF shape is the reverse.
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        name = hf_name(t.name)
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute(w, n_head)
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute(w, n_kv)
        tensors[name] = np.ascontiguousarray(w)
    if "lm_head.weight" not in tensors and not config.get("tie_word_embeddings", False):
        raise SystemExit(f"gguf_to_hf: {gguf_path} has no output tensor and {src}/config.json is not tied")
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copyfile(f, out / f.name)
    cfg = dict(config, dtype="float32")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    types = sorted({t.tensor_type.name for t in reader.tensors})
    print(f"{gguf_path.name}: {len(tensors)} tensors ({', '.join(types)}) -> {out}")


if __name__ == "__main__":
    main()
