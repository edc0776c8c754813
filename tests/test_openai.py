"""OpenAI API: body translation and refusals, response and SSE shapes, routing (no model needed)."""

from __future__ import annotations

import json

import pytest

from cpu_llm.api.openai_api import OpenAIApi
from cpu_llm.api.responses import Reply
from cpu_llm.api.routes import NATIVE, Router
from cpu_llm.api.text_stream import TextStream
from cpu_llm.config.serving import ServingConfig
from cpu_llm.core.errors import RequestError
from cpu_llm.core.params import GenerationRequest
from cpu_llm.core.params import TokenizerInfo
from cpu_llm.decode.sequence import Sequence

CONFIG = ServingConfig(max_new_tokens=100, default_max_new_tokens=20, max_stop_sequences=4)
CHAT = {"model": "smollm2", "messages": [{"role": "user", "content": "Hi"}]}


def parse(body: dict, kind: str = "chat") -> GenerationRequest:
    return OpenAIApi(kind, "smollm2", "rid").parse(json.dumps(body).encode(), CONFIG)


def refusal(body: dict, kind: str = "chat") -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse(body, kind)
    return caught.value


def test_completion_fields_map_onto_the_native_request():
    request = parse({"model": "m", "prompt": "Once", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9,
                     "seed": 3, "stop": "\n", "user": "u1", "n": 1, "frequency_penalty": 0, "logprobs": None,
                     "top_k": 5, "min_tokens": 2, "ignore_eos": True}, "text")
    assert request.prompt == "Once" and request.max_new_tokens == 7 and request.stop == ("\n",)
    sampling = request.sampling
    assert sampling.do_sample and (sampling.temperature, sampling.top_p, sampling.seed, sampling.top_k) == (0.5, 0.9, 3, 5)
    assert request.min_new_tokens == 2 and request.ignore_eos


def test_openai_defaults_sample_at_temperature_one_and_temperature_zero_is_greedy():
    default = parse(CHAT)
    assert default.sampling.do_sample and default.sampling.temperature == 1.0
    assert default.max_new_tokens == CONFIG.default_max_new_tokens
    assert not parse({**CHAT, "temperature": 0}).sampling.do_sample


def test_chat_content_parts_developer_role_and_explicit_nulls():
    request = parse({"model": "m", "messages": [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]},
    ], "max_completion_tokens": 9, "stop": None, "seed": None, "stream_options": None})
    assert request.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"})
    assert request.max_new_tokens == 9 and request.stop == ()


def test_what_benchmark_tools_send_is_accepted():
    """guidellm's streamed completion body (stop null, ignore_eos, vLLM's continuous_usage_stats)."""
    request = parse({"model": "m", "prompt": "Hi", "max_tokens": 8, "stop": None, "ignore_eos": True, "stream": True,
                     "stream_options": {"include_usage": True, "continuous_usage_stats": True}}, "text")
    assert request.ignore_eos and request.stream and request.max_new_tokens == 8


def test_presence_and_frequency_penalties_are_passed_on():
    sampling = parse({**CHAT, "presence_penalty": 0.5, "frequency_penalty": -1, "temperature": 0}).sampling
    assert (sampling.presence_penalty, sampling.frequency_penalty) == (0.5, -1.0) and not sampling.do_sample


def test_fields_that_change_nothing_here_are_accepted_and_logged_once(caplog, monkeypatch):
    """What agent SDKs and proxies send (OpenAI's stored completions, tags, tiers), as vLLM accepts it."""
    from cpu_llm.api import openai_api

    monkeypatch.setattr(openai_api, "_NOTED", set())
    extra = {"store": True, "metadata": {"team": "a"}, "service_tier": "auto", "parallel_tool_calls": False}
    with caplog.at_level("INFO"):
        assert parse({**CHAT, **extra}) == parse(CHAT)
        parse({**CHAT, **extra})
    assert sum("accepted and ignored" in r.getMessage() for r in caplog.records) == len(extra)


def test_a_one_string_prompt_list_is_that_prompt():
    assert parse({"prompt": ["Once"]}, "text").prompt == "Once"


