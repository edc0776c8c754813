"""Native SmoothQuant on a tiny random Llama: smoothing is exact in fp32, calibration files."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from cpu_llm.core.errors import QuantizationError
from cpu_llm.layers.quantized_linear import QuantizedLinear
from cpu_llm.load import native_smoothquant as sq
from cpu_llm.load.calibration import CalibrationBatch
from cpu_llm.load.native_backend import quantize_w8a8


def _tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # an outlier channel after each norm, the case SmoothQuant exists for
        for layer in model.model.layers:
            layer.input_layernorm.weight[5] = 30.0
            layer.post_attention_layernorm.weight[9] = 30.0
    return model


def _batches(n: int = 3) -> list[CalibrationBatch]:
    torch.manual_seed(1)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (1, 24))
        out.append(CalibrationBatch(ids, torch.ones_like(ids), torch.arange(24)[None]))
    return out


def _logits(model, batch):
    with torch.inference_mode():
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False)[0]


def test_smoothing_factors_follow_the_formula():
    act = torch.tensor([4.0, 1.0])
    w = torch.tensor([[1.0, 0.5], [-2.0, 0.25]])  # column maxima 2.0 and 0.5
    s = sq.smoothing_factors(act, [w], alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([4.0**0.5 / 2.0**0.5, 1.0 / 0.5**0.5]))


def test_smoothing_leaves_the_fp32_model_unchanged_and_flattens_the_outlier():
    model, batches = _tiny_llama(), _batches()
    act_max = sq.collect_activation_maxima(model, batches)
    assert set(act_max) == {source for source, _ in sq.smoothing_groups(model)}
    assert act_max["model.layers.0.input_layernorm"].shape == (64,)
    assert act_max["model.layers.0.mlp.up_proj"].shape == (128,)  # down_proj's input
    before = _logits(model, batches[0])
    sq.apply_smoothing(model, act_max, alpha=0.5)
    torch.testing.assert_close(_logits(model, batches[0]), before, rtol=1e-4, atol=1e-4)
    smoothed = sq.collect_activation_maxima(model, batches)["model.layers.0.input_layernorm"]
    ratio = lambda t: float(t.max() / t.median())  # noqa: E731
    assert ratio(smoothed) < ratio(act_max["model.layers.0.input_layernorm"]) / 2


def test_smoothquant_w8a8_beats_w8a8_without_smoothing():
    batches = _batches()
    reference = _logits(_tiny_llama(), batches[0])
    plain = _tiny_llama()
    quantize_w8a8(plain)
    smoothed = _tiny_llama()
    sq.apply_smoothing(smoothed, sq.collect_activation_maxima(smoothed, batches), alpha=0.5)
    quantize_w8a8(smoothed)
    assert isinstance(smoothed.model.layers[0].self_attn.q_proj, QuantizedLinear)
    error = lambda m: float((_logits(m, batches[0]) - reference).norm() / reference.norm())  # noqa: E731
    assert error(smoothed) < error(plain)


def test_calibration_saves_a_file_that_loads_back(tmp_path):
    model, path = _tiny_llama(), tmp_path / "sq.json"
    act_max, alpha = sq.calibrate(model, _batches(), [0.3, 0.5, 0.7], quantize_w8a8, path)
    assert alpha in (0.3, 0.5, 0.7)
    loaded, loaded_alpha = sq.load_calibration(path)
    assert loaded_alpha == alpha and set(loaded) == set(act_max)
    for name in act_max:
        torch.testing.assert_close(loaded[name], act_max[name], rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())  # candidates were copies


def test_foreign_or_mismatched_calibration_files_are_refused(tmp_path):
    ipex_summary = tmp_path / "ipex.json"
    ipex_summary.write_text(json.dumps({" ": {"q_op_infos": {}}}))
    with pytest.raises(ValueError, match="not a native SmoothQuant calibration"):
        sq.load_calibration(ipex_summary)
    with pytest.raises(QuantizationError, match="no activation maxima for model.layers.0.input_layernorm"):
        sq.apply_smoothing(_tiny_llama(), {}, alpha=0.5)


def test_architectures_without_llama_style_layers_are_refused():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(QuantizationError, match="needs Llama-style decoder layers"):
        sq.smoothing_groups(gpt2)


def test_a_norm_that_cannot_absorb_the_factors_is_detected():
    model, batches = _tiny_llama(), _batches()
    broken = _tiny_llama()
    sq.apply_smoothing(broken, sq.collect_activation_maxima(broken, batches), alpha=0.5)
    with torch.no_grad():  # as if the norm computed x * (1 + weight), like Gemma's
        broken.model.layers[0].input_layernorm.weight.add_(1.0)
    with pytest.raises(QuantizationError, match="folding changed the fp32 output"):
        sq.check_smoothing_is_exact(model, broken, batches[0])
