"""Served side by side: our TorchServe (continuous batching, our model runner) against llama-server
on the same weights and format, N concurrent streams, in one run and one report.

Each mode is one of our configs (continuous batching, batchSize = the stream count) paired with the
llama.cpp format it is compared with, as in bench_peer.py. llama-server runs with one slot per
stream and continuous batching (`--parallel N -cb`), the same threads as our worker; both are
driven by the same Locust sweep (load_tests/sweep.py, OpenAI API, streamed, ignore_eos), so both
see identical prompts. Prints aggregate output tokens/s and time to first token, and the ratios.

    python scripts/bench_served_peer.py                       # WoQ INT8 vs Q8_0, 16 streams
    python scripts/bench_served_peer.py --mode fp32 --mode woq-int4 --streams 16 --duration 60
    python scripts/bench_served_peer.py --isa avx2 --llama /tmp/llama.cpp-avx2   # both sides on AVX2 only

`--isa` sets our worker's handler.kernel_isa; `--llama` is the llama.cpp build llama-server comes
from (built there for the matching LLAMA_ISA if missing, as in bench_peer.py). The report names
the ISA of each side.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from bench_peer import TORCH_ISA_ENV, add_peer_arguments, cpu_name, llama_dir, llama_isa, prepare_peer  # noqa: E402

MODES = {  # our config -> the llama.cpp format it is compared with
    "fp32": ("configs/continuous.yaml", "F32"),
    "woq-int8": ("configs/woq-int8.yaml", "Q8_0"),
    "woq-int4": ("configs/woq-int4.yaml", "Q4_0"),
    "smoothquant": ("configs/smoothquant.yaml", "Q8_0"),
}


def served_config(mode: str, streams: int, threads: int, isa: str, work: Path) -> Path:
    """The mode's quantization on configs/continuous.yaml, with one batch row per stream, our
    kernels on `isa`."""
    raw = yaml.safe_load((ROOT / "configs" / "continuous.yaml").read_text())
    raw["quantization"] = yaml.safe_load((ROOT / MODES[mode][0]).read_text())["quantization"]
    raw["quantization"]["backend"] = "native"
    raw["batchSize"] = streams
    raw["handler"]["num_threads"] = threads
    raw["handler"]["kernel_isa"] = isa
    path = work / f"{mode}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def worker_kernels(out: Path) -> str:
    """The kernels our worker ran on, as its load log says (sweep.py keeps the log in `out`)."""
    for log in out.glob("*-model_log.log"):
        match = re.search(r"kernels (cpu_llm_kernels \([^)]*\)|reference \([^)]*\))", log.read_text())
        if match:
            return match.group(1)
    return "unknown (no load log)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server(binary: Path, gguf: Path, streams: int, threads: int, context: int, port: int,
                 options: list[str] = ()) -> subprocess.Popen:
    """llama-server on `gguf` with `streams` slots of `context` tokens each and `options`, ready to serve."""
    log = open(gguf.parent / f"llama-server-{gguf.stem}.log", "w")
    process = subprocess.Popen(
        [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
         "-t", str(threads), "--parallel", str(streams), "-cb", "-c", str(streams * context), "--no-webui",
         *options],
        stdout=log, stderr=subprocess.STDOUT)
    for _ in range(120):
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except requests.ConnectionError:
            pass
        if process.poll() is not None:
            break
        time.sleep(1)
    process.kill()
    raise RuntimeError(f"llama-server did not come up; see {log.name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", action="append", choices=sorted(MODES), help="default: woq-int8")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    parser.add_argument("--prompt-tokens", default="130")
    parser.add_argument("--output-tokens", default="64")
    parser.add_argument("--duration", type=int, default=60, help="seconds each server is measured")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    add_peer_arguments(parser, "GGUFs")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "served-peer")
    args = parser.parse_args()
    llama = llama_dir(args)
    prefix = prepare_peer(args.work, [args.model_dir], llama=llama, isa=args.isa)[args.model_dir]
    context = int(args.prompt_tokens.split("-")[-1]) + int(args.output_tokens.split("-")[-1]) + 64
    lines = [f"{cpu_name()}, {psutil.cpu_count()} logical CPUs; ours: --isa {args.isa} (handler.kernel_isa); "
             f"llama-server: {llama} built for {llama_isa(llama)}.", "",
             f"{args.streams} concurrent streams, prompts of {args.prompt_tokens} tokens, {args.output_tokens} output "
             f"tokens (ignore_eos), {args.duration} s each, {args.threads} threads per server, OpenAI API, Locust on "
             "the same host.", "",
             "| ours | kernels (worker's load log) | output tok/s | TTFT p50 ms | ITL p50 ms | llama-server | output tok/s | "
             "TTFT p50 ms | ITL p50 ms | tok/s ours / peer | TTFT ours / peer |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in args.mode or ["woq-int8"]:
        fmt = MODES[mode][1]
        out = args.out / mode
        with tempfile.TemporaryDirectory() as tmp:
            config = served_config(mode, args.streams, args.threads, args.isa, Path(tmp))
            port = free_port()
            server = llama_server(llama / "bin" / "llama-server", Path(f"{prefix}-{fmt}.gguf"),
                                  args.streams, args.threads, context, port)
            try:
                subprocess.run([sys.executable, str(ROOT / "load_tests" / "sweep.py"), "--api", "openai",
                                "--config", str(config), "--openai-target", f"llama-server-{fmt}=http://127.0.0.1:{port}/v1",
                                "--concurrency", str(args.streams), "--prompt-tokens", args.prompt_tokens,
                                "--output-tokens", args.output_tokens, "--duration", str(args.duration),
                                "--model-dir", str(args.model_dir), "--out", str(out)], check=True,
                               env={**os.environ, **TORCH_ISA_ENV.get(args.isa, {})})  # TorchServe's worker inherits it
            finally:
                server.terminate()
                server.wait(30)
        ours, peer = json.loads((out / "summary.json").read_text())
        ratio = lambda key: ours[key] / peer[key] if ours[key] and peer[key] else float("nan")  # noqa: E731
        lines.append(f"| {mode} | {worker_kernels(out)} | {ours['total_output_tokens_per_s']:.1f} | {ours['time_to_first_token_ms_p50']:.0f} | "
                     f"{ours['inter_token_latency_ms_p50']:.0f} | {fmt} | {peer['total_output_tokens_per_s']:.1f} | "
                     f"{peer['time_to_first_token_ms_p50']:.0f} | {peer['inter_token_latency_ms_p50']:.0f} | "
                     f"**{ratio('total_output_tokens_per_s'):.2f}x** | {ratio('time_to_first_token_ms_p50'):.2f}x |")
    text = "\n".join(lines)
    print("\n" + text)
    (args.out / "report.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
