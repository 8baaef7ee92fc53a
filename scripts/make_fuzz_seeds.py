#!/usr/bin/env python3
"""Write the small hand-made seed inputs of the fuzz targets into fuzz/corpus/<target>/.

Seeds from real files (models/tiny-llama, tests/data/model/*) are added by scripts/fuzz.sh at run
time; this script makes what the repo has no small real example of: every safetensors dtype, a
sharded folder, GPTQ modules at 2/3/4/8 bits (v1/v2, act-order g_idx, bias), and small
tokenizer.json files cut down from models/tiny-llama/tokenizer.json plus byte-level ones that use
the pre-tokenizer / decoder settings of the Qwen2 and Llama 3 variants in tests/data/tokenizer;
chat templates (the published ones of tests/data/generate plus arithmetic and slicing corners).
Deterministic: rerunning gives the same bytes. Usage: python3 scripts/make_fuzz_seeds.py
"""
import json
import os
import random
import struct

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "fuzz", "corpus")
SEP = b"\n--gptq-fuzz-part--\n"  # fuzz/fuzz_common.h k_part_separator

DTYPES = {"F64": ("d", 8), "F32": ("f", 4), "F16": ("e", 2), "BF16": (None, 2), "I64": ("q", 8), "I32": ("i", 4),
          "I16": ("h", 2), "I8": ("b", 1), "U8": ("B", 1), "BOOL": ("?", 1)}


def st_bytes(tensors, metadata=None):
    """tensors: list of (name, dtype, shape, raw bytes). Returns a .safetensors image."""
    header = {}
    off = 0
    for name, dt, shape, raw in tensors:
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        off += len(raw)
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(t[3] for t in tensors)


def pack(fmt, values):
    return struct.pack("<" + fmt * len(values), *values)


