"""Automatic prefix caching (engine/prefix_cache.py): which slot a prompt gets, what it reuses, and
that reusing never changes a token."""

from __future__ import annotations


import pytest
import torch

from cpu_llm.api.prompt import encode_prompt
from cpu_llm.api.request import parse_request
from cpu_llm.config.serving import ServingConfig, parse_serving_config
from cpu_llm.decode.sequence import Sequence
from cpu_llm.engine.prefix_cache import PrefixCache, common_prefix
from cpu_llm.engine.slot_engine import SlotEngine
from cpu_llm.layers.attention import SlotKVCache

CONFIG = ServingConfig(max_new_tokens=64)


def _cache(slots: int = 3) -> SlotKVCache:
    return SlotKVCache(layers=2, slots=slots, kv_heads=1, length=256, head_dim=4)


def _fill(cache: SlotKVCache, slot: int, tokens: list[int]) -> None:
    """Write `tokens` into `slot` as a forward would: keys and values that name their token."""
    for position, token in enumerate(tokens):
        cache.keys[:, slot, :, position] = token
        cache.values[:, slot, :, position] = -token
    cache.record(tokens, list(range(len(tokens))), [slot] * len(tokens))


@pytest.mark.parametrize("shared", [0, 1, 63, 64, 65, 70, 128, 199])
def test_common_prefix_is_exact_to_the_token(shared):
    held = list(range(200))
    prompt = held[:shared] + [9999] + held[shared + 1:]
    assert common_prefix(held, prompt, limit=500) == shared
    assert common_prefix(held, held, limit=150) == 150  # at most `limit`
    assert common_prefix(held[:30], held, limit=500) == 30  # at most what the slot holds


def test_what_a_slot_holds_follows_every_write():
    cache = _cache()
    cache.record([1, 2, 3, 4], [0, 1, 2, 3], [0] * 4)
    cache.record([9], [1], [0])  # rewritten: what came after was computed from the old token
    assert cache.held[0] == [1, 9]
    cache.record([5], [4], [0])  # past a gap: position 2 and 3 are unknown
    assert cache.held[0] == [1, 9]
    cache.record([7, 8], [0, 2], [1, 0])
    assert cache.held == [[1, 9, 8], [7], []]


def test_a_prompt_takes_the_free_slot_with_its_longest_prefix_and_reuses_all_but_its_last_token():
    cache = _cache()
    prefixes = PrefixCache(cache, reuse=True)
    _fill(cache, 0, list(range(100, 140)))
    _fill(cache, 1, list(range(40)))
    assert prefixes.take(list(range(70))) == (1, 40)
    assert cache.held[1] == list(range(40)) and cache.free == [0, 2]
    assert prefixes.take(list(range(100, 140))) == (0, 39)  # an identical prompt: its last token is prefilled
    assert cache.held[0] == list(range(100, 139))


def test_a_prefix_in_a_busy_slot_is_copied_into_a_free_one():
    cache = _cache()
    prefixes = PrefixCache(cache, reuse=True)
    system = list(range(500, 570))  # 70 tokens: a prefix that ends mid-block
    _fill(cache, 1, system + [1, 2, 3])
    cache.take(1, keep=73)  # slot 1 is running a request
    _fill(cache, 2, system[:10])
    slot, reused = prefixes.take(system + [7, 8, 9])
    assert (slot, reused) == (2, 70)  # the free slot that matched most, topped up from slot 1
    assert cache.held[2] == system
    expected = torch.tensor(system, dtype=torch.float32)
    assert torch.equal(cache.keys[:, 2, 0, :70, 0], expected.expand(2, 70))
    assert torch.equal(cache.values[:, 2, 0, :70, 3], -expected.expand(2, 70))
    assert cache.held[1] == system + [1, 2, 3]  # the source is untouched


def test_eviction_under_a_full_cache_is_least_recently_used():
    cache = _cache(slots=2)
    prefixes = PrefixCache(cache, reuse=True)
    for prompt in ([1] * 20, [2] * 20, [3] * 20):  # three prompts through two slots, one at a time
        slot, reused = prefixes.take(prompt)
        assert reused == 0
        cache.record(prompt, list(range(20)), [slot] * 20)
        prefixes.give_back(slot)
    assert sorted(map(tuple, cache.held)) == [(2,) * 20, (3,) * 20]  # the oldest, [1] * 20, was evicted
    hit = prefixes.take([2] * 20)
    assert hit[1] == 19
    assert prefixes.take([1] * 20) == (1 - hit[0], 0)  # a miss: it evicts the last entry
    assert prefixes.take([4] * 20) is None  # both slots busy now: the request waits


def test_with_reuse_off_nothing_is_reused():
    cache = _cache()
    _fill(cache, 0, list(range(50)))
    assert PrefixCache(cache, reuse=False).take(list(range(50))) == (0, 0)
    assert cache.held[0] == []


