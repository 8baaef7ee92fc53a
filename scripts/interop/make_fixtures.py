#!/usr/bin/env python3
"""Checkpoints written by the peers' own quantizers, packers and save functions, for
tests/model/test_interop_fixtures.cpp (issue 15 item 5; docs/interop.md says how to rerun).

Base model: the bundled models/tiny-llama cut to its first BASE_LAYERS decoder layers (same
embedding, norms, tokenizer), so that each fixture adds under 2 MB of new bytes. Every fixture is
made on the CPU, read back by the peers' readers (interop_common.py) on the first MAX_WINDOWS
windows of SEQLEN tokens of WikiText-2 test (the test runs `gptq ppl` with the same flags), and
stored under tests/data/interop/NAME/ with fixture.json:
  - expect_ppl: the producer's own reader's perplexity (expect_reader names it); every reader's
    result (or its error) is under readers, for the record;
  - files: every file as the peer wrote it, with its size and FNV-1a 64 hash. To keep the repo
    small, a file byte-identical to a file of models/tiny-llama or of an earlier fixture is not
    stored again ("copy"), and a .safetensors file is stored without the byte ranges that equal a
    tensor of models/tiny-llama/model.safetensors (the embedding: 4 MiB) as NAME.part with a
    "splice" list; the test puts the exact file back together and checks size and hash.

Producers:
  gptqmodel  GPTQModel.load(base, QuantizeConfig(..), dtype=float16) .quantize(paragraphs) .save(out)
  autogptq   AutoGPTQ 0.7.1's GPTQ class (quantization/gptq.py) and QuantLinear.pack, driven layer by
             layer as its BaseGPTQForCausalLM.quantize does, and saved as its save_quantized does
             (gptq_model-{bits}bit-{group}g.safetensors with its metadata, config.json with
             quantization_config, quantize_config.json). Its package cannot be imported under
             transformers 5 (see interop_common.py), so this script drives its files itself; the
             quantization and packing arithmetic is theirs.

  /work/venv/bin/python scripts/interop/make_fixtures.py [--only NAME,...] [--keep-work DIR]
"""
import argparse
import importlib
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import interop_common as ic  # noqa: E402

import torch  # noqa: E402

BASE = os.path.join(ic.REPO, "models/tiny-llama")
OUT_ROOT = os.path.join(ic.REPO, "tests/data/interop")
BASE_LAYERS = 2
SEQLEN = 512  # tiny-llama was trained at 512
MAX_WINDOWS = 16
N_CALIB = 64  # paragraphs of data/calib/corpus-sample.txt (training-domain text, no WikiText)
CALIB_MAX_TOKENS = 512
SPLICE_MIN_BYTES = 64 * 1024

