"""Overload: send more requests at once than a server admits, and measure how the rest are refused.

Serves the default model with `batchSize` + `jobQueueSize` admitted (both batching modes by
default), sends `--requests` requests at the same moment, and prints how many were served and
refused, each refusal's status and body, and how long a refusal took (it should be immediate,
not a timeout).

    python load_tests/overload.py                      # 64 requests: continuous 16+16, dynamic 4+16
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

ROOT = Path(__file__).resolve().parent.parent
from streams import served  # noqa: E402

PORTS = {"inference": 28680, "management": 28681, "metrics": 28682}
BODY = {"prompt": "The history of the Roman empire", "max_new_tokens": 64}


def flood(url: str, n: int, body: dict = BODY) -> list[dict]:
    """`n` requests sent at once; per request its status, seconds to the answer, and body."""
    def send(_: int) -> dict:
        sent = time.monotonic()
        response = requests.post(url, json=body, timeout=300)
        return {"status": response.status_code, "seconds": time.monotonic() - sent, "answered": time.monotonic(),
                "body": response.json()}

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(send, range(n)))


def summary(results: list[dict]) -> dict:
    refused = sorted(r["seconds"] for r in results if r["status"] == 503)
    return {"served": sum(r["status"] == 200 for r in results), "refused_503": len(refused),
            "other": sorted({r["status"] for r in results} - {200, 503}),
            "refusal_ms_min_p50_max": [round(refused[i] * 1000) for i in (0, len(refused) // 2, -1)] if refused else None,
            "refusal_body": next((r["body"] for r in results if r["status"] == 503), None)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--queue", type=int, default=16, help="jobQueueSize")
    args = parser.parse_args()
    for mode, batch in (("continuous", 16), ("dynamic", 4)):
        config = {"minWorkers": 1, "maxWorkers": 1, "batchSize": batch, "maxBatchDelay": 50, "jobQueueSize": args.queue,
                  "continuousBatching": mode == "continuous", "responseTimeout": 300,
                  "handler": {"max_prompt_tokens": 64, "max_new_tokens": 128}}
        with served(config, "overload", args.model_dir, PORTS) as urls:
            results = flood(f"{urls['inference']}/predictions/overload", args.requests)
        print(json.dumps({"mode": mode, "batchSize": batch, "jobQueueSize": args.queue, "requests": args.requests,
                          **summary(results)}, indent=2), flush=True)


if __name__ == "__main__":
    main()
