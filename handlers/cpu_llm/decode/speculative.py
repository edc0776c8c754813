"""Verifying drafted tokens: one forward pass scores a request's last token and its k drafts
(k + 1 logits rows), and this module decides how many drafts the request keeps.

- **Greedy**: a draft is kept while it is the argmax of the row before it; the first row whose
  argmax differs gives the corrected token, and when every draft is kept the last row gives one
  more. Each row's logits are those a one-token step would compute (the runner's rows do not
  depend on their batch), so the text is bit-identical to decoding without drafts.
- **Sampling** keeps the distribution, as in speculative sampling (Leviathan et al. 2023, Chen
  et al. 2023) with a draft that is one token for sure (q = 1 on the draft): the draft is kept
  with probability p(draft); otherwise the token is drawn from p with the draft removed,
  renormalized (max(0, p - q) normalized). A seeded request draws its random numbers in another
  order than without drafts, so it samples a different text from the same distribution.

Every token goes through `record_token`, so EOS, stop strings and max_new_tokens end a request at
the same token as without drafts; drafts after that are dropped.
"""

from __future__ import annotations

import torch

from ..core.params import TokenizerInfo
from .sampling import sample, sampling_probs
from .sequence import Sequence, plain_greedy, penalized, record_token


def accept_drafts(rows: torch.Tensor, seq: Sequence, drafts: list[int], info: TokenizerInfo) -> int:
    """Record the tokens `seq` gets from `rows` (len(drafts) + 1, vocab): the logits after its
    last token and after each draft. Returns how many drafts were kept."""
    greedy = rows.max(-1).indices.tolist() if plain_greedy(seq) else None
    for i in range(len(drafts) + 1):
        draft = drafts[i] if i < len(drafts) else None
        if greedy is not None and plain_greedy(seq):
            token = greedy[i]
        else:
            token = _verify_row(penalized(rows[i], seq, info.eos_ids), seq, draft)
        record_token(seq, token, info)
        if seq.done or token != draft:
            return i
    return len(drafts)


def _verify_row(logits: torch.Tensor, seq: Sequence, draft: int | None) -> int:
    """This row's token: the argmax (greedy), or a sample that keeps the draft with probability p(draft)."""
    params = seq.request.sampling
    if not params.do_sample:
        return int(logits.max(-1).indices)
    probs = sampling_probs(logits, params)
    if draft is None:
        return sample(probs, seq.generator)
    if float(torch.rand(1, generator=seq.generator)) < float(probs[draft]):
        return draft
    probs[draft] = 0.0  # rejected: draw from what is left of p
    return sample(probs, seq.generator)