# name -> producer, its settings, what it exercises
FIXTURES = {
    "gptqmodel-w4-act-order": dict(
        producer="gptqmodel", qcfg=dict(bits=4, group_size=128, desc_act=True, sym=True),
        about="4-bit g128 act-order (desc_act, g_idx permuted), v1 zeros, GPTQModel's layout"),
    "gptqmodel-w3": dict(
        producer="gptqmodel", qcfg=dict(bits=3, group_size=128, desc_act=False, sym=True),
        about="3-bit g128 (values across int32 words)"),
    "gptqmodel-w8": dict(
        producer="gptqmodel", qcfg=dict(bits=8, group_size=128, desc_act=False, sym=True),
        about="8-bit g128"),
    "gptqmodel-asym-v2": dict(
        producer="gptqmodel", qcfg=dict(bits=4, group_size=128, desc_act=False, sym=False, format="gptq_v2"),
        about="4-bit g128 asymmetric, saved with checkpoint_format gptq_v2 (zeros stored as is)"),
    "gptqmodel-lm-head": dict(
        producer="gptqmodel", qcfg=dict(bits=4, group_size=128, desc_act=False, sym=True, lm_head=True),
        untied=True, expect_reader="gptqmodel",
        about="4-bit g128 with lm_head quantized too; the base is untied (lm_head.weight a copy of the "
              "embedding, tie_word_embeddings false): GPTQModel refuses lm_head on a tied model. "
              "Only GPTQModel's own loader reads it right (transformers + optimum leave lm_head a "
              "plain Linear whose weight is missing from the file)"),
    "gptqmodel-sharded": dict(
        producer="gptqmodel", qcfg=dict(bits=4, group_size=64, desc_act=False, sym=True),
        save=dict(max_shard_size="300KB"),
        about="4-bit g64 saved in shards of at most 300 KB with model.safetensors.index.json"),
    "autogptq-w4-act-order": dict(
        producer="autogptq", qcfg=dict(bits=4, group_size=128, desc_act=True, sym=True, damp_percent=0.01),
        about="AutoGPTQ 0.7.1 layout: gptq_model-4bit-128g.safetensors, quantize_config.json with "
              "model_file_base_name null, a zero bias for every linear, act-order"),
}
# Not a producer's output: the gptqmodel-asym-v2 tensors with both config files relabelled
# checkpoint_format "gptq" (v1), as a hand edit or a converting tool leaves them. Its expected
# perplexity is the correctly labelled file's: a reader must go by the data (issue 15 item 2).
MISLABELLED = ("gptqmodel-asym-v2-labelled-v1", "gptqmodel-asym-v2")


# ---------------------------------------------------------------- inputs


def make_base(dst, untied=False):
    """models/tiny-llama cut to BASE_LAYERS layers; untied: with lm_head.weight, a copy of the
    embedding, and tie_word_embeddings false (GPTQModel quantizes lm_head only when untied)."""
    from safetensors.torch import load_file, save_file

    cfg = ic.read_json(os.path.join(BASE, "config.json"))
    cfg["num_hidden_layers"] = BASE_LAYERS
    if untied:
        cfg["tie_word_embeddings"] = False
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    st = load_file(os.path.join(BASE, "model.safetensors"))
    keep = {k: v for k, v in st.items() if not k.startswith("model.layers.") or int(k.split(".")[2]) < BASE_LAYERS}
    if untied:
        keep["lm_head.weight"] = keep["model.embed_tokens.weight"].clone()
    save_file(keep, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    for name in os.listdir(BASE):
        if name not in ("config.json", "model.safetensors", "training_info.json"):
            shutil.copy(os.path.join(BASE, name), dst)


def calibration_paragraphs():
    with open(os.path.join(ic.REPO, "data/calib/corpus-sample.txt"), encoding="utf-8") as f:
        paras = [p.strip() for p in f.read().split("\n\n")]
    return [p for p in paras if len(p) > 200][:N_CALIB]


# ---------------------------------------------------------------- GPTQModel


def produce_gptqmodel(base, out, spec):
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(**spec["qcfg"])
    cwd = os.getcwd()
    os.chdir(os.path.dirname(out))  # GPTQModel writes a logs/ folder into the working directory
    try:
        model = GPTQModel.load(base, qcfg, device="cpu", dtype=torch.float16)
        model.quantize(calibration_paragraphs(), batch_size=1)
        model.save(out, **spec.get("save", {}))
    finally:
        os.chdir(cwd)


# ---------------------------------------------------------------- AutoGPTQ 0.7.1


def autogptq_quantization_modules():
    """auto_gptq/quantization/{quantizer,gptq}.py as a package of their own (no auto_gptq __init__)."""
    spec = importlib.util.find_spec("auto_gptq")
    root = os.path.join(list(spec.submodule_search_locations)[0], "quantization")
    pkg = types.ModuleType("autogptq_quantization")
    pkg.__path__ = [root]
    sys.modules["autogptq_quantization"] = pkg
    return importlib.import_module("autogptq_quantization.gptq")


LLAMA_SEQUENTIAL = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
                    ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]  # AutoGPTQ's LlamaGPTQForCausalLM


class _StopForward(Exception):
    pass


