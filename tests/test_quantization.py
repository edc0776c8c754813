"""Quantization at load: what each mode turns the linear layers into, and refusals."""

from __future__ import annotations

import importlib.util
import logging
import time
from pathlib import Path

import pytest
import torch
import yaml

from cpu_llm import quantize
from cpu_llm.config import ConfigError, parse_serving_config
from cpu_llm.generation import generate_batch
from cpu_llm.model import encode_prompt, load_model
from cpu_llm.quant_config import parse_quantization_config
from cpu_llm.request import parse_request

ROOT = Path(__file__).resolve().parent.parent
HAS_IPEX = importlib.util.find_spec("intel_extension_for_pytorch") is not None
needs_ipex = pytest.mark.skipif(not HAS_IPEX, reason="IPEX is only in the ipex stack")


def _config(name: str):
    return parse_serving_config(yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text()))


def _serve(model_dir, name: str):
    model, info = load_model(str(model_dir))
    config = _config(name)
    served = quantize.prepare_for_serving(model, info.tokenizer, config.quantization, str(model_dir), str(ROOT))
    return served, info, config


def _generate(served, info, config, bodies):
    requests = [parse_request(b, config) for b in bodies]
    prompts = [encode_prompt(info.tokenizer, r, config.max_prompt_tokens) for r in requests]
    return [r.text for r in generate_batch(served.model, info, requests, prompts, served.new_cache)]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(quantize.CACHE_DIR_ENV, str(tmp_path / "cache"))


def test_bf16_is_refused_on_cpus_without_avx512bw(monkeypatch, model_dir):
    monkeypatch.setattr(quantize, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(ConfigError) as error:
        quantize.prepare_for_serving(torch.nn.Linear(2, 2), None, parse_quantization_config({"dtype": "bf16"}),
                                     str(model_dir), str(ROOT))
    assert error.value.key == "quantization.dtype" and "avx512bw" in str(error.value)


def test_quantization_without_a_quantizing_backend_is_a_config_error(monkeypatch):
    monkeypatch.setattr(quantize.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="quantization.method"):
        quantize.resolve_backend(parse_quantization_config({"method": "woq"}))
    with pytest.raises(ConfigError, match="quantization.backend: ipex: intel-extension-for-pytorch is not installed"):
        quantize.resolve_backend(parse_quantization_config({"backend": "ipex"}))


def test_keep_full_precision_must_name_a_linear_layer():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="'lm_head' is not a linear layer"):
        quantize.keep_full_precision(model, ("lm_head",))
    quantize.keep_full_precision(model, ("0",))
    assert isinstance(model[0], quantize.FullPrecisionLinear)


@needs_ipex
@pytest.mark.model
@pytest.mark.parametrize("name,dtype", [("woq-int8", "INT8"), ("woq-int4", "INT4")])
def test_woq_turns_linear_layers_into_ipex_woq_modules(model_dir, name, dtype):
    served, info, config = _serve(model_dir, name)
    modules = served.report["linear_modules"]
    assert modules.get("WeightOnlyQuantizedLinear") == 150  # 30 layers x 5 projections
    assert "Linear" not in modules  # nothing left as a plain float nn.Linear ...
    assert isinstance(served.model.lm_head, quantize.FullPrecisionLinear)  # ... but the kept lm_head
    woq = next(m for m in served.model.modules() if type(m).__name__ == "WeightOnlyQuantizedLinear")
    assert woq.weight.dtype in (torch.int8, torch.uint8, torch.quint4x2)
    assert served.batch_invariant
    a = {"prompt": "Water boils at", "max_new_tokens": 8}
    c = {"prompt": "The history of the bicycle begins in", "max_new_tokens": 8}
    alone = _generate(served, info, config, [a])
    assert _generate(served, info, config, [a, c])[0] == alone[0]
    assert _generate(served, info, config, [c, a, a]) [1:] == alone * 2


@needs_ipex
@pytest.mark.model
def test_smoothquant_runs_int8_linears_and_reuses_its_calibration(model_dir, caplog):
    caplog.set_level(logging.INFO)
    started = time.perf_counter()
    served, info, config = _serve(model_dir, "smoothquant")
    first_s = time.perf_counter() - started
    assert served.report["linear_modules"]["int8 linear ops in IPEX traced graph"] == 151  # incl. lm_head
    assert not served.batch_invariant
    assert "SmoothQuant: calibrated with alpha" in caplog.text
    assert _generate(served, info, config, [{"prompt": "The capital of France is", "max_new_tokens": 4}])[0]
    caplog.clear()
    started = time.perf_counter()
    _serve(model_dir, "smoothquant")
    assert "SmoothQuant: reusing calibration" in caplog.text
    assert "calibrated with alpha" not in caplog.text
    print(f"smoothquant load: first {first_s:.1f} s, cached {time.perf_counter() - started:.1f} s")


@needs_ipex
def test_unsupported_architecture_fails_instead_of_serving_fp32(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    def tiny_gpt2():  # as from_pretrained would load it (config.architectures set)
        config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64,
                            architectures=["GPT2LMHeadModel"])
        return GPT2LMHeadModel(config).eval()

    model = tiny_gpt2()
    q = parse_quantization_config({"method": "woq", "backend": "ipex", "keep_full_precision": []})
    with pytest.raises(quantize.QuantizationError, match="left every linear layer unquantized"):
        quantize.prepare_for_serving(model, None, q, "/nonexistent", str(ROOT))
    caplog.set_level(logging.WARNING)
    fallback = parse_quantization_config({"method": "woq", "backend": "ipex", "keep_full_precision": [],
                                          "fallback_to_unquantized": True})
    served = quantize.prepare_for_serving(tiny_gpt2(), None, fallback, "/nonexistent", str(ROOT))
    assert served.report["quantized_modules"] == 0
    assert "SERVING UNQUANTIZED" in caplog.text


@needs_ipex
@pytest.mark.model
@pytest.mark.parametrize("section", [
    pytest.param({"dtype": "bf16"}, marks=pytest.mark.skipif(
        not quantize.bf16_capable(quantize.cpu_flags()), reason="bf16 needs AVX-512 BW or AMX")),
    {"method": "woq", "woq": {"weight_dtype": "NF4", "group_size": 32}},
], ids=["bf16", "woq-nf4"])
def test_other_documented_modes_load_and_generate(model_dir, section):
    model, info = load_model(str(model_dir))
    config = parse_serving_config({"quantization": section})
    served = quantize.prepare_for_serving(model, info.tokenizer, config.quantization, str(model_dir), str(ROOT))
    if section.get("method") == "woq":
        assert served.report["linear_modules"]["WeightOnlyQuantizedLinear"] == 150
    text = _generate(served, info, config, [{"prompt": "The capital of France is", "max_new_tokens": 4}])[0]
    assert "Paris" in text
