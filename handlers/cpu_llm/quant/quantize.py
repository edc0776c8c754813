"""Turn the loaded fp32 model into the model we serve, as `quantization:` asks, and say what was done.

Backends: `ipex` (Intel Extension for PyTorch: ipex.llm.optimize, WoQ, SmoothQuant) and
`native` (plain PyTorch plus our kernels: WoQ INT8/INT4 and SmoothQuant W8A8). `auto` picks
the one that is faster on this CPU (resolve_backend). Quantization that silently did nothing
(IPEX falls back to the original model for architectures it does not know) fails the load,
unless `fallback_to_unquantized: true` says to serve fp32 -- and then it is logged as a warning.

`load_for_serving` is the entry point: native WoQ and SmoothQuant are quantized while the
checkpoint is read (loader.py; a first SmoothQuant calibration runs one fp32 layer at a time,
streamed_calibration.py), so the fp32 model is never held; every other mode, and a checkpoint
that cannot stream, loads fp32 and quantizes it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import psutil
import torch

from .calibration import CalibrationBatch, calibration_batches, read_texts
from ..errors import ConfigError, QuantizationError
from ..engine.generation import GenerationResult, Sequence, TokenizerInfo, generate_batch
from ..loader import release_freed_memory
from ..model import load_model, load_tokenizer_info
from ..ops import kernel_status, kernels_available
from .quant_config import SECTION, QuantizationConfig
from .quantized_linear import FullPrecisionLinear, as_linear, tile_model

logger = logging.getLogger(__name__)
CACHE_DIR_ENV = "LLM_CPU_CACHE_DIR"  # where SmoothQuant calibrations are cached


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

    @property
    def max_batch(self) -> int | None:
        """Most requests generated together (None = no limit)."""
        return None if self.batch_invariant else 1

    def generate(self, info: TokenizerInfo, seqs: list[Sequence],
                 on_step: Callable[[list[Sequence]], None] | None = None) -> list[GenerationResult]:
        """Generate for all sequences, in as few batches as batch invariance allows."""
        if self.runner is not None:
            from ..runner.slot_engine import SlotEngine

            return SlotEngine(self.runner, info, float("inf")).generate(seqs, on_step)
        step = self.max_batch or len(seqs)
        return [result for start in range(0, len(seqs), step)
                for result in generate_batch(self.model, info, seqs[start:start + step], self.new_cache, on_step)]


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def bf16_capable(flags: set[str]) -> bool:
    """IPEX's bf16 kernels need AVX-512 BW (or AVX-NE-CONVERT); AVX2-only CPUs fail at load."""
    return bool(flags & {"avx512bw", "avx_ne_convert", "amx_bf16"})


def resolve_backend(q: QuantizationConfig, continuous_batching: bool = False) -> str:
    """The backend to serve with; `auto` picks the faster one on this CPU, and the load log says why."""
    ipex_present = importlib.util.find_spec("intel_extension_for_pytorch") is not None
    backend, why = q.backend, "set in the config"
    if q.backend == "auto":
        backend, why = _auto_backend(q, continuous_batching, ipex_present)
    if backend == "ipex" and not ipex_present:
        raise ConfigError(f"{SECTION}.backend", "ipex: intel-extension-for-pytorch is not installed "
                          "(use the ipex stack: make install STACK=ipex)")
    if backend == "ipex" and continuous_batching:
        # IPEX's indirect-access KV cache has one write position for the whole batch (and its
        # SmoothQuant kernels couple the rows), so a request cannot join a batch mid-flight.
        raise ConfigError(f"{SECTION}.backend", "ipex cannot serve continuousBatching: true: IPEX's KV cache "
                          "keeps one position for the whole batch, so requests cannot join or leave a running "
                          "batch; use backend: native (or auto), or turn continuousBatching off")
    if backend == "native":
        from .native_backend import check_kernels, check_supported

        check_supported(q)
        check_kernels(q)
    logger.info("quantization backend: %s (%s)", backend, why)
    return backend


