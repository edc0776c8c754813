"""The one intake of both batching modes: TorchServe's parameters for a new request, through its
API's parser and the tokenizer, into a `Sequence` the engine can run (or a RequestError)."""

from __future__ import annotations

from typing import Any, Mapping

from ..api.prompt import encode_prompt
from ..api.request import request_body
from ..api.routes import Api
from ..config.serving import ServingConfig
from ..core.params import TokenizerInfo
from ..decode.sequence import Sequence


def admit(row: Mapping[str, Any], api: Api, config: ServingConfig, info: TokenizerInfo, arrived: float) -> Sequence:
    """The sequence for a new request that arrived at `arrived` (time.perf_counter())."""
    request = api.parse(request_body(row), config)
    return Sequence.start(request, encode_prompt(info.tokenizer, request, config.max_prompt_tokens), arrived)
