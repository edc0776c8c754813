"""Native PyTorch backend: WoQ INT8/INT4 and SmoothQuant on our own kernels, without IPEX.

Reads the same `quantization:` keys as the IPEX backend. `woq.lowp_mode` means what it means
for IPEX: AUTO and INT8 compute with int8 activations (quantized per block of 32 on the fly),
NONE computes in fp32 from weights dequantized in registers. Keys whose IPEX meaning has no
native counterpart (NF4 weights, FP16/BF16 compute, bf16 with quantization) are refused with
the key named, instead of being ignored.

The input embedding and the LM head are quantized too (int8, one scale per row), unless the
head is in `keep_full_precision`; a tied head reads the embedding's own int8 rows.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import native_smoothquant as smoothquant, streamed_calibration
from .. import kernels
from ..config.quantization import SECTION, QuantizationConfig, WoqConfig
from ..core.errors import ConfigError, QuantizationError
from ..formats.quantlib import PackedWeight, QuantSpec, kernel_weights, quantize
from ..layers.quantized_linear import (FP32_KERNEL_MAX_ROWS, FullPrecisionLinear, QuantizedEmbedding, QuantizedLinear, replace_linears, set_module)
from .calibration import CalibrationBatch, alpha_candidates
from .checkpoint import Checkpoint, LinearConverter, QuantizedLoad, Transform

logger = logging.getLogger(__name__)
HEAD_SPEC = QuantSpec(bits=8, scheme="symmetric", granularity="channel")  # embedding and LM head
W8A8_WEIGHTS = HEAD_SPEC
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
    if q.woq.lowp_mode not in ("AUTO", "INT8", "NONE"):
        raise ConfigError(f"{key}.lowp_mode", f"the native backend computes WoQ in int8 (AUTO or INT8) or fp32 "
                          f"(NONE); {q.woq.lowp_mode} needs backend: ipex")
    if 0 < q.woq.group_size < MIN_GROUP:
        raise ConfigError(f"{key}.group_size", f"the native backend needs -1 or a power of two >= {MIN_GROUP} "
                          f"(got {q.woq.group_size})")


def check_kernels(q: QuantizationConfig) -> None:
    """No silent slow path: without the compiled kernels a quantized model decodes 10-20x slower
    than fp32, so that fails the load unless the config opts into the reference path."""
    if q.method == "none" or kernels.kernels_available():
        return
    if not q.allow_reference_kernels:
        raise QuantizationError(f"{kernels.kernel_status()}: the native {q.method} would run 10-20x slower than fp32. "
                                f"Build the kernels for this torch: {kernels.BUILD_COMMAND}; or set "
                                f"{SECTION}.allow_reference_kernels: true to serve on the slow reference path")
    logger.warning("SLOW REFERENCE PATH: %s; %s.allow_reference_kernels is true", kernels.kernel_status(), SECTION)


def compute_mode(woq: WoqConfig) -> str:
    return "fp32" if woq.lowp_mode == "NONE" else "int8"


def woq_spec(woq: WoqConfig) -> QuantSpec:
    """Symmetric weights, one scale per output channel or per group. Grouped scales are stored
    as float16: for INT4 in groups of 32 that is 18 bytes per 32 weights, as llama.cpp's Q4_0."""
    bits = 8 if woq.weight_dtype == "INT8" else 4
    grouped = woq.group_size != -1
    return QuantSpec(bits=bits, scheme="symmetric", granularity="group" if grouped else "channel",
                     group_size=max(woq.group_size, 0), scale_dtype="float16" if grouped else "float32")


def head_layer(q: QuantizationConfig) -> Callable[[PackedWeight, torch.Tensor | None], torch.nn.Module]:
    """The layer a tied LM head becomes, over the embedding's int8 rows."""
    kind = "w8a8" if q.method == "smoothquant" else "woq"
    return lambda packed, bias: QuantizedLinear(packed, bias, HEAD_SPEC, kind, compute_mode(q.woq))


def linear_converter(q: QuantizationConfig, head_name: str | None) -> LinearConverter:
    """name, quantize(spec), bias -> the quantized layer (an untied LM head gets HEAD_SPEC)."""
    if q.method == "smoothquant":
        return lambda name, pack, bias: QuantizedLinear(pack(W8A8_WEIGHTS), bias, W8A8_WEIGHTS, "w8a8")
    body, compute = woq_spec(q.woq), compute_mode(q.woq)

    def convert(name: str, pack: Callable[[QuantSpec], PackedWeight], bias: torch.Tensor | None) -> QuantizedLinear:
        spec = HEAD_SPEC if name == head_name else body
        return QuantizedLinear(pack(spec), bias, spec, "woq", compute)

    return convert


def _module_name(model: torch.nn.Module, module: torch.nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None)


