"""The one place that chooses the engine for a served model: our runner's when the load attached one
(runner.model_runner.attach_runner), else the Hugging Face path's."""

from __future__ import annotations

from ..core.params import TokenizerInfo
from ..load.served import ServedModel
from .base import Engine
from .hf_engine import HFEngine
from .slot_engine import SlotEngine


def engine_for(served: ServedModel, info: TokenizerInfo, request_timeout_s: float = float("inf"),
               prefix_cache: bool = True) -> Engine:
    """The engine that generates with `served`; requests older than `request_timeout_s` finish with
    reason "timeout". `prefix_cache` reuses cached prompt prefixes where the engine can (our runner's)."""
    if served.runner is not None:
        return SlotEngine(served.runner, info, request_timeout_s, prefix_cache)
    return HFEngine(served.model, info, request_timeout_s, served.new_cache,
                    max_batch=None if served.batch_invariant else 1)
