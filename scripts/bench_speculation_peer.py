"""Speculative decoding at batch 1, side by side: ours with n-gram drafting and without, and
llama-server with its n-gram speculation (`--spec-type ngram-simple`) and without, on the same
weights and format, in one run and one report.

Two workloads, one request at a time through the OpenAI chat API, greedy:
- **repeats input**: rewrite a piece of this repo's own code, the output mostly copies the prompt;
- **never hits**: short stories, where drafts have (next to) nothing to copy.

Printed per side and workload: decode tokens/s (tokens after the first / time after the first),
the ratio with drafting to without, and whether our greedy text is identical with and without.

    python scripts/bench_speculation_peer.py                       # WoQ INT8 vs Q8_0
    python scripts/bench_speculation_peer.py --isa avx2 --llama /tmp/llama.cpp-avx2
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

import psutil
import requests

from bench_chat_peer import chat, peer_serving, serving
from bench_peer import TORCH_ISA_ENV, add_peer_arguments, cpu_name, llama_dir, llama_isa, prepare_peer
from bench_served_peer import MODES, worker_kernels
from serve import ROOT

SOURCES = ["handlers/cpu_llm/decode/sampling.py", "handlers/cpu_llm/engine/prefix_cache.py",
           "handlers/cpu_llm/decode/detokenizer.py", "handlers/cpu_llm/core/errors.py"]
STORIES = ["Write a short story about a lighthouse keeper.", "Tell me about the history of bread.",
           "Describe a walk through a forest in autumn.", "Why do cats purr? Answer at length."]


def code_piece(path: str, lines: int = 24) -> str:
    """`lines` lines of a source file, from its first function on."""
    text = (ROOT / path).read_text().splitlines()
    start = next(i for i, line in enumerate(text) if line.startswith("def ") or line.startswith("class "))
    return "\n".join(text[start:start + lines])


ACCEPTANCE = ("llm_draft_tokens_total", "llm_accepted_draft_tokens_total")
WORKLOADS = {
    "repeats input": [f"Rewrite this Python code with a comment above each function, changing nothing else:\n\n"
                      f"```python\n{code_piece(path)}\n```" for path in SOURCES],
    "never hits": STORIES,
}


def counter(metrics: str | None, name: str) -> float:
    """A Prometheus counter of our worker (summed over its labels); 0 without a metrics URL."""
    if metrics is None:
        return 0.0
    lines = requests.get(f"{metrics}/metrics", timeout=30).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") or line.startswith(name + " "))


def run(base: str, model: str, prompts: list[str], tokens: int, metrics: str | None = None) -> dict:
    """Each prompt once, one at a time: decode tokens/s (median), the texts, and (ours, from
    Prometheus) the share of drafted tokens kept."""
    before = [counter(metrics, name) for name in ACCEPTANCE]
    rates, texts = [], []
    for prompt in prompts:
        reply = chat(base, model, [{"role": "user", "content": prompt}], tokens, {})
        texts.append(reply["text"])
        if reply["tokens"] > 1 and reply["total"] > reply["ttft"]:
            rates.append((reply["tokens"] - 1) / (reply["total"] - reply["ttft"]))
    drafted, kept = (counter(metrics, name) - start for name, start in zip(ACCEPTANCE, before))
    return {"tok_s": statistics.median(rates), "texts": texts, "drafted": drafted, "kept": kept}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="woq-int8", choices=sorted(MODES))
    parser.add_argument("--tokens", type=int, default=192, help="most output tokens per request")
    parser.add_argument("--draft-tokens", type=int, default=4, help="handler.speculative_tokens; llama's --spec-draft-n-max")
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    add_peer_arguments(parser, "GGUFs")
    args = parser.parse_args()
    args.batch_size = 1
    os.environ.update(TORCH_ISA_ENV.get(args.isa, {}))  # TorchServe's worker inherits it
    llama = llama_dir(args)
    gguf = Path(f"{prepare_peer(args.work, [args.model_dir], llama=llama, isa=args.isa)[args.model_dir]}-{MODES[args.mode][1]}.gguf")
    sides: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-spec-") as tmp:
        for label, speculation in (("ours, n-gram drafts", "ngram"), ("ours", "none")):
            work = Path(tmp) / speculation
            work.mkdir()
            handler = {"speculation": speculation, "speculative_tokens": args.draft_tokens,
                       "max_new_tokens": args.tokens, "default_max_new_tokens": args.tokens}
            with serving(args.mode, args, handler, work, f"spec-{speculation}") as urls:
                sides[label] = {w: run(urls["v1"], f"spec-{speculation}", prompts, args.tokens, urls["metrics"])
                                for w, prompts in WORKLOADS.items()}
        kernels = worker_kernels(work)
    fmt = MODES[args.mode][1]
    for label, options in ((f"llama-server {fmt}, ngram-simple", ["--spec-type", "ngram-simple", "--spec-draft-n-max",
                                                                   str(args.draft_tokens)]),
                           (f"llama-server {fmt}", [])):
        with peer_serving(llama, gguf, 1, args.threads, 4096, options) as base:
            sides[label] = {w: run(base, "peer", prompts, args.tokens) for w, prompts in WORKLOADS.items()}
    print(f"\n{cpu_name()}, {psutil.cpu_count()} logical CPUs; ours: {args.mode}, --isa {args.isa}, kernels {kernels}, "
          f"{args.draft_tokens} draft tokens; llama-server: {llama} built for {llama_isa(llama)}; {args.threads} "
          f"threads each. One request at a time, up to {args.tokens} output tokens, greedy, OpenAI chat API.\n")
    print("| workload | ours, drafts tok/s | drafts kept | ours tok/s | ours: drafts / none | llama-server, ngram tok/s | "
          "llama-server tok/s | llama: ngram / none | ours / llama, both drafting | our greedy text identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    spec, plain, peer_spec, peer = (sides[label] for label in sides)
    for w in WORKLOADS:
        same = spec[w]["texts"] == plain[w]["texts"]
        kept = f"{spec[w]['kept']:.0f} of {spec[w]['drafted']:.0f}"
        print(f"| {w} | {spec[w]['tok_s']:.1f} | {kept} | {plain[w]['tok_s']:.1f} | **{spec[w]['tok_s'] / plain[w]['tok_s']:.2f}x** | "
              f"{peer_spec[w]['tok_s']:.1f} | {peer[w]['tok_s']:.1f} | {peer_spec[w]['tok_s'] / peer[w]['tok_s']:.2f}x | "
              f"{spec[w]['tok_s'] / peer_spec[w]['tok_s']:.2f}x | {'yes' if same else 'NO'} |")


if __name__ == "__main__":
    main()
