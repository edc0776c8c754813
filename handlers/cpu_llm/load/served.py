"""What a load produced: the served model, how to start its KV cache, and a report of what was done.

A plain record: generation runs in engine/, which takes it (engine.select.engine_for)."""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable

import psutil
import torch

from ..config.quantization import QuantizationConfig
from ..core.errors import QuantizationError
from ..core.memory import release_freed_memory
from ..kernels import kernel_status
from ..layers.quantized_linear import tile_model

logger = logging.getLogger(__name__)


@dataclass
class ServedModel:
    model: torch.nn.Module
    new_cache: Callable[[int], Any]  # the empty KV cache a batch of n rows starts with
    backend: str  # "ipex" or "native"
    report: dict[str, Any]
    # False when a row's output can change with its batch companions (IPEX SmoothQuant's int8
    # kernels): such requests are then generated one at a time.
    batch_invariant: bool = True
    runner: Any = None  # runner.model_runner.ModelRunner when our own forward pass serves the model


def module_report(model: torch.nn.Module) -> tuple[dict[str, int], int]:
    """(count per type of the linear-like modules, number of quantized ones)."""
    counts = Counter(type(m).__name__ for m in model.modules()
                     if "Linear" in type(m).__name__ and type(m).__name__ != "FullPrecisionLinear")
    quantized = sum(n for kind, n in counts.items() if "Quantized" in kind or "Woq" in kind)
    scripted = getattr(getattr(model, "trace_graph", None), "optimized_model", None)
    if scripted is not None and quantized == 0:
        # SmoothQuant: the modules stay nn.Linear, but IPEX's traced graph runs them on int8
        # weights (a dequantize feeding the linear's weight input, fused into int8 kernels).
        graph = scripted.inlined_graph  # keep a reference: nodes die with their graph
        int8_linears = sum(
            1 for node in graph.findAllNodes("aten::linear")
            if list(node.inputs())[1].node().kind() == "aten::dequantize"
        )
        if int8_linears:
            counts["int8 linear ops in IPEX traced graph"] = int8_linears
            quantized = int8_linears
    return dict(counts), quantized


def served_model(model: torch.nn.Module, q: QuantizationConfig, backend: str, rss_before: int, started: float,
            streamed: bool = False) -> ServedModel:
    """Check that quantization did something, report what, and wrap the model for serving."""
    new_cache: Callable[[int], Any] = lambda n: None  # noqa: E731 - transformers builds its own cache
    extra: dict[str, Any] = {}
    if backend == "ipex":
        from . import ipex_backend

        new_cache = ipex_backend.new_cache_fn(model)
    elif q.dtype == "fp32":
        from . import native_backend

        extra = native_backend.fp32_matvec(model)  # fp32 layers left (all of them, or a kept head)
    if backend == "native" and q.method != "none":
        extra["tiled_layers"] = tile_model(model)  # the integer kernels' tiled layout, where it serves
        release_freed_memory()  # tiling's slices
    counts, quantized = module_report(model)
    if q.method != "none" and quantized == 0:
        message = (f"{q.method} with backend {backend} left every linear layer unquantized "
                   f"(architecture {type(model).__name__} is probably not supported); module types: {counts}")
        if not q.fallback_to_unquantized:
            raise QuantizationError(message + "; set quantization.fallback_to_unquantized: true to serve fp32")
        logger.warning("SERVING UNQUANTIZED: %s", message)
    process = psutil.Process(os.getpid())
    report = {
        "method": q.method, "backend": backend, "dtype": q.dtype, "cpu_isa": torch.backends.cpu.get_cpu_capability(),
        "linear_modules": counts, "quantized_modules": quantized,
        **({"kernels": kernel_status(), "quantized_while_loading": streamed}
           if backend == "native" and q.method != "none" else {}),
        **extra,
        "seconds": round(time.perf_counter() - started, 1),
        "rss_mib_before": round(rss_before / 2**20), "rss_mib_after": round(process.memory_info().rss / 2**20),
    }
    logger.info("quantization: %s", json.dumps(report))
    return ServedModel(model=model, new_cache=new_cache, backend=backend, report=report,
                       batch_invariant=not (backend == "ipex" and q.method == "smoothquant"))
