"""Prefill and decode speed and memory of every native mode side by side with llama.cpp on identical weights.

    python scripts/bench_peer.py                                  # make bench-peer: SmolLM2 and a 1B Llama shape
    python scripts/bench_peer.py --models models/SmolLM2-135M-Instruct --threads 2
    python scripts/bench_peer.py --isa avx2 --llama /tmp/llama.cpp-avx2   # both sides on AVX2 only

For each model folder: llama.cpp's `llama-bench` prefills 128 and 512 tokens (pp128, pp512) and
decodes 64 (tg64) on GGUF F32 / Q8_0 / Q4_0 made from the same safetensors, and our served path
(load_for_serving, the server's own runner) prefills one prompt of 128 and of 512 tokens and
decodes 64 tokens after a 32-token prompt in fp32, WoQ INT8, WoQ INT4 and SmoothQuant, each in a
fresh process. The two alternate: in each of --rounds rounds (3) llama-bench runs once, then ours,
so each pair sees the same machine (a shared host's speed drifts by tens of percent within
minutes); each ratio printed is the median of the rounds' ratios, with their range. Printed side
by side: tokens/s at batch 1 (medians) with the ratio to the llama.cpp counterpart (fp32 vs F32,
INT8 and SmoothQuant vs Q8_0, INT4 vs Q4_0), prefill tokens/s and ratios, batch 8 and 16
aggregates and their ratio to batch 1, the weights' read bandwidth achieved as a share of
the machine's bandwidth measured in the same run, peak RSS while loading and quantizing (for
SmoothQuant a first load, calibrating: each process starts with an empty calibration cache), and
RSS while serving. With --accuracy, also perplexity of each mode beside llama.cpp's on the same
held-out text (eval/python-reference.txt, scored the same way).

Each side's instruction set is printed: ours is `--isa` (the config's handler.kernel_isa; auto =
the best this CPU has; torch's own kernels and BLAS are held to it too, TORCH_ISA_ENV), llama.cpp's the one its build directory (--llama) was built for
(build_llama_cpp.sh's LLAMA_ISA, built there if missing: auto -> native, avx2 -> avx2,
avx512-vnni -> avx512). Compare like with like: `--isa avx2` against a `LLAMA_ISA=avx2` build.

llama.cpp is a peer for this comparison only: it is built from the llama-cpp-python sdist and
the GGUFs are converted by ../shared/peer/ (build_llama_cpp.sh, to_gguf.sh, make_shape_model.py),
into --work (default /tmp/llama.cpp-peer); nothing of it is used at run time. Run on a quiet
machine: anything else on the CPU changes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handlers"))
sys.path.insert(0, str(ROOT / "scripts"))
from cpu_llm.config.serving import parse_serving_config  # noqa: E402
from cpu_llm.kernels import kernel_status  # noqa: E402
from cpu_llm.load.calibration import CACHE_DIR_ENV  # noqa: E402
from evaluate import (TEXT, bytes_read_per_step, evaluate_all, framework_overhead_ms, memory_bandwidth_gb_s,  # noqa: E402, I001
                      peak_rss_mib, perplexity_change, serve_like_the_worker, speed)

PEER = ROOT.parent / "shared" / "peer"
MODES = [  # (our config, the llama.cpp format it is compared with)
    ("configs/fp32.yaml", "F32"), ("configs/woq-int8.yaml", "Q8_0"),
    ("configs/woq-int4.yaml", "Q4_0"), ("configs/smoothquant.yaml", "Q8_0"),
]
BATCHES = (1, 8, 16)  # decode batch sizes measured (the first paired with llama.cpp)
SHAPE_1B = "llama-1b-shape"  # hidden 2048, 16 layers, FFN 8192, GQA 32/8, tied: 1.07B parameters


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")), "unknown CPU")


def run(cmd: list[str], **kwargs) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, **kwargs).stdout


LLAMA_ISA = {"auto": "native", "avx2": "avx2", "avx512-vnni": "avx512"}  # our --isa -> build_llama_cpp.sh's
# What torch's own kernels and BLAS (our fp32 prefill, the Hugging Face path) may use under --isa:
# without these, forcing our kernels to AVX2 would leave fp32 GEMMs on AVX-512 or AMX.
TORCH_ISA_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "avx512-vnni": {"ATEN_CPU_CAPABILITY": "avx512", "MKL_ENABLE_INSTRUCTIONS": "AVX512",
                    "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"},
}


def llama_isa(llama: Path) -> str:
    """What the llama.cpp build in `llama` was compiled for (build_llama_cpp.sh writes isa.txt)."""
    stamp = llama / "isa.txt"
    return stamp.read_text().strip() if stamp.is_file() else "unknown ISA"


def add_peer_arguments(parser: argparse.ArgumentParser, work_holds: str) -> None:
    """--work, --isa and --llama: where the peer's files are and which ISA each side runs (this
    script and bench_served_peer.py)."""
    parser.add_argument("--work", type=Path, default=Path("/tmp/llama.cpp-peer"),
                        help=f"{work_holds}; also llama.cpp's build unless --llama")
    parser.add_argument("--isa", default="auto", choices=sorted(LLAMA_ISA),
                        help="our kernels' instruction set (handler.kernel_isa); default: the best this CPU has")
    parser.add_argument("--llama", type=Path,
                        help="llama.cpp build directory (default: --work for --isa auto, else --work-<LLAMA_ISA>); "
                             "built there for the matching LLAMA_ISA if missing. On VMs that report AMX but "
                             "fault on it, use a LLAMA_ISA=avx512 build")


def llama_dir(args: argparse.Namespace) -> Path:
    """The llama.cpp build the comparison runs: --llama, else one per ISA beside --work."""
    return args.llama or (args.work if args.isa == "auto" else Path(f"{args.work}-{LLAMA_ISA[args.isa]}"))


def prepare_peer(work: Path, models: list[Path], peer: Path = PEER, llama: Path | None = None,
                 isa: str = "auto") -> dict[Path, Path]:
    """llama.cpp built for `isa` in `llama` (default: work; kept if llama/bin/llama-bench exists:
    a host without network can build it beforehand), and each model's GGUFs in work/gguf (prefix
    per model folder)."""
    llama = llama or work
    run(["bash", str(peer / "build_llama_cpp.sh"), str(llama)], env={**os.environ, "LLAMA_ISA": LLAMA_ISA[isa]})
    prefixes = {}
    for model in models:
        prefix = work / "gguf" / model.name
        if not all(Path(f"{prefix}-{t}.gguf").is_file() for t in ("F32", "Q8_0", "Q4_0")):
            prefix.parent.mkdir(parents=True, exist_ok=True)
            print(f"converting {model} to GGUF F32/Q8_0/Q4_0 ...", flush=True)
            run(["bash", str(peer / "to_gguf.sh"), str(model), str(prefix), sys.executable, str(llama)])
        prefixes[model] = prefix
    return prefixes


def llama_bench(llama: Path, gguf: Path, threads: int, prompts: list[int]) -> dict[str, float]:
    """llama.cpp's tokens/s: decode ("tg", tg64) and prefill of each prompt length ("pp128", ...),
    one repetition after its warm-up."""
    out = run([str(llama / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads),
               "-p", ",".join(map(str, prompts)) or "0", "-n", "64", "-r", "1", "-o", "json"])
    return {("tg" if entry["n_gen"] else f"pp{entry['n_prompt']}"): float(entry["avg_ts"])
            for entry in json.loads(out) if entry["n_gen"] or entry["n_prompt"]}


def llama_perplexity(work: Path, gguf: Path, text: Path, threads: int) -> tuple[float, float]:
    """llama.cpp's perplexity and its +- (windows of 128 tokens, second halves scored)."""
    out = subprocess.run([str(work / "bin" / "llama-perplexity"), "-m", str(gguf), "-f", str(text), "-c", "128",
                          "-b", "128", "-t", str(threads)], check=True, capture_output=True, text=True)
    match = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", out.stdout + out.stderr)
    if match is None:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{(out.stdout + out.stderr)[-2000:]}")
    return float(match.group(1)), float(match.group(2))


