"""Which backend serves a quantization config: `ipex` (Intel Extension for PyTorch) or `native`
(plain PyTorch plus our kernels). `auto` picks the one measured faster on this CPU, and the load log
says why."""

from __future__ import annotations

import importlib.util
import logging

from ..config.quantization import SECTION, QuantizationConfig
from ..core.errors import ConfigError
from ..kernels import kernel_status, kernels_available

logger = logging.getLogger(__name__)


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
