#!/usr/bin/env python3
"""Golden token ids for tests/unit/test_tokenizer.cpp, from Hugging Face `tokenizers` and
`sentencepiece` (the references the C++ tokenizers must match exactly).

Regenerate (needs the shared/ folder next to the repo, and PyPI packages used only here):
    pip install tokenizers sentencepiece
    python3 scripts/make_tokenizer_goldens.py            # writes tests/data/tokenizer/*.json

Outputs (kept small so they can be committed):
  inputs.json        the input strings, shared by all tokenizers: hard strings (spaces, tabs,
                     newlines, digits, punctuation, accents, CJK, emoji, invalid UTF-8 given as
                     hex, special tokens inside text, empty string), the first 200 lines of
                     WikiText-2 test and 6 lines of the calibration corpus.
  <name>.json        one per tokenizer: how to build it ("build") and one case per input:
                       ids         encode(text, add_special_tokens=True)
                       ids_plain   encode(text, add_special_tokens=False)   (hard strings only;
                                   left out when it is ids without the first n_prefix ids)
                       decode      decode(ids, skip_special_tokens=False)   (hard strings only)
                       decode_skip decode(ids, skip_special_tokens=True); left out when equal to text
                     For WikiText lines past the first 12 the ids are given as their count and a
                     64-bit FNV-1a hash of the ids (int32 little-endian), and a differing
                     decode_skip as decode_skip_fnv (FNV-1a of its UTF-8), to keep files small.
whole_wikitext gives the count and hash of encode(all of wiki.test.raw as one string, True).
Invalid UTF-8 inputs ("hex") are encoded as bytes.decode("utf-8", "replace"), which is what the
C++ encode does with invalid bytes.

Tokenizers: shared/tokenizers/{llama2,mistral-v1,gptqkit-8k} through tokenizer.json
(Tokenizer.from_file) and through tokenizer.model (sentencepiece), gpt2 (vocab.json +
merges.txt as a ByteLevel BPE), the bundled model models/tiny-llama (both files), and three
variants that exercise the byte-level (Llama-3 and Qwen2 style) and Metaspace paths; no
Llama-3/Qwen2 tokenizer.json ships in a PyPI package we could find, so these variants put the
Llama-3/Qwen2 pre-tokenizer, normalizer, added tokens and post-processor around GPT-2's
vocabulary (or Metaspace around Llama-2's). The C++ test builds the same JSON the same way
("build" below).
"""
import copy
import json
import os
import sys

import sentencepiece as spm
from tokenizers import Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(REPO), "shared")
TOKS = os.path.join(SHARED, "tokenizers")
OUT = os.path.join(REPO, "tests", "data", "tokenizer")

N_WIKI = 200
N_WIKI_FULL = 12
N_CALIB = 6

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def added(i, content, special=True, lstrip=False, rstrip=False, normalized=None):
    return {"id": i, "content": content, "single_word": False, "lstrip": lstrip, "rstrip": rstrip,
            "normalized": (not special) if normalized is None else normalized, "special": special}


# How each variant is built: a base ("gpt2" = shared gpt2 vocab.json + merges.txt as a BPE model;
# or a tokenizer.json under shared/tokenizers), then top-level keys replaced, then model keys.
VARIANTS = {
    "bytelevel-llama3": {
        "base": "gpt2",
        "merges_as_pairs": True,
        "model": {"ignore_merges": True},
        "top": {
            "added_tokens": [added(50256, "<|endoftext|>"), added(50257, "<|begin_of_text|>"),
                             added(50258, "<|end_of_text|>"), added(50259, "<|eot_id|>"),
                             added(50260, "<tool>", special=False, lstrip=True, rstrip=True, normalized=False)],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": LLAMA3_SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
            "post_processor": {"type": "Sequence", "processors": [
                {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
                {"type": "TemplateProcessing",
                 "single": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                            {"Sequence": {"id": "A", "type_id": 0}}],
                 "pair": [{"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}},
                          {"Sequence": {"id": "A", "type_id": 0}},
                          {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 1}},
                          {"Sequence": {"id": "B", "type_id": 1}}],
                 "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>", "ids": [50257],
                                                          "tokens": ["<|begin_of_text|>"]}}}]},
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        },
    },
    "bytelevel-qwen2": {
        "base": "gpt2",
        "model": {},
        "top": {
            "added_tokens": [added(50256, "<|endoftext|>"), added(50257, "<|im_start|>"),
                             added(50258, "<|im_end|>")],
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
            "post_processor": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                               "use_regex": False},
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        },
    },
    "llama2-metaspace": {
        "base": "llama2/tokenizer.json",
        "model": {},
        "top": {
            "normalizer": None,
            "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first",
                              "split": False},
            "decoder": {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False},
        },
    },
}

