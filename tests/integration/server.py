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

TEST_PORTS = {"inference": 18080, "management": 18081, "metrics": 18082}
# Make the venv's torchserve / torch-model-archiver reachable whatever PATH pytest got.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"


def package(tmp: Path, model_dir: Path, name: str, model_config: dict) -> Path:
    """Build `name.mar` into tmp/store from a model-config dict; returns the store folder."""
    config_path = tmp / f"{name}-model-config.yaml"
    config_path.write_text(yaml.safe_dump(model_config))
    store = tmp / "store"
    build_archive(model_dir, name, config_path, store)
    return store


@contextmanager
def running_server(tmp: Path, store: Path, models: list[str], timeout: float = 240) -> Iterator[dict[str, str]]:
    """TorchServe on the test ports; yields the endpoint URLs and always stops it."""
    with serve.running(serve.write_ts_config(tmp, TEST_PORTS), store, models, tmp / "logs", timeout) as urls:
        yield urls