def quantize_embeddings(model: torch.nn.Module, q: QuantizationConfig) -> None:
    """Input embedding -> int8 rows; a tied LM head (not kept in fp32) shares them."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    head_name = _module_name(model, head)
    tied = head is not None and getattr(head, "weight", None) is embedding.weight
    if tied and head_name in q.keep_full_precision:
        return  # the kept head reads the fp32 table: a second, int8 copy would only cost memory
    packed = kernel_weights(quantize(embedding.weight, HEAD_SPEC))
    set_module(model, _module_name(model, embedding), QuantizedEmbedding(packed.qweight, packed.scales))
    if tied:
        set_module(model, head_name, head_layer(q)(packed, head.bias))


def quantize_w8a8(model: torch.nn.Module) -> None:
    """Every linear layer to W8A8 (what SmoothQuant's calibration compares alphas with)."""
    replace_linears(model, lambda name, linear: QuantizedLinear.from_linear(linear, W8A8_WEIGHTS, "w8a8"))


def quantize_model(model: torch.nn.Module, q: QuantizationConfig) -> None:
    """Swap every linear layer (not kept) and the embeddings for quantized ones, in place."""
    head_name = _module_name(model, model.get_output_embeddings())
    quantize_embeddings(model, q)
    convert = linear_converter(q, head_name)
    replace_linears(model, lambda name, linear: convert(
        name, lambda spec: kernel_weights(quantize(linear.weight, spec)), linear.bias))


def read_calibration(path: Path) -> tuple[dict[str, torch.Tensor], float]:
    """A saved SmoothQuant calibration (activation maxima, alpha); a ConfigError if it is not one."""
    logger.info("SmoothQuant: reusing calibration %s", path)
    try:
        return smoothquant.load_calibration(path)
    except ValueError as error:
        raise ConfigError(f"{SECTION}.smoothquant.qconfig_summary_file", str(error)) from None


def smoothing_while_loading(path: Path) -> Callable[[torch.nn.Module, Checkpoint], Transform | None]:
    """The streaming loader's transform for the calibration at `path` (see native_smoothquant)."""
    act_max, alpha = read_calibration(path)
    return lambda model, checkpoint: smoothquant.smoothing_while_loading(model, checkpoint, act_max, alpha)


def calibrate_streaming(source: str, q: QuantizationConfig, batches: list[CalibrationBatch], path: Path) -> float | None:
    """A first SmoothQuant calibration without the fp32 model in memory, saved to `path`: the
    activation maxima one fp32 layer at a time; with several alphas, each candidate is the model
    we serve, scored one quantized layer at a time (streamed_calibration). The alpha chosen, or
    None where the checkpoint cannot stream (then the caller calibrates the fp32 model in memory)."""
    act_max = streamed_calibration.activation_maxima(source, batches)
    if act_max is None:
        return None

    def loss_of(alpha: float) -> float:
        load = QuantizedLoad.open(source, lambda head: linear_converter(q, head), HEAD_SPEC, head_layer(q),
                                  q.keep_full_precision,
                                  lambda m, checkpoint: smoothquant.smoothing_while_loading(m, checkpoint, act_max, alpha))
        return streamed_calibration.calibration_loss(load, batches)

    sq = q.smoothquant
    alphas = alpha_candidates(sq.alpha, sq.alpha_min, sq.alpha_max, sq.alpha_step)
    return smoothquant.choose_and_save(act_max, alphas, loss_of, path, len(batches))[1]


def optimize(model: torch.nn.Module, q: QuantizationConfig,
             calibration: Callable[[], list[CalibrationBatch]], summary_path: Path | None) -> torch.nn.Module:
    """Quantize `model` in place as `q` asks (keep_full_precision is applied by the caller)."""
    logger.info("native backend kernels: %s", kernels.kernel_status())
    if q.method == "smoothquant":
        if summary_path.is_file():
            act_max, alpha = read_calibration(summary_path)
        else:
            sq = q.smoothquant
            alphas = alpha_candidates(sq.alpha, sq.alpha_min, sq.alpha_max, sq.alpha_step)
            act_max, alpha = smoothquant.calibrate(model, calibration(), alphas, quantize_w8a8, summary_path)
        smoothquant.apply_smoothing(model, act_max, alpha)
    if q.method != "none":
        quantize_model(model, q)
    return model


# --- fp32: our matrix-vector kernel where the BLAS is slow -------------------------------------

def _gb_per_s(fn: Callable[[], torch.Tensor], nbytes: int, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return nbytes / best / 1e9


def fp32_matvec(model: torch.nn.Module) -> dict[str, object]:
    """Time PyTorch's fp32 matrix-vector product (the BLAS) against our kernel on the model's
    largest linear weight, once at load; where ours is faster, every fp32 linear layer uses it
    for decode-sized inputs. On AMD hosts the BLAS reads 6-13 GB/s of 30-39 (FACTS.md)."""
    linears = [m for m in model.modules() if type(m) in (torch.nn.Linear, FullPrecisionLinear)]
    if not kernels.kernels_available() or not linears:
        return {"fp32_matvec": "torch (no kernels)" if linears else "none"}
    weight = max((m.weight for m in linears), key=lambda w: w.numel())
    x = torch.randn(1, weight.shape[1])
    nbytes = weight.numel() * 4
    with torch.inference_mode():
        blas = _gb_per_s(lambda: F.linear(x, weight), nbytes)
        ours = _gb_per_s(lambda: kernels.linear_f32(x, weight, None), nbytes)
    use_ours = ours > blas
    if use_ours:
        for name, module in list(model.named_modules()):
            if type(module) is torch.nn.Linear:
                set_module(model, name, FullPrecisionLinear(module, use_kernel=True))
            elif isinstance(module, FullPrecisionLinear):
                module.use_kernel = True
    return {"fp32_matvec": f"{'cpu_llm' if use_ours else 'torch'} (up to {FP32_KERNEL_MAX_ROWS} rows; "
                           f"measured at load on {tuple(weight.shape)}: torch {blas:.1f} GB/s, ours {ours:.1f} GB/s)"}
