"""Dynamic batching's session (serving/dynamic.py), driven directly: each request is validated on
its own, the valid ones run through the engine's `generate` (step until finished), streamed text
goes out through `send` and adds up to the final text, and the running count always comes back
to 0, also when the engine fails."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from cpu_llm.api.responses import JSON_LINES, Reply
from cpu_llm.api.routes import NATIVE
from cpu_llm.config.serving import ServingConfig
from cpu_llm.core.params import TokenizerInfo
from cpu_llm.decode.sequence import Sequence, record_token
from cpu_llm.engine.base import Engine
from cpu_llm.serving.dynamic import DynamicSession

TEXT = "Paris is the capital."


class CharTokenizer:
    """Token id = character code (0 = EOS)."""

    def __call__(self, text: str) -> SimpleNamespace:
        return SimpleNamespace(input_ids=[ord(c) for c in text])

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


INFO = TokenizerInfo(tokenizer=CharTokenizer(), eos_ids=frozenset({0}), pad_id=0)


class ScriptedEngine(Engine):
    """Every step gives each running sequence the next character of TEXT, then EOS."""

    def __init__(self, fail_at_step: int | None = None) -> None:
        self.seqs: dict[str, Sequence] = {}
        self.steps, self.fail_at_step = 0, fail_at_step

    def step(self, new: dict[str, Sequence], wanted: set[str]) -> tuple[dict[str, Sequence], int]:
        self.steps += 1
        if self.steps == self.fail_at_step:
            raise RuntimeError("the forward pass failed")
        self.seqs.update(new)
        for seq in self.seqs.values():
            n = len(seq.generated)
            record_token(seq, ord(TEXT[n]) if n < len(TEXT) else 0, INFO)
        touched = dict(self.seqs)
        self.seqs = {rid: seq for rid, seq in self.seqs.items() if not seq.done}
        return touched, 0

    def clear(self) -> None:
        self.seqs = {}


def body(payload: dict | bytes) -> dict:
    return {"body": payload if isinstance(payload, bytes) else json.dumps(payload).encode()}


def session(engine: Engine) -> tuple[DynamicSession, list, list]:
    running, finished = [], []
    return (DynamicSession(engine, ServingConfig(max_new_tokens=64), INFO, on_finished=finished.append,
                           on_running=running.append), running, finished)


def test_bad_requests_get_their_400_and_the_others_are_generated_and_streamed():
    dynamic, running, finished = session(ScriptedEngine())
    sent: list[dict[int, tuple[bytes, str]]] = []
    replies = dynamic.handle([(body({"prompt": "Hi", "max_new_tokens": 40}), NATIVE),
                              (body(b"not json"), NATIVE),
                              ({"prompt": "form field"}, NATIVE),
                              (body({"prompt": "Hi", "max_new_tokens": 40, "stream": True}), NATIVE),
                              ({}, Reply(b"{}", status=404))],
                             sent.append)
    assert json.loads(replies[0].body)["text"] == TEXT and replies[0].status == 200
    for reply in replies[1:3]:
        assert reply.status == 400 and json.loads(reply.body)["error"]["field"] == "body"
    assert replies[4].status == 404
    assert sent and all(set(chunks) == {3} and chunks[3][1] == JSON_LINES for chunks in sent)
    lines = [json.loads(line) for chunks in sent for line in chunks[3][0].splitlines()]
    lines += [json.loads(line) for line in replies[3].body.splitlines()]
    assert "".join(line.get("text", "") for line in lines) == TEXT
    assert running == [2, 0] and len(finished) == 2


def test_an_engine_failure_still_reports_the_batch_ended():
    dynamic, running, _ = session(ScriptedEngine(fail_at_step=3))
    with pytest.raises(RuntimeError, match="forward pass failed"):
        dynamic.handle([(body({"prompt": "Hi"}), NATIVE)], lambda chunks: None)
    assert running == [1, 0]
