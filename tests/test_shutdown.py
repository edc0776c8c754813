"""The drain protocol between the supervisor and the workers (handlers/cpu_llm/serving/shutdown.py)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from cpu_llm.serving.shutdown import DRAINING, QUIET_S, WorkerDrain, drain, in_flight, prepare


def test_workers_report_what_they_generate_and_see_the_drain(tmp_path):
    state = prepare(tmp_path / "state")
    worker = WorkerDrain(state)
    assert not worker.draining()
    worker.report(3)
    assert in_flight(state) == 3
    (state / DRAINING).touch()
    assert worker.draining()
    assert WorkerDrain(None).draining() is False  # no supervisor: never drains, reports nothing
    WorkerDrain(None).report(5)


def test_a_dead_workers_last_report_does_not_count(tmp_path):
    state = prepare(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    WorkerDrain(state, pid=dead.pid).report(2)
    WorkerDrain(state).report(1)
    assert in_flight(state) == 1


def test_prepare_clears_a_previous_runs_drain(tmp_path):
    (tmp_path / DRAINING).touch()
    WorkerDrain(tmp_path).report(4)
    prepare(tmp_path)
    assert not (tmp_path / DRAINING).exists() and in_flight(tmp_path) == 0


def test_drain_waits_for_the_last_request_then_a_quiet_moment(tmp_path):
    state = prepare(tmp_path)
    worker = WorkerDrain(state)
    worker.report(1)
    threading.Timer(0.5, worker.report, args=(0,)).start()
    started = time.monotonic()
    assert drain(state, grace_s=10, poll_s=0.05) == 0
    assert 0.5 + QUIET_S <= time.monotonic() - started < 0.5 + QUIET_S + 5
    assert (state / DRAINING).exists()


def test_drain_gives_up_at_the_grace_period_and_says_how_many_were_cut(tmp_path):
    state = prepare(tmp_path)
    WorkerDrain(state).report(2)
    started = time.monotonic()
    assert drain(state, grace_s=0.3, poll_s=0.05) == 2
    assert time.monotonic() - started < 1
