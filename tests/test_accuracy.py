"""Accuracy of each shipped quantization mode on the real SmolLM2 (scripts/evaluate.py)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from cpu_llm.load import calibration
from evaluate import evaluate_all, markdown_table

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.model
BACKENDS = ["native", pytest.param("ipex", marks=pytest.mark.skipif(
    importlib.util.find_spec("intel_extension_for_pytorch") is None, reason="IPEX is only in the ipex stack"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_perplexity_stays_close_to_fp32(tmp_path, monkeypatch, model_dir, backend):
    monkeypatch.setenv(calibration.CACHE_DIR_ENV, str(tmp_path))
    names = ["fp32", "woq-int8", "smoothquant", "woq-int4"]
    configs = [ROOT / "configs" / f"{n}.yaml" for n in names]
    rows = {r["config"]: r for r in evaluate_all(configs, model_dir, backend=backend, text=ROOT / "eval" / "heldout.txt")}
    assert {r["backend"] for r in rows.values()} == {backend}
    print("\n" + markdown_table(list(rows.values())))
    fp32 = rows["fp32.yaml"]["perplexity"]
    assert 5 < fp32 < 100  # a sane language model on plain English (random weights: ~50,000)
    assert rows["woq-int8.yaml"]["perplexity"] <= fp32 * 1.02
    assert rows["smoothquant.yaml"]["perplexity"] <= fp32 * 1.10
    assert math.isfinite(rows["woq-int4.yaml"]["perplexity"])  # reported; INT4 of 4-bit source weights
    assert rows["fp32.yaml"]["greedy_agreement"] == 1.0
    for name in ("woq-int8.yaml", "smoothquant.yaml", "woq-int4.yaml"):
        assert rows[name]["quantized_modules"] > 0
        assert rows[name]["weights_mib"] < rows["fp32.yaml"]["weights_mib"]
