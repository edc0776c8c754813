"""Overload: with the queue full (`jobQueueSize`), TorchServe refuses a request at once with a 503
and a JSON body, and the requests it admitted still finish."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .server import package, running_server

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "dynamic"])
def test_a_full_queue_refuses_at_once_and_serves_what_it_admitted(tmp_path, model_dir, continuous):
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 2, "maxBatchDelay": 50, "jobQueueSize": 2,
              "continuousBatching": continuous, "responseTimeout": 120,
              "handler": {"max_prompt_tokens": 64, "max_new_tokens": 128}}
    store = package(tmp_path, model_dir, "smollm2", config)
    with running_server(tmp_path, store, ["smollm2=smollm2.mar"]) as urls:
        url = f"{urls['inference']}/predictions/smollm2"
        body = {"prompt": "The history of the Roman empire", "max_new_tokens": 100}

        def send(_: int) -> tuple[int, float, dict]:
            response = requests.post(url, json=body, timeout=120)
            return response.status_code, time.monotonic(), response.json()

        with ThreadPoolExecutor(10) as pool:
            results = list(pool.map(send, range(10)))
        answered_after = requests.post(url, json={"prompt": "Hi", "max_new_tokens": 4}, timeout=60)

    served = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 503]
    assert len(served) + len(refused) == 10
    assert 2 <= len(served) <= 6 and refused  # batch + queue admitted, the rest refused
    assert max(at for _, at, _ in refused) < min(at for _, at, _ in served)  # refusals come first, not after a timeout
    assert all(b["completion_tokens"] == 100 for _, _, b in served)
    assert all(b["code"] == 503 and b["type"] == "ServiceUnavailableException" for _, _, b in refused)
    assert answered_after.status_code == 200
