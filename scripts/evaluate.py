"""Accuracy, memory and speed of each quantization mode, measured on the served path.

For every model-config given, load the model, quantize it exactly as the handler does, then
report: perplexity on held-out English text (by default eval/python-reference.txt, 21k tokens
of the Python Language Reference; --text eval/heldout.txt is the short one the tests use; never
the calibration text), with its 95 % interval,
greedy-token agreement with fp32 (mean share of the first N greedy tokens identical to the
fp32 model's, up to the first difference), process RSS and the size of the served weights.
With --speed, also prefill and decode tokens/s at batch 1 and 8 (greedy, the server's own
prefill/decode functions, as many threads as the config's num_threads gives the server).

    python scripts/evaluate.py configs/fp32.yaml configs/woq-int8.yaml configs/woq-int4.yaml configs/smoothquant.yaml
    python scripts/evaluate.py --speed --backend native configs/...   # make bench
    python scripts/evaluate.py --text eval/heldout.txt configs/...     # the short text (tests)

Each config runs in its own process, so the RSS column is that mode's alone, and --backend
overrides every config's quantization.backend (fp32 included: native = plain transformers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
from cpu_llm import kernels  # noqa: E402
from cpu_llm.api.prompt import encode_prompt  # noqa: E402
from cpu_llm.api.request import parse_request  # noqa: E402
from cpu_llm.config.serving import parse_serving_config, resolve_threads  # noqa: E402
from cpu_llm.decode.sequence import Sequence  # noqa: E402
from cpu_llm.engine.hf_steps import decode_one_token, left_pad, prefill  # noqa: E402
from cpu_llm.engine.select import engine_for  # noqa: E402
from cpu_llm.load.pipeline import load_for_serving  # noqa: E402
from cpu_llm.load.served import ServedModel  # noqa: E402
from cpu_llm.runner.model_runner import attach_runner  # noqa: E402

TEXT = ROOT / "eval" / "python-reference.txt"
PROMPTS = [
    "What is the capital of France?", "Give me three tips for staying healthy.",
    "Explain what a CPU cache is.", "Write a short poem about the sea.",
    "How do I boil an egg?", "What is the difference between a list and a tuple in Python?",
    "Name three planets of the solar system.", "Why is the sky blue?",
]


def perplexity(served: ServedModel, tokenizer, text: str, window: int = 128) -> dict[str, float]:
    """exp(mean next-token NLL), scored as llama.cpp's llama-perplexity does: consecutive windows
    of `window` tokens, each scoring its second half (every scored token sees at least window/2
    tokens of context). The 95 % interval comes from the spread of the windows' mean NLL."""
    ids = tokenizer(text).input_ids
    half = window // 2
    means = []
    with torch.inference_mode():
        for start in range(0, len(ids) - window + 1, window):
            chunk = torch.tensor([ids[start:start + window]])
            if served.runner is not None:  # our runner: every position's logits, in slot 0
                every = list(range(window))
                logits = served.runner.run(chunk[0].tolist(), every, [0] * window, every)[None]
            else:
                logits = served.model(input_ids=chunk, attention_mask=torch.ones_like(chunk),
                                      position_ids=torch.arange(window)[None],
                                      past_key_values=served.new_cache(1), use_cache=True)[0].float()
            nll = torch.nn.functional.cross_entropy(logits[0, half - 1:-1], chunk[0, half:])
            means.append(float(nll))
    low, mean, high = _interval(means)
    return {"perplexity": math.exp(mean), "perplexity_low": math.exp(low), "perplexity_high": math.exp(high),
            "scored_tokens": len(means) * (window - half), "window_nll": means}


def _interval(values: list[float]) -> tuple[float, float, float]:
    """Mean of `values` with its 95 % interval (normal approximation over the windows)."""
    t = torch.tensor(values, dtype=torch.float64)
    error = 1.96 * float(t.std()) / len(values) ** 0.5 if len(values) > 1 else 0.0
    return float(t.mean()) - error, float(t.mean()), float(t.mean()) + error


def perplexity_change(row: dict, base: dict) -> tuple[float, float, float]:
    """Perplexity of `row` relative to `base` in %, with a 95 % interval paired by window: both
    score the same windows, so the window-to-window spread of the text cancels out."""
    low, mean, high = _interval([a - b for a, b in zip(row["window_nll"], base["window_nll"])])
    return tuple(100 * (math.exp(v) - 1) for v in (mean, low, high))


