#!/usr/bin/env python3
"""Placeholder weights of a real checkpoint's shape (issue 22, scripts/device/cpu_bench.sh).

  placeholder_weights.py headers SRC_DIR DST_DIR   # here: the model's small files + each shard's header only
  placeholder_weights.py fill DIR                  # there: every *.safetensors.header -> *.safetensors

A CPU speed benchmark does not depend on the weights' values, and the real files are too large to
carry to the GPU machine, so `fill` writes each tensor of the recorded headers with seeded random
F16/BF16/F32 values of N(0, 0.02) (norm weights: ones), the same layout byte for byte as the
original shards. Standard library only (the device has no numpy).
"""
import json
import os
import random
import shutil
import struct
import sys


def headers(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        p = os.path.join(src, name)
        if not os.path.isfile(p):
            continue
        if name.endswith(".safetensors"):
            with open(p, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                head = f.read(n)
            with open(os.path.join(dst, name + ".header"), "wb") as f:
                f.write(struct.pack("<Q", n) + head)
        else:
            shutil.copy(p, dst)


def pool_bytes(dtype, count, rng):
    """count values of N(0, 0.02) as little-endian bytes of dtype."""
    vals = [rng.gauss(0.0, 0.02) for _ in range(count)]
    if dtype == "F16":
        return struct.pack("<%de" % count, *vals)
    f32 = struct.pack("<%df" % count, *vals)
    if dtype == "F32":
        return f32
    if dtype == "BF16":  # the high halves of the F32 values
        return b"".join(f32[i + 2:i + 4] for i in range(0, len(f32), 4))
    raise SystemExit(f"placeholder_weights: dtype {dtype} not supported")


def ones_bytes(dtype, count):
    one = {"F16": b"\x00\x3c", "BF16": b"\x80\x3f", "F32": struct.pack("<f", 1.0)}[dtype]
    return one * count


def fill(folder):
    rng = random.Random(0)
    pools = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors.header"):
            continue
        with open(os.path.join(folder, name), "rb") as f:
            raw = f.read()
        n = struct.unpack("<Q", raw[:8])[0]
        head = json.loads(raw[8:8 + n])
        tensors = sorted(((k, v) for k, v in head.items() if k != "__metadata__"),
                         key=lambda kv: kv[1]["data_offsets"][0])
        out = os.path.join(folder, name[: -len(".header")])
        with open(out, "wb") as f:
            f.write(raw[:8 + n])
            pos = 0
            for key, t in tensors:
                a, b = t["data_offsets"]
                assert a == pos, f"{name}: {key} starts at {a}, expected {pos}"
                dt = t["dtype"]
                size = {"F16": 2, "BF16": 2, "F32": 4}[dt]
                count = (b - a) // size
                if "norm" in key:
                    f.write(ones_bytes(dt, count))
                else:
                    if dt not in pools:  # 1 Mi values, repeated with a random start per tensor
                        pools[dt] = pool_bytes(dt, 1 << 20, rng)
                    pool = pools[dt]
                    start = rng.randrange(0, 1 << 20) * size
                    need = b - a
                    chunk = pool[start:] + pool[:start]
                    while need > 0:
                        f.write(chunk[:need])
                        need -= min(need, len(chunk))
                pos = b
        os.remove(os.path.join(folder, name))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "headers":
        headers(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3 and sys.argv[1] == "fill":
        fill(sys.argv[2])
    else:
        raise SystemExit(__doc__)