def accuracy_table(work: Path, model: Path, prefix: Path, threads: int) -> str:
    """Perplexity of each of our modes (scripts/evaluate.py) beside llama.cpp's on the same text."""
    rows = evaluate_all([ROOT / config for config, _ in MODES], model, backend="native", text=TEXT)
    lines = [f"### perplexity on {TEXT.relative_to(ROOT)} ({rows[0]['scored_tokens']} scored tokens), "
             f"{model.name}", "",
             "| ours | perplexity [95 %] | vs fp32 [95 %, paired] | llama.cpp | perplexity +- | vs F32 |",
             "|---|---|---|---|---|---|"]
    peers = {fmt: llama_perplexity(work, Path(f"{prefix}-{fmt}.gguf"), TEXT, threads)
             for fmt in ("F32", "Q8_0", "Q4_0")}
    for (config, fmt), r in zip(MODES, rows):
        ppl, err = peers[fmt]
        change, low, high = perplexity_change(r, rows[0])
        lines.append(f"| {Path(config).stem} | {r['perplexity']:.2f} [{r['perplexity_low']:.2f}, "
                     f"{r['perplexity_high']:.2f}] | {change:+.1f} % [{low:+.1f}, {high:+.1f}] | "
                     f"{fmt} | {ppl:.2f} +- {err:.2f} | {100 * (ppl / peers['F32'][0] - 1):+.1f} % |")
    return "\n".join(lines)


