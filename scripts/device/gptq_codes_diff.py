#!/usr/bin/env python3
"""Compare the GPTQ codes and scales of two checkpoints of the same model and settings (standard
library only): run.sh uses it on tiny-llama quantized with --device cpu and --device cuda.

    python3 scripts/device/gptq_codes_diff.py DIR_A DIR_B BITS      (BITS 2, 4 or 8)

Reads every "*.qweight" (I32, 32 / BITS codes per word, LSB first, format.md 1.2) and "*.scales"
(F16 bits) of one-file checkpoints (model.safetensors), and prints one JSON line:
{"codes": N, "codes_differing": n, "codes_frac": f, "scales": M, "scales_differing": m, ...}.
3-bit codes cross word boundaries along the input dimension and are not supported here.
"""
import json
import struct
import sys


def tensors(path):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    base = 8 + n
    out = {}
    for name, t in header.items():
        if name == "__metadata__":
            continue
        a, b = t["data_offsets"]
        out[name] = (t["dtype"], blob[base + a:base + b])
    return out


def codes_of(data, bits):
    """All codes of a packed qweight, word by word (the same order for both files)."""
    mask, per = (1 << bits) - 1, 32 // bits
    for (w,) in struct.iter_unpack("<I", data):
        for k in range(per):
            yield (w >> (bits * k)) & mask


def main():
    a, b, bits = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if bits not in (2, 4, 8):
        sys.exit("gptq_codes_diff: bits %d not supported (2, 4 or 8)" % bits)
    ta, tb = tensors(a + "/model.safetensors"), tensors(b + "/model.safetensors")
    n_codes = d_codes = n_scales = d_scales = 0
    worst = ("", 0.0)
    for name in sorted(ta):
        if name not in tb:
            continue
        da, db = ta[name][1], tb[name][1]
        if name.endswith(".qweight"):
            n = d = 0
            for x, y in zip(codes_of(da, bits), codes_of(db, bits)):
                n += 1
                d += x != y
            n_codes += n
            d_codes += d
            if n and d / n > worst[1]:
                worst = (name, d / n)
        elif name.endswith(".scales"):
            for x, y in zip(struct.iter_unpack("<H", da), struct.iter_unpack("<H", db)):
                n_scales += 1
                d_scales += x != y
    print(json.dumps({"codes": n_codes, "codes_differing": d_codes, "codes_frac": d_codes / max(1, n_codes),
                      "scales": n_scales, "scales_differing": d_scales,
                      "scales_frac": d_scales / max(1, n_scales), "worst_tensor": worst[0],
                      "worst_codes_frac": worst[1]}))


if __name__ == "__main__":
    main()
