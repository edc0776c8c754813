#!/opt/venv/bin/python
"""Container entry point: make sure /model-store holds an archive, then run TorchServe in the
foreground so its log goes to the container's stdout.

An empty store (the default volume) gets an archive of $MODEL_DIR (the default model, converted
into the image at build time) packaged with $MODEL_CONFIG under the name $MODEL_NAME. The
archive refers to the weights in the image instead of copying them, so it takes seconds. A store
mounted with archives of your own is served as it is.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, "/app/scripts")
from build_archive import build_archive  # noqa: E402

STORE = Path("/model-store")


def main() -> None:
    if not any(STORE.glob("*.mar")):
        model_dir = Path(os.environ.get("MODEL_DIR", "/opt/models/SmolLM2-135M-Instruct"))
        raw = yaml.safe_load(Path(os.environ["MODEL_CONFIG"]).read_text()) or {}
        raw.setdefault("handler", {})["model_path"] = str(model_dir)
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "model-config.yaml"
            config.write_text(yaml.safe_dump(raw))
            print(f"entrypoint: packaging {model_dir} with {os.environ['MODEL_CONFIG']} as {os.environ['MODEL_NAME']}",
                  flush=True)
            build_archive(model_dir, os.environ["MODEL_NAME"], config, STORE)
    os.execvp("torchserve", ["torchserve", "--start", "--foreground", "--ncs", "--ts-config",
                             "/app/docker/config.properties", "--model-store", str(STORE), "--models", "all"])


if __name__ == "__main__":
    main()
