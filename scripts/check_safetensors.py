#!/usr/bin/env python3
"""Independent safetensors checker (standard library only), used by the io round-trip test.

Reads one .safetensors file or a folder (model.safetensors.index.json + shards, or one file),
validates the layout exactly as the format requires (u64 LE header length, JSON header padded
with spaces, offsets relative to the data region tiling it with no holes or overlaps, byte span =
numel * element size, __metadata__ a string map with "format": "pt", data start 8-byte aligned,
each tensor aligned to its element size), and prints one JSON object:
    {name: {"dtype": ..., "shape": [...], "fnv1a64": "<hex of the tensor bytes>"}}
With --expect FILE it compares against such an object instead and exits 1 on any difference.

    python3 scripts/check_safetensors.py PATH [--expect manifest.json]
"""
import json
import os
import struct
import sys

SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def fail(msg):
    print("check_safetensors: " + msg, file=sys.stderr)
    sys.exit(1)


def read_file(path):
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        fail("%s: shorter than 8 bytes" % path)
    (n,) = struct.unpack("<Q", blob[:8])
    if 8 + n > len(blob):
        fail("%s: header length %d beyond end of file" % (path, n))
    if n % 8 != 0:
        fail("%s: header length %d not a multiple of 8" % (path, n))
    raw = blob[8:8 + n]
    text = raw.decode("utf-8")
    if not text.startswith("{"):
        fail("%s: header does not start with '{'" % path)
    if text != text.rstrip(" ") and not text.rstrip(" ").endswith("}"):
        fail("%s: bad header padding" % path)
    pairs_seen = []
    header = json.loads(text, object_pairs_hook=lambda pairs: pairs_seen.append(pairs) or dict(pairs))
    top_keys = [k for k, _ in pairs_seen[-1]]
    if len(top_keys) != len(set(top_keys)):
        fail("%s: duplicate keys" % path)
    meta = header.pop("__metadata__", None)
    if not isinstance(meta, dict) or meta.get("format") != "pt":
        fail("%s: __metadata__ must hold format=pt, got %r" % (path, meta))
    if not all(isinstance(v, str) for v in meta.values()):
        fail("%s: __metadata__ values must be strings" % path)
    data = blob[8 + n:]
    spans = []
    out = {}
    for name, info in header.items():
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in SIZES:
            fail("%s: %s has unknown dtype %s" % (path, name, dtype))
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * SIZES[dtype]:
            fail("%s: %s span %d != %d" % (path, name, end - begin, numel * SIZES[dtype]))
        if (8 + n + begin) % SIZES[dtype] != 0:
            fail("%s: %s not aligned to %d bytes" % (path, name, SIZES[dtype]))
        spans.append((begin, end, name))
        out[name] = {"dtype": dtype, "shape": shape, "fnv1a64": fnv1a64(data[begin:end])}
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            fail("%s: %s starts at %d, expected %d (hole or overlap)" % (path, name, begin, pos))
        pos = end
    if pos != len(data):
        fail("%s: data region is %d bytes, tensors cover %d" % (path, len(data), pos))
    return out


def read_path(path):
    if os.path.isfile(path):
        return read_file(path)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            idx = json.load(f)
        weight_map = idx["weight_map"]
        out = {}
        total = 0
        for shard in sorted(set(weight_map.values())):
            part = read_file(os.path.join(path, shard))
            for name, info in part.items():
                if weight_map.get(name) != shard:
                    fail("%s: %s in %s but the index says %s" % (index, name, shard, weight_map.get(name)))
                numel = 1
                for d in info["shape"]:
                    numel *= d
                total += numel * SIZES[info["dtype"]]
            out.update(part)
        if set(out) != set(weight_map):
            fail("%s: index names %d tensors, shards hold %d" % (index, len(weight_map), len(out)))
        if idx.get("metadata", {}).get("total_size") != total:
            fail("%s: total_size %r != %d" % (index, idx.get("metadata", {}).get("total_size"), total))
        return out
    return read_file(os.path.join(path, "model.safetensors"))


def main():
    args = sys.argv[1:]
    expect = None
    if "--expect" in args:
        i = args.index("--expect")
        expect = args[i + 1]
        del args[i:i + 2]
    if len(args) != 1:
        fail("usage: check_safetensors.py PATH [--expect manifest.json]")
    got = read_path(args[0])
    if expect is None:
        print(json.dumps(got, indent=1, sort_keys=True))
        return
    with open(expect) as f:
        want = json.load(f)
    if got != want:
        for name in sorted(set(got) | set(want)):
            if got.get(name) != want.get(name):
                fail("tensor %s: got %r, expected %r" % (name, got.get(name), want.get(name)))
    print("check_safetensors: %d tensors match" % len(got))


if __name__ == "__main__":
    main()