HARD = [
    "", " ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\t\n", " \n ", "\r\n",
    "Hello world", " Hello world", "Hello World", "  Hello  World  ", "Hello, world!", "   leading spaces",
    "trailing spaces   ", "multiple   inner    spaces", "tabs\tand\t\ttabs", "line1\nline2\r\nline3\n",
    "1234567890", "3.14159 + 2,718 = 5.85", "year 2023, 1,000,000 dollars, 007", "9" * 40,
    "!!!???...", "(foo) [bar] {baz} <qux> \"quoted\" 'single'", "email@example.com http://x.y/z?a=1&b=2",
    "I'm you're they've he'll she'd it's WE'RE DON'T I'M", "café naïve résumé façade", "Ünïcödé Ångström",
    "e\u0301 and a\u0308 and \u212b (decomposed)", "\uac00\u11a8 \u1100\u1161\u11a8 hangul jamo",
    "中文字符测试，标点。", "日本語のテキスト", "한국어 텍스트", "Привет, мир!", "مرحبا بالعالم", "ไทย ภาษา",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "𝕳𝖊𝖑𝖑𝖔 𝟙𝟚𝟛", "\u00a0nbsp\u2009thin\u3000ideographic",
    "\u2581 already \u2581\u2581 metaspace", "Ġ ċ byte-level chars", "<0x41> literal",
    "<s>", "</s>", "<unk>", "Hello <s> world</s>", "<s><s>", " <s> ", "text\n<s>\nmore",
    "<|endoftext|>", "a<|endoftext|>b", " <|endoftext|> ", "<|begin_of_text|>Hi<|eot_id|>",
    "<|im_start|>user\nhi<|im_end|>\n", "x <tool>  y <tool>z", "<tool>",
    "def f(x):\n    return x * 2\n\n\tpass  # comment", "a" * 300, "ab" * 150, "the" * 100,
    "Supercalifragilisticexpialidocious antidisestablishmentarianism",
    {"hex": "616263fffe646566"}, {"hex": "c3"}, {"hex": "e282"}, {"hex": "6f6beda080737572"},
    {"hex": "f09f98"}, {"hex": "80 41 bf".replace(" ", "")}, {"hex": "e282ac20f09f9880"},
]


def read_lines(path, n, keep_empty=True):
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not keep_empty and not line.strip():
                continue
            out.append(line)
            if len(out) == n:
                break
    return out


def fnv1a64(ids, width=4):
    """FNV-1a 64 over ids as int32 little-endian (width 4), or over bytes (width 1)."""
    h = 0xcbf29ce484222325
    for i in ids:
        for b in (int(i).to_bytes(4, "little", signed=True) if width == 4 else bytes([i])):
            h ^= b
            h = (h * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return "%016x" % h


def gpt2_base():
    with open(os.path.join(TOKS, "gpt2", "vocab.json"), encoding="utf-8") as f:
        vocab = json.load(f)
    merges = []
    with open(os.path.join(TOKS, "gpt2", "merges.txt"), encoding="utf-8") as f:
        for k, line in enumerate(f):
            line = line.rstrip("\n")
            if not line or (k == 0 and line.startswith("#version")):
                continue
            merges.append(line)
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": None, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": False, "vocab": vocab, "merges": merges}}


def build_variant(spec):
    if spec["base"] == "gpt2":
        j = gpt2_base()
    else:
        with open(os.path.join(TOKS, spec["base"]), encoding="utf-8") as f:
            j = json.load(f)
    j.update(copy.deepcopy(spec["top"]))
    j["model"].update(spec["model"])
    if spec.get("merges_as_pairs"):
        j["model"]["merges"] = [m.split(" ") for m in j["model"]["merges"]]
    return Tokenizer.from_str(json.dumps(j))