def greedy_tokens(served: ServedModel, info, config, max_new_tokens: int) -> list[tuple[int, ...]]:
    requests = [parse_request({"messages": [{"role": "user", "content": p}], "max_new_tokens": max_new_tokens},
                              config) for p in PROMPTS]
    prompts = [encode_prompt(info.tokenizer, r, config.max_prompt_tokens) for r in requests]
    return [r.token_ids for r in engine_for(served, info).generate([Sequence.start(r, p) for r, p in zip(requests, prompts)])]


def agreement(tokens: list[tuple[int, ...]], reference: list[tuple[int, ...]], n: int) -> float:
    """Mean share of the first n reference tokens reproduced before the first difference."""
    shares = []
    for mine, ref in zip(tokens, reference):
        same = 0
        for a, b in zip(mine, ref):
            if a != b:
                break
            same += 1
        shares.append(same / max(1, min(n, len(ref))))
    return sum(min(s, 1.0) for s in shares) / len(shares)


def weights_mib(served: ServedModel) -> float:
    """Bytes of the weights actually served: the traced module for IPEX static quantization,
    else the model's parameters and buffers (shared storages counted once)."""
    scripted = getattr(getattr(served.model, "trace_graph", None), "optimized_model", None)
    if served.report["method"] == "smoothquant" and scripted is not None:
        with tempfile.NamedTemporaryFile(suffix=".pt") as tmp:
            scripted.save(tmp.name)
            return os.path.getsize(tmp.name) / 2**20
    # IPEX's WoQ modules keep their packed int8/int4 weight as a plain attribute, outside the
    # state_dict; count those too.
    tensors = list(served.model.state_dict().values())
    tensors += [m.weight for m in served.model.modules() if isinstance(getattr(m, "weight", None), torch.Tensor)]
    seen, total = set(), 0
    for tensor in tensors:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total / 2**20


def bytes_read_per_step(served: ServedModel) -> int | None:
    """Bytes of weights a decode step reads: every tensor of every module except embedding tables
    (one row is read), counting a table once if a linear layer uses it (tied lm_head). None for
    IPEX's traced SmoothQuant graph, whose weights are not module tensors."""
    if served.report["method"] == "smoothquant" and served.backend == "ipex":
        return None
    seen, total = set(), 0
    for module in served.model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            tensors.append(module.weight)  # IPEX WoQ keeps its packed weight as a plain attribute
        for tensor in tensors:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def peak_rss_mib() -> float:
    """This process's peak RSS. Not getrusage's ru_maxrss: Linux carries that across exec, so a
    child would report its parent's peak if that was higher."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmHWM")) / 1024


def memory_bandwidth_gb_s(threads: int, size_mb: int = 512) -> float:
    """The machine's memory read bandwidth: best of 5 sums over a buffer far larger than the caches."""
    torch.set_num_threads(threads)
    x = torch.ones(size_mb * 2**20 // 4)
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - started)
    return x.numel() * 4 / best / 1e9


def speed(served: ServedModel, pad_id: int, batch: int, prompt_len: int = 32, steps: int = 64) -> dict[str, float]:
    """Prefill and decode tokens/s for `batch` rows of `prompt_len` tokens, `steps` greedy steps."""
    generator = torch.Generator().manual_seed(batch)
    prompts = torch.randint(100, 20000, (batch, prompt_len), generator=generator).tolist()
    if served.runner is not None:
        return _runner_speed(served.runner, prompts, steps)
    result = {}
    with torch.inference_mode():
        for measured in (False, True):  # the first pass warms caches and the allocator
            input_ids, mask = left_pad(prompts, pad_id)
            started = time.perf_counter()
            logits, cache = prefill(served.model, input_ids, mask, served.new_cache(batch))
            prefill_s = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(steps if measured else 4):
                mask = torch.cat([mask, torch.ones((batch, 1), dtype=torch.long)], dim=1)
                logits, cache = decode_one_token(served.model, logits.argmax(-1), mask, cache)
            decode_s = time.perf_counter() - started
        result = {f"prefill_tok_s_b{batch}": batch * prompt_len / prefill_s,
                  f"decode_tok_s_b{batch}": batch * steps / decode_s}
    return result


def _runner_speed(runner, prompts: list[list[int]], steps: int) -> dict[str, float]:
    """speed() on our runner: the prompts prefilled in one flat batch, each in its own slot."""
    batch, length = len(prompts), len(prompts[0])
    rows = list(range(batch))
    for measured in (False, True):
        started = time.perf_counter()
        logits = runner.run([t for p in prompts for t in p], [i for _ in prompts for i in range(length)],
                            [row for row in rows for _ in range(length)], [(row + 1) * length - 1 for row in rows])
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        for step in range(steps if measured else 4):
            logits = runner.run(logits.max(-1).indices.tolist(), [length + step] * batch, rows, rows)  # as the engine
        decode_s = time.perf_counter() - started
    return {f"prefill_tok_s_b{batch}": batch * length / prefill_s, f"decode_tok_s_b{batch}": batch * steps / decode_s}


