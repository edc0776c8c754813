import pytest

from cpu_llm.config.quantization import parse_quantization_config
from cpu_llm.config.serving import parse_serving_config
from cpu_llm.core.errors import ConfigError


def test_absent_section_means_no_quantization():
    q = parse_serving_config({}).quantization
    assert (q.method, q.backend, q.dtype) == ("none", "auto", "fp32")


def test_full_woq_section():
    q = parse_quantization_config({"method": "woq", "backend": "ipex",
                                   "woq": {"weight_dtype": "int4", "lowp_mode": "INT8", "group_size": 32}})
    assert (q.woq.weight_dtype, q.woq.lowp_mode, q.woq.group_size) == ("INT4", "INT8", 32)


def test_smoothquant_auto_alpha():
    q = parse_quantization_config({"method": "smoothquant", "smoothquant": {"alpha": "auto", "alpha_min": 0.4}})
    assert q.smoothquant.alpha == "auto" and q.smoothquant.alpha_min == 0.4


@pytest.mark.parametrize("section,key,allowed", [
    ({"method": "int8"}, "quantization.method", "['none', 'woq', 'smoothquant']"),
    ({"backend": "onnx"}, "quantization.backend", "['auto', 'ipex', 'native']"),
    ({"dtype": "fp16"}, "quantization.dtype", "['fp32', 'bf16']"),
    ({"method": "woq", "woq": {"weight_dtype": "INT2"}}, "quantization.woq.weight_dtype", "INT8"),
    ({"method": "woq", "woq": {"lowp_mode": "FP8"}}, "quantization.woq.lowp_mode", "AUTO"),
    ({"method": "woq", "woq": {"act_quant_mode": "PER_ROW"}}, "quantization.woq.act_quant_mode", "PER_TENSOR"),
])
def test_bad_choice_names_key_and_allowed_values(section, key, allowed):
    with pytest.raises(ConfigError) as error:
        parse_quantization_config(section)
    assert error.value.key == key and allowed in str(error.value)


@pytest.mark.parametrize("section,key", [
    ({"method": "woq", "woq": {"group_size": 48}}, "quantization.woq.group_size"),
    ({"method": "woq", "woq": {"group_size": 0}}, "quantization.woq.group_size"),
    ({"method": "woq", "woq": {"groupsize": 32}}, "quantization.woq.groupsize"),
    ({"method": "smoothquant", "smoothquant": {"alpha": 1.5}}, "quantization.smoothquant.alpha"),
    ({"method": "smoothquant", "smoothquant": {"alpha_min": 0.8, "alpha_max": 0.6}},
     "quantization.smoothquant.alpha_min"),
    ({"method": "smoothquant", "smoothquant": {"num_samples": 0}}, "quantization.smoothquant.num_samples"),
    ({"method": "woq", "smoothquant": {"alpha": 0.5}}, "quantization.smoothquant"),
    ({"method": "none", "woq": {}}, "quantization.woq"),
    ({"keep_full_precision": "lm_head"}, "quantization.keep_full_precision"),
    ({"fallback_to_unquantized": "yes"}, "quantization.fallback_to_unquantized"),
    ({"metod": "woq"}, "quantization.metod"),
])
def test_bad_values_name_the_key(section, key):
    with pytest.raises(ConfigError) as error:
        parse_quantization_config(section)
    assert error.value.key == key
