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
    from cpu_llm.load.hf import load_model

    torch.set_num_threads(2)
    return load_model(str(model_dir))


@pytest.fixture(scope="session")
def runner_served(model_dir):
    """The fp32 model on our model runner (8 slots, 16-token prefill chunks so prompts are
    prefilled over several steps), for in-process tests of the runner and its engine."""
    from cpu_llm.load.hf import load_model
    from cpu_llm.load.served import ServedModel
    from cpu_llm.runner.model_runner import attach_runner

    torch.set_num_threads(2)
    model, _ = load_model(str(model_dir))
    served = ServedModel(model, lambda n: None, "native", {})
    attach_runner(served, "llama", slots=8, length=1152, prefill_chunk=16)
    return served
