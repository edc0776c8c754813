"""Progress lines for long work at load (reading and quantizing weights, calibrating), so a log
shows that a worker taking minutes to start is alive and how far it is.

Quiet for work that ends within `every_s`: short reads (one layer, a small model) log nothing.
"""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)


class Progress:
    """Logs `<what>: <done>/<total> (<elapsed> s, ~<left> s left)` at most every `every_s` seconds."""

    def __init__(self, what: str, total: int, every_s: float = 5.0) -> None:
        self.what, self.total, self.every_s = what, total, every_s
        self.done = 0
        self.started = self.last = time.monotonic()
        self.logged = False

    def step(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        finished = self.done >= self.total
        if now - self.last < self.every_s and not (finished and self.logged):
            return
        elapsed = now - self.started
        left = "" if finished else f", ~{elapsed / self.done * (self.total - self.done):.0f} s left"
        logger.info("%s: %d/%d (%.0f s%s)", self.what, self.done, self.total, elapsed, left)
        self.last, self.logged = now, True
