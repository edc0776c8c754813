"""Drafting without a second model: prompt lookup (n-gram) speculation.

Text that repeats its input (editing code, quoting a document, filling a template) continues an
n-gram that already occurred in the prompt or in what was generated. The drafter proposes the
tokens that followed the latest earlier occurrence of the request's last n tokens (n = 4, then 3,
then 2), as llama.cpp's lookup decoding and vLLM's n-gram speculator do. Its index is built
incrementally: one dictionary entry per n per token, so a lookup costs the same at any length.

A request whose drafts miss twice in a row stops drafting for a while (4, then 8, ... up to 64
steps while they keep missing), so a workload drafts never fit pays next to nothing.

A draft model would plug in here: anything with `propose(seq, k) -> list[int]` and
`feedback(drafted, accepted)`; the engine verifies its drafts in the same forward pass.
"""

from __future__ import annotations

from ..decode.sequence import Sequence

SIZES = (4, 3, 2)  # n-gram lengths tried, longest first
MAX_PAUSE = 64  # most steps a request goes without drafting after drafts missed


class NgramDrafter:
    """The n-gram index of one request's prompt and generated tokens."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        # n -> {the n tokens before position j: j}, for the latest j: where a continuation starts.
        self.follow: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in SIZES}
        self.misses = 0
        self.paused = 0

    def propose(self, seq: Sequence, k: int) -> list[int]:
        """Up to `k` tokens that may follow `seq`'s last token; none while paused or without a match."""
        self._catch_up(seq)
        if self.paused:
            self.paused -= 1
            return []
        for n, follow in self.follow.items():
            start = follow.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + k]
        return []

    def feedback(self, drafted: int, accepted: int) -> None:
        """A verification kept `accepted` of `drafted` tokens: back off while nothing is kept."""
        if accepted:
            self.misses = 0
            return
        self.misses += 1
        self.paused = min(2 ** self.misses, MAX_PAUSE) if self.misses > 1 else 0

    def _catch_up(self, seq: Sequence) -> None:
        known, prompt = len(self.tokens), len(seq.prompt_ids)
        new = seq.prompt_ids[known:] + seq.generated if known < prompt else seq.generated[known - prompt:]
        tokens, follow = self.tokens, self.follow
        for token in new:
            j = len(tokens)
            for n, table in follow.items():
                if j >= n:
                    table[tuple(tokens[j - n:j])] = j
            tokens.append(token)
