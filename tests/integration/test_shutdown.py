"""Graceful shutdown of a real TorchServe: requests being generated finish, new ones get a 503
with Retry-After, then the server stops (handlers/cpu_llm/serving/shutdown.py, `serve.py stop`)."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import serve
from cpu_llm.serving.shutdown import DRAINING, default_state_dir

from .server import package, running_server

pytestmark = pytest.mark.integration
LONG = {"prompt": "The history of the Roman empire", "max_new_tokens": 60, "stream": True}


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "dynamic"])
def test_stop_finishes_requests_in_flight_and_refuses_new_ones(tmp_path, model_dir, continuous):
    config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 200,
              "continuousBatching": continuous, "responseTimeout": 120,
              "handler": {"max_prompt_tokens": 64, "max_new_tokens": 128}}
    store = package(tmp_path, model_dir, "smollm2", config)
    with running_server(tmp_path, store, ["smollm2=smollm2.mar"]) as urls:
        url = f"{urls['inference']}/predictions/smollm2"
        started = [threading.Event() for _ in range(3)]

        def stream(idx: int) -> list[dict]:
            response = requests.post(url, json=LONG, stream=True, timeout=120)
            assert response.status_code == 200
            lines = []
            for line in response.iter_lines():
                if line:
                    lines.append(json.loads(line))
                    started[idx].set()
            return lines

        with ThreadPoolExecutor(4) as pool:
            streams = [pool.submit(stream, idx) for idx in range(3)]
            for event in started:
                assert event.wait(60), "a request never started generating"
            stopped = pool.submit(serve.stop, tmp_path / "logs", 60)
            deadline = time.monotonic() + 10
            while not (default_state_dir() / DRAINING).exists():
                assert time.monotonic() < deadline, "the drain never began"
                time.sleep(0.05)
            refused = requests.post(url, json={"prompt": "Hello", "max_new_tokens": 4}, timeout=60)
            finished = [future.result() for future in streams]
            cut = stopped.result()

    assert refused.status_code == 503
    assert refused.headers.get("Retry-After") == "1"
    assert refused.json()["error"]["field"] == "server"
    for lines in finished:  # every stream ran to its end: the last line carries the summary
        assert lines[-1]["finish_reason"] == "length"
        assert lines[-1]["completion_tokens"] == LONG["max_new_tokens"]
    assert cut == 0
    assert not serve._server_running()
