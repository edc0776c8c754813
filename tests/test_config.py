from pathlib import Path

import pytest
import yaml

from cpu_llm.config.serving import ServingConfig, check_context_length, parse_serving_config
from cpu_llm.core.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_shipped_model_config_is_valid():
    raw = yaml.safe_load((ROOT / "configs" / "model-config.yaml").read_text())
    config = parse_serving_config(raw)
    assert config.model_path == "model"
    assert config.num_threads == 0  # "auto"


def test_empty_config_gives_defaults():
    assert parse_serving_config(None) == ServingConfig()


def test_misspelt_frontend_key_is_rejected_with_suggestion():
    with pytest.raises(ConfigError) as error:
        parse_serving_config({"BatchSize": 4})
    assert error.value.key == "BatchSize"
    assert "did you mean 'batchSize'" in str(error.value)


@pytest.mark.parametrize("key,value", [("batchSize", 0), ("maxBatchDelay", -1), ("responseTimeout", "300"),
                                       ("minWorkers", True)])
def test_frontend_values_are_type_checked(key, value):
    with pytest.raises(ConfigError, match=f"^model-config.yaml: {key}: must be an integer"):
        parse_serving_config({key: value})


def test_min_workers_above_max_workers():
    with pytest.raises(ConfigError, match="minWorkers"):
        parse_serving_config({"minWorkers": 3, "maxWorkers": 2})


def test_unknown_handler_key_names_the_key():
    with pytest.raises(ConfigError) as error:
        parse_serving_config({"handler": {"max_new_token": 10}})
    assert error.value.key == "handler.max_new_token"
    assert "did you mean 'max_new_tokens'" in str(error.value)


@pytest.mark.parametrize("section,key", [
    ({"max_prompt_tokens": 0}, "handler.max_prompt_tokens"),
    ({"num_threads": -2}, "handler.num_threads"),
    ({"num_threads": "many"}, "handler.num_threads"),
    ({"model_path": ""}, "handler.model_path"),
    ({"default_max_new_tokens": 600, "max_new_tokens": 512}, "handler.default_max_new_tokens"),
    ({"kernel_isa": "sse2"}, "handler.kernel_isa"),
    ({"kernel_isa": 2}, "handler.kernel_isa"),
])
def test_bad_handler_values_name_the_key(section, key):
    with pytest.raises(ConfigError) as error:
        parse_serving_config({"handler": section})
    assert error.value.key == key


def test_kernel_isa_takes_names_and_aliases_in_any_case():
    assert parse_serving_config({}).kernel_isa == "auto"
    assert parse_serving_config({"handler": {"kernel_isa": "AVX512"}}).kernel_isa == "avx512-vnni"
    assert parse_serving_config({"handler": {"kernel_isa": "avx2"}}).kernel_isa == "avx2"


def test_context_length_check():
    config = parse_serving_config({"handler": {"max_prompt_tokens": 8000, "max_new_tokens": 512}})
    with pytest.raises(ConfigError, match="exceeds the model's context of 8192"):
        check_context_length(config, 8192)
    check_context_length(ServingConfig(), 8192)


@pytest.mark.parametrize("workers", [{"minWorkers": 2, "maxWorkers": 2}, {"minWorkers": 1, "maxWorkers": 2}, {}])
def test_continuous_batching_needs_exactly_one_worker(workers):
    # TorchServe 0.12 stalls a continuous-batching model with two workers (docs/reliability.md).
    key = "minWorkers" if workers.get("minWorkers") != 1 else "maxWorkers"
    with pytest.raises(ConfigError, match=f"{key}: must be 1 with continuousBatching"):
        parse_serving_config({"continuousBatching": True, **workers})
    parse_serving_config({"minWorkers": 2, "maxWorkers": 2})  # dynamic batching: any number