def ours(config_path: Path, model_dir: Path, threads: int, isa: str, llama: Path, gguf: Path, rounds: int,
         prompts: list[int]) -> dict:
    """One mode in this process: load as the server does, then `rounds` times llama-bench on
    `gguf` followed by our batch-1 decode and prefills (paired: each pair sees the same machine,
    on a host whose speed drifts by tens of percent within minutes), then batches 8 and 16 and
    the overhead."""
    raw = yaml.safe_load(config_path.read_text())
    raw.setdefault("quantization", {})["backend"] = "native"
    raw["handler"]["num_threads"] = threads
    raw["handler"]["kernel_isa"] = isa
    config = parse_serving_config(raw)
    torch.set_num_threads(threads)
    started = time.perf_counter()
    served, info = serve_like_the_worker(config, model_dir, slots=max(BATCHES))
    row = {"load_s": round(time.perf_counter() - started, 1),
           "peak_rss_load_mib": round(peak_rss_mib()),
           "rss_mib": round(psutil.Process().memory_info().rss / 2**20),
           "step_bytes": bytes_read_per_step(served), "report": served.report, "kernels": kernel_status()}
    row["pairs"] = []  # ({"tg": ours, "pp128": ...}, {the same for llama.cpp}) per round
    for _ in range(rounds):
        peer = llama_bench(llama, gguf, threads, prompts)
        mine = {"tg": speed(served, info.pad_id, 1)["decode_tok_s_b1"]}
        for n in prompts:
            mine[f"pp{n}"] = speed(served, info.pad_id, 1, prompt_len=n, steps=1)["prefill_tok_s_b1"]
        row["pairs"].append((mine, peer))
    for key in ["tg"] + [f"pp{n}" for n in prompts]:
        ratios = [o[key] / p[key] for o, p in row["pairs"]]
        row[key] = {"ours": statistics.median(o[key] for o, _ in row["pairs"]),
                    "peer": statistics.median(p[key] for _, p in row["pairs"]),
                    "ratio": statistics.median(ratios), "low": min(ratios), "high": max(ratios)}
    for batch in BATCHES[1:]:
        row.update(speed(served, info.pad_id, batch))
    if served.runner is not None:
        row.update(framework_overhead_ms(served.runner))
    row["serving_rss_mib"] = round(psutil.Process().memory_info().rss / 2**20)
    return row