def write(target, name, data):
    d = os.path.join(OUT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors_seeds(rng):
    ts = []
    for dt, (fmt, size) in DTYPES.items():
        n = 6
        if dt == "BF16":
            raw = b"".join(struct.pack("<f", rng.uniform(-2, 2))[2:] for _ in range(n))
        elif fmt in "dfe":
            raw = pack(fmt, [rng.uniform(-2, 2) for _ in range(n)])
        elif fmt == "?":
            raw = bytes(rng.randint(0, 1) for _ in range(n))
        else:
            raw = pack(fmt, [rng.randint(-100, 100) if fmt.islower() else rng.randint(0, 200) for _ in range(n)])
        ts.append((f"t.{dt.lower()}", dt, [2, 3], raw))
    write("safetensors", "all-dtypes.safetensors", st_bytes(ts, {"format": "pt"}))
    write("safetensors", "scalar-empty.safetensors",
          st_bytes([("s", "F32", [], pack("f", [1.5])), ("e", "F16", [0, 4], b""), ("v", "I32", [3], pack("i", [1, 2, 3]))]))
    write("safetensors", "empty.safetensors", st_bytes([], {"format": "pt"}))
    return ts


def tensor_source_seeds(ts):
    a, b = ts[:5], ts[5:]
    wm = {t[0]: "model-00001-of-00002.safetensors" for t in a}
    wm.update({t[0]: "model-00002-of-00002.safetensors" for t in b})
    index = json.dumps({"metadata": {"total_size": sum(len(t[3]) for t in ts)}, "weight_map": wm}, indent=2).encode()
    parts = [b"model.safetensors.index.json\n" + index,
             b"model-00001-of-00002.safetensors\n" + st_bytes(a),
             b"model-00002-of-00002.safetensors\n" + st_bytes(b)]
    write("tensor_source", "sharded", SEP.join(parts))
    write("tensor_source", "single", b"model.safetensors\n" + st_bytes(ts))
    write("tensor_source", "one-other-file", b"weights.safetensors\n" + st_bytes(ts[:2]))


def pack_codes(codes, bits):
    """Little-endian bit stream of codes cut into int32 words (format.md 1.3)."""
    acc, n, words = 0, 0, []
    for c in codes:
        acc |= c << n
        n += bits
        while n >= 32:
            words.append(acc & 0xFFFFFFFF)
            acc >>= 32
            n -= 32
    return [w - (1 << 32) if w >= (1 << 31) else w for w in words]


def f16(values):
    return pack("e", values)


def gptq_module_seed(rng, bits, n_out, n_in, group, fmt, sym, act_order, bias, hostile=None):
    n_groups = (n_in + group - 1) // group
    maxq = (1 << bits) - 1
    codes = [[rng.randint(0, maxq) for _ in range(n_in)] for _ in range(n_out)]  # [n_out, n_in]
    # qweight [n_in*bits/32, n_out]: column n packs codes[n][0..n_in).
    cols = [pack_codes(codes[n], bits) for n in range(n_out)]
    qweight = [cols[n][r] for r in range(n_in * bits // 32) for n in range(n_out)]
    zeros = [[(1 << (bits - 1)) if sym else rng.randint(1, maxq) for _ in range(n_out)] for _ in range(n_groups)]
    stored = [[z - 1 if fmt == 0 else z for z in row] for row in zeros]
    qzeros = [w for row in stored for w in pack_codes(row, bits)]
    scales = [rng.uniform(0.001, 0.05) for _ in range(n_groups * n_out)]
    g_idx = [k // group for k in range(n_in)]
    if act_order:
        rng.shuffle(g_idx)
    if hostile == "g_idx":  # one column points past the last group
        g_idx[n_in // 2] = n_groups
    if hostile == "zero_groups":  # scales / qzeros with no group at all
        n_groups = 0
        scales, qzeros = [], []
    ts = [("m.qweight", "I32", [n_in * bits // 32, n_out], pack("i", qweight)),
          ("m.qzeros", "I32", [n_groups, n_out * bits // 32], pack("i", qzeros)),
          ("m.scales", "F16", [n_groups, n_out], f16(scales)),
          ("m.g_idx", "I32", [n_in], pack("i", g_idx))]
    if bias:
        ts.append(("m.bias", "F16", [n_out], f16([rng.uniform(-1, 1) for _ in range(n_out)])))
    bits_byte = {2: 0, 3: 1, 4: 2, 8: 3}[bits]
    prefix = bytes([bits_byte, fmt | (0 if sym else 0x80)]) + struct.pack("<hh", n_out, n_in) + b"\0" * 6
    return prefix + st_bytes(ts)


def gptq_module_seeds(rng):
    write("gptq_module", "b4-g32-v1-sym", gptq_module_seed(rng, 4, 64, 64, 32, 0, True, False, False))
    write("gptq_module", "b3-g32-v1-actorder", gptq_module_seed(rng, 3, 32, 64, 32, 0, True, True, False))
    write("gptq_module", "b2-g16-v2-asym-bias", gptq_module_seed(rng, 2, 32, 32, 16, 1, False, False, True))
    write("gptq_module", "b8-g64-v2-asym", gptq_module_seed(rng, 8, 8, 64, 64, 1, False, True, False))
    write("gptq_module", "b4-nogroup-v1", gptq_module_seed(rng, 4, 16, 48, 48, 0, True, False, True))
    write("gptq_module", "hostile-g_idx-out-of-range", gptq_module_seed(rng, 4, 32, 64, 32, 0, True, False, False, "g_idx"))
    write("gptq_module", "hostile-zero-groups", gptq_module_seed(rng, 4, 32, 64, 32, 1, True, False, False, "zero_groups"))


def reduced_llama_tokenizer(n_keep):
    with open(os.path.join(ROOT, "models", "tiny-llama", "tokenizer.json"), encoding="utf-8") as f:
        t = json.load(f)
    vocab = {k: v for k, v in t["model"]["vocab"].items() if v < n_keep}
    merges = []
    for m in t["model"]["merges"]:
        a, b = m.split(" ", 1) if isinstance(m, str) else m
        if a in vocab and b in vocab and a + b in vocab:
            merges.append(m)
    t["model"]["vocab"] = vocab
    t["model"]["merges"] = merges
    return t


def bytes_to_unicode():
    """GPT-2's printable mapping of the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def bytelevel_tokenizer(variant):
    with open(os.path.join(ROOT, "tests", "data", "tokenizer", variant + ".json"), encoding="utf-8") as f:
        top = json.load(f)["build"]["top"]
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: i for i, b in enumerate(range(256))}
    words = ["the", "ing", "and", "hello", "world", "token", "er", "in", "on", "at"]
    merges = []
    for w in words:
        for piece in (w, "Ġ" + w):
            cur = piece[0]
            for ch in piece[1:]:
                if cur + ch not in vocab:
                    merges.append(f"{cur} {ch}")
                    vocab[cur + ch] = len(vocab)
                cur += ch
    added = []
    for i, tok in enumerate(top["added_tokens"]):
        tok = dict(tok, id=len(vocab) + i)
        added.append(tok)
    t = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
         "normalizer": top.get("normalizer"), "pre_tokenizer": top.get("pre_tokenizer"),
         "post_processor": top.get("post_processor"), "decoder": top.get("decoder"),
         "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                   "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                   "vocab": vocab, "merges": merges}}
    # Template processing names tokens by content: point it at the ids given above.
    ids = {tok["content"]: tok["id"] for tok in added}

    def fix(o):
        if isinstance(o, dict):
            if "special_tokens" in o:
                for k, v in o["special_tokens"].items():
                    v["ids"] = [ids.get(x, v["ids"][0]) for x in v["tokens"]]
            for v in o.values():
                fix(v)
        elif isinstance(o, list):
            for v in o:
                fix(v)
    fix(t)
    return t


def tokenizer_seeds():
    small = reduced_llama_tokenizer(600)
    write("tokenizer_json", "llama-600.json", json.dumps(small, ensure_ascii=False))
    with open(os.path.join(ROOT, "tests", "data", "tokenizer", "llama2-metaspace.json"), encoding="utf-8") as f:
        top = json.load(f)["build"]["top"]
    meta = dict(small, **top)
    write("tokenizer_json", "llama-600-metaspace.json", json.dumps(meta, ensure_ascii=False))
    for v in ("bytelevel-qwen2", "bytelevel-llama3"):
        write("tokenizer_json", v + ".json", json.dumps(bytelevel_tokenizer(v), ensure_ascii=False))
    texts = ["Hello world! The tokenizer is here.\n\n  Indented  text\tand tabs.",
             "été, naïve café — “quotes” ‘single’ … 日本語のテキスト 😀🎉",
             "<s> special </s> <unk> <|endoftext|><|im_start|>user\nhi<|im_end|>",
             "x" * 300 + " 1234567890 3.14159 $100 don't I'll we've",
             b"\x00\x01\x7f bytes \xff\xfe invalid utf-8 \xc3\x28 \xe2\x82"]
    for i, s in enumerate(texts):
        for sel in range(6):  # 2 tiny-llama tokenizers + the 4 tokenizer_json seeds (fuzz_tokenizer.cpp)
            raw = s.encode("utf-8") if isinstance(s, str) else s
            write("tokenizer_text", f"text{i}-tok{sel}", bytes([sel]) + raw)


def config_seeds():
    q = {"bits": 4, "group_size": 128, "desc_act": False, "sym": True, "static_groups": False,
         "true_sequential": True, "damp_percent": 0.01, "quant_method": "gptq", "checkpoint_format": "gptq",
         "model_file_base_name": "model", "pack_dtype": "int32", "meta": {"quantizer": ["gptqkit:0.1.0"]}}
    write("config", "quantize_config.json", json.dumps(q, indent=2))
    with open(os.path.join(ROOT, "models", "tiny-llama", "config.json"), encoding="utf-8") as f:
        c = json.load(f)
    c["quantization_config"] = dict(q, bits=3, desc_act=True, checkpoint_format="gptq_v2", sym=False)
    write("config", "config-quantized.json", json.dumps(c, indent=2))
    c4 = {k: v for k, v in c.items() if k not in ("rope_parameters", "quantization_config", "dtype")}
    c4.update({"torch_dtype": "bfloat16", "rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    write("config", "config-tf4-llama3.json", json.dumps(c4, indent=2))


def chat_template_seeds():
    """The published templates of tests/data/generate/chat_templates.json plus the subset's corners."""
    with open(os.path.join(ROOT, "tests", "data", "generate", "chat_templates.json"), encoding="utf-8") as f:
        data = json.load(f)
    for t in data["templates"]:
        write("chat_template", t["name"], t["template"])
    write("chat_template", "arith", "{{ 7 // -2 }}{{ 2 ** 10 }}{{ -(3) }}{{ 1.5 * 2 }}{{ 'ab' * 3 }}"
          "{% for i in range(10, 0, -3) %}{{ i }}{% endfor %}{{ messages | tojson(indent=2) }}")
    write("chat_template", "slices-ns", "{% set ns = namespace(a=0) %}{% for m in messages[::-1][1:3] %}"
          "{% set ns.a = ns.a + 1 %}{{ m.content[1:] | trim }}{% endfor %}{{ ns.a }}")


def device_map_seeds():
    """--max-memory line + --device-map JSON (fuzz/fuzz_plan.cpp: a 4-layer Llama shape)."""
    layers = {f"model.layers.{i}": (0 if i < 2 else 1) for i in range(4)}
    full = dict({"model.embed_tokens": 0}, **layers, **{"model.norm": 1, "lm_head": "cpu"})
    write("device_map", "two-gpus-cpu", "0=8MiB,1=8MiB,cpu=1GiB\n" + json.dumps(full, indent=1))
    write("device_map", "prefixes", "cuda:0=2GB,cpu=64GiB\n" + json.dumps({"model": 0, "model.layers.3": "cuda:1",
                                                                        "lm_head": "cuda"}))
    write("device_map", "auto-tight", "0=3MiB,1=3MiB,2=3MiB\n{}")
    write("device_map", "bad-units", "0=1.5qb,cpu=-1\n" + json.dumps({"": "disk"}))


def main():
    rng = random.Random(1234)
    ts = safetensors_seeds(rng)
    tensor_source_seeds(ts)
    gptq_module_seeds(rng)
    tokenizer_seeds()
    config_seeds()
    chat_template_seeds()
    device_map_seeds()


if __name__ == "__main__":
    main()
