"""Each shipped quantization config, packaged and served by a real TorchServe.

In the native stack as shipped (`backend: auto` picks native there); in the ipex stack with
`backend: ipex`, so IPEX's quantized serving stays covered now that auto picks native in both
(load.backend.resolve_backend; its rule is pinned by tests/test_quantization.py)."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import requests
import yaml

from cpu_llm import kernels
from cpu_llm.load import calibration
from serve import ROOT

from .server import package, running_server

pytestmark = pytest.mark.integration
MODES = ("woq-int8", "woq-int4", "smoothquant")
BACKEND = "native" if importlib.util.find_spec("intel_extension_for_pytorch") is None else "ipex"
# What each backend's report says the linear layers became, lm_head included (IPEX fuses q/k/v and gate/up).
EXPECTED_MODULES = {
    "ipex": {"woq-int8": {"WeightOnlyQuantizedLinear": 151}, "woq-int4": {"WeightOnlyQuantizedLinear": 151},
             "smoothquant": {"int8 linear ops in IPEX traced graph": 151}},
    "native": {"woq-int8": {"QuantizedLinear": 211}, "woq-int4": {"QuantizedLinear": 211},
               "smoothquant": {"QuantizedLinear": 211}},
}


def _quant_reports(log_dir: Path) -> dict[str, dict]:
    """model name -> the quantization report its worker logged."""
    reports = {}
    for line in (log_dir / "model_log.log").read_text().splitlines():
        if "quantization: {" in line:
            report = json.loads(line.split("quantization: ", 1)[1])
            reports[re.search(r"W-\d+-(.+?)_[\d.]+-stdout", line).group(1)] = report
    return reports


def test_every_mode_is_served_quantized_and_smoothquant_calibration_is_reused(tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv(calibration.CACHE_DIR_ENV, str(tmp_path / "cache"))  # the workers inherit it
    store = None
    for mode in MODES:
        raw = yaml.safe_load((ROOT / "configs" / f"{mode}.yaml").read_text())
        raw["handler"].update(max_new_tokens=16, default_max_new_tokens=8)
        if BACKEND == "ipex":
            raw["quantization"]["backend"] = "ipex"
        store = package(tmp_path, model_dir, mode, raw)
    models = [f"{m}={m}.mar" for m in MODES]
    with running_server(tmp_path, store, models, timeout=400) as urls:
        for mode in MODES:
            response = requests.post(f"{urls['inference']}/predictions/{mode}", timeout=120,
                                     json={"messages": [{"role": "user", "content": "What is the capital of France?"}]})
            assert response.status_code == 200, (mode, response.text)
            assert response.json()["text"].strip()
            assert requests.post(f"{urls['inference']}/predictions/{mode}", json={"prompt": ""},
                                 timeout=60).status_code == 400
        reports = _quant_reports(tmp_path / "logs")
    assert set(reports) == set(MODES)
    for mode, modules in EXPECTED_MODULES[BACKEND].items():
        assert {k: v for k, v in reports[mode]["linear_modules"].items() if k in modules} == modules, mode
        assert reports[mode]["backend"] == BACKEND
    if BACKEND == "native":
        assert all(r["kernels"] == kernels.kernel_status() and r["kernels"].startswith("cpu_llm_kernels (")
                   for r in reports.values())
    assert len(list((tmp_path / "cache" / "smoothquant").glob("*.json"))) == 1

    # A restart finds the cached calibration instead of calibrating again.
    with running_server(tmp_path, store, ["smoothquant=smoothquant.mar"], timeout=300):
        log = (tmp_path / "logs" / "model_log.log").read_text()
    assert "SmoothQuant: reusing calibration" in log and "calibrated with alpha" not in log
