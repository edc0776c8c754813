"""TorchServe handler for causal LMs on CPU: thin glue between TorchServe and `cpu_llm`.

TorchServe allows a single class per handler module, so all logic lives in the `cpu_llm`
package shipped next to this file in the model archive. Two batching modes, chosen by the
model-config's `continuousBatching` key:
- dynamic batching: each `handle()` call generates one batch from start to end
  (`cpu_llm.serving.dynamic`); streaming requests get their text through intermediate responses;
- continuous batching (the default config): each `handle()` call runs decode steps of every
  in-flight request (`cpu_llm.serving.continuous`), so requests join and leave between steps.
Both drive the same engine (`cpu_llm.engine`), chosen once at load.
Each request speaks our native API or, under `/predictions/<model>/<version>/v1/...`, the OpenAI
API (`cpu_llm.api.routes`); both batching modes serve both.
"""

from __future__ import annotations

import http
import logging
import os
import time
from dataclasses import replace
from typing import Any

import psutil
import torch
from ts.handler_utils.utils import send_intermediate_predict_response
from ts.torch_handler.base_handler import BaseHandler

from cpu_llm import kernels
from cpu_llm.api.responses import Reply
from cpu_llm.api.routes import Router
from cpu_llm.config.serving import check_context_length, parse_serving_config, resolve_threads
from cpu_llm.core.errors import RequestError
from cpu_llm.engine.select import engine_for
from cpu_llm.layers.quantized_linear import parameter_count
from cpu_llm.load.hf import max_positions, resolve_model_source
from cpu_llm.load.pipeline import load_for_serving
from cpu_llm.runner.model_runner import attach_runner
from cpu_llm.serving.continuous import ContinuousSession
from cpu_llm.serving.dynamic import DynamicSession
from cpu_llm.serving.metrics import ServingMetrics
from cpu_llm.serving.shutdown import RETRY_AFTER_S, WorkerDrain

logger = logging.getLogger(__name__)
SHUTTING_DOWN = RequestError("server", "is shutting down and starts no new request; retry (another replica)", 503)


class LLMHandler(BaseHandler):
    """Loads the model at `initialize()` and serves generation requests."""

    def initialize(self, context) -> None:
        started = time.perf_counter()
        self.context = context
        self.manifest = context.manifest
        self.config = parse_serving_config(context.model_yaml_config)
        threads = resolve_threads(self.config)
        torch.set_num_threads(threads)
        kernels.use_isa(self.config.kernel_isa)  # before loading: calibration runs the kernels too
        source = resolve_model_source(self.config.model_path, context.system_properties["model_dir"])
        self.served, self.tokenizer_info = load_for_serving(source, self.config.quantization,
                                                            context.system_properties["model_dir"],
                                                            self.config.continuous_batching)
        check_context_length(self.config, max_positions(self.served))
        attach_runner(self.served, self.config.runner, self.config.batch_size,
                      self.config.max_prompt_tokens + self.config.max_new_tokens, self.config.prefill_chunk_tokens)
        params = parameter_count(self.served.model)
        self.metrics = ServingMetrics(context.metrics)
        self.router = Router(self.manifest.get("model", {}).get("modelName", "model"))
        self.drain = WorkerDrain.from_env()
        continuous = self.config.continuous_batching
        ours = self.served.runner is not None  # the prefix cache and speculation are our runner's
        # A dynamic batch runs to its end: its requests never time out.
        engine = engine_for(self.served, self.tokenizer_info,
                            self.config.request_timeout_s if continuous else float("inf"), self.config)
        self.session = (ContinuousSession(engine, self.config, self.tokenizer_info,
                                          on_finished=self.metrics.finished, on_step=self.metrics.step)
                        if continuous else
                        DynamicSession(engine, self.config, self.tokenizer_info, on_finished=self.metrics.finished,
                                       on_running=self._running))
        logger.info(
            "loaded %s: %.1fM parameters, %d threads, %s batching, prefix cache %s, speculation %s, %.1f s, "
            "RSS %.0f MiB, torch %s, CPU ISA %s, kernels %s",
            source, params / 1e6, threads, "continuous" if continuous else "dynamic",
            "on" if self.config.prefix_cache and ours else "off",
            f"ngram ({self.config.speculative_tokens} tokens while <= {self.config.speculative_max_batch} "
            "requests decode)" if self.config.speculation == "ngram" and ours else "off",
            time.perf_counter() - started, psutil.Process(os.getpid()).memory_info().rss / 2**20,
            torch.__version__, torch.backends.cpu.get_cpu_capability(), kernels.kernel_status(),
        )
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context) -> list[bytes]:
        routes = [self.router.route(context.get_request_header(idx, "url_path"), context.request_ids[idx])
                  for idx in range(len(data))]
        if self.drain.draining():  # graceful shutdown (shutdown.py): finish what runs, start nothing new
            routes = [replace(route.error(SHUTTING_DOWN), headers=(("Retry-After", str(RETRY_AFTER_S)),))
                      if row and not isinstance(route, Reply) else route
                      for route, row in zip(routes, data)]
        if isinstance(self.session, ContinuousSession):
            replies = self.session.handle([(context.request_ids[idx], row, routes[idx])
                                           for idx, row in enumerate(data)])
            self.drain.report(self.session.engine.in_flight)
            # True ends the HTTP response, False sends a chunk, None a complete response (see continuous.py).
            context.stopping_criteria = [(lambda _, stop=None if reply.whole else reply.final: stop)
                                         for reply in replies]
        else:
            replies = self.session.handle(list(zip(data, routes)), lambda chunks: self._send(chunks, context))
        for idx, reply in enumerate(replies):
            context.set_response_content_type(idx, reply.content_type)
            for name, value in reply.headers:
                context.set_response_header(idx, name, value)
            if reply.status != 200:
                context.set_response_status(reply.status, http.HTTPStatus(reply.status).phrase, idx)
        return [reply.body for reply in replies]

    def _running(self, in_flight: int) -> None:
        """A dynamic batch starts (its size) or ends (0): the gauge and the drain's count."""
        if in_flight:
            self.metrics.step(in_flight)
        self.drain.report(in_flight)

    @staticmethod
    def _send(chunks: dict[int, tuple[bytes, str]], context) -> None:
        """Streamed text of a dynamic batch, as TorchServe intermediate responses."""
        for idx, (_, content_type) in chunks.items():
            context.set_response_content_type(idx, content_type)
        send_intermediate_predict_response({idx: body for idx, (body, _) in chunks.items()},
                                           {idx: context.request_ids[idx] for idx in chunks},
                                           "Intermediate Prediction success", 200, context)
