"""Shared fixtures: the converted default model, loaded once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
MODEL_DIR = ROOT / "models" / "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    if not (MODEL_DIR / "model.safetensors").is_file():
        pytest.fail(f"{MODEL_DIR} is missing: run `make model` (make test does it for you)")
    return MODEL_DIR


@pytest.fixture(scope="session")
def loaded(model_dir):
    """(model, TokenizerInfo) for in-process generation tests."""
    from cpu_llm.model import load_model

    torch.set_num_threads(2)
    return load_model(str(model_dir))