@torch.inference_mode()
def produce_autogptq(base, out, spec):
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gptq_mod = autogptq_quantization_modules()
    q = dict(spec["qcfg"])
    bits, group, desc_act, sym, damp = q["bits"], q["group_size"], q["desc_act"], q["sym"], q["damp_percent"]
    # fasterquant ends with torch.cuda.synchronize(), which fails on a machine without a GPU.
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float16).eval()  # from_pretrained's default
    examples = [tok(p, return_tensors="pt").input_ids[:, :CALIB_MAX_TOKENS] for p in calibration_paragraphs()]

    # Inputs of layer 0 for every example (AutoGPTQ's LayerHijacker).
    layers = model.model.layers
    captured = []

    def grab(_mod, args, kwargs):
        captured.append((args[0] if args else kwargs.pop("hidden_states"), kwargs))
        raise _StopForward

    h = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    for ids in examples:
        try:
            model(input_ids=ids, use_cache=False)
        except _StopForward:
            pass
    h.remove()

    quantizers = {}
    for i, layer in enumerate(layers):
        full = {n: m for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        for names in LLAMA_SEQUENTIAL:
            gptq = {}
            for n in names:
                gptq[n] = gptq_mod.GPTQ(full[n])
                gptq[n].quantizer.configure(bits, perchannel=True, sym=sym, mse=False)
            hooks = [full[n].register_forward_hook(
                (lambda n: lambda _m, inp, outp: gptq[n].add_batch(inp[0].data, outp.data))(n)) for n in names]
            for hs, kw in captured:
                layer(hs, **kw)
            for hk in hooks:
                hk.remove()
            for n in names:
                scale, zero, g_idx = gptq[n].fasterquant(percdamp=damp, group_size=group, actorder=desc_act,
                                                         static_groups=False)
                quantizers[f"model.layers.{i}.{n}"] = (scale, zero, g_idx)
                gptq[n].free()
        # Outputs of the quantized layer feed the next one.
        nxt = []
        for hs, kw in captured:
            o = layer(hs, **kw)
            nxt.append((o[0] if isinstance(o, tuple) else o, kw))
        captured = nxt

    # pack_model: QuantLinear per quantized linear (bias=True, as make_quant makes them), pack on CPU.
    kind = "cuda_old" if (not desc_act or group == -1) else "cuda"
    QuantLinear = ic.autogptq_quantlinear(kind)
    for name, (scale, zero, g_idx) in quantizers.items():
        lin = model.get_submodule(name)
        ql = QuantLinear(bits, group, lin.in_features, lin.out_features, True, weight_dtype=lin.weight.dtype)
        ql.pack(lin, scale, zero, g_idx)
        parent, child = name.rsplit(".", 1)
        setattr(model.get_submodule(parent), child, ql)

    # save_quantized
    os.makedirs(out, exist_ok=True)
    qc = {"bits": bits, "group_size": group, "damp_percent": damp, "desc_act": desc_act, "static_groups": False,
          "sym": sym, "true_sequential": True, "model_name_or_path": None, "model_file_base_name": None,
          "is_marlin_format": False, "quant_method": "gptq"}
    base_name = f"gptq_model-{bits}bit-{group}g"
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", "auto_gptq_version": ic.autogptq_version(), "gptq_bits": str(bits),
            "gptq_group_size": str(group), "gptq_desc_act": str(desc_act), "gptq_damp_percent": str(damp),
            "gptq_is_marlin_format": "False"}
    save_file(state, os.path.join(out, base_name + ".safetensors"), metadata=meta)
    model.config.quantization_config = qc
    model.config.save_pretrained(out)
    with open(os.path.join(out, "quantize_config.json"), "w", encoding="utf-8") as f:
        json.dump(qc, f, indent=2)
    # AutoGPTQ's save_quantized writes no tokenizer: the user copies the original's files beside.
    for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(base, name), out)


# ---------------------------------------------------------------- storing


