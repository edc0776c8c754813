"""Continuous batching in-process on the real SmolLM2, driven the way TorchServe drives it.

`Frontend` plays TorchServe's continuousBatching frontend: every call carries all in-flight
requests (new ones with their parameters, {"body": ...}, running ones with none), replies are appended to each client's
response, a final reply ends it, and a disconnected client is no longer sent.
"""

from __future__ import annotations

import json

import pytest

from cpu_llm.api.prompt import encode_prompt
from cpu_llm.api.request import parse_request
from cpu_llm.api.responses import Reply
from cpu_llm.api.routes import NATIVE, Api, Router
from cpu_llm.config.serving import ServingConfig
from cpu_llm.decode.sequence import Sequence
from cpu_llm.engine.hf_engine import HFEngine
from cpu_llm.engine.slot_engine import SlotEngine
from cpu_llm.serving.continuous import ContinuousSession

pytestmark = pytest.mark.model
CONFIG = ServingConfig(max_new_tokens=64)


class Frontend:
    def __init__(self, session: ContinuousSession) -> None:
        self.session = session
        self.running: list[str] = []
        self.queued: list[tuple[str, object, Api | Reply]] = []
        self.routes: dict[str, Api | Reply] = {}
        self.bodies: dict[str, bytes] = {}
        self.status: dict[str, int] = {}
        self.done: dict[str, int] = {}  # request id -> call on which its response ended
        self.sent_whole: set[str] = set()
        self.calls = 0

    def submit(self, rid: str, body: dict | bytes | None, route: Api | Reply = NATIVE) -> None:
        self.submit_row(rid, {} if body is None else {"body": body if isinstance(body, bytes) else json.dumps(body).encode()},
                        route)

    def submit_row(self, rid: str, row: dict, route: Api | Reply = NATIVE) -> None:
        """A new request as TorchServe's parameters for it: a form body is one entry per field, an empty one none."""
        self.routes[rid] = route
        self.queued.append((rid, row, route))

    def disconnect(self, rid: str) -> None:
        self.running.remove(rid)

    def call(self) -> None:
        batch = [(rid, {}, self.routes[rid]) for rid in self.running] + self.queued
        self.running += [rid for rid, _, _ in self.queued]
        self.queued = []
        replies = self.session.handle(batch)
        self.calls += 1
        for (rid, _, _), reply in zip(batch, replies):
            self.status.setdefault(rid, reply.status)  # the status line goes out with the first reply
            if rid not in self.sent_whole:
                self.bodies[rid] = self.bodies.get(rid, b"") + reply.body
            if reply.whole:  # a complete HTTP response: nothing more reaches the client
                self.sent_whole.add(rid)
            if reply.final:
                self.running.remove(rid)
                self.done[rid] = self.calls

    def run_until_idle(self, limit: int = 500) -> None:
        while self.running or self.queued:
            assert self.calls < limit, "requests never finished"
            self.call()

    def json(self, rid: str) -> dict:
        return json.loads(self.bodies[rid])

    def lines(self, rid: str) -> list[dict]:
        return [json.loads(line) for line in self.bodies[rid].decode().splitlines()]


@pytest.fixture(params=["hf", "llama"])
def make_engine(request, loaded):
    """Both engines: the Hugging Face path's (left-padded cache) and our runner's (slots)."""
    model, info = loaded
    if request.param == "hf":
        return lambda timeout_s=600: HFEngine(model, info, request_timeout_s=timeout_s)
    runner = request.getfixturevalue("runner_served").runner
    return lambda timeout_s=600: SlotEngine(runner, info, request_timeout_s=timeout_s)


def idle(engine) -> bool:
    """Nothing in flight and nothing held: no batch (hf), every cache slot free (llama)."""
    if isinstance(engine, SlotEngine):
        return engine.in_flight == 0 and len(engine.runner.cache.free) == engine.runner.cache.slots
    return engine.in_flight == 0 and engine.batch is None


@pytest.fixture
def frontend(loaded, make_engine):
    return Frontend(ContinuousSession(make_engine(), CONFIG, loaded[1]))


def alone(loaded, body: dict):
    model, info = loaded
    request = parse_request(body, CONFIG)
    return HFEngine(model, info, float('inf')).generate([Sequence.start(request, encode_prompt(info.tokenizer, request, 1024))])[0]


BODIES = {
    "a": {"prompt": "The history of the Roman empire", "max_new_tokens": 40},
    "b": {"messages": [{"role": "user", "content": "Write a haiku about CPUs."}], "max_new_tokens": 24},
    "c": {"prompt": "def fibonacci(n):", "max_new_tokens": 20, "repetition_penalty": 1.3},
    "d": {"prompt": "Once upon a time", "max_new_tokens": 16, "do_sample": True, "seed": 7, "top_k": 40},
    "e": {"messages": [{"role": "user", "content": "What is 2+2?"}], "max_new_tokens": 30, "stop": [" is"]},
}


