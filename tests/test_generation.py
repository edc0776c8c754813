"""In-process generation on the real SmolLM2: batching must not change any request's output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpu_llm.api.prompt import encode_prompt
from cpu_llm.api.request import parse_request
from cpu_llm.config.serving import ServingConfig
from cpu_llm.core.errors import RequestError
from cpu_llm.decode.sequence import Sequence
from cpu_llm.engine.hf_engine import HFEngine

pytestmark = pytest.mark.model
CONFIG = ServingConfig()
GOLDEN = Path(__file__).parent / "data" / "golden_greedy.json"


def _prepare(loaded, bodies):
    _, info = loaded
    requests = [parse_request(body, CONFIG) for body in bodies]
    return requests, [encode_prompt(info.tokenizer, r, CONFIG.max_prompt_tokens) for r in requests]


def _run(loaded, bodies):
    model, info = loaded
    requests, prompts = _prepare(loaded, bodies)
    return HFEngine(model, info, float('inf')).generate([Sequence.start(r, p) for r, p in zip(requests, prompts)])


def hf_greedy_tokens(loaded, messages, max_new_tokens):
    """Reference: transformers' own generate(), greedy, one prompt."""
    model, info = loaded
    text = info.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([info.tokenizer(text, add_special_tokens=False).input_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=info.pad_id)
    return out[0, ids.shape[1]:].tolist()


def test_converted_model_generates_the_recorded_tokens_in_every_stack(loaded):
    """The golden tokens were recorded once; both stacks (4.51.3 and 5.x) must reproduce them.

    A wrongly converted folder (e.g. rope_theta lost, tokenizer mangled) changes them.
    """
    golden = json.loads(GOLDEN.read_text())
    for case in golden["cases"]:
        assert hf_greedy_tokens(loaded, case["messages"], golden["max_new_tokens"]) == case["tokens"]


def test_greedy_matches_transformers_generate(loaded):
    _, info = loaded
    golden = json.loads(GOLDEN.read_text())
    bodies = [{"messages": c["messages"], "max_new_tokens": golden["max_new_tokens"]} for c in golden["cases"]]
    for case, result in zip(golden["cases"], _run(loaded, bodies)):
        expected = case["tokens"]
        eos_at = next((i for i, t in enumerate(expected) if t in info.eos_ids), None)
        expected_text = info.tokenizer.decode(expected[:eos_at], skip_special_tokens=True)
        assert result.text == expected_text
        assert result.finish_reason == ("eos" if eos_at is not None else "length")


BATCH = [
    {"prompt": "The capital of France is", "max_new_tokens": 12},
    {"messages": [{"role": "user", "content": "Write a haiku about CPUs."}], "max_new_tokens": 20},
    {"prompt": "def fibonacci(n):", "max_new_tokens": 16, "repetition_penalty": 1.3},
    {"prompt": "Once upon a time", "max_new_tokens": 16, "do_sample": True, "seed": 11,
     "temperature": 0.8, "top_p": 0.9, "top_k": 40},
    {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_new_tokens": 30, "stop": [" is"]},
]


def test_batch_output_equals_output_alone(loaded):
    batched = _run(loaded, BATCH)
    for body, together in zip(BATCH, batched):
        alone = _run(loaded, [body])[0]
        assert together.text == alone.text, body
        assert together.finish_reason == alone.finish_reason
        assert together.completion_tokens == alone.completion_tokens


def test_per_request_parameters_are_honoured_in_one_batch(loaded):
    results = _run(loaded, BATCH)
    for body, result in zip(BATCH, results):
        assert result.completion_tokens <= body["max_new_tokens"]
        if result.finish_reason == "length":
            assert result.completion_tokens == body["max_new_tokens"]
    assert results[0].finish_reason == "length" and results[0].completion_tokens == 12
    stopped = results[4]
    assert stopped.finish_reason == "stop" and " is" not in stopped.text
    assert all(r.prompt_tokens > 0 for r in results)


def test_seed_reproduces_and_differs(loaded):
    body = {"prompt": "Once upon a time", "max_new_tokens": 12, "do_sample": True, "temperature": 1.0}
    first, second, other = _run(loaded, [{**body, "seed": 1}, {**body, "seed": 1}, {**body, "seed": 2}])
    assert first.text == second.text
    assert first.text != other.text


def test_eos_finishes_early(loaded):
    result = _run(loaded, [{"messages": [{"role": "user", "content": "What is the capital of France?"}],
                            "max_new_tokens": 64}])[0]
    assert result.finish_reason == "eos"
    assert result.completion_tokens < 64
    assert "Paris" in result.text and "<|im_end|>" not in result.text


def test_prompt_longer_than_limit_is_rejected(loaded):
    _, info = loaded
    request = parse_request({"prompt": "word " * 50}, CONFIG)
    with pytest.raises(RequestError) as error:
        encode_prompt(info.tokenizer, request, max_prompt_tokens=10)
    assert error.value.field == "prompt" and "at most 10" in error.value.message


def test_ignore_eos_and_min_new_tokens_control_the_output_length(loaded):
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_new_tokens": 40}
    natural = _run(loaded, [body])[0]
    assert natural.finish_reason == "eos" and natural.completion_tokens < 30
    forced = _run(loaded, [{**body, "ignore_eos": True}])[0]
    assert forced.finish_reason == "length" and forced.completion_tokens == 40
    assert forced.text.startswith(natural.text)
    longer = _run(loaded, [{**body, "min_new_tokens": natural.completion_tokens + 5}])[0]
    assert longer.completion_tokens >= natural.completion_tokens + 5
