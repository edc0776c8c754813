"""Dynamic batching: each `handle()` call generates one batch of requests from start to end, on the
same engine that continuous batching steps (engine.base.Engine.generate).

Each request is validated on its own (a bad one gets its 400, the others are generated); a
streaming request gets its text as it is generated through `send`, TorchServe's intermediate
responses in the handler. Knows nothing of TorchServe's objects, so it is tested directly."""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping

from ..api.responses import Reply
from ..api.routes import Api
from ..api.text_stream import TextStream
from ..config.serving import ServingConfig
from ..core.errors import RequestError
from ..core.params import TokenizerInfo
from ..decode.sequence import Sequence
from ..engine.base import Engine
from .intake import admit

# The chunks to send now: request index -> (body, content type).
Send = Callable[[dict[int, tuple[bytes, str]]], None]


class DynamicSession:
    """Per-worker state for dynamic batching: the engine and the callbacks around one batch."""

    def __init__(self, engine: Engine, config: ServingConfig, info: TokenizerInfo,
                 on_finished: Callable[[Sequence], None] = lambda seq: None,
                 on_running: Callable[[int], None] = lambda in_flight: None) -> None:
        self.engine, self.config, self.info = engine, config, info
        self.on_finished, self.on_running = on_finished, on_running

    def handle(self, batch: list[tuple[Mapping[str, Any], Api | Reply]], send: Send) -> list[Reply]:
        """`batch`: (TorchServe's parameters, route) per request; returns one reply per request."""
        arrived = time.perf_counter()
        replies: list[Reply | None] = [route if isinstance(route, Reply) else None for _, route in batch]
        valid: dict[int, Sequence] = {}
        apis = {idx: route for idx, (_, route) in enumerate(batch) if not isinstance(route, Reply)}
        for idx, api in apis.items():
            try:
                valid[idx] = admit(batch[idx][0], api, self.config, self.info, arrived)
            except RequestError as error:
                replies[idx] = api.error(error)
        streams = {idx: TextStream() for idx, seq in valid.items() if seq.request.stream}

        def send_new_text(_: list[Sequence]) -> None:
            chunks = {idx: apis[idx].chunk(stream.next_piece(valid[idx]))
                      for idx, stream in streams.items() if not valid[idx].done}
            chunks = {idx: (chunk, apis[idx].content_type(True)) for idx, chunk in chunks.items() if chunk}
            if chunks:
                send(chunks)

        if valid:
            self.on_running(len(valid))
            try:
                self.engine.generate(list(valid.values()), on_step=send_new_text if streams else None)
            finally:
                self.on_running(0)
        for idx, seq in valid.items():
            self.on_finished(seq)
            replies[idx] = apis[idx].finished(seq, streams.get(idx))
        return replies