def _auto_backend(q: QuantizationConfig, continuous_batching: bool, ipex_present: bool) -> tuple[str, str]:
    """(backend, why) for `backend: auto`. Quantized: ours, measured faster than IPEX's in every
    mode on every CPU we have run (AMX included: on a 2-core AMX Xeon VM SmolLM2 WoQ INT8 decodes at
    179.8 vs 50.0 tok/s, INT4 262.6 vs 62.7, SmoothQuant 169.3 vs 1.8; on a 16-core Xeon the 1B shape's
    INT8 at 66.0 vs 40.6, SmoothQuant 77.7 vs 45.5), in a third of IPEX's memory. fp32: IPEX, whose
    batched fp32 products are ahead of ours (1B shape at batch 8: 28.3 vs 17.5 tok/s; ours leads at
    batch 1 on small hosts, 6.3 vs 4.8, in half the memory: `backend: native` chooses that)."""
    if continuous_batching:
        return "native", "continuous batching (IPEX's KV cache cannot let rows join)"
    if not ipex_present:
        return "native", "IPEX is not installed"
    if q.method == "none":
        return "ipex", "fp32: ipex.llm.optimize's batched products beat ours and plain transformers"
    from .native_backend import check_supported

    try:
        check_supported(q)
    except ConfigError as error:
        return "ipex", f"only IPEX implements {error.key} as set"
    if not kernels_available():
        return "ipex", f"the native kernels are missing: {kernel_status()}"
    return "native", "our quantized kernels decode faster than IPEX's on every CPU measured, AMX included"


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


def smoothquant_summary_path(q: QuantizationConfig, backend: str, model_source: str, model_dir: str,
                             calibration: Path) -> Path:
    """A given summary file, or a cache entry keyed by everything the calibration depends on."""
    sq = q.smoothquant
    if sq.qconfig_summary_file:
        path = Path(sq.qconfig_summary_file)
        path = path if path.is_absolute() else Path(model_dir) / path
        if not path.is_file():
            raise ConfigError(f"{SECTION}.smoothquant.qconfig_summary_file", f"{path} does not exist")
        return path
    digest = hashlib.sha256()
    for part in (Path(model_source) / "config.json", calibration):
        digest.update(part.read_bytes() if part.is_file() else str(part).encode())
    weights = sorted(Path(model_source).glob("*.safetensors"))
    digest.update(json.dumps([(w.name, w.stat().st_size) for w in weights]).encode())
    digest.update(json.dumps(sq.__dict__, sort_keys=True, default=str).encode())
    digest.update(json.dumps(q.keep_full_precision).encode())
    cache = Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "torchserve-llm-cpu"))
    prefix = "" if backend == "ipex" else f"{backend}-"  # the two backends' files differ in format
    return cache / "smoothquant" / f"{prefix}{digest.hexdigest()[:16]}.json"


def smoothquant_batches(tokenizer, q: QuantizationConfig, calibration: Path) -> list[CalibrationBatch]:
    """The calibration samples `q.smoothquant` asks for, from the JSONL file `calibration`."""
    texts = read_texts(calibration, f"{SECTION}.smoothquant.calibration_data")
    return calibration_batches(tokenizer, texts, q.smoothquant.num_samples, q.smoothquant.seq_len)


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
        from .. import loader
        from . import native_backend

        info = info or load_tokenizer_info(source)
        model = loader.load_quantized(source, lambda head: native_backend.linear_converter(q, head),
                                      native_backend.HEAD_SPEC, native_backend.head_layer(q), q.keep_full_precision,
                                      None if summary is None else native_backend.smoothing_while_loading(summary))
        if model is not None:
            logger.info("native backend kernels: %s; quantized while loading from %s", kernel_status(), source)
            return _served(model, q, backend, rss_before, started, streamed=True), info
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
    return _served(model, q, backend, rss_before, started)


def _served(model: torch.nn.Module, q: QuantizationConfig, backend: str, rss_before: int, started: float,
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
        extra["tiled_layers"] = tile_model(model)  # the AVX-512 VNNI kernel's layout, where it serves
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
