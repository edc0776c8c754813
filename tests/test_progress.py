"""Progress lines at load: quiet for short work, regular lines with an estimate for long work."""

from __future__ import annotations

import logging

from cpu_llm.core.progress import Progress


def test_short_work_logs_nothing(caplog):
    caplog.set_level(logging.INFO, logger="cpu_llm.core.progress")
    progress = Progress("reading", 3, every_s=60)
    for _ in range(3):
        progress.step()
    assert caplog.records == []


def test_long_work_logs_each_interval_with_what_is_left_and_the_end(caplog):
    caplog.set_level(logging.INFO, logger="cpu_llm.core.progress")
    progress = Progress("reading and quantizing: linear layers", 4, every_s=0)
    for _ in range(4):
        progress.step()
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 4
    assert lines[0].startswith("reading and quantizing: linear layers: 1/4 (") and "s left)" in lines[0]
    assert lines[-1].startswith("reading and quantizing: linear layers: 4/4 (") and "left" not in lines[-1]
