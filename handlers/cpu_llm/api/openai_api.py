"""The OpenAI API (`v1/completions`, `v1/chat/completions`, `v1/models`) on top of our own.

An OpenAI body is translated into a native body and validated by `request.parse_request`, so
both APIs share one set of limits and checks; errors are renamed back to the OpenAI field the
client sent. Fields we cannot honour (n > 1, penalties, logprobs, ...) are refused with HTTP 400
instead of being ignored, because a client that asked for them would otherwise get a different
result than it expects without knowing. Responses and Server-Sent-Event chunks follow OpenAI's
shapes; concatenating the chunks' text gives the non-streamed text (`text_stream.TextStream`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..config.serving import ServingConfig
from ..core.errors import RequestError
from ..core.params import GenerationRequest
from ..decode.sequence import GenerationResult, Sequence
from .request import decode_body, parse_request
from .responses import JSON, Reply
from .text_stream import TextStream

logger = logging.getLogger(__name__)
EVENT_STREAM = "text/event-stream"
DONE = b"data: [DONE]\n\n"
OWNER = "torchserve-llm-cpu"
# Our finish reasons -> OpenAI's. A request cut by handler.request_timeout_s was truncated by a
# server limit, which OpenAI clients understand as "length".
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "timeout": "length"}
# Fields accepted only at their default values (compared with ==; null counts as absent), with
# what a client should know.
DEFAULT_ONLY = {
    "n": ((1,), "only n=1 is supported; send several requests (they are batched server-side)"),
    "logit_bias": (({},), "is not implemented; only {} is accepted"),
}
COMPLETIONS_DEFAULT_ONLY = {
    "logprobs": ((), "is not implemented; omit it or send null"),
    "echo": ((False,), "is not implemented; only false is accepted"),
    "best_of": ((1,), "only best_of=1 is supported"),
    "suffix": (("",), "is not implemented; omit it"),
}
CHAT_DEFAULT_ONLY = {
    "logprobs": ((False,), "is not implemented; only false is accepted"),
    "top_logprobs": ((0,), "is not implemented; only 0 is accepted"),
    "response_format": (({"type": "text"},), "only {\"type\": \"text\"} is supported"),
}
# Accepted and passed on: OpenAI's own fields, and the extensions vLLM and others also accept.
PASSED_ON = {"temperature", "top_p", "seed", "stop", "stream", "top_k", "ignore_eos", "repetition_penalty",
             "presence_penalty", "frequency_penalty"}
# Accepted and ignored, logged once each: they change no token on a self-hosted server (OpenAI's
# stored completions, request tags, its tiers; how several tool calls may be made, without tools),
# and agent SDKs and proxies send them, as vLLM accepts them.
NO_EFFECT = {"store", "metadata", "service_tier", "parallel_tool_calls"}
ACCEPTED = PASSED_ON | NO_EFFECT | {"model", "user", "max_tokens", "min_tokens", "stream_options"}
# vLLM's continuous_usage_stats (usage in every chunk, sent by guidellm) is accepted and ignored:
# it changes no generated token, and the usage still comes in the last chunk.
STREAM_OPTIONS = {"include_usage", "continuous_usage_stats"}
_NOTED: set[str] = set()  # the NO_EFFECT fields already logged by this worker
NATIVE_NAMES = {"min_new_tokens": "min_tokens"}  # native field -> OpenAI field, for error messages


@dataclass
class OpenAIApi:
    """One OpenAI request: parses its body and formats its replies (`kind` is "chat" or "text")."""

    kind: str
    model: str
    request_id: str
    created: int = field(default_factory=lambda: int(time.time()))
    include_usage: bool = False
    role_sent: bool = False  # chat streams announce the assistant role in their first chunk

    def parse(self, body: Any, config: ServingConfig) -> GenerationRequest:
        native, self.include_usage, max_name = to_native(decode_body(body), self.kind)
        try:
            return parse_request(native, config)
        except RequestError as error:
            name = {**NATIVE_NAMES, "max_new_tokens": max_name}.get(error.field, error.field)
            raise RequestError(name, error.message, error.status) from None

    def content_type(self, stream: bool) -> str:
        return EVENT_STREAM if stream else JSON

    def chunk(self, piece: str) -> bytes:
        """One SSE event carrying new text (nothing when there is none)."""
        return self._event(self._choice(piece, None)) if piece else b""

    def finished(self, seq: Sequence, stream: TextStream | None) -> Reply:
        """The whole response, or the stream's last events: rest of the text, finish, usage, [DONE]."""
        result = seq.result()
        reason = FINISH_REASONS[result.finish_reason]
        if stream is None:
            body = {**self._header(""), "choices": [self._choice(result.text, reason, whole=True)],
                    "usage": usage(result)}
            return Reply(json.dumps(body, ensure_ascii=False).encode("utf-8"))
        events = self.chunk(stream.next_piece(seq)) + self._event(self._choice("", reason))
        if self.include_usage:
            events += self._event(None, usage(result))
        return Reply(events + DONE, content_type=EVENT_STREAM)

    def error(self, error: RequestError) -> Reply:
        return error_reply(error)

    def _header(self, suffix: str) -> dict[str, Any]:
        prefix, obj = ("chatcmpl", "chat.completion") if self.kind == "chat" else ("cmpl", "text_completion")
        return {"id": f"{prefix}-{self.request_id}", "object": obj + suffix, "created": self.created,
                "model": self.model}

    def _choice(self, text: str, reason: str | None, whole: bool = False) -> dict[str, Any]:
        if self.kind == "text":
            content: dict[str, Any] = {"text": text}
        elif whole:
            content = {"message": {"role": "assistant", "content": text}}
        else:
            delta = {"content": text} if text else {}
            if not self.role_sent:
                delta, self.role_sent = {"role": "assistant", **delta}, True
            content = {"delta": delta}
        return {"index": 0, **content, "logprobs": None, "finish_reason": reason}

    def _event(self, choice: dict[str, Any] | None, final_usage: dict[str, int] | None = None) -> bytes:
        """`data: {chunk}`; with include_usage every chunk has `usage` (null but in the last one)."""
        payload = {**self._header(".chunk" if self.kind == "chat" else ""),
                   "choices": [] if choice is None else [choice]}
        if self.include_usage:
            payload["usage"] = final_usage
        return b"data: " + json.dumps(payload, ensure_ascii=False).encode("utf-8") + b"\n\n"


