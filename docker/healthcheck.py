#!/opt/venv/bin/python
"""HEALTHCHECK and readiness probe: ready only when every registered model has a READY worker
and the server is not draining for a shutdown (so a load balancer stops sending it requests).

TorchServe's /ping says Healthy before any worker has loaded its model, so it cannot tell a
load balancer when the container can serve. This asks the management API (inside the container)
with the management key when token authorization is on.
"""

from __future__ import annotations

import json
import sys
import urllib.request
from pathlib import Path

sys.path.insert(0, "/app/handlers")
from cpu_llm.serving.shutdown import DRAINING, default_state_dir  # noqa: E402

MANAGEMENT = "http://127.0.0.1:8081"
KEY_FILE = Path("/home/serve/key_file.json")


def get(path: str):
    headers = {}
    if KEY_FILE.is_file():
        headers["Authorization"] = "Bearer " + json.loads(KEY_FILE.read_text())["management"]["key"]
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
