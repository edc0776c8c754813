"""Batch-1 decode step with the C++ decoder stack against the Python loop over the same layers.

    python scripts/bench_stack.py [--configs configs/woq-int8.yaml ...] [--steps 150] [--threads 2]

Loads each config as the server does (native backend, our model runner), then times single
decode steps with the stack and without it, alternating step by step so that both see the same
machine (on a shared host its speed drifts by tens of percent within a minute). Prints the
minimum and the median of each. Both paths compute bitwise the same logits
(tests/test_runner.py); only the time differs.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handlers"))
sys.path.insert(0, str(ROOT / "scripts"))
from cpu_llm.config.serving import parse_serving_config  # noqa: E402
from evaluate import serve_like_the_worker  # noqa: E402

CONFIGS = ["fp32.yaml", "woq-int8.yaml", "woq-int4.yaml", "smoothquant.yaml"]


def step_times(runner, steps: int, prompt_len: int = 32) -> dict[bool, list[float]]:
    """Seconds per decode step at position `prompt_len`, with (True) and without the stack."""
    runner.run(list(range(100, 100 + prompt_len)), list(range(prompt_len)), [0] * prompt_len, [prompt_len - 1])
    times: dict[bool, list[float]] = {True: [], False: []}
    with torch.inference_mode():
        for _ in range(steps):
            for use in (True, False):
                with contextlib.nullcontext() if use else runner.model.python_loop():
                    started = time.perf_counter()
                    runner.run([7], [prompt_len], [0], [0])
                    times[use].append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="*", type=Path, default=[ROOT / "configs" / c for c in CONFIGS])
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| config | stack ms (min / median) | Python loop ms (min / median) | saved per step (median) |")
    print("|---|---|---|---|")
    for path in args.configs:
        raw = yaml.safe_load(path.read_text())
        raw.setdefault("quantization", {})["backend"] = "native"
        served, _ = serve_like_the_worker(parse_serving_config(raw), args.model_dir, slots=1)
        if served.runner is None or served.model.stack is None:
            sys.exit(f"{path.name}: no decoder stack here (report: runner {served.report.get('runner')}, "
                     f"decoder_stack {served.report.get('decoder_stack')})")
        times = step_times(served.runner, args.steps)
        stack, loop = ([1000 * v for v in times[use]] for use in (True, False))
        print(f"| {path.stem} | {min(stack):.2f} / {statistics.median(stack):.2f} | {min(loop):.2f} / "
              f"{statistics.median(loop):.2f} | {statistics.median(loop) - statistics.median(stack):.2f} |", flush=True)


if __name__ == "__main__":
    main()
