"""The request schema: JSON body -> validated `GenerationRequest`, or a `RequestError`.

Every problem is reported as HTTP 400 with a JSON body naming the field, so a client can
fix its request without reading server logs. Unknown fields are errors too: a typo such as
`max_tokens` must not silently fall back to a default.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from ..config.serving import ServingConfig
from ..core.errors import RequestError
from ..core.params import GenerationRequest, SamplingParams

CHAT_ROLES = ("system", "user", "assistant")
MAX_SEED = 2**63 - 1


JSON_HINT = 'send a JSON object with Content-Type: application/json, such as {"prompt": "Hi"}'


def request_body(row: Mapping[str, Any]) -> Any:
    """The body of a new request from TorchServe's parameters for it, or a RequestError saying what to send.

    TorchServe puts a JSON or raw body under "body" ("data" for some clients). It splits a
    form-encoded or multipart body into one parameter per field, and an empty body gives no
    parameter at all. Neither is a JSON object, and each must get a 400, in both batching modes."""
    for key in ("body", "data"):
        if key in row:
            return row[key]
    if row:
        fields = ", ".join(sorted(str(name) for name in row)[:5])
        raise RequestError("body", f"arrived as form fields ({fields}), not JSON: {JSON_HINT}")
    raise RequestError("body", f"is empty: {JSON_HINT}")


def decode_body(body: Any) -> Mapping[str, Any]:
    """TorchServe hands us a dict (already parsed JSON), bytes or str: return a JSON object."""
    if isinstance(body, (bytes, bytearray)):
        try:
            body = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError("body", f"is not valid UTF-8 ({exc.reason})") from None
    if isinstance(body, str):
        if not body.strip():
            raise RequestError("body", f"is empty: {JSON_HINT}")
        try:
            body = json.loads(body)
        except json.JSONDecodeError as exc:
            raise RequestError("body", f"is not valid JSON: {exc.msg} at position {exc.pos}") from None
        except ValueError as exc:  # e.g. an integer of more than 4,300 digits (Python's conversion limit)
            raise RequestError("body", f"is not acceptable JSON: {exc}") from None
        except RecursionError:
            raise RequestError("body", "is nested too deeply") from None
    if not isinstance(body, Mapping):
        raise RequestError("body", f"must be a JSON object, got {type(body).__name__}")
    try:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"), which no tokenizer accepts: refuse it
        # here, or it would fail the tokenizer call and with it every request of the batch.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError("body", "contains a lone UTF-16 surrogate escape (\\ud800-\\udfff): not valid text") from None
    except RecursionError:
        raise RequestError("body", "is nested too deeply") from None
    return body


def _short(value: int | float) -> str:
    """A number for an error message: a 5,000-digit integer would not even convert to text."""
    return f"{value:.6g}" if isinstance(value, float) else (str(value) if abs(value) < 10**30 else "a huge integer")


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float,
            low_inclusive: bool = True) -> float:
    value = body.get(name, default)
    # isfinite() of an integer too large for a float raises OverflowError: test floats only.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float)
                                                                          and not math.isfinite(value)):
        raise RequestError(name, f"must be a number, got {json.dumps(value)[:40]}")
    too_low = value < low if low_inclusive else value <= low
    if too_low or value > high:
        bracket = "[" if low_inclusive else "("
        raise RequestError(name, f"must be in {bracket}{low}, {high}], got {_short(value)}")
    return float(value)


def _integer(body: Mapping[str, Any], name: str, default: int | None, low: int, high: int) -> int | None:
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(name, f"must be an integer, got {json.dumps(value)}")
    if not low <= value <= high:
        raise RequestError(name, f"must be between {low} and {high}, got {value}")
    return value


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise RequestError(name, f"must be true or false, got {json.dumps(value)}")
    return value


def _messages(value: Any) -> tuple[Mapping[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise RequestError("messages", "must be a non-empty list of {role, content} objects")
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, Mapping):
            raise RequestError(where, "must be an object with 'role' and 'content'")
        extra = set(message) - {"role", "content"}
        if extra:
            raise RequestError(f"{where}.{sorted(extra)[0]}", "unknown field")
        if message.get("role") not in CHAT_ROLES:
            raise RequestError(f"{where}.role", f"must be one of {list(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"{where}.content", "must be a string")
    return tuple(dict(m) for m in value)


def _stop(value: Any, limit: int) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise RequestError("stop", "must be a list of non-empty strings")
    if len(value) > limit:
        raise RequestError("stop", f"at most {limit} stop strings are allowed, got {len(value)}")
    return tuple(value)


KNOWN_FIELDS = {
    "prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k",
    "do_sample", "seed", "stop", "repetition_penalty", "stream", "min_new_tokens", "ignore_eos",
    "presence_penalty", "frequency_penalty",
}


def parse_request(body: Any, config: ServingConfig) -> GenerationRequest:
    """Validate one request body against the schema and the server's limits."""
    body = decode_body(body)
    unknown = sorted(set(body) - KNOWN_FIELDS)
    if unknown:
        raise RequestError(unknown[0], f"unknown field; allowed fields are {sorted(KNOWN_FIELDS)}")

    has_prompt, has_messages = "prompt" in body, "messages" in body
    if has_prompt == has_messages:
        raise RequestError("prompt", "send exactly one of 'prompt' or 'messages'")
    prompt = messages = None
    if has_prompt:
        prompt = body["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise RequestError("prompt", "must be a non-empty string")
    else:
        messages = _messages(body["messages"])

    do_sample = _boolean(body, "do_sample")
    temperature = _number(body, "temperature", 1.0, 0.0, 100.0)
    if do_sample and temperature == 0.0:
        raise RequestError("temperature", "must be > 0 when do_sample is true (use do_sample: false for greedy)")
    sampling = SamplingParams(
        do_sample=do_sample,
        temperature=temperature,
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_inclusive=False),
        top_k=_integer(body, "top_k", 0, 0, 1_000_000),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_inclusive=False),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        seed=_integer(body, "seed", None, 0, MAX_SEED),
    )
    max_new_tokens = _integer(body, "max_new_tokens", config.default_max_new_tokens, 1, config.max_new_tokens)
    return GenerationRequest(
        prompt=prompt,
        messages=messages,
        max_new_tokens=max_new_tokens,
        min_new_tokens=_integer(body, "min_new_tokens", 0, 0, max_new_tokens),
        ignore_eos=_boolean(body, "ignore_eos"),
        sampling=sampling,
        stop=_stop(body.get("stop"), config.max_stop_sequences),
        stream=_boolean(body, "stream"),
    )
