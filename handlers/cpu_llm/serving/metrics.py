"""LLM serving metrics, exported by TorchServe at `:8082/metrics` (Prometheus text format).

The worker reports through TorchServe's metrics API (`context.metrics`); the frontend creates
each metric on first sight (`model_metrics_auto_detect=true` in config.properties). Latencies
are Prometheus histograms in seconds, so the client library's default buckets (5 ms .. 10 s)
fit them. Inter-token latency is observed once per request (its mean over the decode steps), to
keep the metric traffic per request, not per token.
"""

from __future__ import annotations

from typing import Any

from ..decode.sequence import Sequence


class ServingMetrics:
    """Writes our metrics into TorchServe's metric cache (`context.metrics`)."""

    def __init__(self, cache: Any) -> None:
        from ts.metrics.metric_type_enum import MetricTypes

        self.cache, self.types = cache, MetricTypes

    def finished(self, seq: Sequence) -> None:
        result = seq.result()
        self._observe("llm_time_to_first_token_seconds", result.time_to_first_token_ms / 1000)
        self._observe("llm_queue_time_seconds", result.queue_ms / 1000)
        if result.completion_tokens > 1:
            self._observe("llm_inter_token_latency_seconds", result.decode_ms / 1000 / (result.completion_tokens - 1))
        self._add("llm_generated_tokens_total", result.completion_tokens, "tokens", self.types.COUNTER)
        self._add("llm_prompt_tokens_total", result.prompt_tokens, "tokens", self.types.COUNTER)
        if result.cached_prompt_tokens:  # prefix cache hits, and the prompt tokens they did not prefill
            self._add("llm_prefix_cache_hits_total", 1, "requests", self.types.COUNTER)
            self._add("llm_prefix_cache_tokens_total", result.cached_prompt_tokens, "tokens", self.types.COUNTER)
        if result.draft_tokens:  # speculative decoding: acceptance rate = accepted / drafted
            self._add("llm_draft_tokens_total", result.draft_tokens, "tokens", self.types.COUNTER)
            self._add("llm_accepted_draft_tokens_total", result.accepted_draft_tokens, "tokens", self.types.COUNTER)
        self._add("llm_requests_finished_total", 1, "requests", self.types.COUNTER)

    def step(self, in_flight: int, cancelled: int = 0) -> None:
        """After each batch step: requests being generated now, and clients that went away."""
        self._add("llm_requests_in_flight", in_flight, "requests", self.types.GAUGE)
        if cancelled:
            self._add("llm_requests_cancelled_total", cancelled, "requests", self.types.COUNTER)

    def _observe(self, name: str, seconds: float) -> None:
        self._add(name, round(seconds, 6), "seconds", self.types.HISTOGRAM)

    def _add(self, name: str, value: float, unit: str, kind: Any) -> None:
        self.cache.add_metric(name, value, unit, dimensions=[], metric_type=kind)
