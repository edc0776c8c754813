"""Soak test: hold a server at saturation for a while and check that nothing drifts.

Serves `--config` (continuous batching, `batchSize` = `--streams`) on spare ports, then keeps
`--streams` clients busy: streamed requests of mixed prompt and output lengths, and a share of
clients that disconnect mid-stream on purpose. Every `--interval` seconds it samples the RSS of
the worker(s) and of the Java frontend, the frontend's live Java heap (after a full collection,
through `jcmd`: a JDK is needed), and the window's time to first token and inter-token latency
(p50/p95 over the requests finished in the window). After `--warmup` it judges:
- memory: the workers' RSS and the frontend's live heap may exceed their first post-warm-up
  sample by at most `--max-rss-growth` (5 %); the frontend's RSS is reported, not judged (see
  `live_heap_mib`);
- failures: any request that failed other than by its deliberate disconnect;
- latency: the median of the windows' inter-token p95 over the last third of the run may exceed
  that of the first third by at most `--max-latency-drift` (20 %).
Writes samples.csv and report.md into `--out`, prints the report, exits 1 if a check failed.

    python load_tests/soak.py --duration 1800                 # the README's 30-minute run
    python load_tests/soak.py --duration 120 --warmup 30      # what CI runs
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import re
import shutil
import subprocess
import statistics
import sys
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent
from streams import StreamClients, inter_token_ms, served  # noqa: E402

PORTS = {"inference": 28380, "management": 28381, "metrics": 28382}


def frontend_pid() -> int:
    """The Java frontend's pid, from TorchServe's pid file."""
    return int((Path(os.environ.get("TMPDIR", "/tmp")) / ".model_server.pid").read_text())


def rss_mib(pid: int) -> tuple[float, float]:
    """(workers, frontend) resident memory in MiB; the workers are the frontend's Python descendants."""
    frontend = psutil.Process(pid)
    workers = [p for p in frontend.children(recursive=True) if "python" in p.name()]
    return (sum(p.memory_info().rss for p in workers) / 2**20, frontend.memory_info().rss / 2**20)


def live_heap_mib(jcmd: str, pid: int) -> float:
    """The frontend's live Java heap in MiB: the heap's used bytes right after a full collection
    (`jcmd GC.run`, then `GC.heap_info`).

    This, not the frontend's RSS, is where a leak in the JVM shows within minutes: G1 keeps
    touching more of its committed heap as it cycles through eden regions, so the RSS climbs in
    steps and then stays flat (a CI soak saw 205 -> 222 MiB between 50 and 70 s, then no change)."""
    subprocess.run([jcmd, str(pid), "GC.run"], check=True, capture_output=True, timeout=60)
    info = subprocess.run([jcmd, str(pid), "GC.heap_info"], check=True, capture_output=True, text=True,
                          timeout=60).stdout
    used = re.search(r"used (\d+)K", info)
    if used is None:
        sys.exit(f"soak: no 'used' figure in jcmd GC.heap_info's answer:\n{info}")
    return int(used.group(1)) / 1024


def quantile(values: list[float], q: float) -> float | None:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) >= 2 else None


