"""Multi-turn chat served side by side: ours with the prefix cache, ours without it, and
llama-server (its `cache_prompt` on), on the same weights and format, in one run and one report.

N conversations run at once, each of `--turns` turns. Every conversation starts with the same
~1,000-token system prompt (text the repo ships, eval/python-reference.txt), and every turn sends
the whole history through the OpenAI chat API, streamed, greedy, EOS ignored, so each side
generates the same number of tokens. Printed per side: time to first token (p50 over all turns,
and of turns 2 and later), aggregate output tokens/s, and whether our greedy replies are identical
with the cache on and off.

    python scripts/bench_chat_peer.py                           # WoQ INT8 vs Q8_0, 16 conversations
    python scripts/bench_chat_peer.py --conversations 4 --turns 4 --isa avx2 --llama /tmp/llama.cpp-avx2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import requests
import yaml
from transformers import AutoTokenizer

from bench_peer import TORCH_ISA_ENV, add_peer_arguments, cpu_name, llama_dir, llama_isa, prepare_peer
from bench_served_peer import MODES, free_port, llama_server, served_config, worker_kernels
from build_archive import build_archive  # also puts handlers/ on sys.path
from serve import ROOT, running, write_ts_config

PORTS = {"inference": 28780, "management": 28781, "metrics": 28782}
TEXT = ROOT / "eval" / "python-reference.txt"


def system_prompt(tokenizer, tokens: int) -> str:
    """The first `tokens` tokens of the shipped text, as an instruction to a documentation assistant."""
    ids = tokenizer(TEXT.read_text()[:tokens * 8])["input_ids"][:tokens]
    return "You answer questions about the Python reference below, briefly.\n\n" + tokenizer.decode(ids)


def user_turn(conversation: int, turn: int) -> str:
    """A question of its own for every turn of every conversation (they share only the system prompt)."""
    words = TEXT.read_text().split()
    start = (conversation * 97 + turn * 31) % (len(words) - 40)
    return f"Reader {conversation}, question {turn + 1}: what does this mean? " + " ".join(words[start:start + 25])


def chat(base: str, model: str, messages: list[dict], output_tokens: int, extra: dict) -> dict:
    """One streamed greedy turn: its reply `text`, seconds to its first token (`ttft`) and in all
    (`total`), and its `tokens` (the usage's count). `extra` holds a side's own fields
    (llama-server's cache_prompt, EOS ignored)."""
    started = time.perf_counter()
    first, text, tokens = None, [], 0
    body = {"model": model, "messages": messages, "max_tokens": output_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, **extra}
    with requests.post(f"{base}/chat/completions", json=body, stream=True, timeout=1800) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            piece = chunk["choices"][0]["delta"].get("content") if chunk["choices"] else None
            if piece:
                first = first or time.perf_counter()
                text.append(piece)
    end = time.perf_counter()
    return {"text": "".join(text), "ttft": (first or end) - started, "total": end - started, "tokens": tokens}


@contextmanager
def serving(mode: str, args, models: dict[str, dict], work: Path):
    """One TorchServe serving `mode` (bench_served_peer's config) as each of `models` (name ->
    handler keys on top), each with its own worker, warmed up. Yields its URLs and each model's
    OpenAI base under its name. The workers' load log is kept in `work`."""
    for name, handler in models.items():
        config = served_config(mode, args.batch_size, args.threads, args.isa, work)
        raw = yaml.safe_load(config.read_text())
        raw["handler"].update(handler)
        config.write_text(yaml.safe_dump(raw, sort_keys=False))
        build_archive(args.model_dir, name, config, work / "store")
    (work / "java-tmp").mkdir(exist_ok=True)
    ts_config = write_ts_config(work, PORTS, java_tmp=work / "java-tmp")
    try:
        with running(ts_config, work / "store", [f"{name}={name}.mar" for name in models], work / "logs",
                     timeout=600) as urls:
            for name in models:
                urls[name] = f"{urls['inference']}/predictions/{name}/1.0/v1"
                chat(urls[name], name, [{"role": "user", "content": "Hello"}], 4, {})  # warm-up
            yield urls
    finally:
        for log in (work / "logs").glob("model_log.log"):
            (work / "ours-model_log.log").write_text(log.read_text())


@contextmanager
def peer_serving(llama: Path, gguf: Path, slots: int, threads: int, context: int, options: list[str] = ()):
    """llama-server on `gguf` with `options`, warmed up; yields its OpenAI base URL."""
    port = free_port()
    server = llama_server(llama / "bin" / "llama-server", gguf, slots, threads, context, port, options)
    try:
        base = f"http://127.0.0.1:{port}/v1"
        chat(base, "peer", [{"role": "user", "content": "Hello"}], 4, {})
        yield base
    finally:
        server.terminate()
        server.wait(30)


def conversations(base: str, model: str, system: str, count: int, turns: int, output_tokens: int,
                  extra: dict) -> dict:
    """`count` conversations at once; returns the TTFT of every turn, the replies and output tok/s."""
    ttft: dict[tuple[int, int], float] = {}
    replies: dict[tuple[int, int], str] = {}
    errors: list[BaseException] = []

    def converse(c: int) -> None:
        messages = [{"role": "system", "content": system}]
        try:
            for t in range(turns):
                messages.append({"role": "user", "content": user_turn(c, t)})
                turn = chat(base, model, messages, output_tokens, extra)
                ttft[c, t], replies[c, t] = turn["ttft"], turn["text"]
                messages.append({"role": "assistant", "content": turn["text"]})
        except BaseException as error:  # noqa: BLE001 - reported below, after every thread ended
            errors.append(error)

    started = time.perf_counter()
    threads = [threading.Thread(target=converse, args=(c,)) for c in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise errors[0]
    later = [s for (_, t), s in ttft.items() if t > 0]
    return {"ttft_p50_ms": statistics.median(ttft.values()) * 1000,
            "ttft_later_p50_ms": statistics.median(later) * 1000 if later else float("nan"),
            "output_tok_s": count * turns * output_tokens / wall, "wall_s": wall, "replies": replies}


def ours(args, system: str, prefix_cache: bool, work: Path) -> dict:
    """Serve args.mode with the prefix cache on or off and run the conversations through it."""
    name = f"chat-{'cache' if prefix_cache else 'nocache'}"
    handler = {"prefix_cache": prefix_cache, "max_prompt_tokens": args.context - args.output_tokens,
               "max_new_tokens": args.output_tokens, "default_max_new_tokens": args.output_tokens}
    with serving(args.mode, args, {name: handler}, work) as urls:
        result = conversations(urls[name], name, system, args.conversations, args.turns, args.output_tokens,
                               {"ignore_eos": True})
    result["kernels"] = worker_kernels(work)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", default="woq-int8", choices=sorted(MODES))
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--output-tokens", type=int, default=32)
    parser.add_argument("--context", type=int, default=2560, help="tokens per conversation (KV slot) on each side")
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    add_peer_arguments(parser, "GGUFs")
    args = parser.parse_args()
    args.batch_size = args.conversations
    if args.isa in TORCH_ISA_ENV:
        os.environ.update(TORCH_ISA_ENV[args.isa])  # TorchServe's worker inherits it
    llama = llama_dir(args)
    gguf = Path(f"{prepare_peer(args.work, [args.model_dir], llama=llama, isa=args.isa)[args.model_dir]}-{MODES[args.mode][1]}.gguf")
    system = system_prompt(AutoTokenizer.from_pretrained(args.model_dir), args.system_tokens)
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        for prefix_cache in (True, False):
            work = Path(tmp) / str(prefix_cache)
            work.mkdir()
            results[f"ours, prefix cache {'on' if prefix_cache else 'off'}"] = ours(args, system, prefix_cache, work)
    with peer_serving(llama, gguf, args.conversations, args.threads, args.context) as peer:
        results[f"llama-server {MODES[args.mode][1]}, cache_prompt"] = conversations(
            peer, "peer", system, args.conversations, args.turns, args.output_tokens,
            {"ignore_eos": True, "cache_prompt": True})
    on, off, peer_row = results.values()
    same = on["replies"] == off["replies"]
    print(f"\n{cpu_name()}, {psutil.cpu_count()} logical CPUs; ours: {args.mode}, --isa {args.isa}, kernels "
          f"{on['kernels']}; llama-server: {llama} built for {llama_isa(llama)}, {args.threads} threads each.\n")
    print(f"{args.conversations} conversations at once x {args.turns} turns, a {args.system_tokens}-token system "
          f"prompt shared by all, the whole history every turn, {args.output_tokens} output tokens per turn "
          "(greedy, EOS ignored), OpenAI chat API, streamed.\n")
    print("| side | TTFT p50 ms | TTFT p50 ms, turns 2+ | output tok/s | wall s |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r['ttft_p50_ms']:.0f} | {r['ttft_later_p50_ms']:.0f} | {r['output_tok_s']:.1f} | "
              f"{r['wall_s']:.0f} |")
    print(f"\nTTFT p50, cache on / off: {on['ttft_p50_ms'] / off['ttft_p50_ms']:.1%}; on / llama-server: "
          f"{on['ttft_p50_ms'] / peer_row['ttft_p50_ms']:.2f}x; output tok/s on / llama-server: "
          f"{on['output_tok_s'] / peer_row['output_tok_s']:.2f}x; on / off: {on['output_tok_s'] / off['output_tok_s']:.2f}x")
    print(f"greedy replies identical with the cache on and off: {'yes' if same else 'NO'} "
          f"({sum(on['replies'][k] == off['replies'][k] for k in on['replies'])}/{len(on['replies'])} turns)")


if __name__ == "__main__":
    main()
