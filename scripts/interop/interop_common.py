"""Shared pieces of the interop scripts (docs/interop.md): the dataset's token ids, the GPTQ-paper
perplexity protocol, our CLI's figure, and the peers' own readers.

Readers (all torch paths, CPU or CUDA):
  transformers  transformers 5 AutoModelForCausalLM.from_pretrained on the folder; optimum's
                GPTQQuantizer and GPTQModel's kernel underneath, forced to its torch kernel
                (backend "gptq_torch": the CPU "auto" choice may pick an int8-activation kernel).
  gptqmodel     GPTQModel.load(folder, backend=gptq_torch), GPTQModel's own loader.
  autogptq      AutoGPTQ 0.7.1's QuantLinear (qlinear_cuda_old, or qlinear_cuda for act-order with
                groups, as its dynamically_import_QuantLinear picks) on its torch path. The
                auto_gptq package does not import under transformers 5 (its modeling/_base.py
                imports transformers.modeling_utils.no_init_weights, its peft_utils a peft name
                that no longer exists), so its two QuantLinear files are loaded on their own (they
                import only torch, numpy and transformers) and the few steps of its
                from_quantized that matter for reading a checkpoint are mirrored here:
                quantize_config.json (required in a local folder), the file named by
                model_file_base_name (else gptq_model-{bits}bit-{group}g, then model), or its
                .safetensors.index.json, every Linear of the decoder layers replaced, zeros read
                as v1 whatever checkpoint_format says (0.7.1 has no such field), ties re-made.

Python here is for checks only: nothing in the product runtime uses it.
"""
import glob
import importlib.util
import json
import math
import os
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIKITEXT2 = os.path.join(REPO, "data/wikitext2/wiki.test.raw.gptq_join.txt")
READERS = ("transformers", "gptqmodel", "autogptq")


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- tokens and the ppl protocol


def dataset_ids(model_dir, dataset=WIKITEXT2):
    """The dataset tokenized once, BOS prepended (the tokenizer's add_bos_token), as `gptq ppl`."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(dataset, encoding="utf-8") as f:
        text = f.read()
    return tok(text, add_special_tokens=True, return_tensors="pt").input_ids[0]


@torch.inference_mode()
def perplexity(model, ids, seqlen, max_windows=0, device="cpu"):
    """GPTQ-paper protocol (src/model/perplexity.h): non-overlapping windows of seqlen tokens
    (a partial last window dropped), tokens 1..seqlen-1 of each predicted from the window's own
    prefix, ppl = exp(mean NLL), log-softmax in F32."""
    n_windows = ids.numel() // seqlen
    if max_windows > 0:
        n_windows = min(n_windows, max_windows)
    nll_sum = 0.0
    t0 = time.time()
    for w in range(n_windows):
        x = ids[w * seqlen:(w + 1) * seqlen].to(device)[None]
        logits = model(input_ids=x, use_cache=False).logits[0].float()
        nll = torch.nn.functional.cross_entropy(logits[:-1], x[0, 1:], reduction="sum")
        nll_sum += float(nll.double())
    n_pred = n_windows * (seqlen - 1)
    return {
        "ppl": math.exp(nll_sum / n_pred),
        "nll_mean": nll_sum / n_pred,
        "n_windows": n_windows,
        "n_predicted": n_pred,
        "n_dataset_tokens": int(ids.numel()),
        "seconds": time.time() - t0,
    }


def ours_ppl(gptq_bin, folder, seqlen, max_windows=0, threads=0):
    """`gptq ppl --json` on the folder: the figure the peers' readers are compared with."""
    cmd = [gptq_bin, "ppl", folder, "--json", "--seqlen", str(seqlen), "--max-windows", str(max_windows)]
    if threads:
        cmd += ["--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exit {r.returncode}: {r.stderr.strip()[-2000:]}")
    return json.loads(r.stdout)


# ---------------------------------------------------------------- readers


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def gptq_settings(folder):
    """The GPTQ dict as transformers sees it (config.json quantization_config), else quantize_config.json."""
    cfg = read_json(os.path.join(folder, "config.json"))
    q = cfg.get("quantization_config")
    if q is None:
        q = read_json(os.path.join(folder, "quantize_config.json"))
    return q


def load_transformers(folder, dtype=torch.float32, device="cpu", **kwargs):
    from transformers import AutoModelForCausalLM, GPTQConfig

    q = gptq_settings(folder)
    # Only the loading attributes (backend) of this config are used for a quantized checkpoint;
    # bits etc. come from the folder's config.json.
    loading = GPTQConfig(bits=q["bits"], backend="gptq_torch")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map=device,
                                                 quantization_config=loading, **kwargs)
    return model.eval()