MATMUL_MODULES = ("Linear", "QuantizedLinear", "FullPrecisionLinear", "FullPrecisionGroup", "QuantizedEmbedding")


def framework_overhead_ms(runner, prompt_len: int = 32, steps: int = 32) -> dict[str, float]:
    """Batch-1 decode step time, and how much of it is not matrix products: the step minus the
    time the same linear layers (and LM head) take on the same inputs called back to back (from
    C++ where the decoder stack runs the layers, else from Python, call overhead included)."""
    model, inputs = runner.model, []
    stack = model.stack
    targets = ([m for layer in model.layers for m in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)]
               + [model.lm_head] if stack is not None  # what run_linears takes, in call order
               else [m for m in model.modules() if type(m).__name__ in MATMUL_MODULES])
    hooks = [m.register_forward_hook(lambda m, args, out: inputs.append((m, args[0]))) for m in targets]
    runner.run(list(range(100, 100 + prompt_len)), list(range(prompt_len)), [0] * prompt_len, [prompt_len - 1])
    inputs.clear()
    with model.python_loop():  # the C++ decoder stack calls no module: no hook would fire
        runner.run([7], [prompt_len], [0], [0])  # one step's linear inputs, captured
    for hook in hooks:
        hook.remove()
    best_step = best_matmul = float("inf")
    with torch.inference_mode():
        for _ in range(steps):
            started = time.perf_counter()
            runner.run([7], [prompt_len], [0], [0])
            best_step = min(best_step, time.perf_counter() - started)
            started = time.perf_counter()
            if stack is not None:
                stack.run_linears([x for _, x in inputs[:-1]])
                inputs[-1][0](inputs[-1][1])  # the LM head
            else:
                for module, x in inputs:
                    module(x)
            best_matmul = min(best_matmul, time.perf_counter() - started)
    return {"step_ms": best_step * 1000, "matmul_ms": best_matmul * 1000,
            "overhead_ms": (best_step - best_matmul) * 1000}


def serve_like_the_worker(config, model_dir: Path, slots: int = 8):
    """load_for_serving, then our runner where the server would use it (slots for batch 8), on
    the kernels' ISA the config names (handler.kernel_isa; CPU_LLM_ISA overrides it)."""
    kernels.use_isa(config.kernel_isa)
    served, info = load_for_serving(str(model_dir), config.quantization, str(ROOT))
    attach_runner(served, config.runner, max(slots, config.batch_size),
                  config.max_prompt_tokens + config.max_new_tokens, config.prefill_chunk_tokens)
    return served, info


def evaluate(config_path: Path, model_dir: Path, reference: list[tuple[int, ...]] | None,
             backend: str | None = None, with_speed: bool = False, max_new_tokens: int = 24,
             text: Path = TEXT) -> dict:
    raw = yaml.safe_load(config_path.read_text())
    if backend:
        raw.setdefault("quantization", {})["backend"] = backend
    config = parse_serving_config(raw)
    torch.set_num_threads(resolve_threads(config))
    started = time.perf_counter()
    served, info = serve_like_the_worker(config, model_dir)
    load_s = time.perf_counter() - started
    tokens = greedy_tokens(served, info, config, max_new_tokens)
    row = {
        "config": config_path.name, "method": config.quantization.method, "backend": served.backend,
        **perplexity(served, info.tokenizer, text.read_text()),
        "greedy_agreement": round(agreement(tokens, reference or tokens, max_new_tokens), 3),
        "rss_mib": round(psutil.Process().memory_info().rss / 2**20),
        "weights_mib": round(weights_mib(served)),
        "load_s": round(load_s, 1),
        "quantized_modules": served.report["quantized_modules"],
        "tokens": tokens,
    }
    if with_speed:
        step_bytes = bytes_read_per_step(served)
        for batch in (1, 8):
            row.update({k: round(v, 1) for k, v in speed(served, info.pad_id, batch).items()})
            # A decode step reads the weights once for the whole batch.
            steps_per_s = row[f"decode_tok_s_b{batch}"] / batch
            row[f"gb_s_b{batch}"] = round(step_bytes * steps_per_s / 1e9, 2) if step_bytes else None
        row["peak_rss_mib"] = round(peak_rss_mib())
    return row


