"""TorchServe handler for causal LMs on CPU: thin glue between TorchServe and `cpu_llm`.

TorchServe allows a single class per handler module, so all logic lives in the `cpu_llm`
package shipped next to this file in the model archive. Two batching modes, chosen by the
model-config's `continuousBatching` key:
- dynamic batching (default): each `handle()` call generates one batch from start to end;
  streaming requests get their text through intermediate responses as it is generated;
- continuous batching: each `handle()` call is one decode step of every in-flight request
  (`cpu_llm.serving.continuous`), so requests join and leave the running batch between steps.
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

from cpu_llm.config import check_context_length, parse_serving_config, resolve_threads
from cpu_llm.serving.continuous import ContinuousSession
from cpu_llm.engine.hf_engine import ContinuousEngine
from cpu_llm.engine.generation import Sequence
from cpu_llm.model import encode_prompt, max_positions, resolve_model_source
from cpu_llm.quant.quantize import load_for_serving
from cpu_llm.quant.quantized_linear import parameter_count
from cpu_llm.api.request import RequestError, request_body
from cpu_llm.api.responses import Reply
from cpu_llm.api.routes import Api, Router
from cpu_llm.runner.model_runner import attach_runner
from cpu_llm.runner.slot_engine import SlotEngine
from cpu_llm.serving.serving_metrics import ServingMetrics
from cpu_llm.serving.shutdown import RETRY_AFTER_S, WorkerDrain
from cpu_llm.api.text_stream import TextStream

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
        self.session = None
        self.drain = WorkerDrain.from_env()
        if self.config.continuous_batching:
            engine = (SlotEngine(self.served.runner, self.tokenizer_info, self.config.request_timeout_s)
                      if self.served.runner is not None
                      else ContinuousEngine(self.served.model, self.tokenizer_info, self.config.request_timeout_s))
            self.session = ContinuousSession(engine, self.config, self.tokenizer_info, on_finished=self.metrics.finished,
                                             on_step=self.metrics.step)
        logger.info(
            "loaded %s: %.1fM parameters, %d threads, %s batching, %.1f s, RSS %.0f MiB, torch %s, CPU ISA %s",
            source, params / 1e6, threads, "continuous" if self.session else "dynamic",
            time.perf_counter() - started, psutil.Process(os.getpid()).memory_info().rss / 2**20,
            torch.__version__, torch.backends.cpu.get_cpu_capability(),
        )
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context) -> list[bytes]:
        routes = [self.router.route(context.get_request_header(idx, "url_path"), context.request_ids[idx])
                  for idx in range(len(data))]
        if self.drain.draining():  # graceful shutdown (shutdown.py): finish what runs, start nothing new
            routes = [replace(route.error(SHUTTING_DOWN), headers=(("Retry-After", str(RETRY_AFTER_S)),))
                      if row and not isinstance(route, Reply) else route
                      for route, row in zip(routes, data)]
        if self.session is not None:
            replies = self.session.handle([(context.request_ids[idx], row, routes[idx])
                                           for idx, row in enumerate(data)])
            self.drain.report(self.session.engine.in_flight)
            # True ends the HTTP response, False sends a chunk, None a complete response (see continuous.py).
            context.stopping_criteria = [(lambda _, stop=None if reply.whole else reply.final: stop)
                                         for reply in replies]
        else:
            replies = self._generate_batch(data, routes, context)
        for idx, reply in enumerate(replies):
            context.set_response_content_type(idx, reply.content_type)
            for name, value in reply.headers:
                context.set_response_header(idx, name, value)
            if reply.status != 200:
                context.set_response_status(reply.status, http.HTTPStatus(reply.status).phrase, idx)
        return [reply.body for reply in replies]

    def _generate_batch(self, data: list[dict[str, Any]], routes: list[Api | Reply], context) -> list[Reply]:
        """Dynamic batching: validate each request on its own, generate the valid ones together
        (one at a time when the model is not batch-invariant: IPEX SmoothQuant)."""
        arrived = time.perf_counter()
        replies: list[Reply | None] = [route if isinstance(route, Reply) else None for route in routes]
        valid: dict[int, Sequence] = {}
        apis: dict[int, Api] = {idx: route for idx, route in enumerate(routes) if not isinstance(route, Reply)}
        for idx, api in apis.items():
            try:
                request = api.parse(request_body(data[idx]), self.config)
                ids = encode_prompt(self.tokenizer_info.tokenizer, request, self.config.max_prompt_tokens)
                valid[idx] = Sequence.start(request, ids, arrived)
            except RequestError as error:
                replies[idx] = api.error(error)
        streams = {idx: TextStream() for idx, seq in valid.items() if seq.request.stream}

        def send_new_text(_: list[Sequence]) -> None:
            chunks = {idx: apis[idx].chunk(stream.next_piece(valid[idx], self.tokenizer_info))
                      for idx, stream in streams.items() if not valid[idx].done}
            chunks = {idx: chunk for idx, chunk in chunks.items() if chunk}
            if chunks:
                for idx in chunks:
                    context.set_response_content_type(idx, apis[idx].content_type(True))
                send_intermediate_predict_response(chunks, {idx: context.request_ids[idx] for idx in chunks},
                                                   "Intermediate Prediction success", 200, context)

        if valid:
            self.metrics.step(len(valid))
            self.drain.report(len(valid))
            try:
                self.served.generate(self.tokenizer_info, list(valid.values()),
                                     on_step=send_new_text if streams else None)
            finally:
                self.drain.report(0)
        for idx, seq in valid.items():
            self.metrics.finished(seq)
            replies[idx] = apis[idx].finished(seq, streams.get(idx), self.tokenizer_info)
        return replies

