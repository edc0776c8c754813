"""TorchServe handler for causal LMs on CPU: thin glue between TorchServe and `cpu_llm`.

TorchServe allows a single class per handler module, so all logic lives in the `cpu_llm`
package shipped next to this file in the model archive.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import psutil
import torch
from ts.torch_handler.base_handler import BaseHandler

from cpu_llm.config import check_context_length, parse_serving_config, resolve_threads
from cpu_llm.generation import GenerationResult
from cpu_llm.model import encode_prompt, load_model, max_positions, resolve_model_source
from cpu_llm.quantize import prepare_for_serving
from cpu_llm.request import RequestError, parse_request

logger = logging.getLogger(__name__)


class LLMHandler(BaseHandler):
    """Loads the model at `initialize()` and serves batched generation requests."""

    def initialize(self, context) -> None:
        started = time.perf_counter()
        self.context = context
        self.manifest = context.manifest
        self.config = parse_serving_config(context.model_yaml_config)
        threads = resolve_threads(self.config)
        torch.set_num_threads(threads)
        source = resolve_model_source(self.config.model_path, context.system_properties["model_dir"])
        model, self.tokenizer_info = load_model(source)
        params = sum(p.numel() for p in model.parameters())
        self.served = prepare_for_serving(model, self.tokenizer_info.tokenizer, self.config.quantization,
                                          source, context.system_properties["model_dir"])
        check_context_length(self.config, max_positions(self.served))
        logger.info(
            "loaded %s: %.1fM parameters, %d threads, %.1f s, RSS %.0f MiB, torch %s, CPU ISA %s",
            source, params / 1e6, threads, time.perf_counter() - started,
            psutil.Process(os.getpid()).memory_info().rss / 2**20, torch.__version__,
            torch.backends.cpu.get_cpu_capability(),
        )
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context) -> list[dict[str, Any]]:
        """Validate each request on its own; generate the valid ones together (one at a time
        when the served model is not batch-invariant: IPEX SmoothQuant)."""
        started = time.perf_counter()
        responses: list[dict[str, Any]] = [{} for _ in data]
        valid = []
        for idx, row in enumerate(data):
            context.set_response_content_type(idx, "application/json")
            try:
                request = parse_request(_body_of(row), self.config)
                ids = encode_prompt(self.tokenizer_info.tokenizer, request, self.config.max_prompt_tokens)
                valid.append((idx, request, ids))
            except RequestError as error:
                context.set_response_status(error.status, "Bad Request", idx)
                responses[idx] = error.to_json()
        if valid:
            results = self.served.generate(
                self.tokenizer_info, [r for _, r, _ in valid], [ids for _, _, ids in valid]
            )
            total_ms = (time.perf_counter() - started) * 1000
            batch_size = min(len(valid), self.served.max_batch or len(valid))
            for (idx, _, _), result in zip(valid, results):
                responses[idx] = _response_json(result, batch_size, total_ms)
        return responses


def _body_of(row: dict[str, Any]) -> Any:
    """TorchServe puts a raw request body under "body" (or "data" for form uploads)."""
    for key in ("body", "data"):
        if key in row:
            return row[key]
    raise RequestError("body", "is missing; send a JSON object with Content-Type: application/json")


def _response_json(result: GenerationResult, batch_size: int, total_ms: float) -> dict[str, Any]:
    decode_s = result.decode_ms / 1000
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "batch_size": batch_size,
        "timings": {
            "prefill_ms": round(result.prefill_ms, 1),
            "decode_ms": round(result.decode_ms, 1),
            "total_ms": round(total_ms, 1),
            # The first token comes out of prefill; the rest are decode steps.
            "decode_tokens_per_s": (
                round((result.completion_tokens - 1) / decode_s, 2)
                if result.completion_tokens > 1 and decode_s > 0 else None
            ),
        },
    }
