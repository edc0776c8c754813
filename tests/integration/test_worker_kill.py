"""A worker killed under load (load_tests/worker_kill.py): with two workers, only the requests the
dead one was generating fail; the other keeps serving and TorchServe brings the dead one back."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from .server import package, running_server

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "load_tests"))
from worker_kill import kill_one_worker  # noqa: E402

pytestmark = pytest.mark.integration


def test_killing_one_of_two_workers_loses_only_its_own_requests(tmp_path, model_dir):
    config = {"minWorkers": 2, "maxWorkers": 2, "batchSize": 2, "maxBatchDelay": 50, "responseTimeout": 120,
              "handler": {"num_threads": 1, "max_prompt_tokens": 512, "max_new_tokens": 128}}
    store = package(tmp_path, model_dir, "smollm2", config)
    with running_server(tmp_path, store, ["smollm2=smollm2.mar"]) as urls:
        # Limits, not durations: the kill waits for completed requests, the end for recovery (a slow CPU needs longer).
        result = kill_one_worker(urls, "smollm2", streams=4, before=300, after=300, progress=True)
    assert result["completed_before"] > 0
    assert result["killed_pid"] not in result["worker_pids_after"] and len(result["worker_pids_after"]) == 2
    assert result["failed"] <= 2, result  # at most the dead worker's batch
    assert result["failed_were_in_flight_at_kill"], result
    assert result["completed_after"] > 0, result
    assert result["both_workers_ready_after_s"] is not None, result
