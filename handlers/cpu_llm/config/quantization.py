"""The `quantization:` section of model-config.yaml, validated once at load.

Every wrong value fails the load with an error naming the key and the allowed values; a
key that does not apply to the chosen method (say `woq.group_size` with
`method: smoothquant`) is an error too, rather than being silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Mapping

from ..core.errors import ConfigError

SECTION = "quantization"
METHODS = ("none", "woq", "smoothquant")
BACKENDS = ("auto", "ipex", "native")
DTYPES = ("fp32", "bf16")
WEIGHT_DTYPES = ("INT8", "INT4", "NF4")
LOWP_MODES = ("AUTO", "NONE", "FP16", "BF16", "INT8")
ACT_QUANT_MODES = (
    "PER_TENSOR", "PER_IC_BLOCK", "PER_BATCH", "PER_BATCH_IC_BLOCK",
    "PER_TENSOR_SYM", "PER_IC_BLOCK_SYM", "PER_BATCH_SYM", "PER_BATCH_IC_BLOCK_SYM",
)
DEFAULT_CALIBRATION = "calibration/calibration.jsonl"


@dataclass(frozen=True)
class WoqConfig:
    weight_dtype: str = "INT8"
    lowp_mode: str = "AUTO"  # AUTO: INT8 compute for INT8/INT4 weights (both backends), NONE for NF4
    group_size: int = -1  # -1 = one scale per output channel, else a power of two
    act_quant_mode: str = "PER_BATCH_IC_BLOCK_SYM"  # only used with lowp_mode INT8


@dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float | str = 0.5  # a number in [0, 1], or "auto" to search alpha_min..alpha_max
    alpha_min: float = 0.3
    alpha_max: float = 0.7
    alpha_step: float = 0.1
    calibration_data: str = DEFAULT_CALIBRATION  # JSONL of {"text": ...}; relative to the archive
    num_samples: int = 16
    seq_len: int = 128
    qconfig_summary_file: str | None = None  # a saved calibration to reuse (relative to the archive)


@dataclass(frozen=True)
class QuantizationConfig:
    method: str = "none"
    backend: str = "auto"
    dtype: str = "fp32"
    keep_full_precision: tuple[str, ...] = ()  # e.g. [lm_head]; the native backend quantizes the head int8 per row
    fallback_to_unquantized: bool = False  # serve fp32 (loudly) if the backend cannot quantize
    allow_reference_kernels: bool = False  # native: serve without the compiled kernels (10-20x slower)
    woq: WoqConfig = field(default_factory=WoqConfig)
    smoothquant: SmoothQuantConfig = field(default_factory=SmoothQuantConfig)


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    normalised = value.upper() if isinstance(value, str) and allowed[0].isupper() else value
    if normalised not in allowed:
        raise ConfigError(key, f"must be one of {list(allowed)} (got {value!r})")
    return normalised


def _number(key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigError(key, f"must be a number in [{low}, {high}] (got {value!r})")
    return float(value)


def _int(key: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(key, f"must be an integer >= {low} (got {value!r})")
    return value


def _mapping(key: str, value: Any, cls) -> dict[str, Any]:
    value = value or {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, "must be a mapping")
    known = {f.name for f in fields(cls)}
    for name in value:
        if name not in known:
            raise ConfigError(f"{key}.{name}", f"unknown key; allowed: {sorted(known)}")
    return dict(value)


def _parse_woq(raw: Any) -> WoqConfig:
    key = f"{SECTION}.woq"
    values = {**WoqConfig().__dict__, **_mapping(key, raw, WoqConfig)}
    group_size = values["group_size"]
    if isinstance(group_size, bool) or not isinstance(group_size, int) or not (
        group_size == -1 or (group_size > 0 and group_size & (group_size - 1) == 0)
    ):
        raise ConfigError(f"{key}.group_size", f"must be -1 or a power of two (got {group_size!r})")
    return WoqConfig(
        weight_dtype=_choice(f"{key}.weight_dtype", values["weight_dtype"], WEIGHT_DTYPES),
        lowp_mode=_choice(f"{key}.lowp_mode", values["lowp_mode"], LOWP_MODES),
        group_size=group_size,
        act_quant_mode=_choice(f"{key}.act_quant_mode", values["act_quant_mode"], ACT_QUANT_MODES),
    )


def _parse_smoothquant(raw: Any) -> SmoothQuantConfig:
    key = f"{SECTION}.smoothquant"
    values = {**SmoothQuantConfig().__dict__, **_mapping(key, raw, SmoothQuantConfig)}
    alpha = values["alpha"]
    if alpha != "auto":
        alpha = _number(f"{key}.alpha", alpha, 0.0, 1.0)
    low = _number(f"{key}.alpha_min", values["alpha_min"], 0.0, 1.0)
    high = _number(f"{key}.alpha_max", values["alpha_max"], 0.0, 1.0)
    if low > high:
        raise ConfigError(f"{key}.alpha_min", f"must not exceed alpha_max ({high})")
    summary = values["qconfig_summary_file"]
    if summary is not None and (not isinstance(summary, str) or not summary):
        raise ConfigError(f"{key}.qconfig_summary_file", "must be a file path")
    if not isinstance(values["calibration_data"], str) or not values["calibration_data"]:
        raise ConfigError(f"{key}.calibration_data", "must be a file path")
    return SmoothQuantConfig(
        alpha=alpha, alpha_min=low, alpha_max=high,
        alpha_step=_number(f"{key}.alpha_step", values["alpha_step"], 0.01, 1.0),
        calibration_data=values["calibration_data"],
        num_samples=_int(f"{key}.num_samples", values["num_samples"], 1),
        seq_len=_int(f"{key}.seq_len", values["seq_len"], 8),
        qconfig_summary_file=summary,
    )


def parse_quantization_config(raw: Any) -> QuantizationConfig:
    """Validate the `quantization:` section (absent = no quantization)."""
    values = {**QuantizationConfig().__dict__, **_mapping(SECTION, raw, QuantizationConfig)}
    method = _choice(f"{SECTION}.method", values["method"], METHODS)
    keep = values["keep_full_precision"]
    if not isinstance(keep, (list, tuple)) or not all(isinstance(k, str) and k for k in keep):
        raise ConfigError(f"{SECTION}.keep_full_precision", "must be a list of module names, e.g. [lm_head]")
    for flag in ("fallback_to_unquantized", "allow_reference_kernels"):
        if not isinstance(values[flag], bool):
            raise ConfigError(f"{SECTION}.{flag}", "must be true or false")
    raw = raw or {}
    for sub, applies_to in (("woq", "woq"), ("smoothquant", "smoothquant")):
        if sub in raw and method != applies_to:
            raise ConfigError(f"{SECTION}.{sub}", f"only applies to method: {applies_to} (method is {method})")
    return QuantizationConfig(
        method=method,
        backend=_choice(f"{SECTION}.backend", values["backend"], BACKENDS),
        dtype=_choice(f"{SECTION}.dtype", values["dtype"], DTYPES),
        keep_full_precision=tuple(keep),
        fallback_to_unquantized=values["fallback_to_unquantized"],
        allow_reference_kernels=values["allow_reference_kernels"],
        woq=_parse_woq(raw.get("woq")),
        smoothquant=_parse_smoothquant(raw.get("smoothquant")),
    )
