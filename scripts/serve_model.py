"""Serve your own model in one command: `make serve MODEL=<folder | file.gguf | org/name> CONFIG=<yaml>`.

MODEL is resolved once, then packaged under its own name and served:
- a Hugging Face folder (config.json, weights, tokenizer) goes into the archive as it is;
- a `.gguf` file is converted first (scripts/convert_gguf.py) into models/<file stem>/, reused
  while it is newer than the file;
- a hub id (`org/name`) is not downloaded here: the config's `handler.model_path` is set to it and
  the worker loads it through transformers (a host with internet access, or a filled HF cache).

The name is MODEL's last path component without `.gguf`, lower-cased, with anything but letters,
digits, `-`, `_` and `.` turned into `-` (TorchServe's URL path /predictions/<name>); `--name`
overrides it. CONFIG defaults to configs/model-config.yaml.

    python scripts/serve_model.py models/mine --config configs/woq-int4.yaml
    python scripts/serve_model.py ~/Downloads/tinyllama.Q8_0.gguf --name tiny
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

from build_archive import build_archive  # also puts handlers/ on sys.path
from cpu_llm.core.errors import ConfigError
from cpu_llm.load.hf import HUB_ID
from serve import ROOT, start_and_report

MODELS = ROOT / "models"


@dataclass(frozen=True)
class ModelSource:
    """What MODEL named: a local folder to package, or a hub id the worker loads itself."""

    name: str
    folder: Path | None = None
    hub_id: str | None = None


def model_name(model: str) -> str:
    stem = Path(model.rstrip("/")).name
    stem = stem[:-len(".gguf")] if stem.lower().endswith(".gguf") else stem
    name = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-.")
    if not name:
        raise SystemExit(f"serve_model: cannot make a model name of {model!r}; pass --name")
    return name


def resolve(model: str, models_dir: Path = MODELS) -> ModelSource:
    """Say what MODEL is, converting a GGUF file into a folder first. Exits with the reason."""
    path = Path(model).expanduser()
    name = model_name(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SystemExit(f"serve_model: MODEL={model} is a folder without config.json: "
                             "not a Hugging Face model folder")
        return ModelSource(name, folder=path.resolve())
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SystemExit(f"serve_model: MODEL={model} is a file but not a .gguf; "
                             "pass a GGUF file or a Hugging Face folder")
        out = models_dir / name
        if not (out / "model.safetensors").is_file() or (out / "model.safetensors").stat().st_mtime < path.stat().st_mtime:
            from convert_gguf import convert

            print(f"serve_model: converting {path} into {out}", flush=True)
            convert(path.resolve(), out)
        return ModelSource(name, folder=out.resolve())
    if HUB_ID.match(model):
        return ModelSource(name, hub_id=model)
    raise SystemExit(f"serve_model: MODEL={model} is neither a folder, a .gguf file nor a hub id (org/name)")


def package(source: ModelSource, config: Path, store: Path) -> Path:
    """Archive `source` with `config` (its handler.model_path pointed at a hub id when there is one)."""
    if source.hub_id is None:
        return build_archive(source.folder, source.name, config, store)
    raw = yaml.safe_load(config.read_text()) or {}
    raw.setdefault("handler", {})["model_path"] = source.hub_id
    with tempfile.TemporaryDirectory() as tmp:
        written = Path(tmp) / "model-config.yaml"
        written.write_text(yaml.safe_dump(raw, sort_keys=False))
        return build_archive(Path(tmp), source.name, written, store)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a Hugging Face folder, a .gguf file or a hub id (org/name)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "model-config.yaml")
    parser.add_argument("--name", help="model name (default: from MODEL)")
    parser.add_argument("--ts-config", type=Path, default=ROOT / "config.properties")
    parser.add_argument("--model-store", type=Path, default=ROOT / "model-store")
    parser.add_argument("--log-dir", type=Path, default=ROOT / "logs")
    parser.add_argument("--models-dir", type=Path, default=MODELS, help="where a GGUF file is converted to")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for READY")
    args = parser.parse_args()
    if not args.config.is_file():
        sys.exit(f"serve_model: CONFIG={args.config} does not exist")
    source = resolve(args.model, args.models_dir)
    if args.name:
        source = ModelSource(model_name(args.name), source.folder, source.hub_id)
    try:
        mar = package(source, args.config, args.model_store)
    except ConfigError as error:
        sys.exit(f"serve_model: {args.config}: {error}")
    print(f"serve_model: packaged {args.model} with {args.config} as {mar}", flush=True)
    start_and_report(args.ts_config, args.model_store, [f"{source.name}={mar.name}"], args.log_dir, args.timeout)


if __name__ == "__main__":
    main()
