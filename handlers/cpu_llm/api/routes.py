"""Which API a request speaks, from the path TorchServe hands over as the `url_path` header.

TorchServe 0.12 passes whatever follows `/predictions/<model>/<version>/` to the handler as the
request header `url_path` (empty without a version segment). An empty path is our native API;
`v1/...` paths (and `health`, which benchmark tools probe) are the OpenAI API. A route is either an `Api` (the request is generated; the Api
parses its body and formats its replies) or a `Reply` to send at once (model list, unknown path).
Both batching modes go through the same `Api` methods, so neither knows which API it serves.
"""

from __future__ import annotations

import time
from typing import Any, Protocol

from ..config.serving import ServingConfig
from ..core.errors import RequestError
from ..core.params import GenerationRequest
from ..decode.sequence import Sequence
from .openai_api import OpenAIApi, health_reply, models_reply, not_found_reply
from .request import parse_request
from .responses import JSON, JSON_LINES, Reply, error_reply, finished_reply, text_line
from .text_stream import TextStream


class Api(Protocol):
    """How one generation request is parsed and answered."""

    def parse(self, body: Any, config: ServingConfig) -> GenerationRequest: ...

    def content_type(self, stream: bool) -> str: ...

    def chunk(self, piece: str) -> bytes: ...

    def finished(self, seq: Sequence, stream: TextStream | None) -> Reply: ...

    def error(self, error: RequestError) -> Reply: ...


class NativeApi:
    """Our own JSON API (README, "Request and response"); stateless, so one instance serves all."""

    def parse(self, body: Any, config: ServingConfig) -> GenerationRequest:
        return parse_request(body, config)

    def content_type(self, stream: bool) -> str:
        return JSON_LINES if stream else JSON

    def chunk(self, piece: str) -> bytes:
        return text_line(piece) if piece else b""

    def finished(self, seq: Sequence, stream: TextStream | None) -> Reply:
        return finished_reply(seq, stream)

    def error(self, error: RequestError) -> Reply:
        return error_reply(error)


NATIVE = NativeApi()
OPENAI_KINDS = {"v1/completions": "text", "v1/chat/completions": "chat"}


class Router:
    """Routes the requests of one served model (its name appears in OpenAI responses)."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.created = int(time.time())

    def route(self, url_path: str | None, request_id: str) -> Api | Reply:
        path = (url_path or "").strip("/")
        if not path:
            return NATIVE
        if path in OPENAI_KINDS:
            return OpenAIApi(OPENAI_KINDS[path], self.model, request_id)
        if path == "v1/models":
            return models_reply(self.model, self.created)
        if path == "health":
            return health_reply()
        return not_found_reply(path)
