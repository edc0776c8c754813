"""Intel Extension for PyTorch backend: ipex.llm.optimize for fp32/bf16, WoQ and SmoothQuant.

IPEX models keep their KV cache in IPEX's own format (per layer: a placeholder, key and value
buffers, and a beam-index table), so this module also provides `new_cache`, the empty cache
the decode loop starts each batch with. Everything IPEX-specific lives here; the rest of the
package only sees a model that maps (input_ids, attention_mask, position_ids, cache) to
(logits, cache).
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Callable

import torch

from ..config.quantization import QuantizationConfig, WoqConfig
from .calibration import CalibrationBatch, alpha_candidates, calibration_loss

logger = logging.getLogger(__name__)
# IPEX's indirect-access KV cache tracks beams for this many positions.
IPEX_MAX_POSITIONS = 2048


def import_ipex():
    """Import IPEX (it refuses torch other than 2.8.x with an ImportError)."""
    import intel_extension_for_pytorch as ipex

    return ipex


def new_cache_fn(model: torch.nn.Module) -> Callable[[int], tuple]:
    """Factory of IPEX's empty KV cache for a batch of `n` rows."""
    layers = model.config.num_hidden_layers
    dtype = torch.bfloat16 if next(model.parameters()).dtype == torch.bfloat16 else torch.float32

    def new_cache(n: int) -> tuple:
        beam_idx = torch.zeros((IPEX_MAX_POSITIONS, n), dtype=torch.long)
        return tuple(
            (torch.zeros(1, 0, 0, 1, dtype=torch.long), torch.zeros([1, 1, 1, 1], dtype=dtype),
             torch.zeros([1, 1, 1, 1], dtype=dtype), beam_idx)
            for _ in range(layers)
        )

    return new_cache


def woq_qconfig(ipex, woq: WoqConfig):
    from intel_extension_for_pytorch.quantization import WoqActQuantMode, WoqLowpMode, WoqWeightDtype

    lowp = woq.lowp_mode
    if lowp == "AUTO":
        # INT8 compute is IPEX's fastest WoQ path on every CPU we measured; NF4 needs float compute.
        lowp = "NONE" if woq.weight_dtype == "NF4" else "INT8"
    return ipex.quantization.get_weight_only_quant_qconfig_mapping(
        weight_dtype=WoqWeightDtype[woq.weight_dtype],
        lowp_mode=WoqLowpMode[lowp],
        act_quant_mode=WoqActQuantMode[woq.act_quant_mode],
        group_size=woq.group_size,
    )


def optimize(model: torch.nn.Module, q: QuantizationConfig, torch_dtype: torch.dtype,
             calibration: Callable[[], list[CalibrationBatch]], summary_path: Path | None) -> torch.nn.Module:
    """Apply ipex.llm.optimize according to `q`; returns the model to serve."""
    ipex = import_ipex()
    if q.method == "none":
        return ipex.llm.optimize(model, dtype=torch_dtype, inplace=True, deployment_mode=True)
    if q.method == "woq":
        return ipex.llm.optimize(model, dtype=torch_dtype, quantization_config=woq_qconfig(ipex, q.woq),
                                 inplace=True, deployment_mode=True)
    sq = q.smoothquant
    if not summary_path.is_file():
        alphas = alpha_candidates(sq.alpha, sq.alpha_min, sq.alpha_max, sq.alpha_step)
        calibrate_smoothquant(model, alphas, calibration(), summary_path)
    else:
        logger.info("SmoothQuant: reusing calibration %s", summary_path)
    qconfig = ipex.quantization.get_smooth_quant_qconfig_mapping(alpha=_summary_alpha(summary_path))
    return ipex.llm.optimize(model, dtype=torch_dtype, quantization_config=qconfig,
                             qconfig_summary_file=str(summary_path), inplace=True, deployment_mode=True)


def _summary_alpha(summary_path: Path) -> float:
    """The alpha a summary was calibrated with, recorded next to it by `calibrate_smoothquant`."""
    alpha_file = summary_path.with_suffix(".alpha")
    return float(alpha_file.read_text()) if alpha_file.is_file() else 0.5


def calibrate_smoothquant(model: torch.nn.Module, alphas: list[float], batches: list[CalibrationBatch],
                          summary_path: Path) -> float:
    """Calibrate on `batches` for each alpha; keep the alpha whose quantized model has the
    lowest loss on the calibration set. Writes the IPEX qconfig summary (and the alpha)."""
    ipex = import_ipex()
    from intel_extension_for_pytorch.transformers.optimize import get_dummy_input

    best = None
    new_cache = new_cache_fn(model)
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    for alpha in alphas:
        candidate = summary_path.with_name(f"{summary_path.stem}.alpha{alpha}.json")
        qconfig = ipex.quantization.get_smooth_quant_qconfig_mapping(alpha=alpha)
        work = ipex.llm.optimize(copy.deepcopy(model), dtype=torch.float32, quantization_config=qconfig,
                                 inplace=True, deployment_mode=False)
        prepared = ipex.quantization.prepare(work, qconfig, example_inputs=get_dummy_input(work), inplace=True)
        with torch.inference_mode():
            for batch in batches:
                prepared(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         past_key_values=new_cache(batch.input_ids.shape[0]), position_ids=batch.position_ids)
        prepared.save_qconf_summary(qconf_summary=str(candidate))
        if len(alphas) == 1:
            best = (0.0, alpha, candidate)
            break
        quantized = ipex.llm.optimize(copy.deepcopy(model), dtype=torch.float32, quantization_config=qconfig,
                                      qconfig_summary_file=str(candidate), inplace=True, deployment_mode=True)
        loss = calibration_loss(quantized, batches, new_cache)
        logger.info("SmoothQuant alpha=%.2f: calibration loss %.4f", alpha, loss)
        if best is None or loss < best[0]:
            best = (loss, alpha, candidate)
    _, alpha, chosen = best
    chosen.replace(summary_path)
    summary_path.with_suffix(".alpha").write_text(f"{alpha}\n")
    for leftover in summary_path.parent.glob(f"{summary_path.stem}.alpha*.json"):
        leftover.unlink()
    logger.info("SmoothQuant: calibrated with alpha=%.2f on %d samples -> %s", alpha, len(batches), summary_path)
    return alpha
