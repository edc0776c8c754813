"""Property tests of the request parsers (native and OpenAI): whatever a client sends, the
outcome is a valid request or a RequestError naming a field (an HTTP 4xx), never another
exception (which TorchServe would turn into a 5xx for the whole batch)."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cpu_llm.api.openai_api import ACCEPTED, CHAT_DEFAULT_ONLY, COMPLETIONS_DEFAULT_ONLY, DEFAULT_ONLY, OpenAIApi
from cpu_llm.api.request import KNOWN_FIELDS, parse_request
from cpu_llm.config.serving import ServingConfig
from cpu_llm.core.errors import RequestError
from cpu_llm.core.params import GenerationRequest

CONFIG = ServingConfig()
PROPERTIES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(10**40), max_value=10**40),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
    st.sampled_from(["\ud800", "a\udfffb", "", " ", "\x00", "🦙"]),
)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=12), inner, max_size=4)), max_leaves=20)
messages = st.lists(st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]), "content": json_values}),
    json_values), max_size=3)


def bodies(field_names: set[str]) -> st.SearchStrategy:
    """Objects whose keys are mostly real field names (so validation goes deep), with any values."""
    keys = st.one_of(st.sampled_from(sorted(field_names)), st.text(max_size=12))
    others = {k: json_values for k in sorted(field_names - {"prompt", "messages"})}
    return st.one_of(
        st.dictionaries(keys, json_values, max_size=8),
        st.fixed_dictionaries({"prompt": json_values}, optional=others),
        st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=20)}, optional=others),
        st.fixed_dictionaries({"messages": messages}, optional=others),
    )


def raw_bodies(field_names: set[str]) -> st.SearchStrategy:
    """What arrives on the wire: any bytes, any JSON, JSON text with unpaired surrogate escapes,
    huge numbers, deep nesting."""
    encoded = bodies(field_names).map(lambda b: json.dumps(b, ensure_ascii=True).encode())
    escapes = st.tuples(st.sampled_from(sorted(field_names)), st.sampled_from(["\\ud800", "\\udfff", "\\u0000", "\\x"])).map(
        lambda kv: f'{{"{kv[0]}": "a{kv[1]}b"}}'.encode())
    huge = st.sampled_from(sorted(field_names)).map(lambda k: f'{{"prompt": "hi", "{k}": 1{"0" * 5000}}}'.encode())
    nested = st.integers(min_value=1, max_value=50_000).map(lambda n: b'{"prompt": ' + b"[" * n + b"]" * n + b"}")
    return st.one_of(st.binary(max_size=200), encoded, escapes, huge, nested, json_values)


def outcome(parse, body) -> None:
    try:
        request = parse(body)
    except RequestError as error:
        # the field is ours ("body", "prompt", ...) or the client's own unknown key, even ""
        assert isinstance(error.field, str) and error.message and 400 <= error.status < 500, error
        return
    assert isinstance(request, GenerationRequest)


@PROPERTIES
@given(raw_bodies(KNOWN_FIELDS) | bodies(KNOWN_FIELDS))
def test_native_parser_answers_anything_with_a_request_or_a_field_error(body):
    outcome(lambda b: parse_request(b, CONFIG), body)


OPENAI_FIELDS = ACCEPTED | set(DEFAULT_ONLY) | set(COMPLETIONS_DEFAULT_ONLY) | set(CHAT_DEFAULT_ONLY) | {"prompt", "messages"}


@PROPERTIES
@given(raw_bodies(OPENAI_FIELDS) | bodies(OPENAI_FIELDS), st.sampled_from(["text", "chat"]))
def test_openai_parser_answers_anything_with_a_request_or_a_field_error(body, kind):
    outcome(lambda b: OpenAIApi(kind, "smollm2", "request-1").parse(b, CONFIG), body)
