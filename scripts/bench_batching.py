"""Dynamic vs continuous batching under the same concurrent streaming load, side by side.

For each mode, package the model with the same batch size (only `continuousBatching` differs),
start a real TorchServe on spare ports, send N streaming requests at once with mixed output
lengths (exact, via ignore_eos), and measure on the client: time to first token (first text
line), end-to-end latency, and total output tokens/s over the whole burst.

    python scripts/bench_batching.py                      # 16 requests, batchSize 8
    python scripts/bench_batching.py --requests 32 --batch-size 8 --json results/batching.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # noqa: E402
from build_archive import build_archive  # noqa: E402

ROOT = serve.ROOT
PORTS = {"inference": 28180, "management": 28181, "metrics": 28182}
PROMPTS = [
    "The history of the Roman empire", "Write a short story about a robot.", "def quicksort(items):",
    "Explain how a CPU cache works.", "The best way to learn a language is", "Once upon a time, in a small village,",
    "List the planets of the solar system.", "The recipe for a good bread starts with",
]
OUTPUT_LENGTHS = [16, 32, 64, 128]  # cycled over the requests: short ones stuck behind long ones show HOL blocking


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def stream_one(url: str, body: dict, out: dict) -> None:
    """Send one streaming request; record when it was sent, its first text and its end."""
    out["sent"] = time.perf_counter()
    with requests.post(url, json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        buffered = b""
        # chunk_size=None: each HTTP chunk as it arrives (iter_lines() would wait for 512 bytes)
        for data in response.iter_content(chunk_size=None):
            buffered += data
            *lines, buffered = buffered.split(b"\n")
            for line in filter(None, lines):
                chunk = json.loads(line)
                if chunk.get("text") and "first" not in out:
                    out["first"] = time.perf_counter()
                if "finish_reason" in chunk:
                    out["tokens"] = chunk["completion_tokens"]
    out["end"] = time.perf_counter()
    out.setdefault("first", out["end"])


def burst(url: str, n: int) -> list[dict]:
    results = [{} for _ in range(n)]
    threads = [threading.Thread(target=stream_one, args=(url, {
        "prompt": PROMPTS[i % len(PROMPTS)], "max_new_tokens": OUTPUT_LENGTHS[i % len(OUTPUT_LENGTHS)],
        "ignore_eos": True, "stream": True}, results[i])) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def measure(mode: str, model_dir: Path, batch_size: int, n: int, tmp: Path) -> dict:
    config = {
        "minWorkers": 1, "maxWorkers": 1, "batchSize": batch_size, "maxBatchDelay": 50,
        "continuousBatching": mode == "continuous", "responseTimeout": 600, "startupTimeout": 300,
        "handler": {"max_prompt_tokens": 256, "max_new_tokens": max(OUTPUT_LENGTHS)},
        "quantization": {"backend": "native"},  # the same model path in both modes
    }
    work = tmp / mode
    work.mkdir()
    (work / "model-config.yaml").write_text(yaml.safe_dump(config))
    build_archive(model_dir, "bench", work / "model-config.yaml", work / "store")
    ts_config = serve.write_ts_config(work, PORTS)
    with serve.running(ts_config, work / "store", ["bench=bench.mar"], work / "logs") as urls:
        url = f"{urls['inference']}/predictions/bench"
        burst(url, 2)  # warm-up
        print(f"{mode}: {n} streaming requests at once ...", flush=True)
        results = burst(url, n)
    started = min(r["sent"] for r in results)
    ttft = [(r["first"] - r["sent"]) * 1000 for r in results]
    latency = [(r["end"] - r["sent"]) * 1000 for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {
        "mode": mode, "requests": n, "batch_size": batch_size,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
        "latency_p50_ms": percentile(latency, 50), "latency_p95_ms": percentile(latency, 95),
        "output_tokens": tokens, "tokens_per_s": tokens / (max(r["end"] for r in results) - started),
        "ttft_mean_ms": statistics.fmean(ttft),
    }


def table(rows: list[dict]) -> str:
    base = rows[0]
    lines = ["| batching | TTFT p50 ms | TTFT p95 ms | latency p50 ms | latency p95 ms | output tok/s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} ({r['ttft_p95_ms'] / base['ttft_p95_ms']:.2f}x) "
                     f"| {r['latency_p50_ms']:.0f} | {r['latency_p95_ms']:.0f} "
                     f"| {r['tokens_per_s']:.1f} ({r['tokens_per_s'] / base['tokens_per_s']:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as tmp:
        rows = [measure(mode, args.model_dir, args.batch_size, args.requests, Path(tmp))
                for mode in ("dynamic", "continuous")]
    print(f"\n{args.requests} concurrent streaming requests, output lengths {OUTPUT_LENGTHS} tokens (cycled), "
          f"batchSize {args.batch_size}, SmolLM2 fp32, native backend\n")
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