def fnv1a64(data):
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def safetensors_ranges(data):
    """name -> (absolute offset, length, dtype, shape) of every tensor of a safetensors file's bytes."""
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    start = 8 + n
    return {k: (start + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0], v["dtype"], v["shape"])
            for k, v in header.items() if k != "__metadata__"}


class Store:
    """Writes a fixture's files with copy/splice de-duplication (module doc)."""

    def __init__(self):
        with open(os.path.join(BASE, "model.safetensors"), "rb") as f:
            self.base_bytes = f.read()
        self.base_tensors = {}
        for k, (off, ln, _dt, _sh) in safetensors_ranges(self.base_bytes).items():
            if ln >= SPLICE_MIN_BYTES:
                self.base_tensors[self.base_bytes[off:off + ln]] = off
        self.known = {}  # fnv -> repo-relative path of a stored identical file
        self.known_spliced = {}  # fnv -> {"stored", "splice"} of an identical spliced file
        for name in sorted(os.listdir(BASE)):
            with open(os.path.join(BASE, name), "rb") as f:
                self.known.setdefault(fnv1a64(f.read()), f"models/tiny-llama/{name}")

    def add(self, src_dir, fx_dir):
        files = {}
        os.makedirs(fx_dir, exist_ok=True)
        rel_fx = os.path.relpath(fx_dir, ic.REPO)
        for name in sorted(os.listdir(src_dir)):
            path = os.path.join(src_dir, name)
            if not os.path.isfile(path) or name == "fixture.json":
                continue
            with open(path, "rb") as f:
                data = f.read()
            h = fnv1a64(data)
            entry = {"size": len(data), "fnv1a64": h}
            cuts = self._splices(data) if name.endswith(".safetensors") else []
            if h in self.known:
                entry["copy"] = self.known[h]
            elif h in self.known_spliced:  # the same .part and splice list as an earlier fixture's file
                entry.update(self.known_spliced[h])
            elif cuts:
                part, last = bytearray(), 0
                for at, ln, src_off in cuts:
                    part += data[last:at]
                    last = at + ln
                part += data[last:]
                with open(os.path.join(fx_dir, name + ".part"), "wb") as f:
                    f.write(part)
                entry["stored"] = f"{rel_fx}/{name}.part"
                entry["splice"] = [{"at": at, "length": ln, "from": "models/tiny-llama/model.safetensors",
                                    "offset": src_off} for at, ln, src_off in cuts]
                self.known_spliced[h] = {"stored": entry["stored"], "splice": entry["splice"]}
            else:
                shutil.copy(path, os.path.join(fx_dir, name))
                entry["stored"] = f"{rel_fx}/{name}"
                self.known[h] = entry["stored"]
            files[name] = entry
        return files

    def _splices(self, data):
        """(offset, length, offset in the base file) of each large tensor equal to one of the base's."""
        cuts = []
        for _k, (off, ln, _dt, _sh) in sorted(safetensors_ranges(data).items(), key=lambda kv: kv[1][0]):
            src = self.base_tensors.get(data[off:off + ln]) if ln >= SPLICE_MIN_BYTES else None
            if src is not None:
                cuts.append((off, ln, src))
        return cuts


# ---------------------------------------------------------------- readers' perplexity


def reader_results(folder, ids, readers):
    out = {}
    for reader in readers:
        try:
            model = ic.load(reader, folder)
            r = ic.perplexity(model, ids, SEQLEN, MAX_WINDOWS)
            out[reader] = {"ppl": r["ppl"], "nll_mean": r["nll_mean"], "n_windows": r["n_windows"],
                           "dtype": "float16" if reader == "gptqmodel" else "float32"}
            del model
        except Exception as e:  # noqa: BLE001 - a refusal is a result worth recording
            out[reader] = {"error": ic.short_error(e)}
        ic.log(f"  {reader}: {out[reader]}")
    return out