def test_requests_joining_mid_flight_get_the_same_tokens_as_alone(loaded, frontend):
    frontend.submit("a", BODIES["a"])
    frontend.call()
    frontend.call()
    frontend.call()
    frontend.submit("b", BODIES["b"])
    frontend.submit("c", BODIES["c"])
    frontend.call()
    frontend.submit("d", BODIES["d"])
    for _ in range(5):
        frontend.call()
    frontend.submit("e", BODIES["e"])
    frontend.run_until_idle()
    peak = 0
    for rid, body in BODIES.items():
        solo = alone(loaded, body)
        got = frontend.json(rid)
        assert frontend.status[rid] == 200
        assert (got["text"], got["finish_reason"], got["completion_tokens"]) == \
            (solo.text, solo.finish_reason, solo.completion_tokens), rid
        peak = max(peak, got["batch_size"])
    assert peak >= 3  # they really were decoded together
    assert idle(frontend.session.engine)


def test_a_finished_request_leaves_at_once(frontend):
    frontend.submit("short", {"prompt": "Hello", "max_new_tokens": 3})
    frontend.submit("long", {"prompt": "Hello", "max_new_tokens": 30})
    frontend.run_until_idle()
    assert idle(frontend.session.engine)
    # 3 tokens: prefill + 2 decode steps, then one call for the held-back final reply
    assert frontend.done["short"] <= 4 < frontend.done["long"]
    assert frontend.json("short")["completion_tokens"] == 3


def test_streamed_pieces_add_up_to_the_final_text(loaded, frontend):
    for rid in ("b", "e"):
        frontend.submit(rid, {**BODIES[rid], "stream": True})
    frontend.run_until_idle()
    for rid in ("b", "e"):
        lines = frontend.lines(rid)
        assert len(lines) > 3  # really incremental
        assert all(set(line) == {"text"} for line in lines[:-1])
        last = lines[-1]
        solo = alone(loaded, BODIES[rid])
        assert "".join(line["text"] for line in lines) == solo.text
        assert last["finish_reason"] == solo.finish_reason and last["completion_tokens"] == solo.completion_tokens
        assert last["timings"]["time_to_first_token_ms"] > 0
    assert " is" not in "".join(line["text"] for line in frontend.lines("e"))  # the stop string never leaked


def test_disconnected_client_frees_its_row_and_others_are_unaffected(loaded, frontend):
    frontend.submit("gone", {"prompt": "The history of the Roman empire", "max_new_tokens": 60})
    frontend.submit("stays", BODIES["c"])
    frontend.call()
    frontend.call()
    assert frontend.session.engine.in_flight == 2
    frontend.disconnect("gone")
    frontend.call()
    assert frontend.session.engine.in_flight == 1 and "gone" not in frontend.session.engine.seqs
    frontend.run_until_idle()
    assert idle(frontend.session.engine)
    assert frontend.json("stays")["text"] == alone(loaded, BODIES["c"]).text


def test_bad_request_gets_its_status_first_and_its_body_next(frontend):
    frontend.submit("bad", {"prompt": "hi", "max_new_tokens": 0})
    frontend.submit("junk", b"{not json")
    frontend.submit("good", {"prompt": "Hello", "max_new_tokens": 5})
    frontend.run_until_idle()
    assert frontend.status["bad"] == frontend.status["junk"] == 400
    assert frontend.json("bad")["error"]["field"] == "max_new_tokens"
    assert frontend.json("junk")["error"]["field"] == "body"
    assert frontend.status["good"] == 200 and frontend.json("good")["completion_tokens"] == 5


def test_form_fields_and_empty_bodies_get_a_400_that_says_what_to_send(frontend):
    frontend.submit_row("form", {"prompt": b"hello"})
    frontend.submit_row("empty", {})
    frontend.submit("good", {"prompt": "Hello", "max_new_tokens": 3})
    frontend.run_until_idle()
    assert frontend.status["form"] == frontend.status["empty"] == 400
    assert frontend.json("form")["error"]["field"] == frontend.json("empty")["error"]["field"] == "body"
    assert "form fields (prompt)" in frontend.json("form")["error"]["message"]
    assert "application/json" in frontend.json("empty")["error"]["message"]
    assert frontend.status["good"] == 200 and frontend.json("good")["completion_tokens"] == 3


@pytest.mark.parametrize("steps_per_call_ms,last_call", [(0, 8), (60_000, 2)])
def test_one_call_keeps_stepping_for_steps_per_call_ms(loaded, make_engine, steps_per_call_ms, last_call):
    """0: one token per call (the prompt's step gives the first, so the 8th ends call 8);
    a long budget: every token in the first call, whose final reply goes out on the next."""
    config = ServingConfig(max_new_tokens=64, steps_per_call_ms=steps_per_call_ms)
    frontend = Frontend(ContinuousSession(make_engine(), config, loaded[1]))
    frontend.submit("r", {"prompt": "Hello", "max_new_tokens": 8, "ignore_eos": True, "stream": True})
    frontend.run_until_idle()
    assert frontend.done["r"] == last_call
    assert frontend.lines("r")[-1]["completion_tokens"] == 8


