import json

import pytest

from cpu_llm.api.request import parse_request
from cpu_llm.config.serving import ServingConfig
from cpu_llm.core.errors import RequestError

CONFIG = ServingConfig(max_new_tokens=100, default_max_new_tokens=20, max_stop_sequences=2)


def test_minimal_prompt_gets_defaults():
    request = parse_request({"prompt": "Hi"}, CONFIG)
    assert request.prompt == "Hi" and request.messages is None
    assert request.max_new_tokens == 20
    assert not request.sampling.do_sample and request.stop == ()


def test_all_fields_bytes_body():
    body = json.dumps({
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_new_tokens": 100, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "do_sample": True,
        "seed": 3, "stop": ["\n", "."], "repetition_penalty": 1.2,
    }).encode()
    request = parse_request(body, CONFIG)
    assert request.messages[1] == {"role": "user", "content": "Hi"}
    sampling = request.sampling
    assert (sampling.temperature, sampling.top_p, sampling.top_k, sampling.seed) == (0.7, 0.9, 40, 3)
    assert sampling.repetition_penalty == 1.2 and request.stop == ("\n", ".")


@pytest.mark.parametrize("body,field", [
    (b"{not json", "body"),
    (b"", "body"),
    (b"\xff\xfe", "body"),
    ([1, 2], "body"),
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 42}, "prompt"),
    ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 1}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name"),
    ({"prompt": "a", "max_new_tokens": "10"}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 10.0}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 0}, "max_new_tokens"),
    ({"prompt": "a", "max_new_tokens": 101}, "max_new_tokens"),
    ({"prompt": "a", "temperature": -0.1}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"),
    ({"prompt": "a", "top_p": 0}, "top_p"),
    ({"prompt": "a", "top_p": 1.5}, "top_p"),
    ({"prompt": "a", "top_k": -1}, "top_k"),
    ({"prompt": "a", "do_sample": "yes"}, "do_sample"),
    ({"prompt": "a", "do_sample": True, "temperature": 0}, "temperature"),
    ({"prompt": "a", "seed": -5}, "seed"),
    ({"prompt": "a", "seed": True}, "seed"),
    ({"prompt": "a", "stop": "\n"}, "stop"),
    ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stop": ["a", "b", "c"]}, "stop"),
    ({"prompt": "a", "repetition_penalty": 0}, "repetition_penalty"),
    ({"prompt": "a", "max_tokens": 5}, "max_tokens"),
])
def test_bad_requests_name_the_field(body, field):
    with pytest.raises(RequestError) as error:
        parse_request(body, CONFIG)
    assert error.value.field == field
    payload = error.value.to_json()["error"]
    assert payload["field"] == field and payload["code"] == 400 and payload["message"]


def test_nan_is_rejected():
    with pytest.raises(RequestError, match="temperature"):
        parse_request(b'{"prompt": "a", "temperature": NaN}', CONFIG)


def test_length_controls_and_stream_are_validated():
    from cpu_llm.config.serving import ServingConfig
    from cpu_llm.core.errors import RequestError
    from cpu_llm.api.request import parse_request

    config = ServingConfig()
    ok = parse_request({"prompt": "x", "max_new_tokens": 10, "min_new_tokens": 10, "ignore_eos": True,
                        "stream": True}, config)
    assert (ok.min_new_tokens, ok.ignore_eos, ok.stream) == (10, True, True)
    for body, field in [({"prompt": "x", "max_new_tokens": 5, "min_new_tokens": 6}, "min_new_tokens"),
                        ({"prompt": "x", "ignore_eos": "yes"}, "ignore_eos"),
                        ({"prompt": "x", "stream": 1}, "stream")]:
        try:
            parse_request(body, config)
        except RequestError as error:
            assert error.field == field
        else:
            raise AssertionError(f"{body} was accepted")


@pytest.mark.parametrize("body", [b'{"prompt": "a\\ud800b"}', {"messages": [{"role": "user", "content": "\udfff"}]}])
def test_lone_surrogates_are_refused_before_the_tokenizer_sees_them(body):
    with pytest.raises(RequestError) as caught:
        parse_request(body, CONFIG)
    assert caught.value.field == "body" and "surrogate" in caught.value.message


def test_deeply_nested_json_is_refused():
    with pytest.raises(RequestError) as caught:
        parse_request(b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", CONFIG)
    assert caught.value.field == "body" and "nested" in caught.value.message
