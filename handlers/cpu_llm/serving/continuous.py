"""TorchServe's `continuousBatching` protocol around an engine (engine.base.Engine).

With `continuousBatching: true` the frontend calls `handle()` again and again with every
in-flight request: a new one carries its parameters (its body), a running one comes back with
none, and one whose client disconnected is simply no longer sent. A new request with an empty
body also comes with no parameters: it is told apart from a running one by its id, which the
engine does not know. Each call must return one reply per request; a reply marked `final` ends
that request's HTTP response, any other is sent as one chunk of it (an empty chunk sends nothing).
This module maps that protocol onto the engine and knows nothing of TorchServe's objects, so it is
tested directly.

Two TorchServe 0.12 quirks shape it. If a request's *first* reply is final, the frontend writes
the body without the HTTP status line and headers, so a completion that ends in its first call
(one token, or EOS at once) gets an empty non-final reply and its body on the next call. And a
first chunk with an error status makes the frontend close the connection right after the
headers, losing the body; so a rejected request is sent as one complete HTTP response (a `whole`
reply, which the frontend sends unchunked but still counts as in flight) and its next call is
answered with an empty final reply that ends it. A route that needs no generation (the OpenAI
model list, an unknown path) is answered the same way.
"""

from __future__ import annotations

import time
from dataclasses import replace
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


class ContinuousSession:
    """Per-worker state across `handle()` calls: the engine, and what each client was sent."""

    def __init__(self, engine: Engine, config: ServingConfig, info: TokenizerInfo,
                 on_finished: Callable[[Sequence], None] = lambda seq: None,
                 on_step: Callable[[int, int], None] = lambda in_flight, cancelled: None) -> None:
        self.engine, self.config, self.info = engine, config, info
        self.on_finished, self.on_step = on_finished, on_step
        self.streams: dict[str, TextStream] = {}  # streaming requests: text sent so far
        self.apis: dict[str, Api] = {}  # the API each running request speaks
        self.pending: dict[str, Reply] = {}  # final replies held back one call (see module docstring)

    def handle(self, batch: list[tuple[str, Mapping[str, Any], Api | Reply]]) -> list[Reply]:
        """`batch`: (request id, TorchServe's parameters, route) per in-flight request, the
        parameters empty for a running one; the route (routes.py) is an `Api`, or a `Reply` to
        send instead of generating."""
        arrived = time.perf_counter()
        present = {rid for rid, _, _ in batch}
        self.pending = {rid: reply for rid, reply in self.pending.items() if rid in present}
        self.streams = {rid: stream for rid, stream in self.streams.items() if rid in present}
        self.apis = {rid: api for rid, api in self.apis.items() if rid in present}
        replies: dict[str, Reply] = {}
        new: dict[str, Sequence] = {}
        wanted: set[str] = set()
        for rid, row, route in batch:
            if rid in self.pending:
                replies[rid] = self.pending.pop(rid)
            elif isinstance(route, Reply):
                replies[rid] = self._whole(rid, route)
            elif not row and rid in self.engine.seqs:
                wanted.add(rid)
            else:
                try:
                    new[rid] = admit(row, route, self.config, self.info, arrived)
                except RequestError as error:
                    replies[rid] = self._whole(rid, route.error(error))
                    continue
                self.apis[rid] = route
                if new[rid].request.stream:
                    self.streams[rid] = TextStream()
        if new or wanted or self.engine.in_flight:
            touched, cancelled = self.engine.step(new, wanted)
            self._more_steps(touched, arrived)
            self.on_step(self.engine.in_flight, cancelled)
            for rid, seq in touched.items():
                replies[rid] = self._reply(rid, seq, first=rid in new)
        return [replies[rid] for rid, _, _ in batch]

    def _more_steps(self, touched: dict[str, Sequence], arrived: float) -> None:
        """Keep decoding within this call for `steps_per_call_ms`, until a request finishes.

        Each call costs a round trip through TorchServe's frontend, and on a small model that is
        a large share of a step. A streaming client gets the steps' text in one chunk; a new
        request waits at most this long to join the batch."""
        budget_s = self.config.steps_per_call_ms / 1000
        while (self.engine.in_flight and not any(seq.done for seq in touched.values())
               and time.perf_counter() - arrived < budget_s):
            self.engine.step({}, set(self.engine.seqs))

    def _whole(self, rid: str, reply: Reply) -> Reply:
        """Send `reply` as one complete HTTP response now; end the request on the next call."""
        self.pending[rid] = Reply(b"", status=reply.status)
        return replace(reply, final=False, whole=True)

    def _reply(self, rid: str, seq: Sequence, first: bool) -> Reply:
        stream, api = self.streams.get(rid), self.apis[rid]
        content_type = api.content_type(stream is not None)
        if not seq.done:
            body = api.chunk(stream.next_piece(seq)) if stream else b""
            return Reply(body, final=False, content_type=content_type)
        self.on_finished(seq)
        final = api.finished(seq, self.streams.pop(rid, None))
        if first:
            self.pending[rid] = final
            return Reply(b"", final=False, content_type=content_type)
        return final
