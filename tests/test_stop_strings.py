"""Incremental stop strings (stop_strings.py) against the plain rule they replace: decode
everything after every token and cut before the first stop string."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cpu_llm.engine.stop_strings import REPLACEMENT, StopScanner

TEXTS = ["The capital of France is Paris. It is known for the Eiffel Tower.",
         "def add(a, b):\n    return a + b\n\nprint(add(1, 2))",
         "Grüße aus Zürich — 東京 and 🙂 emoji, ünïcödé."]


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def plain_rule(tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[int, str] | None:
    """(tokens generated when it stops, final text) the way every token was checked before."""
    for n in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:n], skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return n, text[:min(hits)]
    return None


def incremental(tokenizer, ids: list[int], stops: tuple[str, ...]) -> tuple[int, str] | None:
    scanner = StopScanner(stops)
    for n in range(1, len(ids) + 1):
        text = scanner.feed(tokenizer, ids[:n])
        if text is not None:
            return n, text
    return None


@settings(max_examples=200, deadline=None)
@example(text=TEXTS[2], start=7, length=12, extra="")  # the stop ends where "東" is still incomplete
@given(text=st.sampled_from(TEXTS), start=st.integers(0, 40), length=st.integers(1, 12), extra=st.sampled_from(["", "x", " ."]))
def test_the_same_stop_at_the_same_token_as_decoding_everything(tokenizer, text, start, length, extra):
    stops = (text[start:start + length] + extra, "\n\n")
    ids = tokenizer.encode(text + " and more text after it.", add_special_tokens=False)
    assert incremental(tokenizer, ids, stops) == plain_rule(tokenizer, ids, stops)


def test_the_text_grows_to_the_whole_decoding_without_broken_characters(tokenizer):
    for text in TEXTS:
        ids = tokenizer.encode(text, add_special_tokens=False)
        scanner = StopScanner(("never appears",))
        for n in range(1, len(ids) + 1):
            assert scanner.feed(tokenizer, ids[:n]) is None
            assert REPLACEMENT not in scanner.text
        assert scanner.text == tokenizer.decode(ids, skip_special_tokens=True)
