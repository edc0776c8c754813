"""Shared pieces of the reliability runs (soak.py, overload.py, worker_kill.py, replicas.py): a
model-config served on spare ports, and closed-loop streaming clients.

Each of N threads sends its next streamed request (native API, mixed prompt and output lengths)
as soon as the last one ends, and records one `Outcome` per request. A share of requests hang up
after a few lines on purpose: those are `hung_up`, not failures. Unlike Locust (load_tests/
locustfile.py, which measures throughput curves) this keeps every request's own record, which is
what a fault run needs: which requests failed, when, and how.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import serve  # noqa: E402
from build_archive import build_archive  # noqa: E402

WORDS = (ROOT / "eval" / "heldout.txt").read_text().split() * 8


@contextmanager
def served(raw: dict, name: str, model_dir: Path, ports: dict[str, int]) -> Iterator[dict[str, str]]:
    """Package the model-config `raw` as `name` in a temporary folder (the frontend unpacks there
    too) and serve it on `ports`; yields the endpoint URLs and always stops the server."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / f"{name}.yaml").write_text(yaml.safe_dump(raw))
        build_archive(model_dir, name, work / f"{name}.yaml", work / "store")
        ts_config = serve.write_ts_config(work, ports, java_tmp=work)
        with serve.running(ts_config, work / "store", [f"{name}={name}.mar"], work / "logs") as urls:
            yield urls


@dataclass
class Outcome:
    """One request: when it was sent and ended, what came back. `error` is None for a request
    that finished (its last line carries finish_reason) or hung up by design."""

    sent: float
    end: float
    first: float | None = None
    tokens: int = 0
    hung_up: bool = False
    error: str | None = None


class StreamClients:
    """`streams` threads sending streamed requests to `url` until `stop()`."""

    def __init__(self, url: str, streams: int, prompt_words: tuple[int, int] = (5, 300),
                 new_tokens: tuple[int, int] = (8, 128), hang_up_share: float = 0.0, seed: int = 0) -> None:
        self.url, self.prompt_words, self.new_tokens, self.hang_up_share = url, prompt_words, new_tokens, hang_up_share
        self.lock = threading.Lock()
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(random.Random(seed + i),), daemon=True)
                        for i in range(streams)]

    def start(self) -> StreamClients:
        for thread in self.threads:
            thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self.threads:
            thread.join(timeout=300)

    def since(self, start: float) -> list[Outcome]:
        """The requests that ended at or after `start` (time.monotonic())."""
        with self.lock:
            return [o for o in self.outcomes if o.end >= start]

    def _loop(self, rng: random.Random) -> None:
        session = requests.Session()
        while not self._stop.is_set():
            start = rng.randrange(len(WORDS) - self.prompt_words[1])
            body = {"prompt": " ".join(WORDS[start:start + rng.randint(*self.prompt_words)]),
                    "max_new_tokens": rng.randint(*self.new_tokens), "stream": True}
            hang_up_after = rng.randint(1, 4) if rng.random() < self.hang_up_share else None
            outcome = Outcome(sent=time.monotonic(), end=0.0)
            try:
                self._one(session, body, hang_up_after, outcome)
            except Exception as error:  # noqa: BLE001  (every way a request can fail is an outcome)
                outcome.error = f"{type(error).__name__}: {error}"[:300]
            outcome.end = time.monotonic()
            with self.lock:
                self.outcomes.append(outcome)

    def _one(self, session: requests.Session, body: dict, hang_up_after: int | None, outcome: Outcome) -> None:
        with session.post(self.url, json=body, stream=True, timeout=300) as response:
            if response.status_code != 200:
                outcome.error = f"HTTP {response.status_code}: {response.text[:200]}"
                return
            lines = []
            for line in response.iter_lines():
                if line:
                    outcome.first = outcome.first or time.monotonic()
                    lines.append(json.loads(line))
                    if hang_up_after is not None and len(lines) >= hang_up_after and "finish_reason" not in lines[-1]:
                        outcome.hung_up = True  # closing the response drops the connection: the server cancels
                        return
        if not lines or "finish_reason" not in lines[-1]:
            outcome.error = f"the stream was cut after {len(lines)} line(s)"
            return
        outcome.tokens = lines[-1]["completion_tokens"]


def inter_token_ms(outcome: Outcome) -> float | None:
    """The request's mean inter-token latency as its client saw it."""
    if outcome.error or outcome.hung_up or outcome.first is None or outcome.tokens < 2:
        return None
    return (outcome.end - outcome.first) * 1000 / (outcome.tokens - 1)
