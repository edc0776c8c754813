"""Native PyTorch backend: WoQ INT8/INT4 and SmoothQuant without IPEX.

Reads the same `quantization:` keys as the IPEX backend. Keys whose IPEX meaning has no
native counterpart (NF4 weights, low-precision compute modes, bf16 with quantization) are
refused here with the key named, instead of being ignored.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch

from . import native_smoothquant as smoothquant
from .calibration import CalibrationBatch, alpha_candidates
from .errors import ConfigError
from .quant_config import SECTION, QuantizationConfig, WoqConfig
from .quantized_linear import QuantizedLinear, kernel_status, replace_linears
from .quantlib import QuantSpec

logger = logging.getLogger(__name__)
W8A8_WEIGHTS = QuantSpec(bits=8, scheme="symmetric", granularity="channel")
MIN_GROUP = 32  # the kernels read weights in blocks of 32 values


def check_supported(q: QuantizationConfig) -> None:
    """Fail the load on settings only IPEX implements."""
    if q.method == "none":
        return
    if q.dtype != "fp32":
        raise ConfigError(f"{SECTION}.dtype", f"the native backend quantizes around fp32 compute; use dtype: fp32 "
                          f"with method: {q.method} (or backend: ipex)")
    if q.method != "woq":
        return
    key = f"{SECTION}.woq"
    if q.woq.weight_dtype == "NF4":
        raise ConfigError(f"{key}.weight_dtype", "NF4 needs backend: ipex; the native backend has INT8 and INT4")
    if q.woq.lowp_mode not in ("AUTO", "NONE"):
        raise ConfigError(f"{key}.lowp_mode", f"the native backend computes WoQ in fp32 (AUTO or NONE); "
                          f"{q.woq.lowp_mode} needs backend: ipex (for int8 compute use method: smoothquant)")
    if 0 < q.woq.group_size < MIN_GROUP:
        raise ConfigError(f"{key}.group_size", f"the native backend needs -1 or a power of two >= {MIN_GROUP} "
                          f"(got {q.woq.group_size})")


def woq_spec(woq: WoqConfig) -> QuantSpec:
    """INT8: symmetric (weights are centred on zero; measured no worse than affine).
    INT4: affine, since with 16 levels a zero point recovers a level lost to skew."""
    bits = 8 if woq.weight_dtype == "INT8" else 4
    return QuantSpec(bits=bits, scheme="symmetric" if bits == 8 else "affine",
                     granularity="channel" if woq.group_size == -1 else "group",
                     group_size=max(woq.group_size, 0))


def quantize_w8a8(model: torch.nn.Module) -> None:
    replace_linears(model, lambda name, linear: QuantizedLinear.from_linear(linear, W8A8_WEIGHTS, "w8a8"))


def optimize(model: torch.nn.Module, q: QuantizationConfig,
             calibration: Callable[[], list[CalibrationBatch]], summary_path: Path | None) -> torch.nn.Module:
    """Quantize `model` in place as `q` asks (keep_full_precision is applied by the caller)."""
    logger.info("native backend kernels: %s", kernel_status())
    if q.method == "woq":
        spec = woq_spec(q.woq)
        replace_linears(model, lambda name, linear: QuantizedLinear.from_linear(linear, spec))
    elif q.method == "smoothquant":
        if summary_path.is_file():
            logger.info("SmoothQuant: reusing calibration %s", summary_path)
            try:
                act_max, alpha = smoothquant.load_calibration(summary_path)
            except ValueError as error:
                raise ConfigError(f"{SECTION}.smoothquant.qconfig_summary_file", str(error)) from None
        else:
            sq = q.smoothquant
            alphas = alpha_candidates(sq.alpha, sq.alpha_min, sq.alpha_max, sq.alpha_step)
            act_max, alpha = smoothquant.calibrate(model, calibration(), alphas, quantize_w8a8, summary_path)
        smoothquant.apply_smoothing(model, act_max, alpha)
        quantize_w8a8(model)
    return model
