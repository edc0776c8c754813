"""Real TorchServe with `continuousBatching: true`: streaming, joining mid-flight, disconnects, metrics."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .server import assert_not_json_bodies_get_a_400, package, running_server

pytestmark = pytest.mark.integration
MODEL_CONFIG = {
    "minWorkers": 1, "maxWorkers": 1,
    "batchSize": 8, "maxBatchDelay": 5, "continuousBatching": True,
    "responseTimeout": 60, "startupTimeout": 240,
    "handler": {"max_prompt_tokens": 64, "max_new_tokens": 400, "default_max_new_tokens": 8, "speculation": "ngram"},
    "quantization": {"backend": "auto"},  # auto must pick native under continuous batching, in both stacks
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp("cb-server")
    store = package(tmp, model_dir, "smollm2", MODEL_CONFIG)
    with running_server(tmp, store, ["smollm2=smollm2.mar"]) as urls:
        urls["log_dir"] = tmp / "logs"
        yield urls


def predict(server, body, stream=False):
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(f"{server['inference']}/predictions/smollm2", data=data, stream=stream,
                         headers={"Content-Type": "application/json"}, timeout=120)


def metric(server, name: str) -> float:
    """Sum of a Prometheus metric's samples (0 if absent)."""
    text = requests.get(f"{server['metrics']}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_streamed_text_arrives_in_pieces_and_adds_up_to_the_plain_response(server):
    body = {"messages": [{"role": "user", "content": "Write a haiku about CPUs."}], "max_new_tokens": 24}
    plain = predict(server, body).json()
    response = predict(server, {**body, "stream": True}, stream=True)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in response.iter_lines() if line]
    assert len(lines) > 3  # several tokens per piece where drafts were kept (this server speculates)
    assert "".join(line["text"] for line in lines) == plain["text"]
    assert lines[-1]["finish_reason"] == plain["finish_reason"]
    assert lines[-1]["completion_tokens"] == plain["completion_tokens"]


def test_form_multipart_and_empty_bodies_each_get_a_400_while_others_are_served(server):
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(predict, server, {"prompt": "The history of the Roman empire", "max_new_tokens": 60})
        assert_not_json_bodies_get_a_400(f"{server['inference']}/predictions/smollm2")
        assert running.result().status_code == 200
    assert predict(server, {"prompt": "Hello", "max_new_tokens": 2}).status_code == 200


def test_short_request_joins_a_running_one_and_finishes_first(server):
    # 400 tokens: alone, this server drafts (speculation: ngram), and 120 tokens could end before the short one comes
    long_body = {"prompt": "The history of the Roman empire", "max_new_tokens": 400, "ignore_eos": True}
    short_body = {"prompt": "def add(a, b):", "max_new_tokens": 8}
    short_alone = predict(server, short_body).json()
    finished_at = {}

    def timed(name, body, delay):
        time.sleep(delay)
        result = predict(server, body).json()
        finished_at[name] = time.monotonic()
        return result

    with ThreadPoolExecutor(2) as pool:
        long_future = pool.submit(timed, "long", long_body, 0)
        short_future = pool.submit(timed, "short", short_body, 0.5)  # the long one is decoding by then
        long_result, short_result = long_future.result(), short_future.result()
    assert finished_at["short"] < finished_at["long"]
    assert short_result["text"] == short_alone["text"]
    assert short_result["batch_size"] == 2 and long_result["completion_tokens"] == 400


def test_one_token_and_bad_requests_get_well_formed_responses(server):
    one = predict(server, {"prompt": "Hello", "max_new_tokens": 1})
    assert one.status_code == 200 and one.json()["completion_tokens"] == 1
    bad = predict(server, {"prompt": "Hello", "temperature": "hot"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "temperature"
    junk = predict(server, b"{not json")
    assert junk.status_code == 400 and junk.json()["error"]["field"] == "body"
    with ThreadPoolExecutor(3) as pool:
        mixed = list(pool.map(lambda b: predict(server, b),
                              [{"prompt": "Hi", "max_new_tokens": 4}, {"prompt": ""}, {"prompt": "Yo", "max_new_tokens": 4}]))
    assert [r.status_code for r in mixed] == [200, 400, 200]


def test_disconnected_client_stops_consuming_compute(server):
    """The frontend stops sending a request whose client went away; the worker frees its row on its
    next step (at once if others are running, else when the next request arrives: meanwhile the
    worker is idle)."""
    cancelled_before = metric(server, "llm_requests_cancelled_total")
    response = predict(server, {"prompt": "Tell me a very long story.", "max_new_tokens": 400, "stream": True,
                                "ignore_eos": True}, stream=True)
    lines = (line for line in response.iter_lines() if line)
    for _ in range(3):
        next(lines)
    response.close()  # the client goes away ~397 tokens early
    time.sleep(5)  # at ~10+ tokens/s, a worker that kept going would pass 50 tokens here
    assert predict(server, {"prompt": "Hello", "max_new_tokens": 2}).status_code == 200
    log = (server["log_dir"] / "model_log.log").read_text()
    gone = re.findall(r"client gone after (\d+) tokens", log)
    # The worker sees the cancellation at its next call; one call runs up to handler.steps_per_call_ms
    # (50 ms) of steps, so a fast host streams a few more tokens than the 3 read here before it stops.
    assert gone and int(gone[-1]) < 30
    assert metric(server, "llm_requests_cancelled_total") == cancelled_before + 1


def test_llm_metrics_are_exported_for_prometheus(server):
    predict(server, {"prompt": "Hello", "max_new_tokens": 4})
    text = requests.get(f"{server['metrics']}/metrics", timeout=10).text
    for name in ("llm_time_to_first_token_seconds_bucket", "llm_inter_token_latency_seconds_count",
                 "llm_queue_time_seconds_sum", "llm_generated_tokens_total", "llm_requests_in_flight"):
        assert name in text, name
    assert metric(server, "llm_generated_tokens_total") >= 4


def test_a_repeated_prompt_comes_from_the_prefix_cache_and_repeated_text_from_drafts(server):
    body = {"prompt": "Count with me: one two three four five, one two three four five, one two three four",
            "max_new_tokens": 24, "ignore_eos": True}
    hits_before = metric(server, "llm_prefix_cache_hits_total")
    drafted_before = metric(server, "llm_draft_tokens_total")
    first, second = predict(server, body).json(), predict(server, body).json()
    assert second["text"] == first["text"]  # neither the cache nor the drafts change a greedy token
    assert second["timings"]["cached_prompt_tokens"] == second["prompt_tokens"] - 1
    assert metric(server, "llm_prefix_cache_hits_total") >= hits_before + 1
    assert metric(server, "llm_prefix_cache_tokens_total") >= second["prompt_tokens"] - 1
    timings = first["timings"]
    assert 0 < timings["accepted_draft_tokens"] <= timings["draft_tokens"]
    assert metric(server, "llm_draft_tokens_total") >= drafted_before + 2 * timings["draft_tokens"]
