"""Inter-token latency of running streams while a long prompt arrives, per prefill chunk size.

In-process, on the model runner and its engine as the server uses them (continuous batching):
`--streams` requests are decoding when a `--prompt-tokens` prompt joins. For each chunk size the
script prints the running streams' inter-token latency (p50 and max) before and while the newcomer
is prefilled, and the newcomer's time to first token. A chunk as long as the prompt is what an
unchunked prefill costs the running streams.

    python scripts/bench_chunked_prefill.py --config configs/woq-int8.yaml --chunks 64,256,1536
"""

from __future__ import annotations

import argparse
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
from cpu_llm.core.params import GenerationRequest  # noqa: E402
from cpu_llm.decode.sequence import Sequence  # noqa: E402
from cpu_llm.engine.slot_engine import SlotEngine  # noqa: E402
from evaluate import TEXT, serve_like_the_worker  # noqa: E402


def request(ids: list[int], new_tokens: int) -> Sequence:
    return Sequence.start(GenerationRequest(prompt="", messages=None, max_new_tokens=new_tokens, ignore_eos=True), ids)


def measure(engine: SlotEngine, prompt: list[int], streams: int, chunk: int) -> dict[str, float]:
    engine.runner.prefill_chunk = chunk
    running = {f"s{i}": request(prompt[i * 50:i * 50 + 100], 10_000) for i in range(streams)}
    engine.step(running, set())
    while any(not seq.generated for seq in running.values()):
        engine.step({}, set(engine.seqs))
    before: list[float] = []
    for _ in range(8):
        started = time.perf_counter()
        engine.step({}, set(engine.seqs))
        before.append(time.perf_counter() - started)
    newcomer = request(prompt, 1)
    arrived = time.perf_counter()
    during: list[float] = []
    engine.step({"long": newcomer}, set(engine.seqs))
    during.append(time.perf_counter() - arrived)
    while not newcomer.generated:
        started = time.perf_counter()
        engine.step({}, set(engine.seqs))
        during.append(time.perf_counter() - started)
    ttft = time.perf_counter() - arrived
    engine.step({}, set())  # end the running streams: their clients go away
    ms = lambda values, f: 1000 * f(values)  # noqa: E731
    return {"chunk": chunk, "itl_before_p50": ms(before, statistics.median), "itl_during_p50": ms(during, statistics.median),
            "itl_during_max": ms(during, max), "steps": len(during), "ttft_ms": ttft * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "woq-int8.yaml")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--chunks", default="64,256,1536")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    raw = yaml.safe_load(args.config.read_text())
    raw.setdefault("quantization", {})["backend"] = "native"
    raw["batchSize"] = args.streams + 1
    config = parse_serving_config(raw)
    if args.threads:
        torch.set_num_threads(args.threads)
    served, info = serve_like_the_worker(config, args.model_dir, slots=args.streams + 1)
    if served.runner is None:
        sys.exit(f"{args.config} does not run on our model runner here ({served.report.get('runner')})")
    prompt = info.tokenizer(TEXT.read_text()).input_ids[:args.prompt_tokens]
    engine = SlotEngine(served.runner, info, request_timeout_s=3600)
    print(f"{args.config.name}: {args.streams} streams decoding, a {len(prompt)}-token prompt arrives; "
          f"{torch.get_num_threads()} threads")
    print("| prefill chunk | ITL p50 before ms | ITL p50 during ms | ITL max during ms | steps | newcomer TTFT ms |")
    print("|---|---|---|---|---|---|")
    for chunk in [int(c) for c in args.chunks.split(",")]:
        r = measure(engine, prompt, args.streams, chunk)
        print(f"| {r['chunk']} | {r['itl_before_p50']:.1f} | {r['itl_during_p50']:.1f} | {r['itl_during_max']:.1f} "
              f"| {r['steps']} | {r['ttft_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
