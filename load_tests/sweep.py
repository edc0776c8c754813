"""Load-test sweep: serve a model-config, run Locust headless at each concurrency, report.

For every config: package it, start TorchServe on spare ports (or use `--host` for a server that
is already running, local or remote), warm it up, then run `locustfile.py` with `ConcurrentUsers`
at each level of `--concurrency` (and `PoissonArrivals` at each `--arrival-rates`). Writes into
`--out`: Locust's final stats (JSON) and log per run, `summary.csv` / `summary.json`, `tokens_per_s.png`,
`latency.png` and `report.md`. Locust's CPU use is sampled during every run and reported, so a
saturated client is visible rather than mistaken for a slow server.

    python load_tests/sweep.py                                  # configs/continuous.yaml, 1,2,4,8 users
    python load_tests/sweep.py --config configs/fp32.yaml --config configs/continuous.yaml
    python load_tests/sweep.py --host http://10.0.0.5:8080 --model smollm2 --concurrency 1,4,16

With `--api openai` every target is measured through the OpenAI API (`/v1/completions`), and
`--openai-target LABEL=BASE_URL` (repeatable) adds any OpenAI-compatible server already running,
e.g. llama-server: its rows and curves sit beside ours in the same report.

    python load_tests/sweep.py --api openai --config configs/continuous.yaml \\
        --openai-target llama-server=http://127.0.0.1:8090/v1
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import psutil
import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "scripts"))
import serve  # noqa: E402
from build_archive import build_archive  # noqa: E402

PORTS = {"inference": 28280, "management": 28281, "metrics": 28282}
METRICS = ("end_to_end_latency_ms", "time_to_first_token_ms", "inter_token_latency_ms", "output_tokens_per_s")


def percentile(entry: dict, q: float) -> float | None:
    """The q-th percentile of a Locust stats entry, from its response-time histogram."""
    counts = sorted((float(ms), n) for ms, n in entry["response_times"].items())
    total = sum(n for _, n in counts)
    if not total:
        return None
    seen = 0
    for ms, n in counts:
        seen += n
        if seen >= q / 100 * total:
            return ms
    return counts[-1][0]


def run_locust(target: "Target", user_class: str, users: int, args, prefix: Path) -> dict:
    """One headless Locust run; returns its final stats entries (after the requests still in flight
    at the end have finished: `--json`, unlike `--csv`, is written after that) plus client CPU use."""
    host, model = target.host, target.model
    api = ["--api", "openai", "--openai-path", target.openai_path] if target.openai_path else []
    cmd = [serve.venv_tool("locust") or "locust", "-f", str(HERE / "locustfile.py"), user_class, *api,
           "--host", host, "--headless", "-u", str(users), "-r", str(users), "-t", f"{args.duration}s",
           "--json", "--only-summary", "--model", model, "--prompt-tokens", args.prompt_tokens,
           "--output-tokens", args.output_tokens, "--stream-share", str(args.stream_share),
           "--arrival-rate", str(args.arrival_rate), "--tokenizer", str(args.tokenizer), "--stop-timeout", "120"]
    with open(f"{prefix}.log", "w") as log, open(f"{prefix}.json", "w") as stats:
        process = psutil.Popen(cmd, stdout=stats, stderr=log)
        samples = []
        while process.poll() is None:
            try:
                samples.append(process.cpu_percent(interval=1.0))
            except psutil.NoSuchProcess:
                break
    if process.returncode not in (0, 1):  # 1 = some requests failed: still a result
        raise SystemExit(f"locust exited with {process.returncode}; see {prefix}.log")
    rows = {(e["method"], e["name"]): e for e in json.loads(Path(f"{prefix}.json").read_text())}
    samples = samples[1:] or [0.0]  # the first sample covers start-up
    return {"rows": rows, "client_cpu_mean": sum(samples) / len(samples), "client_cpu_max": max(samples)}


@dataclass
class Target:
    """One server to measure: a model-config we serve (`config`), or a running server (`host`).
    `openai_path` set = measured through the OpenAI API at that path, else the native API."""

    label: str
    config: Path | None = None
    host: str | None = None
    model: str | None = None
    openai_path: str | None = None


def targets(args) -> list[Target]:
    """--config (served here), --host and --openai-target, in that order."""
    found = [Target(c.name, config=c) for c in args.config or []]
    if args.host:
        found.append(Target(args.host, host=args.host, model=args.model))
    for spec in args.openai_target:
        label, _, url = spec.partition("=")
        parsed = urlparse(url)
        found.append(Target(label, host=f"{parsed.scheme}://{parsed.netloc}", model=args.model,
                            openai_path=parsed.path or "/v1"))
    return found or [Target("continuous.yaml", config=ROOT / "configs" / "continuous.yaml")]


def openai_path(model: str, version: str) -> str:
    """Where TorchServe serves a model's OpenAI API (the version segment is required)."""
    return f"/predictions/{model}/{version}/v1"