def relabel_v1(src, dst):
    shutil.copytree(src, dst)
    for name in ("config.json", "quantize_config.json"):
        p = os.path.join(dst, name)
        d = ic.read_json(p)
        q = d["quantization_config"] if name == "config.json" else d
        q["checkpoint_format"] = "gptq"
        if "format" in q:
            q["format"] = "gptq"
        with open(p, "w") as f:
            json.dump(d, f, indent=2)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=None, help="comma-separated fixture names")
    ap.add_argument("--keep-work", default=None, help="keep the peers' raw outputs in this folder")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(FIXTURES) + [MISLABELLED[0]]
    work = os.path.abspath(args.keep_work or tempfile.mkdtemp(prefix="interop-fixtures-"))
    os.makedirs(work, exist_ok=True)
    bases = {}
    for untied in (False, True):
        bases[untied] = os.path.join(work, "base-untied" if untied else "base")
        if not os.path.isdir(bases[untied]):
            os.makedirs(bases[untied])
            make_base(bases[untied], untied)
    ids = ic.dataset_ids(bases[False])
    store = Store()
    # files of fixtures already committed are copy sources too
    for fx in sorted(os.listdir(OUT_ROOT)) if os.path.isdir(OUT_ROOT) else []:
        p = os.path.join(OUT_ROOT, fx, "fixture.json")
        if os.path.isfile(p) and fx not in names:
            for fname, e in ic.read_json(p)["files"].items():
                if "splice" in e:
                    store.known_spliced[e["fnv1a64"]] = {"stored": e["stored"], "splice": e["splice"]}
                elif "stored" in e:
                    store.known[e["fnv1a64"]] = e["stored"]
    for name in names:
        ic.log(f"== {name}")
        raw = os.path.join(work, name)
        if name == MISLABELLED[0]:
            if not os.path.isdir(raw):
                relabel_v1(os.path.join(work, MISLABELLED[1]), raw)
            spec = {"producer": "gptqmodel (relabelled by hand)",
                    "about": f"{MISLABELLED[1]}'s files with checkpoint_format relabelled gptq (v1) in both "
                             "config files: the zeros are v2"}
        else:
            spec = FIXTURES[name]
            if not os.path.isdir(raw):
                t0 = time.time()
                produce = produce_gptqmodel if spec["producer"] == "gptqmodel" else produce_autogptq
                produce(bases[spec.get("untied", False)], raw, spec)
                ic.log(f"  produced in {time.time() - t0:.0f} s")
        readers = reader_results(raw, ids, ic.READERS)
        if name == MISLABELLED[0]:
            src = ic.read_json(os.path.join(OUT_ROOT, MISLABELLED[1], "fixture.json"))
            expect_reader, expect = f"{MISLABELLED[1]}: {src['expect_reader']}", src["expect_ppl"]
        else:
            expect_reader = spec.get("expect_reader", "autogptq" if spec["producer"] == "autogptq" else "transformers")
            if "error" in readers[expect_reader]:
                raise SystemExit(f"{name}: its own reader failed: {readers[expect_reader]['error']}")
            expect = readers[expect_reader]["ppl"]
        fx_dir = os.path.join(OUT_ROOT, name)
        shutil.rmtree(fx_dir, ignore_errors=True)
        files = store.add(raw, fx_dir)
        fixture = {
            "name": name,
            "about": spec["about"],
            "producer": spec["producer"],
            "settings": spec.get("qcfg", {}),
            "base": f"models/tiny-llama cut to its first {BASE_LAYERS} decoder layers"
                    + (", lm_head untied" if spec.get("untied") else ""),
            "protocol": {"dataset": "wikitext2", "seqlen": SEQLEN, "max_windows": MAX_WINDOWS},
            "expect_ppl": expect,
            "expect_reader": expect_reader,
            "readers": readers,
            "versions": ic.versions(),
            "files": files,
        }
        with open(os.path.join(fx_dir, "fixture.json"), "w") as f:
            json.dump(fixture, f, indent=1)
            f.write("\n")
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