def test_request_over_its_time_limit_ends_with_timeout(loaded, make_engine):
    frontend = Frontend(ContinuousSession(make_engine(timeout_s=0), CONFIG, loaded[1]))
    frontend.submit("slow", {"prompt": "Hello", "max_new_tokens": 50})
    frontend.run_until_idle()
    body = frontend.json("slow")
    assert body["finish_reason"] == "timeout" and body["completion_tokens"] < 50


@pytest.mark.parametrize("method,lowp_mode", [("woq", "NONE"), ("woq", "AUTO"), ("smoothquant", None)])
def test_natively_quantized_models_batch_continuously(model_dir, method, lowp_mode):
    """Continuous batching serves natively quantized models. WoQ with fp32 compute (lowp_mode
    NONE) keeps a request's tokens when it joins mid-flight, as fp32 does (compared over 16
    tokens). Int8 compute (WoQ's default AUTO, and SmoothQuant) is only checked to serve
    correctly: its int8 activation rounding amplifies the attention's float drift from padding
    (a ~1e-5 change can cross a rounding step), so after a near-tie its greedy text can differ
    from the text alone -- in dynamic batching too (docs: What is guaranteed)."""
    import yaml

    from cpu_llm.config.serving import parse_serving_config
    from cpu_llm.load.hf import load_model
    from cpu_llm.load.pipeline import prepare_for_serving
    from conftest import ROOT

    raw = yaml.safe_load((ROOT / "configs" / "continuous.yaml").read_text())
    raw["quantization"].update(method=method, **({"woq": {"lowp_mode": lowp_mode}} if lowp_mode else {}))
    config = parse_serving_config(raw)
    model, info = load_model(str(model_dir))
    served = prepare_for_serving(model, info.tokenizer, config.quantization, str(model_dir), str(ROOT),
                                 config.continuous_batching)
    assert served.backend == "native" and served.report["quantized_modules"] > 0
    bodies = {rid: {**BODIES[rid], "max_new_tokens": 16} for rid in ("a", "b", "c")}
    frontend = Frontend(ContinuousSession(HFEngine(served.model, info, 600), CONFIG, info))
    frontend.submit("a", bodies["a"])
    frontend.call()
    frontend.call()
    frontend.submit("c", bodies["c"])
    frontend.submit("b", bodies["b"])
    frontend.run_until_idle()
    for rid, body in bodies.items():
        got = frontend.json(rid)
        assert got["finish_reason"] in ("eos", "length") and got["text"].strip(), rid
        if lowp_mode == "NONE":
            assert got["text"] == alone((served.model, info), body).text, rid


def test_openai_requests_share_the_batch_with_native_ones(loaded, frontend):
    """SSE deltas add up to the non-streamed content, a one-token completion and a refused field
    get well-formed responses, and the model list needs no step."""
    router = Router("smollm2")
    chat = {"model": "smollm2", "messages": BODIES["b"]["messages"], "max_tokens": 24, "temperature": 0}
    frontend.submit("native", BODIES["b"])
    frontend.submit("whole", chat, router.route("v1/chat/completions", "whole"))
    frontend.submit("sse", {**chat, "stream": True, "stream_options": {"include_usage": True}},
                    router.route("v1/chat/completions", "sse"))
    frontend.submit("one", {"prompt": "Hi", "max_tokens": 1, "stream": True}, router.route("v1/completions", "one"))
    frontend.submit("bad", {**chat, "n": 3}, router.route("v1/chat/completions", "bad"))
    frontend.submit("models", None, router.route("v1/models", "models"))
    frontend.run_until_idle()
    whole = frontend.json("whole")
    assert whole["choices"][0]["message"]["content"] == frontend.json("native")["text"]
    events = frontend.bodies["sse"].decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        whole["choices"][0]["message"]["content"]
    cached = chunks[-1]["usage"].pop("prompt_tokens_details")["cached_tokens"]
    assert (cached > 0) == isinstance(frontend.session.engine, SlotEngine)  # the prefix cache: our runner's only
    assert chunks[-1]["usage"] == {k: v for k, v in whole["usage"].items() if k != "prompt_tokens_details"}
    one = [json.loads(e.removeprefix("data: ")) for e in frontend.bodies["one"].decode().split("\n\n")[:-2]]
    assert one[-1]["choices"][0]["finish_reason"] == "length"
    assert frontend.status["bad"] == 400 and json.loads(frontend.bodies["bad"])["error"]["param"] == "n"
    assert json.loads(frontend.bodies["models"])["data"][0]["id"] == "smollm2"
