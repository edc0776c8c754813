"""Speculative decoding at batch 1, side by side: ours with n-gram drafting and without, and
llama-server with its n-gram speculation (`--spec-type ngram-simple`) and without, on the same
weights and format, in one run and one report.

Three workloads, one request at a time through the OpenAI chat API:
- **repeats input**: rewrite a piece of this repo's own code (greedy): the output mostly copies
  the prompt;
- **stories** (greedy): little to copy, a few common phrases;
- **stories sampled at temperature 1.5** (seeded): drafts are made from the phrases that recur
  and are nearly never kept, the case where drafting can only cost.

Printed per side and workload: decode tokens/s (tokens after the first / time after the first),
how many of our drafted tokens were kept, the ratio with drafting to without, and whether our
text is identical with and without (greedy, and seeded sampling: a row's token is drawn as
without drafts).

    python scripts/bench_speculation_peer.py                       # WoQ INT8 vs Q8_0
    python scripts/bench_speculation_peer.py --isa avx2 --llama /tmp/llama.cpp-avx2
    python scripts/bench_speculation_peer.py --in-process     # ours only: one worker, no HTTP

`--in-process` runs our engine with and without drafts on one loaded model, request by request
alternating: no second worker whose memory lands elsewhere, no HTTP, so the cost of drafting
where drafts never come is measured to the percent.
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
WORKLOADS = {  # name -> (prompts, sampling fields)
    "repeats input": ([f"Rewrite this Python code with a comment above each function, changing nothing else:\n\n"
                       f"```python\n{code_piece(path)}\n```" for path in SOURCES], {}),
    "stories": (STORIES, {}),
    "stories, temperature 1.5": (STORIES, {"temperature": 1.5, "seed": 1}),
}


def counter(metrics: str | None, name: str) -> float:
    """A Prometheus counter of our worker (summed over its labels); 0 without a metrics URL."""
    if metrics is None:
        return 0.0
    lines = requests.get(f"{metrics}/metrics", timeout=30).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{") or line.startswith(name + " "))


def run(sides: dict[str, str], workload: str, tokens: int, rounds: int, metrics: str | None = None) -> dict:
    """Each prompt `rounds` times on every side (label -> OpenAI base), one request at a time,
    the sides alternating request by request so a drift of the machine's speed hits them alike.
    Per side: decode tokens/s of each request, the texts of the first round, and (ours, from
    Prometheus) the drafted and kept tokens."""
    before = [counter(metrics, name) for name in ACCEPTANCE]
    rates: dict[str, list[float]] = {label: [] for label in sides}
    texts: dict[str, list[str]] = {label: [] for label in sides}
    prompts, sampling = WORKLOADS[workload]
    for turn, prompt in enumerate(prompts * rounds):
        order = list(sides) if turn % 2 == 0 else list(sides)[::-1]
        for label in order:
            reply = chat(sides[label], label, [{"role": "user", "content": prompt}], tokens, sampling)
            if turn < len(prompts):
                texts[label].append(reply["text"])
            if reply["tokens"] > 1 and reply["total"] > reply["ttft"]:
                rates[label].append((reply["tokens"] - 1) / (reply["total"] - reply["ttft"]))
    drafted, kept = (counter(metrics, name) - start for name, start in zip(ACCEPTANCE, before))
    return {label: {"rates": rates[label], "texts": texts[label], "drafted": drafted, "kept": kept}
            for label in sides}


def pooled(runs: list[dict]) -> dict:
    """One side's figures over several runs: the median of every request's tok/s, the first run's
    texts (and whether every run gave them), the drafts of all runs."""
    return {"tok_s": statistics.median(rate for run in runs for rate in run["rates"]), "texts": runs[0]["texts"],
            "same_texts": all(run["texts"] == runs[0]["texts"] for run in runs),
            "drafted": sum(run["drafted"] for run in runs), "kept": sum(run["kept"] for run in runs)}


def in_process(args) -> None:
    """Our engine with and without drafts on one model in this process, alternating request by
    request: decode tok/s from each request's own timings (median), drafts kept, same text."""
    import torch
    import yaml

    from cpu_llm.api.prompt import encode_prompt
    from cpu_llm.api.request import parse_request
    from cpu_llm.config.serving import ServingConfig, parse_serving_config
    from cpu_llm.decode.sequence import Sequence
    from cpu_llm.engine.select import engine_for
    from cpu_llm.kernels import kernel_status, use_isa
    from cpu_llm.load.pipeline import load_for_serving
    from cpu_llm.runner.model_runner import attach_runner

    torch.set_num_threads(args.threads)
    use_isa(args.isa)
    raw = yaml.safe_load((ROOT / MODES[args.mode][0]).read_text())
    raw["quantization"]["backend"] = "native"
    served, info = load_for_serving(str(args.model_dir), parse_serving_config(raw).quantization, str(ROOT))
    attach_runner(served, "llama", slots=2, length=2048, prefill_chunk=256)
    config = ServingConfig(max_new_tokens=args.tokens)
    engines = {"drafts": engine_for(served, info, config=ServingConfig(speculation="ngram",
                                                                      speculative_tokens=args.draft_tokens)),
               "none": engine_for(served, info)}
    print(f"\n{cpu_name()}; ours in-process: {args.mode}, kernels {kernel_status()}, {args.threads} threads, "
          f"{args.draft_tokens} draft tokens; {args.rounds} rounds, the engines alternating request by request.\n")
    print("| workload | drafts tok/s | drafts kept | none tok/s | drafts / none | same text |")
    print("|---|---|---|---|---|---|")
    for w, (prompts, sampling) in WORKLOADS.items():
        fields = {"do_sample": True, "temperature": sampling["temperature"], "seed": sampling["seed"]} if sampling else {}
        rates, texts, drafted, kept = {"drafts": [], "none": []}, {"drafts": [], "none": []}, 0, 0
        for turn, prompt in enumerate(prompts * args.rounds):
            for label in (["drafts", "none"] if turn % 2 == 0 else ["none", "drafts"]):
                request = parse_request({"messages": [{"role": "user", "content": prompt}],
                                         "max_new_tokens": args.tokens, **fields}, config)
                seq = Sequence.start(request, encode_prompt(info.tokenizer, request, 1536))
                result = engines[label].generate([seq])[0]
                rates[label].append((result.completion_tokens - 1) / (result.decode_ms / 1000))
                texts[label].append(result.text)
                drafted, kept = drafted + result.draft_tokens, kept + result.accepted_draft_tokens
        on, off = statistics.median(rates["drafts"]), statistics.median(rates["none"])
        print(f"| {w} | {on:.1f} | {kept} of {drafted} | {off:.1f} | **{on / off:.3f}x** | "
              f"{'yes' if texts['drafts'] == texts['none'] else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="woq-int8", choices=sorted(MODES))
    parser.add_argument("--tokens", type=int, default=192, help="most output tokens per request")
    parser.add_argument("--draft-tokens", type=int, default=4, help="handler.speculative_tokens; llama's --spec-draft-n-max")
    parser.add_argument("--rounds", type=int, default=2, help="times each prompt is sent to each side")
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--in-process", action="store_true", help="ours only, with and without drafts, no server")
    add_peer_arguments(parser, "GGUFs")
    args = parser.parse_args()
    if args.in_process:
        in_process(args)
        return
    args.batch_size = 1
    os.environ.update(TORCH_ISA_ENV.get(args.isa, {}))  # TorchServe's worker inherits it
    llama = llama_dir(args)
    gguf = Path(f"{prepare_peer(args.work, [args.model_dir], llama=llama, isa=args.isa)[args.model_dir]}-{MODES[args.mode][1]}.gguf")
    runs: dict[str, dict[str, list[dict]]] = {w: {} for w in WORKLOADS}  # workload -> side -> its runs
    models = {name: {"speculation": speculation, "speculative_tokens": args.draft_tokens,
                     "max_new_tokens": args.tokens, "default_max_new_tokens": args.tokens}
              for name, speculation in (("ours-drafts", "ngram"), ("ours", "none"))}
    # Served twice, the models loaded in both orders: which worker loads first moves its decode speed
    # by up to ~10 % on a 2-core VM (where its memory lands), with or without drafts.
    for order in (list(models), list(models)[::-1]):
        with tempfile.TemporaryDirectory(prefix="bench-spec-") as tmp:
            with serving(args.mode, args, {name: models[name] for name in order}, Path(tmp)) as urls:
                for w in WORKLOADS:
                    for label, run_ in run({name: urls[name] for name in order}, w, args.tokens, args.rounds,
                                           urls["metrics"]).items():
                        runs[w].setdefault(label, []).append(run_)
            kernels = worker_kernels(Path(tmp))
    with peer_serving(llama, gguf, 1, args.threads, 4096, []) as plain:
        with peer_serving(llama, gguf, 1, args.threads, 4096, ["--spec-type", "ngram-simple", "--spec-draft-n-max",
                                                               str(args.draft_tokens)]) as drafting:
            for w in WORKLOADS:
                for label, run_ in run({"llama-drafts": drafting, "llama": plain}, w, args.tokens, args.rounds).items():
                    runs[w][label] = [run_]
    results = {w: {label: pooled(side) for label, side in sides.items()} for w, sides in runs.items()}
    print(f"\n{cpu_name()}, {psutil.cpu_count()} logical CPUs; ours: {args.mode}, --isa {args.isa}, kernels {kernels}, "
          f"{args.draft_tokens} draft tokens; llama-server: {llama} built for {llama_isa(llama)}; {args.threads} "
          f"threads each. One request at a time, up to {args.tokens} output tokens, OpenAI chat API; each prompt "
          f"{args.rounds} times per side, the sides with and without drafts alternating request by request (both "
          "served at once, each idle while the other runs; ours served twice, loaded in both orders), median decode "
          "tok/s over all requests.\n")
    print("| workload | ours, drafts tok/s | drafts kept | ours tok/s | ours: drafts / none | llama-server, ngram tok/s | "
          "llama-server tok/s | llama: ngram / none | ours / llama, both drafting | our text identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w, r in results.items():
        spec, plain, peer_spec, peer = r["ours-drafts"], r["ours"], r["llama-drafts"], r["llama"]
        kept = f"{spec['kept']:.0f} of {spec['drafted']:.0f}"
        print(f"| {w} | {spec['tok_s']:.1f} | {kept} | {plain['tok_s']:.1f} | **{spec['tok_s'] / plain['tok_s']:.2f}x** | "
              f"{peer_spec['tok_s']:.1f} | {peer['tok_s']:.1f} | {peer_spec['tok_s'] / peer['tok_s']:.2f}x | "
              f"{spec['tok_s'] / peer_spec['tok_s']:.2f}x | {'yes' if spec['texts'] == plain['texts'] and spec['same_texts'] else 'NO'} |")


if __name__ == "__main__":
    main()
