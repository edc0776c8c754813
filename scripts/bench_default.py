"""The default against the old default, served, on this machine: what `make serve` gives a new user.

Each side is packaged with its config, served by its own stack's TorchServe on loopback test
ports, warmed up with one request, then sent one request at a time (128 new tokens, EOS
ignored). Printed: time to READY, decode tok/s of one request (median), time to first token and
the worker's RSS, and the new side's ratio to the old one, in one run.

    python scripts/bench_default.py          # native + configs/model-config.yaml vs ipex + configs/fp32.yaml
    python scripts/bench_default.py --old native:configs/fp32.yaml --requests 5

Each side runs in its stack's venv (.venv/<stack>, `make install STACK=<stack>`); a quiet machine
is needed, as for every benchmark here.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from build_archive import build_archive  # also puts handlers/ on sys.path
from serve import ROOT, running, write_ts_config

PORTS = {"inference": 28680, "management": 28681, "metrics": 28682}
BODY = {"messages": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        "max_new_tokens": 128, "ignore_eos": True}


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def worker_rss_mib(management: str, model: str) -> float:
    with urllib.request.urlopen(f"{management}/models/{model}", timeout=10) as response:
        pids = [int(w["pid"]) for entry in json.load(response) for w in entry["workers"]]
    return sum(psutil.Process(pid).memory_info().rss for pid in pids) / 2**20


def measure(config: Path, model_dir: Path, requests: int) -> dict:
    """Serve `config` with this interpreter's stack and time one request at a time."""
    import torch

    with tempfile.TemporaryDirectory(prefix="bench-default-") as tmp:
        work = Path(tmp)
        (work / "java-tmp").mkdir()
        store = work / "store"
        build_archive(model_dir, "bench", config, store)
        ts_config = write_ts_config(work, PORTS, java_tmp=work / "java-tmp")
        started = time.monotonic()
        with running(ts_config, store, ["bench=bench.mar"], work / "logs", timeout=600) as urls:
            ready_s = time.monotonic() - started
            url = f"{urls['inference']}/predictions/bench"
            post(url, {**BODY, "max_new_tokens": 16})  # warm-up
            timings = [post(url, BODY)["timings"] for _ in range(requests)]
            rss = worker_rss_mib(urls["management"], "bench")
    return {"config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config),
            "torch": torch.__version__, "ready_s": round(ready_s, 1),
            "decode_tok_s": round(statistics.median(t["decode_tokens_per_s"] for t in timings), 1),
            "ttft_ms": round(statistics.median(t["time_to_first_token_ms"] for t in timings), 1),
            "rss_mib": round(rss)}


def run_side(side: str, model_dir: Path, requests: int) -> dict:
    stack, _, config = side.partition(":")
    python = ROOT / ".venv" / stack / "bin" / "python"
    if not python.is_file():
        sys.exit(f"bench_default: {python} is missing: make install STACK={stack}")
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run([str(python), __file__, "--measure", config, "--model-dir", str(model_dir),
                        "--requests", str(requests), "--json", out.name], check=True)
        return {"stack": stack, **json.loads(Path(out.name).read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--old", default="ipex:configs/fp32.yaml", help="STACK:CONFIG of the old default")
    parser.add_argument("--new", default="native:configs/model-config.yaml", help="STACK:CONFIG of the default")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--requests", type=int, default=3, help="timed requests per side (the median is shown)")
    parser.add_argument("--measure", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        args.json.write_text(json.dumps(measure(args.measure, args.model_dir, args.requests)))
        return
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    rows = [run_side(side, args.model_dir, args.requests) for side in (args.old, args.new)]
    old = rows[0]
    print(f"\n{cpu}, {psutil.cpu_count()} cores; one request at a time, 128 new tokens, median of {args.requests}")
    print("| stack | config | torch | READY s | decode tok/s | vs old | TTFT ms | worker RSS MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['stack']} | {row['config']} | {row['torch']} | {row['ready_s']} | {row['decode_tok_s']} | "
              f"{row['decode_tok_s'] / old['decode_tok_s']:.2f}x | {row['ttft_ms']} | {row['rss_mib']} |")


if __name__ == "__main__":
    main()
