"""Quantization at load: what each mode turns the linear layers into, and refusals."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from pathlib import Path

import pytest
import torch
import yaml

from cpu_llm import kernels
from cpu_llm.api.prompt import encode_prompt
from cpu_llm.api.request import parse_request
from cpu_llm.config.quantization import parse_quantization_config
from cpu_llm.config.serving import parse_serving_config
from cpu_llm.core.errors import ConfigError, QuantizationError
from cpu_llm.decode.sequence import Sequence
from cpu_llm.engine.hf_steps import left_pad, prefill
from cpu_llm.engine.select import engine_for
from cpu_llm.layers.quantized_linear import QuantizedLinear
from cpu_llm.load import backend, calibration, pipeline
from cpu_llm.load.hf import load_model

ROOT = Path(__file__).resolve().parent.parent
HAS_IPEX = importlib.util.find_spec("intel_extension_for_pytorch") is not None
needs_ipex = pytest.mark.skipif(not HAS_IPEX, reason="IPEX is only in the ipex stack")


BACKENDS = [pytest.param("native"), pytest.param("ipex", marks=needs_ipex)]


def _config(name: str, backend: str = "auto", **changes):
    raw = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    raw.setdefault("quantization", {}).update(backend=backend, **changes)
    return parse_serving_config(raw)


def _serve(model_dir, name: str, backend: str = "auto", **changes):
    config = _config(name, backend, **changes)
    served, info = pipeline.load_for_serving(str(model_dir), config.quantization, str(ROOT))
    return served, info, config


def _generate(served, info, config, bodies):
    requests = [parse_request(b, config) for b in bodies]
    prompts = [encode_prompt(info.tokenizer, r, config.max_prompt_tokens) for r in requests]
    return [r.text for r in engine_for(served, info).generate([Sequence.start(r, p) for r, p in zip(requests, prompts)])]


def _assert_rows_independent(served, info, config):
    """Quantization must not couple the rows of a batch. Identical rows give identical text,
    and with fp32 compute a row's logits alone and inside a padded batch differ only by the
    attention kernels' own float drift (fp32 shows ~3e-5 too). Int8 compute (activations
    quantized on the fly) turns that ~1e-7 drift into whole rounding steps, so its logits are
    not compared (tests/test_kernels.py pins that the kernels' rows are bitwise independent).
    Greedy text alone vs in a batch is not compared here: at a near-tie the drift can flip a
    token in any mode, fp32 included."""
    a = {"prompt": "Water boils at", "max_new_tokens": 8}
    c = {"prompt": "The history of the bicycle begins in", "max_new_tokens": 8}
    texts = _generate(served, info, config, [c, a, a])
    assert texts[1] == texts[2]
    prompts = [encode_prompt(info.tokenizer, parse_request(b, config), 64) for b in (a, c)]
    with torch.inference_mode():
        alone = prefill(served.model, *left_pad(prompts[:1], info.pad_id), served.new_cache(1))[0]
        batch = prefill(served.model, *left_pad(prompts, info.pad_id), served.new_cache(2))[0]
    q = config.quantization
    int8_compute = (any(getattr(m, "compute", None) == "int8" or getattr(m, "kind", None) == "w8a8"
                        for m in served.model.modules())
                    or (served.backend == "ipex" and q.method == "woq" and q.woq.lowp_mode in ("AUTO", "INT8")))
    if not int8_compute:
        assert float((alone[0] - batch[0]).abs().max()) < 1e-4


# Module types each backend turns SmolLM2's 30 layers x 7 projections into.
WOQ_MODULES = {"native": "QuantizedLinear", "ipex": "WeightOnlyQuantizedLinear"}
WOQ_COUNTS = {"native": 211, "ipex": 151}  # incl. lm_head; IPEX fuses gate/up and q/k/v into fewer modules


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(calibration.CACHE_DIR_ENV, str(tmp_path / "cache"))


def test_bf16_is_refused_on_cpus_without_avx512bw(monkeypatch, model_dir):
    monkeypatch.setattr(pipeline, "cpu_flags", lambda: {"avx2", "fma"})
    with pytest.raises(ConfigError) as error:
        pipeline.prepare_for_serving(torch.nn.Linear(2, 2), None, parse_quantization_config({"dtype": "bf16"}),
                                     str(model_dir), str(ROOT))
    assert error.value.key == "quantization.dtype" and "avx512bw" in str(error.value)


@pytest.mark.parametrize("section,key", [
    ({"method": "woq", "woq": {"weight_dtype": "NF4"}}, "quantization.woq.weight_dtype"),
    ({"method": "woq", "woq": {"lowp_mode": "BF16"}}, "quantization.woq.lowp_mode"),
    ({"method": "woq", "woq": {"group_size": 16}}, "quantization.woq.group_size"),
    ({"method": "smoothquant", "dtype": "bf16"}, "quantization.dtype"),
])
def test_native_backend_refuses_what_only_ipex_implements(section, key):
    with pytest.raises(ConfigError) as error:
        backend.resolve_backend(parse_quantization_config({**section, "backend": "native"}))
    assert error.value.key == key


def test_auto_picks_native_without_ipex_and_ipex_must_be_installed_to_be_asked_for(monkeypatch):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    assert backend.resolve_backend(parse_quantization_config({"method": "woq"})) == "native"
    with pytest.raises(ConfigError, match="quantization.backend: ipex: intel-extension-for-pytorch is not installed"):
        backend.resolve_backend(parse_quantization_config({"backend": "ipex"}))


@pytest.mark.parametrize("section,built,expected,why", [
    ({"method": "woq"}, True, "native", "our quantized kernels decode faster"),
    ({"method": "smoothquant"}, True, "native", "our quantized kernels decode faster"),
    ({"method": "woq", "woq": {"weight_dtype": "INT4"}}, True, "native", "our quantized kernels decode faster"),
    ({"method": "none"}, True, "ipex", "fp32"),
    ({"method": "woq", "woq": {"weight_dtype": "NF4"}}, True, "ipex", "quantization.woq.weight_dtype"),
    ({"method": "smoothquant", "dtype": "bf16"}, True, "ipex", "quantization.dtype"),
    ({"method": "woq"}, False, "ipex", "the native kernels are missing"),
])
def test_auto_with_ipex_installed_picks_native_for_what_our_kernels_serve(monkeypatch, caplog, section, built,
                                                                         expected, why):
    """Measured on every CPU we have run, AMX included: our quantized decode beats IPEX's
    (docs/quantization.md); IPEX keeps fp32, what only it implements, and hosts without our kernels."""
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: object())
    for module in (backend, kernels):  # kernels: the native backend's own check, on the native rows
        monkeypatch.setattr(module, "kernels_available", lambda: built)
    monkeypatch.setattr(backend, "kernel_status", lambda: "reference (not built)")
    caplog.set_level(logging.INFO, logger=backend.logger.name)
    assert backend.resolve_backend(parse_quantization_config(section)) == expected
    assert f"quantization backend: {expected} (" in caplog.text and why in caplog.text


def test_keep_full_precision_must_name_a_linear_layer():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(ConfigError, match="'lm_head' is not a linear layer"):
        pipeline.keep_full_precision(model, ("lm_head",))
    pipeline.keep_full_precision(model, ("0",))
    assert isinstance(model[0], pipeline.FullPrecisionLinear)


@pytest.mark.model
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["woq-int8", "woq-int4"])
def test_woq_quantizes_every_linear_layer_and_the_lm_head(model_dir, name, backend):
    served, info, config = _serve(model_dir, name, backend)
    modules = served.report["linear_modules"]
    assert modules.get(WOQ_MODULES[backend]) == WOQ_COUNTS[backend]
    assert "Linear" not in modules  # nothing left as a plain float nn.Linear, the LM head included
    if backend == "native":  # quantized while loading; the tied head reads the embedding's int8 rows
        assert served.report["quantized_while_loading"]
        assert served.model.lm_head.qweight is served.model.model.embed_tokens.qweight
        head = served.model.lm_head
        assert head.packed.qweight.dtype == torch.int8 and head.compute == "int8"
        # Tiled wherever the kernels are built (every layer, the shared table in place).
        tiled = kernels.kernels_available()
        assert served.report["tiled_layers"] == (WOQ_COUNTS[backend] if tiled else 0)
        assert head.tiled == served.model.model.embed_tokens.tiled == tiled
    woq = next(m for m in served.model.modules() if type(m).__name__ == WOQ_MODULES[backend])
    stored = woq.qweight if backend == "native" else woq.weight
    assert stored.dtype in (torch.int8, torch.uint8, torch.quint4x2)
    assert served.batch_invariant
    _assert_rows_independent(served, info, config)


@pytest.mark.model
def test_native_woq_with_fp32_compute_keeps_rows_exact(model_dir):
    served, info, config = _serve(model_dir, "woq-int8", "native", woq={"weight_dtype": "INT8", "lowp_mode": "NONE"})
    assert {m.compute for m in served.model.modules() if isinstance(m, QuantizedLinear)} == {"fp32"}
    _assert_rows_independent(served, info, config)


@pytest.mark.model
@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_full_precision_keeps_the_lm_head_and_its_tied_embedding_fp32(model_dir, backend):
    served, info, config = _serve(model_dir, "woq-int8", backend, keep_full_precision=["lm_head"])
    assert isinstance(served.model.lm_head, pipeline.FullPrecisionLinear)
    assert served.model.lm_head.weight.dtype == torch.float32
    if backend == "native":
        assert served.model.lm_head.weight is served.model.model.embed_tokens.weight  # one fp32 table, no copy
    assert "Paris" in _generate(served, info, config, [{"prompt": "The capital of France is", "max_new_tokens": 4}])[0]


@pytest.mark.model
@pytest.mark.parametrize("backend", BACKENDS)
def test_smoothquant_runs_int8_linears_and_reuses_its_calibration(model_dir, caplog, backend):
    caplog.set_level(logging.INFO)
    started = time.perf_counter()
    served, info, config = _serve(model_dir, "smoothquant", backend)
    first_s = time.perf_counter() - started
    if backend == "ipex":
        assert served.report["linear_modules"]["int8 linear ops in IPEX traced graph"] == 151  # incl. lm_head
        assert not served.batch_invariant
    else:
        assert served.report["linear_modules"] == {"QuantizedLinear": 211}  # incl. lm_head
        assert {m.kind for m in served.model.modules() if type(m).__name__ == "QuantizedLinear"} == {"w8a8"}
        assert served.batch_invariant  # activations are quantized per row
        _assert_rows_independent(served, info, config)
    assert "SmoothQuant: calibrated with alpha" in caplog.text
    assert "Paris" in _generate(served, info, config,
                                [{"prompt": "The capital of France is", "max_new_tokens": 4}])[0]
    caplog.clear()
    started = time.perf_counter()
    again, _, _ = _serve(model_dir, "smoothquant", backend)
    assert "SmoothQuant: reusing calibration" in caplog.text
    assert "calibrated with alpha" not in caplog.text
    print(f"{backend} smoothquant load: first {first_s:.1f} s, cached {time.perf_counter() - started:.1f} s")
    if backend == "native":  # calibrated one fp32 layer at a time, then both smoothed while loading, to the same bits
        assert served.report["quantized_while_loading"] and again.report["quantized_while_loading"]
        first, second = served.model.state_dict(), again.model.state_dict()
        assert first.keys() == second.keys()
        assert [k for k in first if not torch.equal(first[k], second[k])] == []


@pytest.mark.model
def test_native_smoothquant_refuses_an_ipex_summary_naming_the_key(model_dir, tmp_path):
    summary = tmp_path / "ipex-summary.json"
    summary.write_text(json.dumps({" ": {"q_op_infos": {}}}))
    with pytest.raises(ConfigError) as error:
        _serve(model_dir, "smoothquant", "native", smoothquant={"qconfig_summary_file": str(summary)})
    assert error.value.key == "quantization.smoothquant.qconfig_summary_file"
    assert "not a native SmoothQuant calibration" in str(error.value)


@pytest.mark.model
def test_an_offline_native_calibration_is_served_without_calibrating(model_dir, tmp_path, caplog):
    from calibrate import calibrate

    out = tmp_path / "smollm2-sq.json"
    assert calibrate(ROOT / "configs" / "smoothquant.yaml", model_dir, out, backend="native") == 0.7
    caplog.set_level(logging.INFO)
    served, info, config = _serve(model_dir, "smoothquant", "native", smoothquant={"qconfig_summary_file": str(out)})
    assert f"SmoothQuant: reusing calibration {out}" in caplog.text and "calibrated with alpha" not in caplog.text
    assert served.report["quantized_modules"] == 211


def test_native_woq_quantizes_gpt2_conv1d_layers():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64)).eval()
    ids = torch.randint(0, 128, (1, 12))
    with torch.inference_mode():
        before = model(ids).logits
    served = pipeline.prepare_for_serving(model, None, parse_quantization_config(
        {"method": "woq", "backend": "native"}), "/nonexistent", str(ROOT))
    # 2 layers x 4 Conv1D + the LM head, which reads the int8 rows of the tied embedding
    assert served.report["linear_modules"] == {"QuantizedLinear": 9}
    assert served.model.lm_head.qweight is served.model.transformer.wte.qweight
    with torch.inference_mode():
        after = served.model(ids).logits
    assert float((after - before).norm() / before.norm()) < 0.02


@needs_ipex
def test_unsupported_architecture_fails_instead_of_serving_fp32(caplog):
    from transformers import GPT2Config, GPT2LMHeadModel

    def tiny_gpt2():  # as from_pretrained would load it (config.architectures set)
        config = GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=128, n_positions=64,
                            architectures=["GPT2LMHeadModel"])
        return GPT2LMHeadModel(config).eval()

    model = tiny_gpt2()
    q = parse_quantization_config({"method": "woq", "backend": "ipex", "keep_full_precision": []})
    with pytest.raises(QuantizationError, match="left every linear layer unquantized"):
        pipeline.prepare_for_serving(model, None, q, "/nonexistent", str(ROOT))
    caplog.set_level(logging.WARNING)
    fallback = parse_quantization_config({"method": "woq", "backend": "ipex", "keep_full_precision": [],
                                          "fallback_to_unquantized": True})
    served = pipeline.prepare_for_serving(tiny_gpt2(), None, fallback, "/nonexistent", str(ROOT))
    assert served.report["quantized_modules"] == 0
    assert "SERVING UNQUANTIZED" in caplog.text


@needs_ipex
@pytest.mark.model
@pytest.mark.parametrize("section", [
    pytest.param({"dtype": "bf16"}, marks=pytest.mark.skipif(
        not backend.bf16_capable(backend.cpu_flags()), reason="bf16 needs AVX-512 BW or AMX")),
    {"method": "woq", "woq": {"weight_dtype": "NF4", "group_size": 32}},
], ids=["bf16", "woq-nf4"])
def test_other_documented_modes_load_and_generate(model_dir, section):
    model, info = load_model(str(model_dir))
    config = parse_serving_config({"quantization": section})
    served = pipeline.prepare_for_serving(model, info.tokenizer, config.quantization, str(model_dir), str(ROOT))
    if section.get("method") == "woq":
        assert served.report["linear_modules"]["WeightOnlyQuantizedLinear"] == 151  # incl. lm_head
    text = _generate(served, info, config, [{"prompt": "The capital of France is", "max_new_tokens": 4}])[0]
    assert "Paris" in text
