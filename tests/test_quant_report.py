"""scripts/quant_report.py on the real model: one row per quantized layer, sizes, refusals."""

from __future__ import annotations

import pytest
import yaml

from cpu_llm.config.serving import parse_serving_config
from cpu_llm.core.errors import ConfigError
from cpu_llm.load.hf import load_model
from quant_report import ROOT, format_report, report

pytestmark = pytest.mark.model


def _quantization(name: str):
    return parse_serving_config(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())).quantization


@pytest.mark.parametrize("name,min_snr,max_out_error,smaller", [
    ("woq-int8", 35, 0.05, 3.3), ("woq-int4", 18, 0.35, 5.0), ("smoothquant", 28, 0.1, 3.3)])
def test_report_covers_every_quantized_layer(model_dir, name, min_snr, max_out_error, smaller):
    model, info = load_model(str(model_dir))
    result = report(model, info.tokenizer, _quantization(name))
    layers = {row["layer"]: row for row in result["layers"]}
    kept_lm_head = "lm_head" in _quantization(name).keep_full_precision
    assert len(layers) == 210 + (not kept_lm_head) and ("lm_head" in layers) != kept_lm_head
    for row in layers.values():
        assert row["snr_db"] > min_snr and 0 < row["relative_error"] < 0.2
        assert row["max_abs_error"] >= row["mean_abs_error"] > 0 and row["out_rel_error"] < max_out_error
    assert result["size_mib_before"] / result["size_mib_after"] > smaller
    text = format_report(result)
    assert "model.layers.29.mlp.down_proj" in text and "model size: 513.1 MiB fp32 ->" in text


def test_no_quantization_is_refused(model_dir):
    with pytest.raises(ConfigError, match="quantization.method"):
        report(None, None, _quantization("fp32"))
