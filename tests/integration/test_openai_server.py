"""The OpenAI API through a real TorchServe, driven by the official `openai` SDK with TorchServe's
token authorization on (the inference key is the SDK's api_key), in both batching modes."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from .server import package, running_server

pytestmark = pytest.mark.integration
PORTS = {"inference": 18380, "management": 18381, "metrics": 18382}
HANDLER = {"max_prompt_tokens": 64, "max_new_tokens": 400, "default_max_new_tokens": 8}
MODEL_CONFIGS = {
    "dynamic": {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 300,
                "responseTimeout": 120, "startupTimeout": 240, "handler": HANDLER},
    "continuous": {"minWorkers": 1, "maxWorkers": 1, "batchSize": 8, "maxBatchDelay": 5,
                   "continuousBatching": True, "responseTimeout": 120, "startupTimeout": 240, "handler": HANDLER},
}
CHAT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module", params=sorted(MODEL_CONFIGS))
def server(request, tmp_path_factory, model_dir):
    tmp = tmp_path_factory.mktemp(f"openai-{request.param}")
    store = package(tmp, model_dir, "smollm2", MODEL_CONFIGS[request.param])
    with running_server(tmp, store, ["smollm2=smollm2.mar"], ports=PORTS, token_auth=True) as urls:
        urls["v1"] = f"{urls['inference']}/predictions/smollm2/1.0/v1"
        urls["log_dir"], urls["mode"] = tmp / "logs", request.param
        yield urls


@pytest.fixture
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["v1"], api_key=server["key"], max_retries=0, timeout=120)


def test_models_lists_the_served_model(client):
    assert [model.id for model in client.models.list().data] == ["smollm2"]


def test_chat_completion_streamed_and_not_agree(client, server):
    whole = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=32, temperature=0)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "smollm2" and whole.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason == "stop" and whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=32, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert len(chunks) > 3 and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    usage, details = chunks[-1].usage, "prompt_tokens_details"
    assert chunks[-1].choices == [] and usage.model_dump(exclude={details}) == whole.usage.model_dump(exclude={details})
    # The same prompt again: on our runner the prefix cache holds all of it but the last token.
    cached = "prefix cache on" in (server["log_dir"] / "model_log.log").read_text()
    assert usage.prompt_tokens_details.cached_tokens == (usage.prompt_tokens - 1 if cached else 0)


def test_text_completion_streamed_and_not_agree_with_the_native_api(client, server):
    prompt = "The capital of France is"
    whole = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12
    streamed = client.completions.create(model="smollm2", prompt=prompt, max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    native = requests.post(f"{server['inference']}/predictions/smollm2", json={"prompt": prompt, "max_new_tokens": 12},
                           headers={"Authorization": f"Bearer {server['key']}"}, timeout=120).json()
    assert native["text"] == whole.choices[0].text


def test_sse_wire_format(server):
    response = requests.post(f"{server['v1']}/chat/completions", stream=True, timeout=120,
                             headers={"Authorization": f"Bearer {server['key']}"},
                             json={"model": "smollm2", "messages": CHAT, "max_tokens": 6, "stream": True})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = response.content.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""] and all(e.startswith("data: {") for e in events[:-2])


def test_errors_surface_as_sdk_exceptions(client, server):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="smollm2", messages=CHAT, n=2)
    assert caught.value.status_code == 400 and caught.value.param == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="smollm2", prompt="Hi", max_tokens=100_000)
    assert caught.value.param == "max_tokens" and "between 1 and 400" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="smollm2", input="Hi")
    junk = requests.post(f"{server['v1']}/chat/completions", data=b"{not json", timeout=30,
                         headers={"Authorization": f"Bearer {server['key']}", "Content-Type": "application/json"})
    assert junk.status_code == 400 and junk.json()["error"]["param"] == "body"


def test_the_api_key_is_checked(server):
    stranger = openai.OpenAI(base_url=server["v1"], api_key="wrong", max_retries=0)
    with pytest.raises(openai.BadRequestError):  # TorchServe's frontend answers a wrong key with 400
        stranger.models.list()


def test_a_bad_request_does_not_disturb_its_batch(client, server):
    def good():
        return client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=8, temperature=0)

    def refused():
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="smollm2", messages=CHAT, logit_bias={"42": 5})

    def not_text():  # a lone surrogate escape: valid JSON that no tokenizer accepts
        response = requests.post(f"{server['v1']}/chat/completions", timeout=120,
                                 data=b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',
                                 headers={"Authorization": f"Bearer {server['key']}", "Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["error"]["param"] == "body"

    alone = good().choices[0].message.content
    with ThreadPoolExecutor(4) as pool:
        results = [f.result() for f in [pool.submit(good), pool.submit(refused), pool.submit(good), pool.submit(not_text)]]
    assert [r.choices[0].message.content if r else None for r in results] == [alone, None, alone, None]
    assert good().choices[0].message.content == alone  # the worker is still up


def metric(server, name: str) -> float:
    text = requests.get(f"{server['metrics']}/metrics", timeout=10).text
    return sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_a_stream_closed_by_its_client_is_cancelled(client, server):
    if server["mode"] != "continuous":
        pytest.skip("a dynamic batch runs to its end; cancellation is a continuous-batching feature")
    cancelled = metric(server, "llm_requests_cancelled_total")
    stream = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=400, stream=True,
                                            extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    time.sleep(3)
    assert good_text(client)  # the next step notices the client is gone
    assert metric(server, "llm_requests_cancelled_total") == cancelled + 1
    gone = re.findall(r"client gone after (\d+) tokens", (server["log_dir"] / "model_log.log").read_text())
    assert gone and int(gone[-1]) < 60


def good_text(client) -> str:
    return client.completions.create(model="smollm2", prompt="Hello", max_tokens=2).choices[0].text


def test_metrics_count_openai_requests(client, server):
    before = metric(server, "llm_requests_finished_total")
    good_text(client)
    assert metric(server, "llm_requests_finished_total") == before + 1