def warm_up(target: Target) -> None:
    """Two short requests: the first ones pay for lazy initialisation."""
    if target.openai_path:
        url, body = f"{target.host}{target.openai_path}/completions", {"model": target.model, "prompt": "Hello",
                                                                        "max_tokens": 8}
    else:
        url, body = f"{target.host}/predictions/{target.model}", {"prompt": "Hello", "max_new_tokens": 8}
    for _ in range(2):
        requests.post(url, json=body, timeout=300).raise_for_status()


def summarize(config: str, shape: str, level: float, run: dict, duration: float) -> dict:
    rows = run["rows"]
    requests_rows = [r for (kind, _), r in rows.items() if kind == "POST"]
    count = sum(r["num_requests"] for r in requests_rows)
    out = {"config": config, "shape": shape, "level": level, "requests": count,
           "failures": sum(r["num_failures"] for r in requests_rows),
           "requests_per_s": round(count / duration, 3)}
    latency = rows.get(("METRIC", "end_to_end_latency_ms"))
    for q in (50, 95, 99):
        out[f"latency_p{q}_ms"] = percentile(latency, q) if latency else None
    for metric in METRICS[1:]:
        row = rows.get(("METRIC", metric))
        for q in (50, 95):
            out[f"{metric}_p{q}"] = percentile(row, q) if row else None
    tokens_row = rows.get(("METRIC", "output_tokens_per_s"))
    out["total_output_tokens_per_s"] = round((tokens_row["total_content_length"] if tokens_row else 0) / duration, 2)
    out["client_cpu_mean_pct"] = round(run["client_cpu_mean"], 1)
    out["client_cpu_max_pct"] = round(run["client_cpu_max"], 1)
    return out


def served(config: Path, args, work: Path):
    """Package and serve `config` on spare ports; yields the inference URL and model name."""
    name = config.stem.replace("_", "-")
    build_archive(args.model_dir, name, config, work / "store")
    ts_config = serve.write_ts_config(work, PORTS)
    return serve.running(ts_config, work / "store", [f"{name}={name}.mar"], work / "logs"), name


