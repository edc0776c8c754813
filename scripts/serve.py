"""Start TorchServe and wait until the model's worker is READY; stop it.

`torchserve --start` returns 0 even when Java is missing or a port is taken, and `/ping`
reports Healthy before any worker has loaded. So `start` checks Java and the ports first,
then polls the management API until a worker of every model is READY, and fails loudly
with the tail of the logs if the server dies or a worker fails to load.

    python scripts/serve.py start [--models smollm2=smollm2.mar] [--ts-config config.properties]
    python scripts/serve.py stop [--grace 25]

`stop` is graceful (handlers/cpu_llm/serving/shutdown.py): requests not yet started get a 503 with
Retry-After, the ones being generated finish within the grace period, then TorchServe stops.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handlers"))
from cpu_llm.serving.shutdown import STATE_ENV, default_state_dir, drain, prepare  # noqa: E402

# Lines in the logs that mean a worker could not load the model.
LOAD_FAILURE_MARKERS = ("Backend worker process died", "Load model failed", "Failed to load model")


def venv_tool(name: str) -> str | None:
    """A console script of this interpreter's venv (works without activating it), else PATH's."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else shutil.which(name)


class StartError(RuntimeError):
    """The server could not be brought to a READY state."""


def read_properties(path: Path) -> dict[str, str]:
    props = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            props[key.strip()] = value.strip()
    return props


def endpoints(props: dict[str, str]) -> dict[str, str]:
    """Base URLs of the inference, management and metrics APIs (TorchServe's defaults apply)."""
    return {
        "inference": props.get("inference_address", "http://127.0.0.1:8080"),
        "management": props.get("management_address", "http://127.0.0.1:8081"),
        "metrics": props.get("metrics_address", "http://127.0.0.1:8082"),
    }


def check_prerequisites(urls: dict[str, str]) -> None:
    """Java must run, and every listener's port must be free (TorchServe won't say)."""
    java = shutil.which("java")
    if java is None:
        raise StartError("Java is not installed: TorchServe needs a Java 11+ runtime "
                         "(Debian/Ubuntu: apt-get install openjdk-17-jre-headless)")
    version = subprocess.run([java, "-version"], capture_output=True, text=True)
    if version.returncode != 0:
        raise StartError(f"`java -version` failed: {version.stderr.strip()}")
    for name, url in urls.items():
        parsed = urlparse(url)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((parsed.hostname, parsed.port))
            except OSError as error:
                raise StartError(f"{name} port {parsed.hostname}:{parsed.port} is not free ({error.strerror}); "
                                 "stop whatever uses it or change config.properties") from None


def log_tail(log_dir: Path, lines: int = 40) -> str:
    parts = []
    for name in ("model_log.log", "ts_log.log"):
        path = log_dir / name
        if path.exists():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text))
    return "\n".join(parts) or f"(no logs in {log_dir})"


def worker_states(management: str, model: str) -> list[str]:
    """Status of each worker of `model` (e.g. READY, UNLOADING), [] if not registered yet."""
    try:
        with urllib.request.urlopen(f"{management}/models/{model}", timeout=5) as response:
            described = json.load(response)
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return []
    return [w.get("status", "") for entry in described for w in entry.get("workers", [])]


def _load_failed(log_dir: Path) -> bool:
    for name in ("ts_log.log", "model_log.log"):
        path = log_dir / name
        if path.exists():
            text = path.read_text(errors="replace")
            if any(marker in text for marker in LOAD_FAILURE_MARKERS):
                return True
    return False


def model_names(models: list[str]) -> list[str]:
    """The names TorchServe registers for `--models` entries (`name=file.mar` or `file.mar`)."""
    return [m.split("=", 1)[0] if "=" in m else Path(m).stem for m in models]


def start(ts_config: Path, model_store: Path, models: list[str], log_dir: Path, timeout: float) -> None:
    props = read_properties(ts_config)
    urls = endpoints(props)
    check_prerequisites(urls)
    torchserve = venv_tool("torchserve")
    if torchserve is None:
        raise StartError("torchserve not found; run `make install` and use the venv's python")
    log_dir.mkdir(parents=True, exist_ok=True)
    for stale in log_dir.glob("*.log"):
        stale.unlink()  # a previous run's failure must not be mistaken for this one's
    env = {**os.environ, "LOG_LOCATION": str(log_dir), "METRICS_LOCATION": str(log_dir),
           STATE_ENV: str(prepare(default_state_dir()))}
    cmd = [torchserve, "--start", "--ncs", "--ts-config", str(ts_config),
           "--model-store", str(model_store), "--models", *models]
    # The server outlives this script: it must not hold our stdout/stderr open, or a
    # caller piping our output (`make serve | tee`) would wait until the server stops.
    launch_log = log_dir / "torchserve_start.log"
    with open(launch_log, "wb") as out:
        launched = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    if launched.returncode != 0:  # e.g. "TorchServe is already running" (one per $TMPDIR)
        raise StartError(f"`torchserve --start` failed:\n{launch_log.read_text(errors='replace').strip()}")
    names = model_names(models)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all("READY" in worker_states(urls["management"], name) for name in names):
            return
        if _load_failed(log_dir):
            stop(log_dir)
            raise StartError("a worker failed to load the model\n" + log_tail(log_dir))
        if not _server_running():
            raise StartError("TorchServe exited during start-up\n" + log_tail(log_dir))
        time.sleep(0.5)
    stop(log_dir)
    raise StartError(f"no READY worker after {timeout:.0f} s\n" + log_tail(log_dir))


