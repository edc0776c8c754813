"""Quantizing while loading (load/checkpoint.py): the same model as quantizing after loading, from fp32,
bf16, sharded and GPT-2 checkpoints, without ever holding the fp32 model; the fallbacks; and
no silent slow path without the kernels."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conftest import ROOT
from cpu_llm import kernels
from cpu_llm.config.quantization import parse_quantization_config
from cpu_llm.core.errors import QuantizationError
from cpu_llm.layers.quantized_linear import FullPrecisionLinear, QuantizedEmbedding, QuantizedLinear
from cpu_llm.load import calibration, native_backend, native_smoothquant, pipeline, streamed_calibration
from cpu_llm.load.calibration import CalibrationBatch, calibration_loss
from cpu_llm.load.checkpoint import QuantizedLoad, load_quantized
from cpu_llm.load.hf import load_model
from cpu_llm.load.served import ServedModel

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


def _both_ways(source: str, q) -> tuple[ServedModel, ServedModel]:
    streamed = pipeline.load_for_serving(source, q, str(ROOT))[0]
    model = load_model(source)[0]
    return streamed, pipeline.prepare_for_serving(model, None, q, source, str(ROOT))


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
        logits = _logits(pipeline.load_for_serving(source, _woq(woq=woq), str(ROOT))[0].model)
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
    served = pipeline.load_for_serving(source, _woq(), str(ROOT))[0]
    assert not served.report["quantized_while_loading"] and served.report["quantized_modules"] == 15


def test_without_kernels_a_quantized_config_fails_unless_it_opts_into_the_reference_path(tmp_path, monkeypatch,
                                                                                        caplog):
    monkeypatch.setattr(kernels, "_kernels", None)
    source = _llama(tmp_path)
    with pytest.raises(QuantizationError, match="make install STACK=") as error:
        pipeline.load_for_serving(source, _woq(), str(ROOT))
    assert "quantization.allow_reference_kernels: true" in str(error.value)
    served = pipeline.load_for_serving(source, _woq(allow_reference_kernels=True), str(ROOT))[0]
    assert served.report["kernels"].startswith("reference") and "SLOW REFERENCE PATH" in caplog.text
    pipeline.load_for_serving(source, parse_quantization_config({"backend": "native"}), str(ROOT))  # fp32 needs none


def _calibration(lengths: tuple[int, ...] = (24, 24, 24, 11)) -> list[CalibrationBatch]:
    torch.manual_seed(1)
    ids = [torch.randint(0, 256, (1, n)) for n in lengths]
    return [CalibrationBatch(i, torch.ones_like(i), torch.arange(i.shape[1])[None]) for i in ids]


@pytest.mark.parametrize("tied", [True, False])
def test_a_first_smoothquant_calibration_holds_one_fp32_layer_at_a_time(tmp_path, monkeypatch, tied):
    """The maxima taken one layer at a time are the fp32 model's, bit for bit; an alpha search
    scores streamed, quantized candidates; the saved calibration is what the load then serves."""
    source, batches = _llama(tmp_path / "model", tied), _calibration()
    held: list[int] = []
    collect = streamed_calibration.collect_activation_maxima

    def counting(model, batches):  # inside every layer, how many layers hold real weights
        layers = model.model.layers
        hooks = [layer.mlp.down_proj.register_forward_pre_hook(lambda *_: held.append(
            sum(any(p.device.type != "meta" for p in other.parameters()) for other in layers))) for layer in layers]
        try:
            return collect(model, batches)
        finally:
            for hook in hooks:
                hook.remove()

    monkeypatch.setattr(streamed_calibration, "collect_activation_maxima", counting)
    streamed = streamed_calibration.activation_maxima(source, batches)
    assert held == [1] * 4  # 2 layers x 2 lengths (equal lengths run as one batch)
    in_memory = native_smoothquant.collect_activation_maxima(load_model(source)[0], batches)
    assert streamed.keys() == in_memory.keys()
    for name in streamed:
        torch.testing.assert_close(streamed[name], in_memory[name], rtol=0, atol=0)

    q = parse_quantization_config({"method": "smoothquant", "backend": "native", "smoothquant": {"alpha": "auto"}})
    alpha = native_backend.calibrate_streaming(source, q, batches, tmp_path / "sq.json")
    assert alpha in (0.3, 0.4, 0.5, 0.6, 0.7) and native_smoothquant.load_calibration(tmp_path / "sq.json")[1] == alpha

    # An alpha's score, one quantized layer at a time, is the whole candidate's calibration loss.
    args = (source, lambda head: native_backend.linear_converter(q, head), native_backend.HEAD_SPEC,
            native_backend.head_layer(q), ())
    smoothing = lambda model, checkpoint: native_smoothquant.smoothing_while_loading(  # noqa: E731
        model, checkpoint, streamed, 0.5)
    load = QuantizedLoad.open(*args, smoothing)
    streamed_loss = streamed_calibration.calibration_loss(load, batches)
    assert all(p.device.type == "meta" for p in load.model.model.layers.parameters())  # every layer dropped again
    whole_loss = calibration_loss(load_quantized(*args, smoothing), batches, lambda n: None)
    assert streamed_loss == pytest.approx(whole_loss, rel=1e-5)


def test_a_checkpoint_that_cannot_stream_is_calibrated_in_memory(tmp_path):
    source = _llama(tmp_path)
    torch.save(load_model(source)[0].state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "model.safetensors").unlink()
    assert streamed_calibration.activation_maxima(source, _calibration()) is None


@pytest.mark.model
def test_quantizing_takes_less_memory_than_fp32_not_more(model_dir, tmp_path):
    """Peak RSS over loading and a first forward (fp32's safetensors are mapped, so its weights
    count once read) and RSS after it, fp32 vs WoQ INT8 and a first (uncalibrated) SmoothQuant,
    each in a fresh process (VmHWM: the peak of that process alone)."""
    code = ("import json, sys, torch, yaml; sys.path.insert(0, 'handlers'); "
            "from cpu_llm.config.serving import parse_serving_config; from cpu_llm.load.pipeline import load_for_serving; "
            "raw = yaml.safe_load(open(sys.argv[1])); raw['quantization']['backend'] = 'native'; "
            "served, info = load_for_serving(sys.argv[2], parse_serving_config(raw).quantization, '.'); "
            "status = lambda key: int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]); "
            "served.model(input_ids=torch.tensor([[1, 2, 3]])); "
            "print(json.dumps([status('VmHWM') / 1024, status('VmRSS') / 1024]))")
    rss = {}
    env = {**os.environ, calibration.CACHE_DIR_ENV: str(tmp_path)}  # no calibration cached: SmoothQuant calibrates
    for name in ("fp32", "woq-int8", "smoothquant"):
        out = subprocess.run([sys.executable, "-c", code, f"configs/{name}.yaml", str(model_dir)], cwd=ROOT,
                             check=True, capture_output=True, text=True, env=env).stdout
        rss[name] = json.loads(out.strip().splitlines()[-1])
    fp32_peak, fp32_rss = rss.pop("fp32")
    assert all(peak < fp32_peak and served < fp32_rss for peak, served in rss.values()), (fp32_peak, fp32_rss, rss)
    assert list((tmp_path / "smoothquant").glob("native-*.json")), "SmoothQuant did not calibrate"
