"""The Hugging Face path's forward calls: left-padded prefill and one decode step, with explicit
position ids and attention mask so that each row's result does not depend on its neighbours.

Outputs are indexed, not named: IPEX's traced models return plain tuples."""

from __future__ import annotations

import torch


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack prompts right-aligned so every row's next token is in the last column."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids):] = 1
    return input_ids, mask


def prefill(model, input_ids: torch.Tensor, mask: torch.Tensor, cache=None):
    """Run the prompts through the model; return last-position logits and the KV cache.

    `cache` is the backend's empty cache (None lets transformers create its own). Outputs
    are indexed, not named: IPEX's traced models return plain tuples.
    """
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                past_key_values=cache, use_cache=True)
    return out[0][:, -1, :].float(), out[1]


def decode_one_token(model, tokens: torch.Tensor, mask: torch.Tensor, cache):
    """Feed one token per row; `mask` already includes the new column."""
    positions = (mask.sum(-1, keepdim=True) - 1)
    out = model(
        input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
        past_key_values=cache, use_cache=True,
    )
    return out[0][:, -1, :].float(), out[1]