def test_the_prefix_cache_key_is_validated():
    from cpu_llm.core.errors import ConfigError

    assert parse_serving_config({"handler": {"prefix_cache": False}}).prefix_cache is False
    with pytest.raises(ConfigError, match="handler.prefix_cache: must be true or false"):
        parse_serving_config({"handler": {"prefix_cache": "yes"}})


# --- on the real model ----------------------------------------------------------------------

SYSTEM = ("You are a careful assistant for a hardware store. Answer in one short sentence, name the aisle "
          "where the customer finds what they ask for, and never invent products the store does not sell. ")


@pytest.fixture
def int8(int8_served):
    served, info = int8_served
    return served.runner, info


def _seq(info, body: dict) -> Sequence:
    request = parse_request(body, CONFIG)
    return Sequence.start(request, encode_prompt(info.tokenizer, request, 512))


def _chat(question: str, history: tuple[str, ...] = (), tokens: int = 12) -> dict:
    """A chat with the store's system prompt: earlier turns (user, assistant, ...), then `question`."""
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": text} for i, text in enumerate(history)]
    return {"messages": [{"role": "system", "content": SYSTEM}, *turns, {"role": "user", "content": question}],
            "max_new_tokens": tokens}


def _uncached(int8, body: dict) -> tuple[int, ...]:
    runner, info = int8
    return SlotEngine(runner, info, 600, prefix_cache=False).generate([_seq(info, body)])[0].token_ids


@pytest.mark.model
def test_requests_sharing_a_prefix_across_slots_get_the_tokens_they_get_without_the_cache(int8):
    runner, info = int8
    engine = SlotEngine(runner, info, 600)
    first, second = _seq(info, _chat("Where are the hammers?")), _seq(info, _chat("Do you sell paint?"))
    engine.step({"first": first}, set())
    while not first.generated:
        assert not first.done
        engine.step({}, {"first"})
    engine.step({"second": second}, {"first"})  # the first request is decoding in its slot
    assert engine.slot["first"] != engine.slot["second"]
    while engine.in_flight:
        engine.step({}, set(engine.seqs))
    shared = common_prefix(first.prompt_ids, second.prompt_ids, 10**6)
    assert second.cached_tokens == shared > 30
    assert tuple(first.generated) == _uncached(int8, _chat("Where are the hammers?"))
    assert tuple(second.generated) == _uncached(int8, _chat("Do you sell paint?"))
    third = _seq(info, _chat("Do you sell paint brushes?"))
    SlotEngine(runner, info, 600).generate([third])
    assert third.cached_tokens == common_prefix(second.prompt_ids, third.prompt_ids, 10**6)
    assert third.result().cached_prompt_tokens == third.cached_tokens


@pytest.mark.model
def test_the_next_turn_of_a_chat_reuses_the_whole_previous_turn(int8):
    runner, info = int8
    engine = SlotEngine(runner, info, 600)
    turn = _seq(info, _chat("Where are the hammers?", tokens=20))
    engine.generate([turn])
    body = _chat("And nails?", history=("Where are the hammers?", info.tokenizer.decode(turn.generated)))
    following = _seq(info, body)
    engine.generate([following])
    assert following.cached_tokens >= len(turn.prompt_ids) + len(turn.generated) - 2  # re-tokenized at the seam
    assert tuple(following.generated) == _uncached(int8, body)


@pytest.mark.model
def test_cancelling_a_request_whose_prefix_is_shared_leaves_the_other_intact(int8):
    runner, info = int8
    engine = SlotEngine(runner, info, 600)
    leaving, staying = _seq(info, _chat("Where is the glue?", tokens=40)), _seq(info, _chat("Is there rope?"))
    engine.step({"leaving": leaving}, set())
    while not leaving.generated:
        assert not leaving.done
        engine.step({}, {"leaving"})
    engine.step({"staying": staying}, {"leaving"})
    engine.step({}, {"staying"})  # the client of "leaving" went away
    while engine.in_flight:
        engine.step({}, set(engine.seqs))
    assert staying.cached_tokens > 0 and leaving.done is False
    assert tuple(staying.generated) == _uncached(int8, _chat("Is there rope?"))
    # Cancelled mid-prefill: the next request reuses only what was really written.
    body = {"prompt": "Every ladder we stock, by height. " + SYSTEM, "max_new_tokens": 8, "ignore_eos": True}
    cut = _seq(info, body)
    engine.step({"cut": cut}, set())  # its first chunk of 16 tokens
    engine.step({}, set())
    again = _seq(info, body)
    engine.generate([again])
    assert again.cached_tokens == 16
    assert tuple(again.generated) == _uncached(int8, body)
    assert len(runner.cache.free) == runner.cache.slots