def run_isolated(config: Path, model_dir: Path, reference: Path | None, options: list[str]) -> dict:
    """Evaluate one config in a fresh process, so its RSS is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, "--single", str(config), "--model-dir", str(model_dir), "--out", out.name]
        if reference is not None:
            cmd += ["--reference", str(reference)]
        subprocess.run(cmd + options, check=True)
        return json.loads(Path(out.name).read_text())


def evaluate_all(configs: list[Path], model_dir: Path, backend: str | None = None,
                 with_speed: bool = False, text: Path = TEXT) -> list[dict]:
    """The first config is the reference for greedy agreement (and speed ratios)."""
    options = (["--backend", backend] if backend else []) + (["--speed"] if with_speed else []) + ["--text", str(text)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        reference = Path(tmp) / "reference.json"
        for config in configs:
            row = run_isolated(config, model_dir, reference if rows else None, options)
            if not rows:
                reference.write_text(json.dumps(row["tokens"]))
            rows.append(row)
            speeds = (f", decode tok/s b1 {row['decode_tok_s_b1']} b8 {row['decode_tok_s_b8']}"
                      if with_speed else "")
            print(f"{config.name} ({row['backend']}): perplexity {row['perplexity']:.3f} "
                  f"[{row['perplexity_low']:.3f}, {row['perplexity_high']:.3f}], "
                  f"greedy agreement {row['greedy_agreement']}{speeds}", flush=True)
    return rows


def markdown_table(rows: list[dict], bandwidth: float | None = None) -> str:
    """The rows side by side; with speed, also the weight bandwidth each mode achieves in decode,
    as a share of the machine's `bandwidth` (GB/s) measured in the same run."""
    base = rows[0]
    with_speed = "decode_tok_s_b1" in base
    header = ("| config | backend | perplexity [95 % interval] | vs first [95 % interval] | greedy agreement |"
              " RSS MiB | weights MiB | load s |")
    if with_speed:
        header += (" decode tok/s b1 | decode tok/s b8 | prefill tok/s b1 | prefill tok/s b8 | peak RSS MiB |"
                   " weights GB/s b1 | weights GB/s b8 |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        change, low, high = perplexity_change(r, base)
        line = (f"| {r['config']} | {r['backend']} | {r['perplexity']:.2f} [{r['perplexity_low']:.2f}, "
                f"{r['perplexity_high']:.2f}] | {change:+.1f} % [{low:+.1f}, {high:+.1f}] | "
                f"{r['greedy_agreement']:.2f} | {r['rss_mib']} | {r['weights_mib']} | {r['load_s']} |")
        if with_speed:
            line += "".join(f" {r[k]:.1f} ({r[k] / base[k]:.2f}x) |" for k in
                            ("decode_tok_s_b1", "decode_tok_s_b8", "prefill_tok_s_b1", "prefill_tok_s_b8"))
            line += f" {r['peak_rss_mib']} |"
            for key in ("gb_s_b1", "gb_s_b8"):
                line += (" n/a |" if r[key] is None else
                         f" {r[key]:.1f} ({100 * r[key] / bandwidth:.0f} %) |" if bandwidth else f" {r[key]:.1f} |")
        lines.append(line)
    table = "\n".join(lines) + (f"\n\nPerplexity over {base['scored_tokens']} scored tokens (windows of 128, "
                                 "second halves scored, as llama-perplexity -c 128).")
    if with_speed and bandwidth:
        table = (f"Machine memory read bandwidth, measured in this run: {bandwidth:.1f} GB/s "
                 f"({torch.get_num_threads()} threads). Weights GB/s = bytes of weights a decode step "
                 f"reads x decode steps/s.\n\n") + table
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description="Accuracy/memory of quantization modes (first config = reference).")
    parser.add_argument("configs", nargs="*", type=Path)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--backend", choices=["auto", "ipex", "native"], help="override quantization.backend")
    parser.add_argument("--speed", action="store_true", help="also measure prefill/decode tokens/s at batch 1 and 8")
    parser.add_argument("--text", type=Path, default=TEXT, help="held-out text for perplexity")
    parser.add_argument("--single", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.single:
        reference = json.loads(args.reference.read_text()) if args.reference else None
        args.out.write_text(json.dumps(evaluate(args.single, args.model_dir, reference, args.backend, args.speed,
                                                text=args.text)))
        return
    rows = evaluate_all(args.configs, args.model_dir, args.backend, args.speed, args.text)
    bandwidth = None
    if args.speed:  # with the threads the first config gives the server, while nothing else runs
        bandwidth = memory_bandwidth_gb_s(resolve_threads(parse_serving_config(yaml.safe_load(args.configs[0].read_text()))))
    table = markdown_table(rows, bandwidth)
    print()
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps([{k: v for k, v in r.items() if k not in ("tokens", "window_nll")}
                                         for r in rows], indent=1))


if __name__ == "__main__":
    main()