def ours_isolated(config: Path, model_dir: Path, threads: int, isa: str, llama: Path, gguf: Path, rounds: int,
                  prompts: list[int]) -> dict:
    """ours() in a fresh process, with an empty calibration cache: SmoothQuant's row is a first
    load, its calibration included (the worst case for its peak memory)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out, tempfile.TemporaryDirectory() as cache:
        subprocess.run([sys.executable, __file__, "--single", str(config), "--model-dir", str(model_dir),
                        "--threads", str(threads), "--isa", isa, "--llama", str(llama), "--gguf", str(gguf),
                        "--rounds", str(rounds), "--prompts", ",".join(map(str, prompts)), "--out", out.name],
                       check=True, env={**os.environ, **TORCH_ISA_ENV.get(isa, {}), CACHE_DIR_ENV: cache})
        return json.loads(Path(out.name).read_text())


def overhead(r: dict) -> str:
    """Step time and its part that is not matrix products (our runner only)."""
    return f"{r['step_ms']:.1f} ({r['overhead_ms']:.2f})" if "step_ms" in r else "hf path"


def peak_at_load(r: dict) -> str:
    """Peak RSS at load, marked where the fp32 model was held (a first SmoothQuant calibration)."""
    held = r["report"].get("quantized_while_loading") is False
    return f"{r['peak_rss_load_mib']}{' (fp32 held: calibrating)' if held else ''}"


def ratio(r: dict, key: str) -> str:
    """Ours vs llama.cpp for one measurement: both medians, the median ratio and its range."""
    m = r[key]
    return f"{m['ours']:.1f} vs {m['peer']:.1f} (**{m['ratio']:.2f}x**, {m['low']:.2f}-{m['high']:.2f})"


def table(model: Path, rows: list[tuple[str, str, dict, float]], bandwidth: float, prompts: list[int]) -> str:
    pp = [f"pp{n}" for n in prompts]
    lines = [f"### {model.name}",
             "",
             "| ours | llama.cpp | decode b1 tok/s: ours vs llama.cpp (ratio, range) | "
             + "".join(f"prefill {key} tok/s | " for key in pp)
             + "ours GB/s b1 (share of machine) | llama.cpp GB/s | "
             + "".join(f"tok/s b{b} (x b1) | " for b in BATCHES[1:])
             + "step ms b1 (overhead) | peak RSS load MiB | RSS serving MiB |",
             "|" + "---|" * (8 + len(pp) + len(BATCHES[1:]))]
    for config, fmt, r, peer_bytes in rows:
        b1 = r["tg"]["ours"]
        gb = r["step_bytes"] * b1 / 1e9
        lines.append(f"| {Path(config).stem} | {fmt} | {ratio(r, 'tg')} | "
                     + "".join(f"{ratio(r, key)} | " for key in pp)
                     + f"{gb:.1f} ({100 * gb / bandwidth:.0f} %) | {peer_bytes * r['tg']['peer'] / 1e9:.1f} | "
                     + "".join(f"{r[f'decode_tok_s_b{b}']:.1f} ({r[f'decode_tok_s_b{b}'] / b1:.1f}x) | "
                               for b in BATCHES[1:])
                     + f"{overhead(r)} | {peak_at_load(r)} | {r['serving_rss_mib']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", type=Path,
                        help="HF model folders (default: the default model and a 1B shape made in --work)")
    parser.add_argument("--threads", type=int, default=psutil.cpu_count(logical=False) or 1)
    add_peer_arguments(parser, "GGUFs and the 1B shape")
    parser.add_argument("--prompts", default="128,512", help="prompt lengths of the prefill comparison")
    parser.add_argument("--mode", action="append", choices=[Path(config).stem for config, _ in MODES],
                        help="only these modes (repeatable; default: all)")
    parser.add_argument("--peer", type=Path, default=PEER, help="the peer scripts (default: %(default)s)")
    parser.add_argument("--markdown", type=Path, help="also write the tables here")
    parser.add_argument("--accuracy", action="store_true",
                        help="also perplexity of ours vs llama.cpp on eval/python-reference.txt (first model)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="paired rounds (llama-bench, then ours) per mode; the ratio is their median")
    parser.add_argument("--single", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--gguf", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    prompts = [int(n) for n in args.prompts.split(",") if n]
    llama = llama_dir(args)
    if args.single:
        args.out.write_text(json.dumps(ours(args.single, args.model_dir, args.threads, args.isa, llama, args.gguf,
                                            args.rounds, prompts)))
        return
    models = args.models
    if not models:
        shape = args.work / SHAPE_1B
        if not (shape / "config.json").is_file():
            print(f"making the 1B Llama shape (random weights) in {shape} ...", flush=True)
            run([sys.executable, str(args.peer / "make_shape_model.py"), "--out", str(shape),
                 "--tokenizer-from", str(ROOT / "models" / "SmolLM2-135M-Instruct")])
        models = [ROOT / "models" / "SmolLM2-135M-Instruct", shape]
    prefixes = prepare_peer(args.work, models, args.peer, llama, args.isa)
    bandwidth = memory_bandwidth_gb_s(args.threads)
    sides = f"ours: --isa {args.isa}; llama.cpp: {llama} built for {llama_isa(llama)}"
    print(f"machine read bandwidth: {bandwidth:.1f} GB/s ({args.threads} threads); "
          f"CPU: {psutil.cpu_count()} logical, torch ISA {torch.backends.cpu.get_cpu_capability()}; {sides}", flush=True)
    tables = []
    for model in models:
        rows = []
        for config, fmt in [(c, f) for c, f in MODES if not args.mode or Path(c).stem in args.mode]:
            gguf = Path(f"{prefixes[model]}-{fmt}.gguf")
            r = ours_isolated(ROOT / config, model, args.threads, args.isa, llama, gguf, args.rounds, prompts)
            rows.append((config, fmt, r, gguf.stat().st_size))
            pairs = "; ".join(", ".join(f"{key} {o[key]:.1f}/{p[key]:.1f}" for key in o) for o, p in r["pairs"])
            print(f"{model.name} {Path(config).stem} vs llama.cpp {fmt}: decode {r['tg']['ratio']:.2f}x "
                  + "".join(f", pp{n} {r[f'pp{n}']['ratio']:.2f}x" for n in prompts)
                  + f" (rounds, ours/llama.cpp tok/s: {pairs}); step {overhead(r)} ms; runner "
                  f"{r['report'].get('runner')}; kernels {r['kernels']}", flush=True)
        tables.append(table(model, rows, bandwidth, prompts))
    if args.accuracy:
        tables.append(accuracy_table(args.work, models[0], prefixes[models[0]], args.threads))
    text = (f"{cpu_name()}; {sides}; our kernels: {rows[0][2]['kernels']}. "
            f"Machine read bandwidth measured in this run: {bandwidth:.1f} GB/s, {args.threads} threads. "
            "Batch-1 decode of 64 tokens; ours after a 32-token prompt, llama.cpp's tg64. Prefill of one prompt "
            f"of {' and '.join(map(str, prompts))} tokens, llama.cpp's pp{' and pp'.join(map(str, prompts))}. Each mode: "
            f"{args.rounds} paired rounds (llama-bench, then ours in the same minute); tok/s are medians, the "
            "ratio is the median of the rounds' ratios (range in brackets).\n\n" + "\n\n".join(tables))
    print()
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
