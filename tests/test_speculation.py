"""Speculative decoding: the n-gram drafter, verification (greedy and sampled), and the engine
giving the same greedy tokens with drafts as without."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cpu_llm.config.serving import ServingConfig, parse_serving_config
from cpu_llm.core.errors import ConfigError
from cpu_llm.core.params import GenerationRequest, SamplingParams, TokenizerInfo
from cpu_llm.decode.sequence import Sequence
from cpu_llm.decode.speculative import accept_drafts
from cpu_llm.engine.ngram_drafter import NgramDrafter
from cpu_llm.engine.select import engine_for
from cpu_llm.engine.slot_engine import SlotEngine

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "data" / "golden_greedy.json"


def _seq(prompt: list[int], generated: list[int] = (), **sampling) -> Sequence:
    request = GenerationRequest(prompt="x", messages=None, max_new_tokens=50,
                                sampling=SamplingParams(**sampling))
    seq = Sequence.start(request, list(prompt))
    seq.generated = list(generated)
    return seq


def test_the_drafter_proposes_what_followed_the_latest_earlier_occurrence():
    prompt = [1, 2, 3, 4, 5, 6, 7, 9, 2, 3, 4, 8, 8]
    propose = lambda generated, k: NgramDrafter().propose(_seq(prompt, generated), k)  # noqa: E731
    assert propose([7, 2, 3], 3) == [4, 8, 8]  # [2, 3], at its latest earlier place
    assert propose([1, 2, 3], 3) == [4, 5, 6]  # [1, 2, 3]: the longest n-gram that occurred wins
    assert propose([1, 2, 3, 4, 8], 2) == [8, 1]  # [2, 3, 4, 8], overlapping what was generated
    assert propose([1, 2, 3, 4, 8, 40], 4) == []  # nothing ever followed [8, 40]
    drafter, seq = NgramDrafter(), _seq(prompt, [9, 2])
    assert drafter.propose(seq, 1) == [3]
    seq.generated.append(3)  # the index catches up with what was generated since
    assert drafter.propose(seq, 3) == [4, 8, 8]


def test_the_drafter_backs_off_while_its_drafts_miss():
    drafter, seq = NgramDrafter(), _seq([5, 6, 7, 5, 6])
    assert drafter.propose(seq, 2) == [7, 5]
    drafter.feedback(2, 0)
    assert drafter.propose(seq, 2) == [7, 5]  # one miss is not a pattern
    drafter.feedback(2, 0)
    assert [drafter.propose(seq, 2) for _ in range(5)] == [[], [], [], [], [7, 5]]  # paused 4 steps
    drafter.feedback(2, 1)
    assert drafter.propose(seq, 2) == [7, 5] and drafter.misses == 0


@pytest.fixture(scope="module")
def info(model_dir) -> TokenizerInfo:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return TokenizerInfo(tokenizer=tokenizer, eos_ids=frozenset({2}), pad_id=2)


def test_greedy_verification_keeps_drafts_up_to_the_first_wrong_one_and_adds_the_correction(info):
    rows = torch.full((4, 10), -1.0)
    rows[0, 5], rows[1, 6], rows[2, 9], rows[3, 1] = 1, 1, 1, 1  # argmaxes 5, 6, 9, 1
    seq = _seq([3])
    assert accept_drafts(rows, seq, [5, 6, 7], info) == 2 and seq.generated == [5, 6, 9]
    seq = _seq([3])
    assert accept_drafts(rows[:3], seq, [5, 6], info) == 2 and seq.generated == [5, 6, 9]  # all kept + one more
    seq = _seq([3])
    rows[1, 2] = 5  # EOS after the first draft: the request ends there, as it would without drafts
    assert accept_drafts(rows, seq, [5, 2, 9], info) == 1 and seq.generated == [5] and seq.finish_reason == "eos"


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_sampled_verification_keeps_the_target_distribution(info):
    """Draws with a draft of one token for sure, on a 6-token vocabulary: the first token's
    frequencies must follow p1 (chi-square, 5 degrees of freedom: 20.5 is the 0.999 quantile), and
    after a kept draft the bonus token must follow p2."""
    p1 = torch.tensor([0.05, 0.4, 0.1, 0.25, 0.15, 0.05])
    p2 = torch.tensor([0.3, 0.1, 0.1, 0.2, 0.2, 0.1])
    rows = torch.stack([p1.log(), p2.log()])
    first, bonus = torch.zeros(6), torch.zeros(6)
    info = TokenizerInfo(info.tokenizer, eos_ids=frozenset({100}), pad_id=100)  # every token of the 6 may be drawn
    generator = torch.Generator().manual_seed(1234)
    for _ in range(20000):
        seq = _seq([3], do_sample=True)
        seq.generator = generator
        kept = accept_drafts(rows, seq, [3], info)
        first[seq.generated[0]] += 1
        if kept:
            bonus[seq.generated[1]] += 1
    assert _chi_square(first, p1) < 20.5
    assert _chi_square(bonus, p2) < 20.5
    assert abs(bonus.sum() / 20000 - p1[3]) < 0.02  # the draft is kept with probability p1(draft)


def test_speculation_keys_are_validated():
    config = parse_serving_config({"handler": {"speculation": "ngram", "speculative_tokens": 6}})
    assert (config.speculation, config.speculative_tokens, config.speculative_max_batch) == ("ngram", 6, 1)
    with pytest.raises(ConfigError, match="handler.speculation: must be one of none, ngram"):
        parse_serving_config({"handler": {"speculation": "medusa"}})
    with pytest.raises(ConfigError, match="handler.speculative_tokens: must be an integer >= 1"):
        parse_serving_config({"handler": {"speculative_tokens": 0}})


# --- on the real model ----------------------------------------------------------------------

NGRAM = ServingConfig(speculation="ngram", speculative_tokens=4, speculative_max_batch=8)
REPEAT = {"messages": [{"role": "user", "content": "Repeat this code exactly:\n\ndef add(a, b):\n    total = a + b\n"
                        "    print('the total is', total)\n    return total\n\ndef sub(a, b):\n    return a - b\n"}],
          "max_new_tokens": 60}


def _requests(info, bodies: list[dict]) -> list[Sequence]:
    from cpu_llm.api.prompt import encode_prompt
    from cpu_llm.api.request import parse_request

    requests = [parse_request(body, ServingConfig(max_new_tokens=64)) for body in bodies]
    return [Sequence.start(r, encode_prompt(info.tokenizer, r, 1024)) for r in requests]


@pytest.mark.model
def test_speculative_greedy_gives_the_golden_tokens(loaded, runner_served):
    golden = json.loads(GOLDEN.read_text())
    bodies = [{"messages": c["messages"], "max_new_tokens": golden["max_new_tokens"]} for c in golden["cases"]]
    seqs = _requests(loaded[1], bodies)
    engine_for(runner_served, loaded[1], config=NGRAM).generate(seqs)
    assert sum(seq.accepted_tokens for seq in seqs) > 0
    for case, seq in zip(golden["cases"], seqs):
        expected = [t for t in case["tokens"] if t not in loaded[1].eos_ids]
        assert seq.generated == expected[:len(seq.generated)] and len(seq.generated) >= len(expected)


@pytest.mark.model
def test_speculation_gives_the_tokens_it_gives_without_drafts(int8_served):
    """Alone and in a batch (drafting for every request of it), with text that repeats its prompt
    so most drafts are kept, and with text that does not; greedy, and sampled with a seed (the
    token of a row is drawn as without drafts, from the same random numbers)."""
    served, info = int8_served
    bodies = [REPEAT, {"prompt": "The history of the Roman empire", "max_new_tokens": 30},
              {"messages": [{"role": "user", "content": "Write a haiku about CPUs."}], "max_new_tokens": 24},
              {**REPEAT, "do_sample": True, "seed": 3, "temperature": 0.7, "top_k": 40}]
    plain = [SlotEngine(served.runner, info, 600).generate(_requests(info, [body]))[0].token_ids for body in bodies]
    alone = [_requests(info, [body])[0] for body in bodies]
    for seq in alone:
        engine_for(served, info, config=NGRAM).generate([seq])
    together = _requests(info, bodies)
    engine_for(served, info, config=NGRAM).generate(together)
    assert [tuple(s.generated) for s in alone] == plain == [tuple(s.generated) for s in together]
    assert alone[0].accepted_tokens > 20 and alone[0].result().accepted_draft_tokens == alone[0].accepted_tokens
    assert alone[3].accepted_tokens > 10  # sampled drafts were kept too
    assert len(served.runner.cache.free) == served.runner.cache.slots
