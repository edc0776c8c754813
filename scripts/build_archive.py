"""Package a local Hugging Face causal-LM folder into a TorchServe model archive (.mar).

The archive holds the handler (`llm_handler.py`), its `cpu_llm` package, the
model-config.yaml and the model folder under `model/`, so it is self-contained: drop it in
model-store/ and serve it. The config is validated before packaging, so a misspelt key is
caught here rather than when a worker starts.

    python scripts/build_archive.py --model-dir models/SmolLM2-135M-Instruct --name smollm2
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
HANDLERS = ROOT / "handlers"
sys.path.insert(0, str(HANDLERS))
from cpu_llm.config.serving import parse_serving_config  # noqa: E402
from cpu_llm.core.errors import ConfigError  # noqa: E402
from serve import venv_tool  # noqa: E402

REQUIRED_MODEL_FILES = ("config.json",)


def _link_or_copy_tree(src: Path, dst: Path) -> None:
    """Hard-link the (large) weight files into the staging folder; copy if linking fails."""
    def link(s: str, d: str) -> None:
        try:
            os.link(s, d)
        except OSError:
            shutil.copy2(s, d)
    shutil.copytree(src, dst, copy_function=link)


def build_archive(model_dir: Path, name: str, config: Path, store: Path, version: str = "1.0") -> Path:
    """Stage handler package + model, then call torch-model-archiver. Returns the .mar path."""
    raw = yaml.safe_load(config.read_text()) or {}
    serving = parse_serving_config(raw)  # raises ConfigError naming the key
    if serving.model_path == "model":
        missing = [f for f in REQUIRED_MODEL_FILES if not (model_dir / f).is_file()]
        if missing:
            raise SystemExit(f"build_archive: {model_dir} is not a Hugging Face model folder (no {missing[0]})")
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store, prefix=".stage-") as stage:
        stage_dir = Path(stage)
        shutil.copytree(HANDLERS / "cpu_llm", stage_dir / "cpu_llm",
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        # Calibration texts and saved SmoothQuant summaries (relative paths in the config).
        shutil.copytree(ROOT / "calibration", stage_dir / "calibration")
        if serving.model_path == "model":
            _link_or_copy_tree(model_dir, stage_dir / "model")
        cmd = [
            venv_tool("torch-model-archiver"),
            "--model-name", name,
            "--version", version,
            "--handler", str(HANDLERS / "llm_handler.py"),
            "--extra-files", str(stage_dir),
            "--config-file", str(config),
            "--export-path", str(store),
            "--archive-format", "zip-store",  # safetensors do not compress; storing is fast
            "--force",
        ]
        subprocess.run(cmd, check=True)
    return store / f"{name}.mar"


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a TorchServe archive for a causal LM.")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct",
                        help="local Hugging Face model folder to package")
    parser.add_argument("--name", default="smollm2", help="model name (URL path /predictions/NAME)")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "model-config.yaml",
                        help="model-config.yaml to package")
    parser.add_argument("--store", type=Path, default=ROOT / "model-store", help="output folder")
    parser.add_argument("--version", default="1.0")
    args = parser.parse_args()
    if venv_tool("torch-model-archiver") is None:
        sys.exit("build_archive: torch-model-archiver not found; activate the venv (make install)")
    try:
        mar = build_archive(args.model_dir, args.name, args.config, args.store, args.version)
    except ConfigError as error:
        sys.exit(f"build_archive: {error}")
    print(f"wrote {mar} ({mar.stat().st_size / 2**20:.0f} MiB)")


if __name__ == "__main__":
    main()
