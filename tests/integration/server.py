"""Helpers to package the default model and run a real TorchServe on loopback test ports."""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml

import serve
from build_archive import build_archive

ROOT = Path(__file__).resolve().parents[2]
TEST_PORTS = {"inference": 18080, "management": 18081, "metrics": 18082}
# Make the venv's torchserve / torch-model-archiver reachable whatever PATH pytest got.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def write_ts_config(directory: Path, ports: dict[str, int] = TEST_PORTS) -> Path:
    """The shipped config.properties with the listeners moved to test ports."""
    lines = []
    for line in (ROOT / "config.properties").read_text().splitlines():
        key = line.split("=", 1)[0]
        name = key.replace("_address", "")
        if key.endswith("_address") and name in ports:
            line = f"{key}=http://127.0.0.1:{ports[name]}"
        lines.append(line)
    path = directory / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


def package(tmp: Path, model_dir: Path, name: str, model_config: dict) -> Path:
    """Build `name.mar` into tmp/store from a model-config dict; returns the store folder."""
    config_path = tmp / f"{name}-model-config.yaml"
    config_path.write_text(yaml.safe_dump(model_config))
    store = tmp / "store"
    build_archive(model_dir, name, config_path, store)
    return store


@contextmanager
def running_server(tmp: Path, store: Path, models: list[str], timeout: float = 240) -> Iterator[dict[str, str]]:
    """Start TorchServe, wait for READY workers, yield the endpoint URLs, always stop it."""
    ts_config = write_ts_config(tmp)
    log_dir = tmp / "logs"
    serve.start(ts_config, store, models, log_dir, timeout)
    try:
        yield serve.endpoints(serve.read_properties(ts_config))
    finally:
        serve.stop(log_dir)
