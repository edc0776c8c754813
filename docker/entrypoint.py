#!/opt/venv/bin/python
"""Container entry point: make sure /model-store holds an archive, run TorchServe in the
foreground (its log goes to the container's stdout), and stop it gracefully on SIGTERM.

An empty store (the default volume) gets an archive of $MODEL_DIR (the default model, converted
into the image at build time) packaged with $MODEL_CONFIG under the name $MODEL_NAME. The
archive refers to the weights in the image instead of copying them, so it takes seconds. A store
mounted with archives of your own is served as it is.

On SIGTERM or SIGINT (`docker stop`, a Kubernetes pod deletion, a rolling upgrade) the workers
drain (handlers/cpu_llm/serving/shutdown.py): requests not yet started get a 503 with Retry-After, the
ones being generated finish, for at most $SHUTDOWN_GRACE_S seconds (default 25: under Docker's
10 s stop timeout, pass `docker stop -t 35`; Kubernetes' default grace is 30 s). Then TorchServe
stops and the container exits 0. TorchServe runs in its own session, so a terminal's Ctrl-C
reaches this process only and drains as well.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, "/app/scripts")
from build_archive import build_archive  # noqa: E402  (also puts /app/handlers on sys.path)
from cpu_llm.serving.shutdown import STATE_ENV, default_state_dir, drain, prepare  # noqa: E402

STORE = Path("/model-store")
GRACE_ENV = "SHUTDOWN_GRACE_S"


def grace_seconds() -> float:
    raw = os.environ.get(GRACE_ENV, "25")
    try:
        grace = float(raw)
    except ValueError:
        grace = -1.0
    if not 0 <= grace <= 3600:
        sys.exit(f"entrypoint: {GRACE_ENV}={raw!r} must be a number of seconds between 0 and 3600")
    return grace


def package_default_model() -> None:
    model_dir = Path(os.environ.get("MODEL_DIR", "/opt/models/SmolLM2-135M-Instruct"))
    raw = yaml.safe_load(Path(os.environ["MODEL_CONFIG"]).read_text()) or {}
    raw.setdefault("handler", {})["model_path"] = str(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "model-config.yaml"
        config.write_text(yaml.safe_dump(raw))
        print(f"entrypoint: packaging {model_dir} with {os.environ['MODEL_CONFIG']} as {os.environ['MODEL_NAME']}",
              flush=True)
        build_archive(model_dir, os.environ["MODEL_NAME"], config, STORE)


def main() -> None:
    grace = grace_seconds()
    if not any(STORE.glob("*.mar")):
        package_default_model()
    state = prepare(default_state_dir())
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server = subprocess.Popen(
        ["torchserve", "--start", "--foreground", "--ncs", "--ts-config", "/app/docker/config.properties",
         "--model-store", str(STORE), "--models", "all"],
        env={**os.environ, STATE_ENV: str(state)}, start_new_session=True)
    while server.poll() is None and not stop.wait(0.5):
        pass
    if server.poll() is not None:  # TorchServe ended on its own: pass its status on
        sys.exit(server.returncode)
    started = time.monotonic()
    print(f"entrypoint: stopping: draining for at most {grace:g} s", flush=True)
    cut = drain(state, grace)
    print(f"entrypoint: {'all requests finished' if cut == 0 else f'{cut} request(s) cut at the grace period'} "
          f"after {time.monotonic() - started:.1f} s; stopping TorchServe", flush=True)
    os.killpg(server.pid, signal.SIGTERM)  # the launcher, Java and the workers: one session
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
    sys.exit(0)


if __name__ == "__main__":
    main()
