"""Turn the loaded fp32 model into the model we serve, as `quantization:` asks, and say what was done.

Backends: `ipex` (Intel Extension for PyTorch: ipex.llm.optimize, WoQ, SmoothQuant) and
`native` (plain PyTorch plus our kernels: WoQ INT8/INT4 and SmoothQuant W8A8). `auto` picks
the one that is faster on this CPU (resolve_backend). Quantization that silently did nothing
(IPEX falls back to the original model for architectures it does not know) fails the load,
unless `fallback_to_unquantized: true` says to serve fp32 -- and then it is logged as a warning.

`load_for_serving` is the entry point: native WoQ and SmoothQuant are quantized while the
checkpoint is read (checkpoint.py; a first SmoothQuant calibration runs one fp32 layer at a time,
streamed_calibration.py), so the fp32 model is never held; every other mode, and a checkpoint
that cannot stream, loads fp32 and quantizes it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import psutil
import torch

from ..config.quantization import SECTION, QuantizationConfig
from ..core.errors import ConfigError
from ..core.params import TokenizerInfo
from ..kernels import kernel_status
from ..layers.quantized_linear import FullPrecisionLinear, as_linear
from .backend import bf16_capable, cpu_flags, resolve_backend
from .calibration import smoothquant_batches, smoothquant_summary_path
from .hf import load_model, load_tokenizer_info
from .served import ServedModel, served_model

logger = logging.getLogger(__name__)


def load_for_serving(source: str, q: QuantizationConfig, model_dir: str,
                     continuous_batching: bool = False) -> tuple[ServedModel, TokenizerInfo]:
    """Load the model at `source` and make it the model we serve, as `q` asks."""
    backend = resolve_backend(q, continuous_batching)
    summary, info = None, None
    process = psutil.Process(os.getpid())
    rss_before, started = process.memory_info().rss, time.perf_counter()
    if backend == "native" and q.method == "smoothquant":
        calibration = Path(model_dir) / q.smoothquant.calibration_data
        summary = smoothquant_summary_path(q, backend, source, model_dir, calibration)
        if not summary.is_file():  # a first load: calibrate one fp32 layer at a time where it can
            from .native_backend import calibrate_streaming

            info = load_tokenizer_info(source)
            calibrate_streaming(source, q, smoothquant_batches(info.tokenizer, q, calibration), summary)
    # WoQ, and SmoothQuant once calibrated, quantize while reading the checkpoint; a checkpoint
    # that cannot stream loads fp32 and is quantized (and calibrated) in memory.
    if backend == "native" and (q.method == "woq" or (summary is not None and summary.is_file())):
        from . import checkpoint
        from . import native_backend

        info = info or load_tokenizer_info(source)
        model = checkpoint.load_quantized(source, lambda head: native_backend.linear_converter(q, head),
                                      native_backend.HEAD_SPEC, native_backend.head_layer(q), q.keep_full_precision,
                                      None if summary is None else native_backend.smoothing_while_loading(summary))
        if model is not None:
            logger.info("native backend kernels: %s; quantized while loading from %s", kernel_status(), source)
            return served_model(model, q, backend, rss_before, started, streamed=True), info
    model, info = load_model(source)
    return prepare_for_serving(model, info.tokenizer, q, source, model_dir, continuous_batching, backend), info


def prepare_for_serving(model: torch.nn.Module, tokenizer, q: QuantizationConfig, model_source: str, model_dir: str,
                        continuous_batching: bool = False, backend: str | None = None) -> ServedModel:
    """Quantize an fp32 model already in memory, as `q` asks (on `backend`, else the one resolved)."""
    flags = cpu_flags()
    if q.dtype == "bf16" and not bf16_capable(flags):
        raise ConfigError(f"{SECTION}.dtype", f"bf16 needs a CPU with AVX-512 BW or AMX; this one reports "
                          f"{torch.backends.cpu.get_cpu_capability()} without avx512bw; use dtype: fp32")
    backend = backend or resolve_backend(q, continuous_batching)
    process = psutil.Process(os.getpid())
    rss_before, started = process.memory_info().rss, time.perf_counter()
    torch_dtype = torch.bfloat16 if q.dtype == "bf16" else torch.float32
    if q.method != "none":
        if backend == "ipex" and q.method == "smoothquant" and q.keep_full_precision:
            raise ConfigError(f"{SECTION}.keep_full_precision", "IPEX SmoothQuant quantizes every linear "
                              "operation, wrapped or not; set keep_full_precision: [] for smoothquant")
        keep_full_precision(model, q.keep_full_precision)
    calibration = Path(model_dir) / q.smoothquant.calibration_data
    summary = (smoothquant_summary_path(q, backend, model_source, model_dir, calibration)
               if q.method == "smoothquant" else None)
    batches = lambda: smoothquant_batches(tokenizer, q, calibration)  # noqa: E731 - only when calibrating
    if backend == "ipex":
        from . import ipex_backend

        model = ipex_backend.optimize(model, q, torch_dtype, batches, summary)
    elif q.method != "none":
        from . import native_backend

        model = native_backend.optimize(model, q, batches, summary)
    elif torch_dtype != torch.float32:
        model = model.to(torch_dtype)
    return served_model(model, q, backend, rss_before, started)


def keep_full_precision(model: torch.nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        try:
            parent = model.get_submodule(parent_name)
        except AttributeError:
            parent = None
        linear = as_linear(getattr(parent, attr, None))
        if linear is None:
            raise ConfigError(f"{SECTION}.keep_full_precision", f"'{name}' is not a linear layer of this model")
        setattr(parent, attr, FullPrecisionLinear(linear))
