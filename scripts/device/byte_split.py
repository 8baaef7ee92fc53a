#!/usr/bin/env python3
"""Lossless packing of a model folder for the GPU machine's 64 MiB transfer limit (bundle.sh packs,
run.sh unpacks). Each *.safetensors file is split into its even and odd bytes (the low and high
bytes of the F16 values: the high bytes, sign + exponent, compress well) and each half is
xz-compressed; other files are copied. Stdlib only.

    byte_split.py pack   MODEL_DIR PACK_DIR
    byte_split.py unpack PACK_DIR  MODEL_DIR
"""
import lzma
import os
import shutil
import sys


def pack(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if not os.path.isfile(path):
            continue
        if not name.endswith(".safetensors"):
            shutil.copyfile(path, os.path.join(dst, name))
            continue
        data = open(path, "rb").read()
        for half, part in (("even", data[0::2]), ("odd", data[1::2])):
            with open(os.path.join(dst, f"{name}.{half}.xz"), "wb") as f:
                f.write(lzma.compress(part, preset=6))


def unpack(src, dst):
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path = os.path.join(src, name)
        if name.endswith(".even.xz"):
            base = name[: -len(".even.xz")]
            even = lzma.decompress(open(path, "rb").read())
            odd = lzma.decompress(open(os.path.join(src, base + ".odd.xz"), "rb").read())
            out = bytearray(len(even) + len(odd))
            out[0::2] = even
            out[1::2] = odd
            with open(os.path.join(dst, base), "wb") as f:
                f.write(out)
        elif not name.endswith(".odd.xz"):
            shutil.copyfile(path, os.path.join(dst, name))


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("pack", "unpack"):
        sys.exit(__doc__)
    (pack if sys.argv[1] == "pack" else unpack)(sys.argv[2], sys.argv[3])
