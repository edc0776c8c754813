"""Quantizing while loading (loader.py): the same model as quantizing after loading, from fp32,
bf16, sharded and GPT-2 checkpoints, without ever holding the fp32 model; the fallbacks; and
no silent slow path without the kernels."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import ROOT
from cpu_llm import ops
from cpu_llm.quant import quantize
from cpu_llm.errors import QuantizationError
from cpu_llm.model import load_model
from cpu_llm.quant.quant_config import parse_quantization_config
from cpu_llm.quant.quantized_linear import FullPrecisionLinear, QuantizedEmbedding, QuantizedLinear

IDS = torch.tensor([[5, 17, 99, 3, 42, 7, 120, 64]])


def _save(model: torch.nn.Module, folder, **kwargs) -> str:
    """The model with random weights and a word-level tokenizer of its vocabulary."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.05)
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder, **kwargs)
    vocab = {f"w{i}": i for i in range(model.config.vocab_size)}
    tokenizer = Tokenizer(WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="w2", unk_token="w0").save_pretrained(folder)
    return str(folder)


def _llama(folder, tied: bool = True, dtype: torch.dtype = torch.float32, **kwargs) -> str:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                         tie_word_embeddings=tied, eos_token_id=2)
    return _save(LlamaForCausalLM(config).to(dtype).eval(), folder, **kwargs)


def _woq(**changes):
    return parse_quantization_config({"method": "woq", "backend": "native", **changes})


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=IDS).logits


def _both_ways(source: str, q) -> tuple[quantize.ServedModel, quantize.ServedModel]:
    streamed = quantize.load_for_serving(source, q, str(ROOT))[0]
    model = load_model(source)[0]
    return streamed, quantize.prepare_for_serving(model, None, q, source, str(ROOT))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("woq", [{"weight_dtype": "INT8"}, {"weight_dtype": "INT4", "group_size": 32},
                                 {"weight_dtype": "INT8", "lowp_mode": "NONE"}])
def test_streamed_model_is_the_model_quantized_after_loading(tmp_path, tied, woq):
    source = _llama(tmp_path, tied)
    streamed, in_memory = _both_ways(source, _woq(woq=woq))
    assert streamed.report["quantized_while_loading"] and not in_memory.report.get("quantized_while_loading")
    assert streamed.report["linear_modules"] == in_memory.report["linear_modules"] == {"QuantizedLinear": 15}
    torch.testing.assert_close(_logits(streamed.model), _logits(in_memory.model), rtol=0, atol=0)
    assert isinstance(streamed.model.model.embed_tokens, QuantizedEmbedding)
    head = streamed.model.lm_head
    assert isinstance(head, QuantizedLinear) and (head.bits, head.spec.granularity) == (8, "channel")
    assert (head.qweight is streamed.model.model.embed_tokens.qweight) == tied
    assert not any(t.device.type == "meta" for t in [*streamed.model.parameters(), *streamed.model.buffers()])


def test_quantized_model_stays_close_to_fp32(tmp_path):
    source = _llama(tmp_path)
    reference = _logits(load_model(source)[0])
    for woq, tolerance in (({"weight_dtype": "INT8"}, 0.03), ({"weight_dtype": "INT4", "group_size": 32}, 0.2)):
        logits = _logits(quantize.load_for_serving(source, _woq(woq=woq), str(ROOT))[0].model)
        assert float((logits - reference).norm() / reference.norm()) < tolerance, woq


def test_bf16_and_sharded_checkpoints_stream(tmp_path):
    bf16 = _llama(tmp_path / "bf16", dtype=torch.bfloat16)
    sharded = _llama(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    for source in (bf16, sharded):
        streamed, in_memory = _both_ways(source, _woq())
        assert streamed.report["quantized_while_loading"]
        torch.testing.assert_close(_logits(streamed.model), _logits(in_memory.model), rtol=0, atol=0)


def test_kept_lm_head_stays_fp32_and_shares_the_fp32_table(tmp_path):
    source = _llama(tmp_path)
    streamed, in_memory = _both_ways(source, _woq(keep_full_precision=["lm_head"]))
    for served in (streamed, in_memory):
        assert isinstance(served.model.lm_head, FullPrecisionLinear)
        assert served.model.lm_head.weight is served.model.model.embed_tokens.weight
        assert served.report["linear_modules"] == {"QuantizedLinear": 14}
    # the fp32 head may run on the BLAS or on our kernel (picked by timing at load): float rounding apart
    torch.testing.assert_close(_logits(streamed.model), _logits(in_memory.model), rtol=1e-5, atol=1e-6)


def test_gpt2_conv1d_checkpoint_streams_with_its_transposed_weights(tmp_path):
    source = _save(GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64)).eval(),
                   tmp_path)
    streamed, in_memory = _both_ways(source, _woq())
    assert streamed.report["quantized_while_loading"]
    torch.testing.assert_close(_logits(streamed.model), _logits(in_memory.model), rtol=0, atol=0)


def test_checkpoints_that_cannot_stream_load_the_usual_way(tmp_path):
    source = _llama(tmp_path)
    state = load_model(source)[0].state_dict()
    torch.save({k: v for k, v in state.items() if k != "lm_head.weight"}, tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()  # a .bin checkpoint only
    served = quantize.load_for_serving(source, _woq(), str(ROOT))[0]
    assert not served.report["quantized_while_loading"] and served.report["quantized_modules"] == 15


def test_without_kernels_a_quantized_config_fails_unless_it_opts_into_the_reference_path(tmp_path, monkeypatch,
                                                                                        caplog):
    monkeypatch.setattr(ops, "_kernels", None)
    source = _llama(tmp_path)
    with pytest.raises(QuantizationError, match="make install STACK=") as error:
        quantize.load_for_serving(source, _woq(), str(ROOT))
    assert "quantization.allow_reference_kernels: true" in str(error.value)
    served = quantize.load_for_serving(source, _woq(allow_reference_kernels=True), str(ROOT))[0]
    assert served.report["kernels"].startswith("reference") and "SLOW REFERENCE PATH" in caplog.text
    quantize.load_for_serving(source, parse_quantization_config({"backend": "native"}), str(ROOT))  # fp32 needs none


@pytest.mark.model
def test_quantizing_takes_less_memory_than_fp32_not_more(model_dir):
    """Peak RSS while loading and RSS once every weight has been read (one forward), fp32 vs WoQ
    INT8, each in a fresh process (VmHWM: the peak of that process alone)."""
    code = ("import json, sys, torch, yaml; sys.path.insert(0, 'handlers'); "
            "from cpu_llm.config import parse_serving_config; from cpu_llm.quant.quantize import load_for_serving; "
            "raw = yaml.safe_load(open(sys.argv[1])); raw['quantization']['backend'] = 'native'; "
            "served, info = load_for_serving(sys.argv[2], parse_serving_config(raw).quantization, '.'); "
            "status = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]); "
            "peak = status('VmHWM'); served.model(input_ids=torch.tensor([[1, 2, 3]])); "
            "print(json.dumps([peak / 1024, status('VmRSS') / 1024]))")
    rss = {}
    for name in ("model-config", "woq-int8"):
        out = subprocess.run([sys.executable, "-c", code, f"configs/{name}.yaml", str(model_dir)], cwd=ROOT,
                             check=True, capture_output=True, text=True).stdout
        rss[name] = json.loads(out.strip().splitlines()[-1])
    (fp32_peak, fp32_rss), (int8_peak, int8_rss) = rss["model-config"], rss["woq-int8"]
    assert int8_peak < fp32_peak and int8_rss < fp32_rss, rss