@pytest.mark.parametrize("kind,extra,field", [
    ("chat", {"n": 2}, "n"),
    ("chat", {"frequency_penalty": 2.5}, "frequency_penalty"),
    ("chat", {"presence_penalty": "high"}, "presence_penalty"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"top_logprobs": 3}, "top_logprobs"),
    ("chat", {"logit_bias": {"42": 5}}, "logit_bias"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"tools": [{"type": "function"}]}, "tools"),
    ("chat", {"n": [1]}, "n"),
    ("chat", {"stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {"stream": True, "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
    ("chat", {"stream": True, "stream_options": {"include_usage": True, "x": True}}, "stream_options"),
    ("chat", {"max_tokens": 5, "max_completion_tokens": 5}, "max_tokens"),
    ("chat", {"max_completion_tokens": 1000}, "max_completion_tokens"),
    ("chat", {"min_tokens": -1}, "min_tokens"),
    ("chat", {"temperature": "hot"}, "temperature"),
    ("chat", {"model": 3}, "model"),
    ("chat", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[0].content[0]"),
    ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ("chat", {"messages": None}, "messages"),
    ("text", {"prompt": "Hi", "logprobs": 2}, "logprobs"),
    ("text", {"prompt": "Hi", "echo": True}, "echo"),
    ("text", {"prompt": "Hi", "best_of": 3}, "best_of"),
    ("text", {"prompt": "Hi", "suffix": "end"}, "suffix"),
    ("text", {"prompt": "Hi", "max_tokens": 0}, "max_tokens"),
    ("text", {"prompt": ["a", "b"]}, "prompt"),
    ("text", {"prompt": [1, 2, 3]}, "prompt"),
    ("text", {"prompt": "Hi", "messages": []}, "messages"),
])
def test_unsupported_or_invalid_fields_are_refused_by_name(kind, extra, field):
    base = CHAT if kind == "chat" else {"model": "m"}
    error = refusal({**base, **extra}, kind)
    assert error.field == field and error.status == 400


def test_errors_have_openai_shape():
    reply = OpenAIApi("chat", "m", "r").error(RequestError("n", "only n=1 is supported"))
    assert reply.status == 400
    assert json.loads(reply.body) == {"error": {"message": "n: only n=1 is supported",
                                                "type": "invalid_request_error", "param": "n", "code": None}}


class CharTokenizer:
    """Token id = character code: enough for streaming and formatting."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)


INFO = TokenizerInfo(tokenizer=CharTokenizer(), eos_ids=frozenset({0}), pad_id=0)


def finished_sequence(stream: bool, text: str = "Paris.", reason: str = "eos") -> Sequence:
    request = GenerationRequest(prompt="Hi", messages=None, max_new_tokens=10, stream=stream)
    seq = Sequence.start(request, [1, 2, 3])
    seq.generated, seq.text, seq.finish_reason, seq.cached_tokens = [ord(c) for c in text], text, reason, 2
    return seq


def events(body: bytes) -> list[str]:
    assert body.endswith(b"\n\n")
    return [event.removeprefix("data: ") for event in body.decode().split("\n\n")[:-1]]


@pytest.mark.parametrize("reason,expected", [("eos", "stop"), ("stop", "stop"), ("length", "length"),
                                             ("timeout", "length")])
def test_chat_completion_body(reason, expected):
    reply = OpenAIApi("chat", "smollm2", "abc").finished(finished_sequence(False, reason=reason), None)
    body = json.loads(reply.body)
    assert body["id"] == "chatcmpl-abc" and body["object"] == "chat.completion" and body["model"] == "smollm2"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                                "logprobs": None, "finish_reason": expected}]
    completion = 6 + (reason == "eos")  # the EOS token counts, as in the native API
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": completion, "total_tokens": 3 + completion,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert reply.content_type == "application/json"


def test_text_completion_body():
    body = json.loads(OpenAIApi("text", "m", "abc").finished(finished_sequence(False, reason="length"), None).body)
    assert body["object"] == "text_completion" and body["id"] == "cmpl-abc"
    assert body["choices"][0]["text"] == "Paris." and body["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_streamed_events_add_up_to_the_text_and_end_with_done(kind, include_usage):
    api = OpenAIApi(kind, "m", "abc")
    base = CHAT if kind == "chat" else {"model": "m", "prompt": "Hi"}
    api.parse({**base, "stream": True, "stream_options": {"include_usage": include_usage}}, CONFIG)
    seq, stream = finished_sequence(True), TextStream()
    seq.finish_reason, seq.generated, text = None, [], seq.text
    body = b""
    for char in text[:3]:
        seq.generated.append(ord(char))
        seq.detokenizer.add(INFO.tokenizer, seq.generated)
        body += api.chunk(stream.next_piece(seq))
    seq.generated, seq.finish_reason = [ord(c) for c in text], "eos"
    reply = api.finished(seq, stream)
    assert reply.content_type == "text/event-stream"
    data = events(body + reply.body)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    if include_usage:
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 10
        assert all(c["usage"] is None for c in chunks[:-1])
        chunks = chunks[:-1]
    else:
        assert all("usage" not in c for c in chunks)
    choices = [c["choices"][0] for c in chunks]
    if kind == "chat":
        assert chunks[0]["object"] == "chat.completion.chunk" and choices[0]["delta"]["role"] == "assistant"
        assert "".join(c["delta"].get("content", "") for c in choices) == text
    else:
        assert "".join(c["text"] for c in choices) == text
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["stop"]
    assert len({c["id"] for c in chunks}) == 1


def test_routes():
    router = Router("smollm2")
    assert router.route(None, "r") is NATIVE and router.route("", "r") is NATIVE
    assert router.route("v1/chat/completions", "r").kind == "chat"
    assert router.route("/v1/completions/", "r").kind == "text"
    models = router.route("v1/models", "r")
    assert isinstance(models, Reply) and json.loads(models.body)["data"][0]["id"] == "smollm2"
    assert router.route("health", "r").status == 200
    missing = router.route("v1/embeddings", "r")
    assert missing.status == 404 and json.loads(missing.body)["error"]["type"] == "not_found_error"