def load_gptqmodel(folder, dtype=torch.float32, device="cpu", **kwargs):
    from gptqmodel import BACKEND, GPTQModel

    # Its torch kernel (TorchLinear) refuses float32 ("only supports [torch.float16,
    # torch.bfloat16]"): this reader always runs in float16.
    m = GPTQModel.load(folder, backend=BACKEND.GPTQ_TORCH, device=device, dtype=torch.float16, **kwargs)
    return m.model.eval()


_AUTOGPTQ_MODULES = {}


def autogptq_quantlinear(kind):
    """AutoGPTQ 0.7.1's qlinear_<kind>.py (cuda_old or cuda) loaded on its own (see the module doc)."""
    if kind not in _AUTOGPTQ_MODULES:
        spec = importlib.util.find_spec("auto_gptq")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError("auto_gptq is not installed (pip install --no-deps auto-gptq==0.7.1)")
        root = list(spec.submodule_search_locations)[0]
        path = os.path.join(root, "nn_modules", "qlinear", f"qlinear_{kind}.py")
        mspec = importlib.util.spec_from_file_location(f"autogptq_qlinear_{kind}", path)
        mod = importlib.util.module_from_spec(mspec)
        mspec.loader.exec_module(mod)
        _AUTOGPTQ_MODULES[kind] = mod
    return _AUTOGPTQ_MODULES[kind].QuantLinear


def autogptq_version():
    from importlib import metadata

    return metadata.version("auto-gptq")


AUTOGPTQ_SYNONYMS = {"w_bit": "bits", "q_group_size": "group_size"}
AUTOGPTQ_FIELDS = ("bits", "group_size", "damp_percent", "desc_act", "static_groups", "sym", "true_sequential",
                   "is_marlin_format", "model_name_or_path", "model_file_base_name", "awq_gemm_checkpoint")


def autogptq_quantize_config(folder):
    """BaseQuantizeConfig.from_pretrained of 0.7.1 for a local folder: quantize_config.json is the
    file it opens (it does not fall back when that file is missing); unknown keys are ignored
    with a warning (checkpoint_format among them); defaults bits 4, group -1, desc_act True, sym True."""
    raw = read_json(os.path.join(folder, "quantize_config.json"))
    cfg = {"bits": 4, "group_size": -1, "desc_act": True, "sym": True, "model_file_base_name": None}
    ignored = []
    for k, v in raw.items():
        k = AUTOGPTQ_SYNONYMS.get(k, k)
        if k in AUTOGPTQ_FIELDS:
            cfg[k] = v
        else:
            ignored.append(k)
    if ignored:
        log(f"autogptq: ignoring unknown parameters in quantize_config.json: {', '.join(ignored)}")
    return cfg


def autogptq_checkpoint(folder, qcfg):
    """get_checkpoints of 0.7.1 for a local folder and safetensors: (is_sharded, path)."""
    if qcfg.get("model_file_base_name"):
        bases = [qcfg["model_file_base_name"]]
    else:
        bases = [f"gptq_model-{qcfg['bits']}bit-{qcfg['group_size']}g", "model"]
    for base in bases:
        index = os.path.join(folder, base + ".safetensors.index.json")
        if os.path.isfile(index):
            return True, index
        single = os.path.join(folder, base + ".safetensors")
        if os.path.isfile(single):
            return False, single
    raise FileNotFoundError(f"autogptq: none of {[b + '.safetensors' for b in bases]} (or an index) in {folder}")


def load_state(path, is_sharded):
    from safetensors.torch import load_file

    if not is_sharded:
        return load_file(path)
    state = {}
    for shard in sorted(set(read_json(path)["weight_map"].values())):
        state.update(load_file(os.path.join(os.path.dirname(path), shard)))
    return state