def _server_running() -> bool:
    # TorchServe keeps its pid in $TMPDIR/.model_server.pid
    pid_file = Path(os.environ.get("TMPDIR", "/tmp")) / ".model_server.pid"
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def stop(log_dir: Path | None = None, grace_s: float = 0) -> int:
    """Stop the server; with `grace_s`, drain first. Returns the requests cut by the stop."""
    cut = drain(default_state_dir(), grace_s) if grace_s > 0 and _server_running() else 0
    env = dict(os.environ)
    if log_dir is not None:
        env["LOG_LOCATION"] = str(log_dir)
    torchserve = venv_tool("torchserve")
    if torchserve is None:
        return cut
    subprocess.run([torchserve, "--stop"], env=env, stdin=subprocess.DEVNULL,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    deadline = time.monotonic() + 30
    while _server_running() and time.monotonic() < deadline:
        time.sleep(0.3)
    return cut


def write_ts_config(directory: Path, ports: dict[str, int], source: Path = ROOT / "config.properties",
                    java_tmp: Path | None = None) -> Path:
    """A copy of config.properties whose listeners use `ports` ({"inference": 18080, ...}).

    With `java_tmp`, the frontend unpacks archives there instead of the system's /tmp/models,
    where a killed server leaves a copy of the model behind (the tests use their own folder)."""
    lines = []
    for line in source.read_text().splitlines():
        key = line.split("=", 1)[0]
        name = key.replace("_address", "")
        if key.endswith("_address") and name in ports:
            line = f"{key}=http://127.0.0.1:{ports[name]}"
        if key == "vmargs" and java_tmp is not None:
            line = f"{line} -Djava.io.tmpdir={java_tmp}"
        lines.append(line)
    path = directory / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path


@contextmanager
def running(ts_config: Path, model_store: Path, models: list[str], log_dir: Path,
            timeout: float = 300) -> Iterator[dict[str, str]]:
    """Start TorchServe, wait for READY workers, yield the endpoint URLs, always stop it."""
    start(ts_config, model_store, models, log_dir, timeout)
    try:
        yield endpoints(read_properties(ts_config))
    finally:
        stop(log_dir)


def stop_command() -> str:
    """How to stop the server from the shell: `make stop` names this venv's stack, if it is one."""
    venv = Path(sys.prefix)
    if venv.parent != ROOT / ".venv":
        return "python scripts/serve.py stop"
    return "make stop" if venv.name == "native" else f"make stop STACK={venv.name}"


def next_steps(inference: str, model: str, log_dir: Path, token_auth: bool) -> str:
    """What to do once the server is up (printed at the end of `make serve`): try, read logs, stop."""
    body = json.dumps({"messages": [{"role": "user", "content": "Which city is the capital of France?"}],
                       "max_new_tokens": 32})
    auth = ' -H "Authorization: Bearer <inference key in key_file.json>"' if token_auth else ""
    return "\n".join([
        "Try it:",
        f"  curl -s {inference}/predictions/{model}{auth} -H 'Content-Type: application/json' \\",
        f"    -d '{body}'",
        f"Logs: {log_dir}/ (model_log.log: the model worker; ts_log.log: TorchServe's frontend)",
        f"Stop: {stop_command()}",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description="Start/stop TorchServe for this package.")
    sub = parser.add_subparsers(dest="command", required=True)
    start_p = sub.add_parser("start", help="start and wait until every model has a READY worker")
    start_p.add_argument("--ts-config", type=Path, default=ROOT / "config.properties")
    start_p.add_argument("--model-store", type=Path, default=ROOT / "model-store")
    start_p.add_argument("--models", nargs="+", default=["smollm2=smollm2.mar"])
    start_p.add_argument("--log-dir", type=Path, default=ROOT / "logs")
    start_p.add_argument("--timeout", type=float, default=300, help="seconds to wait for READY")
    stop_p = sub.add_parser("stop", help="drain (finish the requests being generated), then stop TorchServe")
    stop_p.add_argument("--grace", type=float, default=25,
                        help="seconds to wait for requests in flight; 0 stops at once")
    args = parser.parse_args()
    if args.command == "stop":
        cut = stop(grace_s=args.grace)
        if cut:
            print(f"serve: the grace period ended: {cut} request(s) were cut", file=sys.stderr)
        return
    start_and_report(args.ts_config, args.model_store, args.models, args.log_dir, args.timeout)


def start_and_report(ts_config: Path, model_store: Path, models: list[str], log_dir: Path, timeout: float) -> None:
    """`start`, then print how long READY took and the next steps; exit with the reason on failure."""
    started = time.monotonic()
    try:
        start(ts_config, model_store, models, log_dir, timeout)
    except StartError as error:
        sys.exit(f"serve: {error}")
    props = read_properties(ts_config)
    inference = endpoints(props)["inference"]
    print(f"READY after {time.monotonic() - started:.1f} s: {', '.join(model_names(models))} at "
          f"{inference}/predictions/<model>")
    print(next_steps(inference, model_names(models)[0], log_dir,
                     token_auth=props.get("disable_token_authorization") != "true"))

if __name__ == "__main__":
    main()