def plot(results: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [r for r in results if r["shape"] == "users"]
    files = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for config in dict.fromkeys(r["config"] for r in closed):
        rows = [r for r in closed if r["config"] == config]
        ax.plot([r["level"] for r in rows], [r["total_output_tokens_per_s"] for r in rows], marker="o", label=config)
    ax.set(xlabel="concurrent users", ylabel="output tokens/s (all users)", title="Throughput")
    ax.grid(alpha=0.3), ax.legend()
    fig.tight_layout(), fig.savefig(out / "tokens_per_s.png", dpi=100), plt.close(fig)
    files.append("tokens_per_s.png")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for config in dict.fromkeys(r["config"] for r in closed):
        rows = [r for r in closed if r["config"] == config]
        levels = [r["level"] for r in rows]
        for key, style in (("latency_p50_ms", "-"), ("latency_p95_ms", "--"), ("latency_p99_ms", ":")):
            axes[0].plot(levels, [r[key] for r in rows], style, marker="o", label=f"{config} {key[8:11]}")
        for key, style in (("time_to_first_token_ms_p50", "-"), ("time_to_first_token_ms_p95", "--")):
            axes[1].plot(levels, [r[key] for r in rows], style, marker="o", label=f"{config} {key[-3:]}")
    axes[0].set(xlabel="concurrent users", ylabel="ms", title="End-to-end latency")
    axes[1].set(xlabel="concurrent users", ylabel="ms", title="Time to first token")
    for ax in axes:
        ax.grid(alpha=0.3), ax.legend(fontsize=7)
    fig.tight_layout(), fig.savefig(out / "latency.png", dpi=100), plt.close(fig)
    return files + ["latency.png"]


def markdown(results: list[dict]) -> str:
    def fmt(value, digits=0):
        return "–" if value is None else f"{value:.{digits}f}"

    lines = ["| config | load | requests | failures | req/s | latency p50 / p95 / p99 ms | TTFT p50 / p95 ms "
             "| ITL p50 ms | tok/s per request p50 | total output tok/s | Locust CPU mean / max % |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        load = f"{r['level']:g} users" if r["shape"] == "users" else f"{r['level']:g} req/s"
        lines.append(
            f"| {r['config']} | {load} | {r['requests']} | {r['failures']} | {fmt(r['requests_per_s'], 2)} "
            f"| {fmt(r['latency_p50_ms'])} / {fmt(r['latency_p95_ms'])} / {fmt(r['latency_p99_ms'])} "
            f"| {fmt(r['time_to_first_token_ms_p50'])} / {fmt(r['time_to_first_token_ms_p95'])} "
            f"| {fmt(r['inter_token_latency_ms_p50'])} | {fmt(r['output_tokens_per_s_p50'], 1)} "
            f"| {fmt(r['total_output_tokens_per_s'], 1)} | {fmt(r['client_cpu_mean_pct'])} / {fmt(r['client_cpu_max_pct'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, action="append", help="model-config to serve (repeatable)")
    parser.add_argument("--host", help="use this running server instead of starting one (e.g. http://HOST:8080)")
    parser.add_argument("--model", default="smollm2", help="model name on --host / --openai-target")
    parser.add_argument("--api", choices=["native", "openai"], default="native",
                        help="API used for --config and --host targets")
    parser.add_argument("--model-version", default="1.0", help="archive version in TorchServe's OpenAI path")
    parser.add_argument("--openai-target", action="append", default=[], metavar="LABEL=BASE_URL",
                        help="a running OpenAI-compatible server, e.g. llama-server=http://127.0.0.1:8090/v1")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--concurrency", default="1,2,4,8", help="comma-separated user counts")
    parser.add_argument("--arrival-rates", default="", help="comma-separated req/s for Poisson arrivals")
    parser.add_argument("--duration", type=int, default=30, help="seconds per level")
    parser.add_argument("--prompt-tokens", default="32-256")
    parser.add_argument("--output-tokens", default="64")
    parser.add_argument("--stream-share", type=float, default=1.0)
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the model folder's)")
    parser.add_argument("--offline", type=Path, help="Markdown of the offline benchmark to include in report.md")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "load")
    args = parser.parse_args()
    args.tokenizer = args.tokenizer or args.model_dir / "tokenizer.json"
    args.arrival_rate = 1.0
    levels = [("users", "ConcurrentUsers", float(n)) for n in args.concurrency.split(",") if n]
    levels += [("req/s", "PoissonArrivals", float(q)) for q in args.arrival_rates.split(",") if q]
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        for index, target in enumerate(targets(args)):
            with ExitStack() as stack:
                if target.config is not None:
                    work = Path(tmp) / str(index)
                    work.mkdir()
                    server, target.model = served(target.config, args, work)
                    print(f"[{target.label}] packaging and starting TorchServe ...", flush=True)
                    target.host = stack.enter_context(server)["inference"]
                if args.api == "openai" and target.openai_path is None:
                    target.openai_path = openai_path(target.model, args.model_version)
                warm_up(target)
                for shape, user_class, level in levels:
                    print(f"[{target.label}] {level:g} {shape} for {args.duration:g} s ...", flush=True)
                    args.arrival_rate = level if shape == "req/s" else 1.0
                    prefix = args.out / f"{Path(target.label).stem}-{shape.replace('/', '')}-{level:g}"
                    started = time.monotonic()
                    run = run_locust(target, user_class, 1 if shape == "req/s" else int(level), args, prefix)
                    # run time as the client saw it, including the requests still in flight at the end
                    row = summarize(target.label, "users" if shape == "users" else "rate", level, run,
                                    time.monotonic() - started)
                    results.append(row)
                    print(f"[{target.label}]   {row['requests']} requests, {row['failures']} failed, "
                          f"{row['total_output_tokens_per_s']} output tok/s, TTFT p50 "
                          f"{row['time_to_first_token_ms_p50']} ms, Locust CPU {row['client_cpu_mean_pct']} %",
                          flush=True)
            if target.config is not None:  # the worker's log (what it loaded, on which kernels), kept
                shutil.copy(work / "logs" / "model_log.log", args.out / f"{Path(target.label).stem}-model_log.log")
    (args.out / "summary.json").write_text(json.dumps(results, indent=1))
    with open(args.out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(results[0]))
        writer.writeheader(), writer.writerows(results)
    plots = plot(results, args.out) if any(r["shape"] == "users" for r in results) else []
    table = markdown(results)
    report = ["# Load test report", "",
              f"Prompt tokens {args.prompt_tokens}, output tokens {args.output_tokens} (ignore_eos), "
              f"{args.stream_share:.0%} streamed, {args.duration:g} s per level, "
              f"{'OpenAI API (/v1/completions, greedy)' if args.api == 'openai' or args.openai_target else 'native API'}. "
              "Client: Locust on this host; "
              f"its CPU use is in the last column (100 % = one core: above ~90 % the client limits the result).",
              "", table, ""]
    report += [f"![{p}]({p})" for p in plots]
    if args.offline and args.offline.is_file():
        report += ["", "## Offline generation benchmark (no HTTP)", "", args.offline.read_text()]
    (args.out / "report.md").write_text("\n".join(report) + "\n")
    print("\n" + table + f"\n\nwrote {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
