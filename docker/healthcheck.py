#!/opt/venv/bin/python
"""HEALTHCHECK and readiness probe: ready only when every registered model has a READY worker
and the server is not draining for a shutdown (so a load balancer stops sending it requests).

TorchServe's /ping says Healthy before any worker has loaded its model, so it cannot tell a
load balancer when the container can serve. This asks the management API (inside the container)
with the management key when token authorization is on, renewed through keys.py when it is about
to expire (TorchServe's keys expire after token_expiration_min, 60 minutes by default).
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, "/app/handlers")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_llm.serving.shutdown import DRAINING, default_state_dir  # noqa: E402
from keys import MANAGEMENT, valid_key  # noqa: E402

# The probe runs every 10 s: a key with a minute left is renewed well before it fails a probe.
MIN_VALID_S = 60.0


def get(path: str):
    headers = {}
    found = valid_key("management", MIN_VALID_S)
    if found is not None:
        headers["Authorization"] = f"Bearer {found[0]}"
    with urllib.request.urlopen(urllib.request.Request(MANAGEMENT + path, headers=headers), timeout=4) as response:
        return json.load(response)


def ready() -> bool:
    if (default_state_dir() / DRAINING).exists():
        print("draining for a shutdown")
        return False
    models = get("/models")["models"]
    return bool(models) and all(
        any(worker["status"] == "READY" for entry in get(f"/models/{m['modelName']}") for worker in entry["workers"])
        for m in models)


if __name__ == "__main__":
    try:
        sys.exit(0 if ready() else 1)
    except OSError as error:  # not listening yet, or refused
        print(error)
        sys.exit(1)
