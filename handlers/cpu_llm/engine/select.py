"""The one place that chooses the engine for a served model: our runner's when the load attached one
(runner.model_runner.attach_runner), else the Hugging Face path's."""

from __future__ import annotations

from ..config.serving import ServingConfig
from ..core.params import TokenizerInfo
from ..load.served import ServedModel
from .base import Engine
from .hf_engine import HFEngine
from .slot_engine import SlotEngine


def engine_for(served: ServedModel, info: TokenizerInfo, request_timeout_s: float = float("inf"),
               config: ServingConfig | None = None) -> Engine:
    """The engine that generates with `served`; requests older than `request_timeout_s` finish with
    reason "timeout". `config` turns on what only our runner's engine has: the prefix cache (on
    by default) and speculative decoding."""
    config = config or ServingConfig()
    if served.runner is not None:
        return SlotEngine(served.runner, info, request_timeout_s, config.prefix_cache,
                          config.speculative_tokens if config.speculation == "ngram" else 0,
                          config.speculative_max_batch)
    return HFEngine(served.model, info, request_timeout_s, served.new_cache,
                    max_batch=None if served.batch_invariant else 1)
