"""The one incremental detokenizer (decode/detokenizer.py) against the plain rules it replaces:
decode everything after every token, cut before the first stop string, and stream only text that
the final text begins with."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cpu_llm.decode.detokenizer import REPLACEMENT, Detokenizer

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
    detokenizer = Detokenizer(stops)
    for n in range(1, len(ids) + 1):
        if detokenizer.add(tokenizer, ids[:n]):
            return n, detokenizer.text
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
        detokenizer = Detokenizer(("never appears",))
        for n in range(1, len(ids) + 1):
            assert not detokenizer.add(tokenizer, ids[:n])
            assert REPLACEMENT not in detokenizer.text
        assert detokenizer.text == tokenizer.decode(ids, skip_special_tokens=True)
        assert detokenizer.final(tokenizer, ids) == detokenizer.text


def test_a_character_cut_at_the_end_is_in_the_final_text_as_a_full_decoding_has_it(tokenizer):
    ids = tokenizer.encode(TEXTS[2], add_special_tokens=False)
    for n in range(1, len(ids) + 1):
        detokenizer = Detokenizer()
        for end in range(1, n + 1):
            detokenizer.add(tokenizer, ids[:end])
        assert detokenizer.final(tokenizer, ids[:n]) == tokenizer.decode(ids[:n], skip_special_tokens=True)


@settings(max_examples=100, deadline=None)
@given(text=st.sampled_from(TEXTS), start=st.integers(0, 40), length=st.integers(1, 6))
def test_streamed_text_only_grows_and_adds_up_to_the_final_text(tokenizer, text, start, length):
    """What streaming sends after each token (settled()) is never taken back: each is a prefix of
    the next and of the final text, stop string cut or not."""
    stops = (text[start:start + length],) if text[start:start + length] else ()
    ids = tokenizer.encode(text + " and more.", add_special_tokens=False)
    detokenizer, sent = Detokenizer(stops), ""
    for n in range(1, len(ids) + 1):
        stopped = detokenizer.add(tokenizer, ids[:n])
        settled = detokenizer.settled()
        assert settled.startswith(sent) and REPLACEMENT not in settled
        sent = settled
        if stopped:
            break
    final = detokenizer.final(tokenizer, ids[:n])
    assert final.startswith(sent) and not any(stop in final for stop in stops)
