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


@pytest.fixture(scope="session")
def int8_served(model_dir):
    """(served, TokenizerInfo): SmolLM2 in WoQ INT8 on our runner, 4 slots of 512 tokens, prompts
    prefilled 16 tokens per step; its rows are exactly batch-invariant, so tests of the prefix
    cache and of speculative decoding can ask for identical tokens."""
    import yaml

    from cpu_llm.config.serving import parse_serving_config
    from cpu_llm.load.pipeline import load_for_serving
    from cpu_llm.runner.model_runner import attach_runner

    raw = yaml.safe_load((ROOT / "configs" / "woq-int8.yaml").read_text())
    raw["quantization"]["backend"] = "native"
    served, info = load_for_serving(str(model_dir), parse_serving_config(raw).quantization, str(ROOT))
    attach_runner(served, "llama", slots=4, length=512, prefill_chunk=16)
    return served, info