def gpt2_files_tokenizer():
    # What a GPT-2 folder with only vocab.json + merges.txt means: ByteLevel BPE, no BOS.
    spec = {"base": "gpt2", "model": {},
            "top": {"added_tokens": [added(50256, "<|endoftext|>")],
                    "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": True},
                    "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                "use_regex": True}}}
    return build_variant(spec)


class hf_ref:
    def __init__(self, tok):
        self.tok = tok

    def encode(self, text, add_special):
        return self.tok.encode(text, add_special_tokens=add_special).ids

    def decode(self, ids, skip):
        return self.tok.decode(ids, skip_special_tokens=skip)


class spm_ref:
    def __init__(self, path):
        self.sp = spm.SentencePieceProcessor(model_file=path)

    def encode(self, text, add_special):
        ids = self.sp.encode(text)
        return ([self.sp.bos_id()] + ids) if add_special else ids

    def decode(self, ids, skip):
        return self.sp.decode(ids)


def main():
    if not os.path.isdir(TOKS):
        sys.exit(f"no {TOKS}: this script needs the shared tokenizer files")
    tiny = os.path.join(REPO, "models", "tiny-llama")
    if not os.path.isdir(tiny):
        tiny = os.path.join(SHARED, "models", "tiny-llama")

    inputs = []
    for h in HARD:
        if isinstance(h, dict):
            inputs.append({"kind": "hard", "hex": h["hex"]})
        else:
            inputs.append({"kind": "hard", "text": h})
    for k, line in enumerate(read_lines(os.path.join(SHARED, "data", "wikitext2", "wiki.test.raw"), N_WIKI)):
        inputs.append({"kind": "wiki_full" if k < N_WIKI_FULL else "wiki_hash", "text": line})
    for line in read_lines(os.path.join(SHARED, "data", "calib", "corpus-sample.txt"), N_CALIB, keep_empty=False):
        inputs.append({"kind": "wiki_full", "text": line})

    refs = {
        "llama2-json": ({"kind": "file", "path": "llama2/tokenizer.json"},
                        hf_ref(Tokenizer.from_file(os.path.join(TOKS, "llama2", "tokenizer.json")))),
        "llama2-spm": ({"kind": "file", "path": "llama2/tokenizer.model"},
                       spm_ref(os.path.join(TOKS, "llama2", "tokenizer.model"))),
        "mistral-v1-json": ({"kind": "file", "path": "mistral-v1/tokenizer.json"},
                            hf_ref(Tokenizer.from_file(os.path.join(TOKS, "mistral-v1", "tokenizer.json")))),
        "mistral-v1-spm": ({"kind": "file", "path": "mistral-v1/tokenizer.model"},
                           spm_ref(os.path.join(TOKS, "mistral-v1", "tokenizer.model"))),
        "gptqkit-8k-json": ({"kind": "file", "path": "gptqkit-8k/tokenizer.json"},
                            hf_ref(Tokenizer.from_file(os.path.join(TOKS, "gptqkit-8k", "tokenizer.json")))),
        "gptqkit-8k-spm": ({"kind": "file", "path": "gptqkit-8k/tokenizer.model"},
                           spm_ref(os.path.join(TOKS, "gptqkit-8k", "tokenizer.model"))),
        "gpt2-files": ({"kind": "file", "path": "gpt2"}, hf_ref(gpt2_files_tokenizer())),
        "tiny-llama-json": ({"kind": "model", "path": "tiny-llama"},
                            hf_ref(Tokenizer.from_file(os.path.join(tiny, "tokenizer.json")))),
        "tiny-llama-spm": ({"kind": "model", "path": "tiny-llama/tokenizer.model"},
                           spm_ref(os.path.join(tiny, "tokenizer.model"))),
    }
    for name, spec in VARIANTS.items():
        refs[name] = ({"kind": "variant", **spec}, hf_ref(build_variant(spec)))

    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, "inputs.json"), "w", encoding="utf-8") as f:
        json.dump({"inputs": inputs}, f, ensure_ascii=False, indent=0)
        f.write("\n")

    with open(os.path.join(SHARED, "data", "wikitext2", "wiki.test.raw"), encoding="utf-8") as f:
        wiki_text = f.read()
    for name, (build, ref) in refs.items():
        cases = []
        n_prefix = len(ref.encode("", True)) - len(ref.encode("", False))
        for inp in inputs:
            text = bytes.fromhex(inp["hex"]).decode("utf-8", "replace") if "hex" in inp else inp["text"]
            ids = ref.encode(text, True)
            case = {}
            if inp["kind"] == "wiki_hash":
                case["n_ids"] = len(ids)
                case["fnv"] = fnv1a64(ids)
            else:
                case["ids"] = ids
            if inp["kind"] == "hard":
                plain = ref.encode(text, False)
                if plain != ids[n_prefix:]:
                    case["ids_plain"] = plain
                case["decode"] = ref.decode(ids, False)
            skip = ref.decode(ids, True)
            if skip != text:
                if inp["kind"] == "wiki_hash":
                    case["decode_skip_fnv"] = fnv1a64(skip.encode("utf-8"), width=1)
                else:
                    case["decode_skip"] = skip
            cases.append(case)
        whole_ids = ref.encode(wiki_text, True)
        whole = {"n_ids": len(whole_ids), "fnv": fnv1a64(whole_ids)}
        with open(os.path.join(OUT, name + ".json"), "w", encoding="utf-8") as f:
            f.write('{"name": %s,\n "n_prefix": %d,\n "build": %s,\n "whole_wikitext": %s,\n "cases": [\n'
                    % (json.dumps(name), n_prefix, json.dumps(build, ensure_ascii=False), json.dumps(whole)))
            f.write(",\n".join(json.dumps(c, ensure_ascii=False, separators=(",", ":")) for c in cases))
            f.write("\n]}\n")
        print(f"{name}: {len(cases)} cases")


if __name__ == "__main__":
    main()
