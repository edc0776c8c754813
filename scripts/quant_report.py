"""Per-layer quantization error and model size for a model-config, before serving it.

    python scripts/quant_report.py --config configs/woq-int4.yaml [--json report.json]

For every linear layer the config quantizes, the weight is quantized as the native backend
does it (for SmoothQuant: after folding the smoothing factors in) and compared with the
original: max and mean absolute error, relative error ||W - Q(W)|| / ||W|| and SNR in dB.
`out rel err` is the layer's output error on real activations (the first calibration
sample), which for SmoothQuant includes the int8 activations. IPEX's WoQ uses the same
per-channel/per-group scales, so the weight columns describe it too.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "handlers"))
from cpu_llm.config.quantization import QuantizationConfig  # noqa: E402
from cpu_llm.config.serving import parse_serving_config  # noqa: E402
from cpu_llm.core.errors import ConfigError  # noqa: E402
from cpu_llm.formats.quantlib import error_metrics, kernel_weights, quantize  # noqa: E402
from cpu_llm.layers.quantized_linear import as_linear, replace_linears  # noqa: E402
from cpu_llm.load import native_smoothquant  # noqa: E402
from cpu_llm.load.calibration import alpha_candidates, calibration_batches, read_texts  # noqa: E402
from cpu_llm.load.hf import load_model  # noqa: E402
from cpu_llm.load.native_backend import (W8A8_WEIGHTS, check_supported, linear_converter,  # noqa: E402
                                        quantize_embeddings, quantize_w8a8, woq_spec)
from cpu_llm.load.pipeline import keep_full_precision  # noqa: E402

COLUMNS = ("layer", "shape", "max_abs_error", "mean_abs_error", "relative_error", "snr_db", "out_rel_error")


def _tensor_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _layer_inputs(model: torch.nn.Module, names: list[str], batch) -> dict[str, torch.Tensor]:
    inputs, hooks = {}, []
    for name in names:
        def keep(module, args, name=name):
            inputs[name] = args[0].detach().reshape(-1, args[0].shape[-1]).clone()
        hooks.append(model.get_submodule(name).register_forward_pre_hook(keep))
    with torch.inference_mode():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
              position_ids=batch.position_ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return inputs


def report(model: torch.nn.Module, tokenizer, q: QuantizationConfig) -> dict:
    """Rows of per-layer errors plus the fp32 and quantized model sizes (native backend)."""
    if q.method == "none":
        raise ConfigError("quantization.method", "is none: nothing to report")
    check_supported(q)
    sq = q.smoothquant
    texts = read_texts(ROOT / sq.calibration_data, "quantization.smoothquant.calibration_data")
    batches = calibration_batches(tokenizer, texts, sq.num_samples, sq.seq_len)
    size_before = _tensor_bytes(model)
    keep_full_precision(model, q.keep_full_precision)
    alpha = None
    if q.method == "smoothquant":
        alphas = alpha_candidates(sq.alpha, sq.alpha_min, sq.alpha_max, sq.alpha_step)
        with tempfile.TemporaryDirectory() as tmp:
            act_max, alpha = native_smoothquant.calibrate(model, batches, alphas, quantize_w8a8, Path(tmp) / "sq.json")
        native_smoothquant.apply_smoothing(model, act_max, alpha)
    spec, kind = (W8A8_WEIGHTS, "w8a8") if q.method == "smoothquant" else (woq_spec(q.woq), "woq")
    head = model.get_output_embeddings()
    convert = linear_converter(q, next((n for n, m in model.named_modules() if m is head), None))
    targets = [(name, linear) for name, module in model.named_modules() if (linear := as_linear(module)) is not None]
    inputs = _layer_inputs(model, [name for name, _ in targets], batches[0])
    rows, layers = [], {}
    with torch.inference_mode():
        for name, linear in targets:  # each layer as the server quantizes it (the LM head: int8 per row)
            layer = layers[name] = convert(name, lambda s, w=linear.weight: kernel_weights(quantize(w, s)), linear.bias)
            exact = F.linear(inputs[name], linear.weight, linear.bias)
            out_error = float((layer(inputs[name]) - exact).norm() / exact.norm().clamp(min=1e-12))
            rows.append({"layer": name, "shape": list(linear.weight.shape),
                         **error_metrics(linear.weight, layer.packed.dequantize()), "out_rel_error": out_error})
    quantize_embeddings(model, q)  # the embedding int8 per row; a tied head then reads its rows
    replace_linears(model, lambda name, linear: layers[name])
    size_after = _tensor_bytes(model)
    return {"method": q.method, "spec": f"{kind} {spec.bits}-bit {spec.scheme} per {spec.granularity}"
            + (f" of {spec.group_size}" if spec.group_size else ""), "alpha": alpha,
            "kept_full_precision": list(q.keep_full_precision), "layers": rows,
            "size_mib_before": size_before / 2**20, "size_mib_after": size_after / 2**20}


def format_report(result: dict) -> str:
    lines = [f"{result['method']}: {result['spec']}" + (f", alpha {result['alpha']}" if result["alpha"] else "")
             + f"; kept in full precision: {result['kept_full_precision'] or 'none'}",
             "{:<36} {:>12} {:>13} {:>14} {:>14} {:>8} {:>13}".format(*COLUMNS)]
    for row in result["layers"]:
        lines.append("{:<36} {:>12} {:>13.2e} {:>14.2e} {:>14.4f} {:>8.1f} {:>13.4f}".format(
            row["layer"], "x".join(map(str, row["shape"])), row["max_abs_error"], row["mean_abs_error"],
            row["relative_error"], row["snr_db"], row["out_rel_error"]))
    worst = min(result["layers"], key=lambda r: r["snr_db"])
    mean_snr = sum(r["snr_db"] for r in result["layers"]) / len(result["layers"])
    lines += [f"{len(result['layers'])} layers quantized; mean SNR {mean_snr:.1f} dB; worst {worst['layer']} "
              f"({worst['snr_db']:.1f} dB)",
              f"model size: {result['size_mib_before']:.1f} MiB fp32 -> {result['size_mib_after']:.1f} MiB "
              f"({result['size_mib_before'] / result['size_mib_after']:.2f}x smaller)"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="Per-layer quantization error table and model size.")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--model-dir", type=Path, default=ROOT / "models" / "SmolLM2-135M-Instruct")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    try:
        q = parse_serving_config(yaml.safe_load(args.config.read_text())).quantization
        model, info = load_model(str(args.model_dir))
        result = report(model, info.tokenizer, q)
    except ConfigError as error:
        sys.exit(f"quant-report: {error}")
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
