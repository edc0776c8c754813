"""Calibrate SmoothQuant offline and save the result to ship in the archive.

The file is the backend's own: IPEX's qconfig summary (alpha in a `.alpha` file beside it)
or the native backend's JSON of activation maxima and alpha. `--backend` overrides the
config's `quantization.backend` (auto = native where our kernels are built). The native
backend calibrates one fp32 layer at a time, as a first load does, where the checkpoint allows.

Without a saved summary the first worker calibrates at start-up (and caches the result in
$LLM_CPU_CACHE_DIR, default ~/.cache/torchserve-llm-cpu). Calibrating ahead of time makes
every start fast and every host use the very same quantization:

    python scripts/calibrate.py --config configs/smoothquant.yaml --out calibration/smollm2-sq.json
    # then in the config:  smoothquant: {qconfig_summary_file: calibration/smollm2-sq.json}
    # and rebuild the archive (build_archive.py ships the calibration/ folder).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handlers"))
from cpu_llm.config.serving import parse_serving_config  # noqa: E402
from cpu_llm.core.errors import ConfigError  # noqa: E402
from cpu_llm.load import native_smoothquant  # noqa: E402
from cpu_llm.load.calibration import alpha_candidates  # noqa: E402
from cpu_llm.load.hf import load_model, load_tokenizer_info  # noqa: E402
from cpu_llm.load.native_backend import calibrate_streaming, quantize_w8a8  # noqa: E402
from cpu_llm.load.pipeline import keep_full_precision, resolve_backend, smoothquant_batches  # noqa: E402


def calibrate(config_path: Path, model_dir: Path, out: Path, backend: str | None = None) -> float:
    raw = yaml.safe_load(config_path.read_text())
    if backend:
        raw.setdefault("quantization", {})["backend"] = backend
    q = parse_serving_config(raw).quantization
    if q.method != "smoothquant":
        raise ConfigError("quantization.method", f"is {q.method}; calibration is for smoothquant")
    sq = q.smoothquant
    batches = smoothquant_batches(load_tokenizer_info(str(model_dir)).tokenizer, q, ROOT / sq.calibration_data)
    alphas = alpha_candidates(sq.alpha, sq.alpha_min, sq.alpha_max, sq.alpha_step)
    native = resolve_backend(q) == "native"
    alpha = calibrate_streaming(str(model_dir), q, batches, out) if native else None  # no fp32 model held
    if alpha is not None:
        return alpha
    model, _ = load_model(str(model_dir))
    keep_full_precision(model, q.keep_full_precision)
    if native:
        return native_smoothquant.calibrate(model, batches, alphas, quantize_w8a8, out)[1]
    from cpu_llm.load import ipex_backend

    return ipex_backend.calibrate_smoothquant(model, alphas, batches, out)


def main() -> None:
    parser = argparse.ArgumentParser(description="Calibrate SmoothQuant and save the qconfig summary.")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "smoothquant.yaml")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--out", type=Path, required=True, help="calibration JSON to write")
    parser.add_argument("--backend", choices=["auto", "ipex", "native"], help="override quantization.backend")
    args = parser.parse_args()
    torch.set_num_threads(len(__import__("os").sched_getaffinity(0)))
    started = time.perf_counter()
    try:
        alpha = calibrate(args.config, args.model_dir, args.out, args.backend)
    except ConfigError as error:
        sys.exit(f"calibrate: {error}")
    print(f"wrote {args.out} (alpha {alpha}) in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
