"""Response bodies: the JSON of a finished request, and the JSON lines of a streamed one.

A streamed response is `application/x-ndjson`: one `{"text": ...}` line per chunk of new text,
then a last line with the remaining text plus finish_reason, token counts and timings (the same
fields as a non-streamed response). Concatenating the `text` of every line gives the `text` a
non-streamed request would have received.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..core.errors import RequestError
from ..decode.sequence import GenerationResult, Sequence
from .text_stream import TextStream

JSON = "application/json"
JSON_LINES = "application/x-ndjson"


def summary(result: GenerationResult) -> dict[str, Any]:
    """Everything about a finished request except its text."""
    decode_s = result.decode_ms / 1000
    return {
        "finish_reason": result.finish_reason,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "batch_size": result.batch_size,
        "timings": {
            "queue_ms": round(result.queue_ms, 1),
            "prefill_ms": round(result.prefill_ms, 1),
            # Prompt tokens whose keys and values came from the prefix cache instead of the prefill.
            "cached_prompt_tokens": result.cached_prompt_tokens,
            # Speculative decoding: tokens drafted and verified, and those kept.
            "draft_tokens": result.draft_tokens,
            "accepted_draft_tokens": result.accepted_draft_tokens,
            "time_to_first_token_ms": round(result.time_to_first_token_ms, 1),
            "decode_ms": round(result.decode_ms, 1),
            "total_ms": round(result.total_ms, 1),
            # The first token comes out of prefill; the rest are decode steps.
            "decode_tokens_per_s": (
                round((result.completion_tokens - 1) / decode_s, 2)
                if result.completion_tokens > 1 and decode_s > 0 else None
            ),
        },
    }


def response_body(result: GenerationResult) -> dict[str, Any]:
    """The body of a non-streamed response."""
    return {"text": result.text, **summary(result)}


def text_line(piece: str) -> bytes:
    return _line({"text": piece})


def last_line(piece: str, result: GenerationResult) -> bytes:
    return _line({"text": piece, **summary(result)})


def _line(payload: dict[str, Any]) -> bytes:
    return (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")


@dataclass(frozen=True)
class Reply:
    """One request's part of a `handle()` return: a whole response, or one chunk of a stream."""

    body: bytes
    final: bool = True
    status: int = 200
    content_type: str = JSON
    # Continuous batching only: send `body` as one complete HTTP response now, although the
    # frontend keeps the request in flight (see continuous.py).
    whole: bool = False
    headers: tuple[tuple[str, str], ...] = ()  # extra HTTP headers (Retry-After of a 503)


def error_reply(error: RequestError) -> Reply:
    return Reply(json.dumps(error.to_json()).encode("utf-8"), status=error.status)


def finished_reply(seq: Sequence, stream: TextStream | None) -> Reply:
    """The last reply of a finished request: the whole JSON body, or the stream's last line."""
    result = seq.result()
    if stream is not None:
        return Reply(last_line(stream.next_piece(seq), result), content_type=JSON_LINES)
    return Reply(json.dumps(response_body(result), ensure_ascii=False).encode("utf-8"))
