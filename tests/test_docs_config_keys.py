"""docs/configuration.md documents every key the code accepts, so a new key cannot ship unexplained."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import pytest

from cpu_llm.config.quantization import QuantizationConfig, SmoothQuantConfig, WoqConfig
from cpu_llm.config.serving import FRONTEND_INT_KEYS, FRONTEND_OTHER_KEYS, ServingConfig
from serve import read_properties

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"
# ServingConfig fields that are not keys of the handler: section (they come from other sections).
NOT_HANDLER_KEYS = {"quantization", "continuous_batching", "batch_size"}


def config_keys() -> list[str]:
    keys = sorted(FRONTEND_INT_KEYS) + sorted(FRONTEND_OTHER_KEYS)
    keys += [f"handler.{f.name}" for f in fields(ServingConfig) if f.name not in NOT_HANDLER_KEYS]
    keys += [f"quantization.{f.name}" for f in fields(QuantizationConfig) if f.name not in ("woq", "smoothquant")]
    keys += [f"quantization.woq.{f.name}" for f in fields(WoqConfig)]
    keys += [f"quantization.smoothquant.{f.name}" for f in fields(SmoothQuantConfig)]
    keys += [f"config.properties:{key}" for key in read_properties(ROOT / "config.properties")]
    return keys


@pytest.mark.parametrize("key", config_keys())
def test_every_key_is_in_the_configuration_reference(key):
    """The reference names a key in backticks: by its leaf name in its section's table, or
    qualified by its subsection (`woq.group_size`, `smoothquant.alpha`)."""
    text = REFERENCE.read_text()
    leaf = key.rpartition(":")[2].rpartition(".")[2]
    qualified = ".".join(key.split(".")[-2:])
    assert f"`{leaf}`" in text or f"`{qualified}`" in text, f"{REFERENCE.name} does not document {key}"
