"""Verifying drafted tokens: one forward pass scores a request's last token and its k drafts
(k + 1 logits rows), and this module decides how many drafts the request keeps.

- **Greedy**: a draft is kept while it is the argmax of the row before it; the first row whose
  argmax differs gives the corrected token, and when every draft is kept the last row gives one
  more. Each row's logits are those a one-token step would compute (the runner's rows do not
  depend on their batch), so the text is bit-identical to decoding without drafts.
- **Sampling** draws the row's token exactly as a step without drafts would (same distribution,
  same random number from the request's generator) and keeps the draft if it is that token. A
  draft that is one token for sure is thus kept with probability p(draft), as speculative
  sampling's rejection rule (Leviathan et al. 2023, Chen et al. 2023) keeps it, and when it is
  not, the token drawn is distributed as p without the draft, renormalized: the rule's residual
  distribution. So the distribution is kept, and a seeded request samples the same text as
  without drafts.

Every token goes through `record_token`, so EOS, stop strings and max_new_tokens end a request at
the same token as without drafts; drafts after that are dropped.
"""

from __future__ import annotations

import torch

from ..core.params import TokenizerInfo
from .sequence import Sequence, pick_token, plain_greedy, record_token


def accept_drafts(rows: torch.Tensor, seq: Sequence, drafts: list[int], info: TokenizerInfo) -> int:
    """Record the tokens `seq` gets from `rows` (len(drafts) + 1, vocab): the logits after its
    last token and after each draft. Returns how many drafts were kept."""
    greedy = rows.max(-1).indices.tolist() if plain_greedy(seq) else None
    for i in range(len(drafts) + 1):
        draft = drafts[i] if i < len(drafts) else None
        # A plain greedy request stays plain as it grows (min_new_tokens only gets further behind).
        token = greedy[i] if greedy is not None else pick_token(rows[i], seq, info.eos_ids)
        record_token(seq, token, info)
        if seq.done or token != draft:
            return i
    return len(drafts)