def judge(rows: list[dict], warmup: float, max_rss: float, max_drift: float) -> list[str]:
    """The failed checks (empty when the run passed)."""
    settled = [row for row in rows if row["t_s"] > warmup]
    problems = [f"{row['failures']} failed request(s) in the window ending at {row['t_s']:.0f} s: {row['first_failure']}"
                for row in rows if row["failures"]]
    if len(settled) < 3:
        return problems + [f"only {len(settled)} samples after the warm-up: run longer"]
    for key in ("workers_rss_mib", "frontend_heap_mib"):
        growth = settled[-1][key] / settled[0][key] - 1
        if growth > max_rss:
            problems.append(f"{key} grew {growth:.1%} after the warm-up ({settled[0][key]:.0f} -> "
                            f"{settled[-1][key]:.0f} MiB), more than {max_rss:.0%}")
    third = max(1, len(settled) // 3)
    early = [row["itl_p95_ms"] for row in settled[:third] if row["itl_p95_ms"]]
    late = [row["itl_p95_ms"] for row in settled[-third:] if row["itl_p95_ms"]]
    if not early or not late:
        problems.append("no request finished in the first or last third: the server stalled")
    elif statistics.median(late) / statistics.median(early) - 1 > max_drift:
        problems.append(f"inter-token p95 drifted from {statistics.median(early):.0f} to {statistics.median(late):.0f} ms, "
                        f"more than {max_drift:.0%}")
    return problems


def soak(url: str, jcmd: str, args) -> list[dict]:
    clients = StreamClients(url, args.streams, hang_up_share=args.disconnect_share, seed=args.seed).start()
    rows, started, pid = [], time.monotonic(), frontend_pid()
    window_start = started
    try:
        for tick in itertools.count(1):
            # Samples on a fixed schedule: the time spent sampling (jcmd) does not shift the next one.
            time.sleep(max(0.0, min(started + tick * args.interval, started + args.duration) - time.monotonic()))
            now = time.monotonic()
            window = [o for o in clients.since(window_start) if o.end < now]
            window_start = now
            done = [o for o in window if not o.error and not o.hung_up]
            failed = [o.error for o in window if o.error]
            ttft = [(o.first - o.sent) * 1000 for o in done]
            itl = [v for v in map(inter_token_ms, done) if v is not None]
            workers, frontend = rss_mib(pid)
            row = {"t_s": round(now - started, 1), "completed": len(done),
                   "disconnected": sum(o.hung_up for o in window), "failures": len(failed),
                   "first_failure": failed[0] if failed else "",
                   "ttft_p50_ms": quantile(ttft, 50), "ttft_p95_ms": quantile(ttft, 95),
                   "itl_p50_ms": quantile(itl, 50), "itl_p95_ms": quantile(itl, 95),
                   "workers_rss_mib": round(workers, 1), "frontend_rss_mib": round(frontend, 1),
                   "frontend_heap_mib": round(live_heap_mib(jcmd, pid), 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            if now - started >= args.duration:
                break
    finally:
        clients.stop()
    return rows


def report(rows: list[dict], problems: list[str], args) -> str:
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    lines = [f"Soak: {args.config.name}, {args.streams} streams, {args.duration:.0f} s, warm-up {args.warmup:.0f} s, "
             f"{args.disconnect_share:.0%} of requests hang up mid-stream.", "",
             "| t (s) | completed | hung up | failed | TTFT p50/p95 ms | ITL p50/p95 ms | workers RSS MiB | "
             "frontend RSS MiB | frontend live heap MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['t_s']:.0f} | {r['completed']} | {r['disconnected']} | {r['failures']} | {fmt(r['ttft_p50_ms'])}/"
              f"{fmt(r['ttft_p95_ms'])} | {fmt(r['itl_p50_ms'])}/{fmt(r['itl_p95_ms'])} | {r['workers_rss_mib']:.0f} | "
              f"{r['frontend_rss_mib']:.0f} | {r['frontend_heap_mib']:.1f} |" for r in rows]
    lines += ["", "PASSED" if not problems else "FAILED:", *[f"- {p}" for p in problems]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "continuous.yaml")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--duration", type=float, default=600, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=60, help="seconds before the checks' baseline")
    parser.add_argument("--interval", type=float, default=10, help="seconds between samples")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--disconnect-share", type=float, default=0.1)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--max-latency-drift", type=float, default=0.20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "soak")
    args = parser.parse_args()
    jcmd = shutil.which("jcmd")
    if jcmd is None:
        sys.exit("soak: jcmd (part of a JDK, e.g. openjdk-17-jdk-headless) is needed to measure the frontend's live heap")
    raw = yaml.safe_load(args.config.read_text())
    if not raw.get("continuousBatching"):
        sys.exit(f"soak: {args.config} must set continuousBatching: true (the soak holds {args.streams} streams)")
    raw["batchSize"] = args.streams
    # A KV cache sized to the soak's requests (prompts <= 300 words, <= 128 new tokens).
    raw.setdefault("handler", {}).update(max_prompt_tokens=512, max_new_tokens=128)
    with served(raw, "soak", args.model_dir, PORTS) as urls:
        rows = soak(f"{urls['inference']}/predictions/soak", jcmd, args)
    problems = judge(rows, args.warmup, args.max_rss_growth, args.max_latency_drift)
    text = report(rows, problems, args)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "samples.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "report.md").write_text(text + "\n")
    print("\n" + text)
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
