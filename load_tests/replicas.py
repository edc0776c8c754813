"""Two replicas of the container image behind nginx on loopback, Locust through it, one replica
taken away mid-run: what the clients lose, and the throughput before and after.

Each replica is the image (scripts/container.sh build) pinned to its own cores with
`--cpuset-cpus`, so it runs one worker with as many threads as it has cores; nginx balances them
(`least_conn`) and, when a replica refuses (connection refused, or the 503 of a draining one),
sends the request to the other before anything reached the client. After `--before` seconds the
first replica is killed (`--fault kill`: SIGKILL, as a crash or an OOM kill) or stopped
(`--fault stop`: SIGTERM, as a rolling upgrade: it drains). Locust keeps `--users` streams
going for `--after` seconds more. Prints failed requests, completed requests and output tokens/s
before and after, from Locust's per-second history.

    apt-get install -y nginx-light && bash scripts/container.sh build native
    python load_tests/replicas.py --fault kill
    python load_tests/replicas.py --fault stop
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PODMAN_RUN = ["podman", "--runtime", "runc", "run", "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
NGINX = """
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log {work}/nginx-access.log;
  upstream llm {{
    least_conn;
    {servers}
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://llm;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;            # streamed responses pass through line by line
      proxy_read_timeout 300s;
      # A refused request (replica gone, or draining: our 503 comes before any token) is safe to
      # send again; nginx only does so before any byte reached the client.
      proxy_next_upstream error timeout http_503 non_idempotent;
    }}
  }}
}}
"""


def start_replica(image: str, name: str, cpus: str, port: int, config: str) -> None:
    subprocess.run(["podman", "rm", "-f", name], capture_output=True)
    subprocess.run([*PODMAN_RUN, "-d", "--name", name, "--cpuset-cpus", cpus, "-p", f"127.0.0.1:{port}:8080",
                    "-e", "TS_DISABLE_TOKEN_AUTHORIZATION=true", "-e", f"MODEL_CONFIG={config}", image],
                   check=True, capture_output=True)


def wait_ready(port: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    body = json.dumps({"prompt": "Hello", "max_new_tokens": 2}).encode()
    while time.monotonic() < deadline:
        try:
            request = urllib.request.Request(f"http://127.0.0.1:{port}/predictions/smollm2", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(2)
    raise SystemExit(f"replicas: the replica on port {port} did not serve within {timeout:.0f} s")


def history(prefix: Path) -> list[dict]:
    """Locust's per-second history: (seconds since start, streamed requests, failures, tokens)."""
    rows = list(csv.DictReader(open(f"{prefix}_stats_history.csv")))
    start = min(int(r["Timestamp"]) for r in rows)
    by_time: dict[int, dict] = {}
    for r in rows:
        entry = by_time.setdefault(int(r["Timestamp"]) - start, {"requests": 0, "failures": 0, "tokens": 0.0})
        if r["Name"] == "generate-stream":
            entry["requests"], entry["failures"] = int(r["Total Request Count"]), int(r["Total Failure Count"])
        elif r["Name"] == "output_tokens_per_s":
            entry["tokens"] = int(r["Total Request Count"]) * float(r["Total Average Content Size"])
    return [{"t": t, **v} for t, v in sorted(by_time.items())]


def window(rows: list[dict], start: float, end: float) -> dict:
    inside = [r for r in rows if start <= r["t"] <= end]
    first, last = inside[0], inside[-1]
    seconds = max(1, last["t"] - first["t"])
    return {"failed": last["failures"] - first["failures"],
            "completed": (last["requests"] - first["requests"]) - (last["failures"] - first["failures"]),
            "output_tokens_per_s": round((last["tokens"] - first["tokens"]) / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--image", default="localhost/torchserve-llm-cpu:native")
    parser.add_argument("--config", default="/app/configs/continuous.yaml", help="MODEL_CONFIG inside the image")
    parser.add_argument("--fault", choices=["kill", "stop", "none"], default="kill",
                        help="none: no fault, the two replicas' throughput over the whole run")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--before", type=int, default=40)
    parser.add_argument("--after", type=int, default=40)
    parser.add_argument("--port", type=int, default=18500)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "replicas")
    args = parser.parse_args()
    if shutil.which("nginx") is None:
        sys.exit("replicas: nginx is not installed (apt-get install -y nginx-light)")
    cores = sorted(os.sched_getaffinity(0))
    halves = [cores[: len(cores) // 2], cores[len(cores) // 2:]]
    names = ["llm-replica-0", "llm-replica-1"]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        try:
            for idx, name in enumerate(names):
                start_replica(args.image, name, ",".join(map(str, halves[idx])), args.port + 1 + idx, args.config)
            for idx in range(2):
                wait_ready(args.port + 1 + idx)
            servers = "\n    ".join(f"server 127.0.0.1:{args.port + 1 + idx} max_fails=1 fail_timeout=30s;"
                                   for idx in range(2))
            (work / "nginx.conf").write_text(NGINX.format(work=work, servers=servers, port=args.port))
            subprocess.run(["nginx", "-c", str(work / "nginx.conf")], check=True)
            prefix = args.out / f"locust-{args.fault}"
            locust = subprocess.Popen(
                [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "ConcurrentUsers", "--headless",
                 "--host", f"http://127.0.0.1:{args.port}", "-u", str(args.users), "-r", str(args.users),
                 "-t", f"{args.before + args.after}s", "--csv", str(prefix), "--csv-full-history",
                 "--prompt-tokens", "32-256", "--output-tokens", "64", "--stream-share", "1", "--stop-timeout", "120"],
                stdout=subprocess.DEVNULL, stderr=open(f"{prefix}.log", "w"))
            fault = {"kill": ["podman", "kill", names[0]], "stop": ["podman", "stop", "-t", "40", names[0]],
                     "none": ["true"]}[args.fault]
            timer = threading.Timer(args.before, subprocess.run, args=(fault,), kwargs={"capture_output": True})
            timer.start()
            locust.wait()
            timer.join()
        finally:
            if (work / "nginx.pid").exists():
                subprocess.run(["nginx", "-c", str(work / "nginx.conf"), "-s", "stop"], capture_output=True)
            for name in names:
                subprocess.run(["podman", "rm", "-f", name], capture_output=True)
    rows = history(prefix)
    result = {"fault": args.fault, "users": args.users, "replica_cores": [halves[0], halves[1]]}
    if args.fault == "none":
        result["run"] = window(rows, 5, args.before + args.after)
    else:  # the fault lands in second `before`: the "after" window starts the second before it
        result["before"] = window(rows, 5, args.before - 1)
        result["after"] = window(rows, args.before - 1, args.before + args.after)
    (args.out / f"result-{args.fault}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