def to_native(body: Mapping[str, Any], kind: str) -> tuple[dict[str, Any], bool, str]:
    """OpenAI body -> (native body, include_usage, the name the client gave max_new_tokens).

    A null field counts as absent, as OpenAI clients send explicit nulls for unset options."""
    body = {key: value for key, value in body.items() if value is not None}
    refused = {**DEFAULT_ONLY, **(CHAT_DEFAULT_ONLY if kind == "chat" else COMPLETIONS_DEFAULT_ONLY)}
    main = "messages" if kind == "chat" else "prompt"
    allowed = ACCEPTED | set(refused) | {main} | ({"max_completion_tokens"} if kind == "chat" else set())
    for name in sorted(body):
        if name not in allowed:
            raise RequestError(name, f"is not supported by this server; supported fields are {sorted(allowed)}")
        if name in refused and body[name] not in refused[name][0]:
            raise RequestError(name, f"{refused[name][1]}, got {json.dumps(body[name])}")
    for name in sorted(NO_EFFECT & set(body) - _NOTED):
        _NOTED.add(name)
        logger.info("OpenAI field %s accepted and ignored: it changes nothing on this server (logged once)", name)
    for name in ("model", "user"):
        if name in body and not isinstance(body[name], str):
            raise RequestError(name, f"must be a string, got {json.dumps(body[name])}")
    if main not in body:
        raise RequestError(main, "is required")
    native = {key: body[key] for key in PASSED_ON & set(body)}
    native[main] = _messages(body[main]) if kind == "chat" else _prompt(body[main])
    if isinstance(native.get("stop"), str):
        native["stop"] = [native["stop"]]
    # OpenAI samples at temperature 1 unless told otherwise; temperature 0 means greedy.
    temperature = native.get("temperature", 1.0)
    native["do_sample"] = temperature != 0
    if not native["do_sample"]:
        del native["temperature"]
    if "min_tokens" in body:
        native["min_new_tokens"] = body["min_tokens"]
    given = [name for name in ("max_completion_tokens", "max_tokens") if name in body]
    if len(given) > 1:
        raise RequestError("max_tokens", "send only one of max_tokens / max_completion_tokens")
    if given:
        native["max_new_tokens"] = body[given[0]]
    return native, _include_usage(body), (given or ["max_tokens"])[0]


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if body.get("stream") is not True:
        raise RequestError("stream_options", "is only allowed when stream is true")
    if not isinstance(options, Mapping) or set(options) - STREAM_OPTIONS:
        raise RequestError("stream_options", f"must be an object with only {sorted(STREAM_OPTIONS)}")
    for name, value in options.items():
        if not isinstance(value, bool):
            raise RequestError(f"stream_options.{name}", f"must be true or false, got {json.dumps(value)}")
    return options.get("include_usage", False)


def _prompt(value: Any) -> Any:
    """A string, or a list holding exactly one string (what some clients send)."""
    if isinstance(value, list):
        if len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if value and all(isinstance(item, str) for item in value):
            raise RequestError("prompt", "one prompt per request: send several requests (they are batched server-side)")
        raise RequestError("prompt", "must be a string (token-id prompts are not supported)")
    return value  # parse_request checks the rest


def _messages(value: Any) -> Any:
    """Content as a list of text parts is joined into one string; role 'developer' is 'system'."""
    if not isinstance(value, list):
        return value  # parse_request names the problem
    messages = []
    for i, message in enumerate(value):
        if isinstance(message, Mapping):
            message = dict(message)
            if message.get("role") == "developer":
                message["role"] = "system"
            if isinstance(message.get("content"), list):
                message["content"] = _text_parts(message["content"], f"messages[{i}].content")
        messages.append(message)
    return messages


def _text_parts(parts: list[Any], where: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}[{j}]", "only {\"type\": \"text\", \"text\": \"...\"} parts are supported")
        texts.append(part["text"])
    return "".join(texts)


def usage(result: GenerationResult) -> dict[str, Any]:
    """Token counts; `prompt_tokens_details.cached_tokens` as OpenAI reports its prompt caching."""
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens}}


def error_body(message: str, param: str | None, status: int) -> dict[str, Any]:
    kind = {404: "not_found_error"}.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def error_reply(error: RequestError) -> Reply:
    """OpenAI's error shape; the message starts with the field, as in our native errors."""
    body = error_body(f"{error.field}: {error.message}", error.field, error.status)
    return Reply(json.dumps(body).encode("utf-8"), status=error.status)


def models_reply(model: str, created: int) -> Reply:
    body = {"object": "list", "data": [{"id": model, "object": "model", "created": created, "owned_by": OWNER}]}
    return Reply(json.dumps(body).encode("utf-8"))


def health_reply() -> Reply:
    """`health` answers 200 once the worker is up, as vLLM's does (benchmark tools probe it)."""
    return Reply(b"{}")


def not_found_reply(path: str) -> Reply:
    body = error_body(f"no such endpoint: {path}; this server has v1/completions, v1/chat/completions, "
                      "v1/models and health", None, 404)
    return Reply(json.dumps(body).encode("utf-8"), status=404)
