"""Worker fault under load: SIGKILL one of two workers mid-run and measure what it costs.

Serves `--config` with `minWorkers: 2` (each worker `--threads` threads; dynamic batching, since
TorchServe 0.12's continuous batching stalls with two workers: config.py refuses it),
keeps `--streams` streaming clients busy, kills one worker's process after `--before` seconds,
and keeps the load on for `--after` seconds. Prints: the requests that failed (and how), those
completed before and after the kill, output tokens/s before and after, and how long until both
workers were READY again (TorchServe restarts a dead worker by itself).

    python load_tests/worker_kill.py                        # 2 workers x 1 thread, 8 streams
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
from streams import Outcome, StreamClients, served  # noqa: E402

PORTS = {"inference": 28480, "management": 28481, "metrics": 28482}


def workers(management: str, model: str) -> list[dict]:
    with urllib.request.urlopen(f"{management}/models/{model}", timeout=5) as response:
        return [w for entry in json.load(response) for w in entry["workers"]]


def tokens_per_s(outcomes: list[Outcome], seconds: float) -> float:
    return sum(o.tokens for o in outcomes if not o.error) / seconds


def completed(clients: StreamClients, since: float = 0.0) -> int:
    return sum(not o.error and o.end >= since for o in list(clients.outcomes))


def kill_one_worker(urls: dict[str, str], model: str, streams: int, before: float, after: float,
                    progress: bool = False) -> dict:
    """Load, kill the first READY worker, measure; returns the figures.

    With `progress`, `before` and `after` are limits rather than durations: the kill comes once
    requests have completed, and the run ends once both workers are READY and a request has
    completed since the kill. A test then waits for what it checks, on a slow CPU as on a fast one."""
    clients = StreamClients(f"{urls['inference']}/predictions/{model}", streams, new_tokens=(32, 96)).start()
    started = time.monotonic()
    while time.monotonic() - started < before and not (progress and completed(clients) >= 2):
        time.sleep(0.2)
    victim = next(w for w in workers(urls["management"], model) if w["status"] == "READY")
    killed_at = time.monotonic()
    os.kill(int(victim["pid"]), signal.SIGKILL)
    back = None
    while time.monotonic() - killed_at < after and not (progress and back is not None and completed(clients, killed_at)):
        if back is None:
            states = workers(urls["management"], model)
            if time.monotonic() - killed_at > 1 and len(states) == 2 and all(w["status"] == "READY" for w in states):
                back = time.monotonic() - killed_at
        time.sleep(0.2)
    clients.stop()
    ended = time.monotonic()
    pre = [o for o in clients.outcomes if o.end < killed_at]
    post = [o for o in clients.outcomes if o.end >= killed_at]
    failed = [o for o in clients.outcomes if o.error]
    return {
        "streams": streams, "killed_pid": int(victim["pid"]),
        "failed": len(failed), "failures": sorted({o.error.split(":")[0] for o in failed}),
        "failed_were_in_flight_at_kill": all(o.sent <= killed_at + 0.5 for o in failed),
        "completed_before": sum(not o.error for o in pre), "completed_after": sum(not o.error for o in post),
        "first_completion_after_kill_s": min((o.end - killed_at for o in post if not o.error), default=None),
        "tokens_per_s_before": round(tokens_per_s(pre, killed_at - started), 1),
        "tokens_per_s_after": round(tokens_per_s(post, ended - killed_at), 1),
        "both_workers_ready_after_s": None if back is None else round(back, 1),
        "worker_pids_after": sorted(int(w["pid"]) for w in workers(urls["management"], model)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "fp32.yaml")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="threads per worker")
    parser.add_argument("--before", type=float, default=20, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=40, help="seconds of load after it")
    args = parser.parse_args()
    raw = yaml.safe_load(args.config.read_text())
    raw.update(minWorkers=2, maxWorkers=2)
    raw.setdefault("handler", {}).update(num_threads=args.threads, max_prompt_tokens=512, max_new_tokens=128)
    with served(raw, "kill", args.model_dir, PORTS) as urls:
        result = kill_one_worker(urls, "kill", args.streams, args.before, args.after)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
