"""Real TorchServe on loopback: HTTP requests, dynamic batching, bad input, worker health."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from test_request_properties import bodies, raw_bodies

from cpu_llm.api.request import KNOWN_FIELDS

from .server import assert_not_json_bodies_get_a_400, package, running_server

pytestmark = pytest.mark.integration
MODEL_CONFIG = {
    "minWorkers": 1, "maxWorkers": 1,
    "batchSize": 4, "maxBatchDelay": 1500,  # wide window so concurrent test requests share a batch
    "responseTimeout": 120, "startupTimeout": 240,
    "handler": {"max_prompt_tokens": 64, "max_new_tokens": 32, "default_max_new_tokens": 8},
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("server")
    store = package(tmp, model_dir, "smollm2", MODEL_CONFIG)
    with running_server(tmp, store, ["smollm2=smollm2.mar"]) as urls:
        yield urls


def predict(server, body, **kwargs):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{server['inference']}/predictions/smollm2", data=data,
                         headers={"Content-Type": "application/json"}, timeout=120, **kwargs)


def predict_concurrently(server, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: predict(server, b), bodies))


def test_prompt_generates_text(server):
    response = predict(server, {"prompt": "The capital of France is", "max_new_tokens": 8})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["text"].strip() and not body["text"].startswith("The capital")
    assert body["finish_reason"] == "length" and body["completion_tokens"] == 8
    assert body["prompt_tokens"] == 5
    assert set(body["timings"]) >= {"prefill_ms", "decode_ms", "total_ms", "decode_tokens_per_s"}


def test_chat_messages_use_the_chat_template(server):
    response = predict(server, {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                                "max_new_tokens": 32})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["finish_reason"] == "eos" and "Paris" in body["text"]


def test_frontend_settings_from_model_config_are_in_effect(server):
    described = requests.get(f"{server['management']}/models/smollm2", timeout=10).json()[0]
    assert described["batchSize"] == 4 and described["maxBatchDelay"] == 1500
    assert described["minWorkers"] == 1 and described["maxWorkers"] == 1
    assert described["responseTimeout"] == 120
    assert [w["status"] for w in described["workers"]] == ["READY"]


def test_concurrent_requests_share_one_handle_call_and_match_solo_output(server):
    bodies = [{"prompt": p, "max_new_tokens": 10} for p in
              ("The capital of France is", "Water boils at", "def add(a, b):", "My favourite colour is")]
    solo = [predict(server, b).json() for b in bodies]
    assert all(s["batch_size"] == 1 for s in solo)
    together = predict_concurrently(server, bodies)
    assert [r.status_code for r in together] == [200] * 4
    assert [r.json()["batch_size"] for r in together] == [4] * 4
    assert [r.json()["text"] for r in together] == [s["text"] for s in solo]


BAD_REQUESTS = [
    (b"{not json", "body"),
    ({"max_new_tokens": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": ["a"]}, "prompt"),
    ({"prompt": "hi", "max_new_tokens": "5"}, "max_new_tokens"),
    ({"prompt": "hi", "max_new_tokens": 1000}, "max_new_tokens"),
    ({"prompt": "hi", "temperature": -1}, "temperature"),
    ({"prompt": "hi", "top_p": 2}, "top_p"),
    ({"prompt": "hi", "stop": "."}, "stop"),
    ({"prompt": "hi", "max_tokens": 5}, "max_tokens"),
    ({"prompt": "word " * 100}, "prompt"),  # over max_prompt_tokens=64
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
]


@pytest.mark.parametrize("body,field", BAD_REQUESTS, ids=[f for _, f in BAD_REQUESTS])
def test_bad_request_gets_400_naming_the_field(server, body, field):
    response = predict(server, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field


def test_form_multipart_and_empty_bodies_each_get_a_400(server):
    assert_not_json_bodies_get_a_400(f"{server['inference']}/predictions/smollm2")
    assert predict(server, {"prompt": "Hello", "max_new_tokens": 2}).status_code == 200


def test_bad_requests_do_not_spoil_their_batch(server):
    good = {"prompt": "Water boils at", "max_new_tokens": 6}
    solo = predict(server, good).json()["text"]
    responses = predict_concurrently(server, [good, {"prompt": ""}, good, {"prompt": "x", "top_k": -3}])
    assert [r.status_code for r in responses] == [200, 400, 200, 400]
    assert responses[0].json()["text"] == responses[2].json()["text"] == solo
    assert responses[0].json()["batch_size"] == 2  # the two valid ones generated together
    assert responses[3].json()["error"]["field"] == "top_k"


def test_worker_stays_up_after_bad_input(server):
    for body, _ in BAD_REQUESTS[:4]:
        predict(server, body)
    described = requests.get(f"{server['management']}/models/smollm2", timeout=10).json()[0]
    assert [w["status"] for w in described["workers"]] == ["READY"]
    assert predict(server, {"prompt": "Hello", "max_new_tokens": 2}).status_code == 200


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=raw_bodies(KNOWN_FIELDS) | bodies(KNOWN_FIELDS))
def test_generated_bodies_get_an_answer_or_a_4xx(server, body):
    """A sample of the property tests' bodies (tests/test_request_properties.py), sent for real."""
    response = predict(server, body if isinstance(body, bytes) else json.dumps(body))
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    if response.status_code != 200:
        assert "field" in response.json()["error"]


def test_worker_is_ready_after_the_generated_bodies(server):
    described = requests.get(f"{server['management']}/models/smollm2", timeout=10).json()[0]
    assert [w["status"] for w in described["workers"]] == ["READY"]
    assert predict(server, {"prompt": "Hello", "max_new_tokens": 2}).status_code == 200


def _lines(response) -> list[dict]:
    return [json.loads(line) for line in response.iter_lines() if line]


def test_streaming_and_plain_requests_share_a_dynamic_batch(server):
    body = {"prompt": "The capital of France is", "max_new_tokens": 12}
    plain_alone = predict(server, body).json()
    with ThreadPoolExecutor(2) as pool:
        streamed = pool.submit(predict, server, {**body, "stream": True}, stream=True)
        plain = pool.submit(predict, server, body)
        streamed, plain = streamed.result(), plain.result()
    assert streamed.headers["Content-Type"].startswith("application/x-ndjson")
    assert streamed.headers.get("Transfer-Encoding") == "chunked"
    lines = _lines(streamed)
    assert len(lines) > 3 and all(set(line) == {"text"} for line in lines[:-1])
    assert "".join(line["text"] for line in lines) == plain_alone["text"] == plain.json()["text"]
    assert lines[-1]["batch_size"] == plain.json()["batch_size"] == 2
    assert lines[-1]["finish_reason"] == "length" and lines[-1]["completion_tokens"] == 12