def load_autogptq(folder, dtype=torch.float32, device="cpu", **kwargs):
    from transformers import AutoConfig, AutoModelForCausalLM

    qcfg = autogptq_quantize_config(folder)
    is_sharded, ckpt = autogptq_checkpoint(folder, qcfg)
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config  # from_config must build a plain model
    bits, group = qcfg["bits"], qcfg["group_size"]
    kind = "cuda_old" if (not qcfg["desc_act"] or group == -1) else "cuda"
    QuantLinear = autogptq_quantlinear(kind)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, **kwargs)
    # AutoGPTQ quantizes every nn.Linear inside model.layers (lm_head and embeddings stay dense).
    for name, mod in list(model.named_modules()):
        if ".layers." not in name or not isinstance(mod, torch.nn.Linear):
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0])
        ql = QuantLinear(bits, group, mod.in_features, mod.out_features, True, use_cuda_fp16=False,
                         weight_dtype=dtype) if kind == "cuda_old" else \
            QuantLinear(bits, group, mod.in_features, mod.out_features, True, weight_dtype=dtype)
        setattr(parent, name.rsplit(".", 1)[1], ql)
    state = load_state(ckpt, is_sharded)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Biases of layers without one stay zero (AutoGPTQ makes every QuantLinear with a bias buffer);
    # a tied lm_head is tied below.
    missing = [k for k in missing if not k.endswith(".bias") and not
               (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"autogptq: {ckpt}: missing tensors {missing[:8]}, unexpected {unexpected[:8]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device).eval()


def dynamic_override(dynamic, module):
    """GPTQModel's `dynamic` for one module name (quantization/config.py _resolve_dynamic_override):
    the first rule in order that re.match-es it; "-:" excludes the module (False), "+:" or a bare
    pattern gives its overrides. None: no rule."""
    import re

    for key, overrides in (dynamic or {}).items():
        negative = key.startswith("-:")
        pattern = key[2:] if key[:2] in ("+:", "-:") else key
        if re.match(pattern, module):
            return False if negative else overrides
    return None


def checkpoint_modules(folder):
    """{module name: (bits, group_size)} for every module with a .qweight in the folder's
    safetensors, each as the folder's quantization_config says (base, then its `dynamic` rule)."""
    from safetensors import safe_open

    q = gptq_settings(folder)
    names = set()
    for f in glob.glob(os.path.join(folder, "*.safetensors")):
        with safe_open(f, framework="pt") as h:
            names.update(k[:-len(".qweight")] for k in h.keys() if k.endswith(".qweight"))
    out = {}
    for n in sorted(names):
        o = dynamic_override(q.get("dynamic"), n) or {}
        out[n] = (o.get("bits", q["bits"]), o.get("group_size", q["group_size"]))
    return out


def check_modules(model, folder):
    """Did the reader build every quantized module of the checkpoint with the checkpoint's bits and
    group size, and none dense? Returns {"ok", "n_modules", "problems"}: a module left dense
    (e.g. a quantized lm_head as nn.Linear, its weight newly initialized) or built with other
    bits / group size than the config says for it (e.g. `dynamic` ignored)."""
    expected = checkpoint_modules(folder)
    mods = dict(model.named_modules())
    problems = []
    for name, (bits, group) in expected.items():
        m = mods.get(name)
        if m is None:
            problems.append(f"{name}: no such module")
        elif not hasattr(m, "qweight"):
            problems.append(f"{name}: left dense ({type(m).__name__})")
        elif (getattr(m, "bits", None), getattr(m, "group_size", None)) != (bits, group):
            problems.append(f"{name}: built as {getattr(m, 'bits', '?')}-bit g{getattr(m, 'group_size', '?')}, "
                            f"checkpoint {bits}-bit g{group}")
    return {"ok": not problems, "n_modules": len(expected), "problems": problems}


LOADERS = {"transformers": load_transformers, "gptqmodel": load_gptqmodel, "autogptq": load_autogptq}


def load(reader, folder, dtype=torch.float32, device="cpu", **kwargs):
    """kwargs go to the reader's from_pretrained/from_config (e.g. attn_implementation="eager":
    transformers' default sdpa attention drops Gemma 2's attention logit soft-capping)."""
    return LOADERS[reader](folder, dtype=dtype, device=device, **kwargs)


def versions():
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "optimum", "gptqmodel", "auto-gptq", "safetensors", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def short_error(e):
    s = f"{type(e).__name__}: {e}"
    return s if len(s) < 600 else s[:600] + " ..."


def find_gptq(explicit=None):
    for c in [explicit, os.environ.get("GPTQ_BIN"), os.path.join(REPO, "build-cpu/bin/gptq"),
              os.path.join(REPO, "build/bin/gptq")] + sorted(glob.glob(os.path.join(REPO, "build*/bin/gptq"))):
        if c and os.access(c, os.X_OK):
            return c
    raise FileNotFoundError("no gptq binary: pass --gptq or set GPTQ_BIN")
