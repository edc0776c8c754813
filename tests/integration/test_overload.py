"""Overload (load_tests/overload.py): with the queue full (`jobQueueSize`), TorchServe refuses a
request at once with a 503 and a JSON body, and the requests it admitted still finish."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import requests

from .server import package, running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "load_tests"))
from overload import flood  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "dynamic"])
def test_a_full_queue_refuses_at_once_and_serves_what_it_admitted(tmp_path, model_dir, continuous):
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 2, "maxBatchDelay": 50, "jobQueueSize": 2,
              "continuousBatching": continuous, "responseTimeout": 120,
              "handler": {"max_prompt_tokens": 64, "max_new_tokens": 128}}
    store = package(tmp_path, model_dir, "smollm2", config)
    with running_server(tmp_path, store, ["smollm2=smollm2.mar"]) as urls:
        url = f"{urls['inference']}/predictions/smollm2"
        results = flood(url, 10, {"prompt": "The history of the Roman empire", "max_new_tokens": 100})
        answered_after = requests.post(url, json={"prompt": "Hi", "max_new_tokens": 4}, timeout=60)

    served = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 503]
    assert len(served) + len(refused) == 10
    assert 2 <= len(served) <= 6 and refused  # batch + queue admitted, the rest refused
    assert max(r["answered"] for r in refused) < min(r["answered"] for r in served)  # at once, not after a timeout
    assert all(r["body"]["completion_tokens"] == 100 for r in served)
    assert all(r["body"]["code"] == 503 and r["body"]["type"] == "ServiceUnavailableException" for r in refused)
    assert answered_after.status_code == 200
