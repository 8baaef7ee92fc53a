"""Put a fixture of tests/data/interop back together (stdlib only: used on machines without torch
by scripts/device/conformance.py, and by tables.py)."""
import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def assemble(fx, dst):
    """The fixture's files as the peer wrote them (the C++ test does the same, and checks hashes)."""
    for name, e in fx["files"].items():
        if "copy" in e:
            shutil.copy(os.path.join(REPO, e["copy"]), os.path.join(dst, name))
            continue
        with open(os.path.join(REPO, e["stored"]), "rb") as f:
            part = f.read()
        out, taken = bytearray(), 0
        for s in e.get("splice", []):
            gap = s["at"] - len(out)
            out += part[taken:taken + gap]
            taken += gap
            with open(os.path.join(REPO, s["from"]), "rb") as f:
                f.seek(s["offset"])
                out += f.read(s["length"])
        out += part[taken:]
        with open(os.path.join(dst, name), "wb") as f:
            f.write(out)
