import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from cpu_llm.core.params import SamplingParams
from cpu_llm.decode.sampling import (apply_presence_frequency_penalties, apply_repetition_penalty, filter_top_k_top_p,
                                    make_generator, pick_next_token)


def _logits(seed: int = 0, size: int = 50) -> torch.Tensor:
    return torch.randn(size, generator=torch.Generator().manual_seed(seed)) * 3


def test_repetition_penalty_matches_transformers():
    logits, seen = _logits(), torch.tensor([1, 4, 4, 9, 30])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen[None], logits[None].clone())[0]
    assert torch.allclose(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_top_k_and_top_p_match_transformers():
    logits = _logits(1)
    for top_k in (1, 5, 20):
        expected = TopKLogitsWarper(top_k)(None, logits[None].clone())[0]
        assert torch.equal(filter_top_k_top_p(logits, top_k, 1.0).isinf(), expected.isinf())
    for top_p in (0.1, 0.5, 0.9):
        expected = TopPLogitsWarper(top_p)(None, logits[None].clone())[0]
        assert torch.equal(filter_top_k_top_p(logits, 0, top_p).isinf(), expected.isinf())


def test_greedy_is_argmax():
    logits = _logits(2)
    assert pick_next_token(logits, SamplingParams(), torch.tensor([], dtype=torch.long), None) == int(logits.argmax())


def test_seeded_sampling_is_reproducible_and_seed_dependent():
    logits = _logits(3)
    params = SamplingParams(do_sample=True, temperature=2.0)
    empty = torch.tensor([], dtype=torch.long)

    def draw(seed):
        generator = make_generator(seed)
        return [pick_next_token(logits, params, empty, generator) for _ in range(20)]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_top_k_one_sampling_equals_greedy():
    logits = _logits(4)
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=1)
    token = pick_next_token(logits, params, torch.tensor([], dtype=torch.long), make_generator(None))
    assert token == int(logits.argmax())


def test_sampling_follows_the_distribution_and_never_draws_filtered_tokens():
    from cpu_llm.decode.sampling import sample

    probs = torch.tensor([0.0, 0.5, 0.0, 0.3, 0.2, 0.0])
    generator = make_generator(3)
    counts = torch.bincount(torch.tensor([sample(probs, generator) for _ in range(4000)]), minlength=6)
    assert counts[0] == counts[2] == counts[5] == 0
    torch.testing.assert_close(counts.float() / 4000, probs, atol=0.03, rtol=0)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.tensor([1.0, 2.0, 3.0, 4.0])
    out = apply_presence_frequency_penalties(logits, [3, 3, 1], presence=0.5, frequency=0.25)
    assert torch.allclose(out, torch.tensor([1.0, 2.0 - 0.5 - 0.25, 3.0, 4.0 - 0.5 - 0.5]))
    assert apply_presence_frequency_penalties(logits, [], 1.0, 1.0) is logits


def test_a_frequency_penalty_moves_greedy_off_a_repeated_token():
    from cpu_llm.core.params import GenerationRequest
    from cpu_llm.decode.sequence import Sequence, pick_tokens

    logits = torch.tensor([[0.0, 5.0, 4.5, 0.0]])
    request = GenerationRequest(prompt="x", messages=None, max_new_tokens=8,
                                sampling=SamplingParams(frequency_penalty=0.3))
    seq = Sequence.start(request, [0])
    assert pick_tokens(logits, [seq], frozenset()) == [1]
    seq.generated = [1, 1]
    assert pick_tokens(logits, [seq], frozenset()) == [2]  # 5.0 - 2 x 0.3 < 4.5
