"""Batched generation with left padding and a per-request decode loop.

The loop is written out (prefill, then one token per step) instead of calling
`model.generate()` because every request in a TorchServe batch carries its own
max_new_tokens, sampling parameters, seed and stop strings. Left padding plus explicit
position ids and attention mask keep each row's result independent of its neighbours:
greedy output in a batch equals greedy output alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .request import GenerationRequest
from .sampling import make_generator, pick_next_token


@dataclass
class Sequence:
    """Decode state of one request inside a batch."""

    request: GenerationRequest
    prompt_ids: list[int]
    generator: torch.Generator | None = None
    generated: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    finished_at: float = 0.0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class GenerationResult:
    """What a client gets back for one request."""

    text: str
    finish_reason: str  # "eos" | "stop" | "length"
    token_ids: tuple[int, ...]  # generated ids, without the EOS token
    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float
    decode_ms: float


@dataclass(frozen=True)
class TokenizerInfo:
    """What the decode loop needs from the tokenizer, resolved once at load."""

    tokenizer: object
    eos_ids: frozenset[int]
    pad_id: int


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


def _update_finish(seq: Sequence, token: int, info: TokenizerInfo) -> None:
    """Record `token` for `seq` and decide whether the sequence has finished."""
    if token in info.eos_ids:
        seq.finish_reason = "eos"
        return
    seq.generated.append(token)
    stop = seq.request.stop
    if stop:
        text = info.tokenizer.decode(seq.generated, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stop) if i >= 0]
        if hits:
            seq.text = text[: min(hits)]
            seq.finish_reason = "stop"
            return
    if len(seq.generated) >= seq.request.max_new_tokens:
        seq.finish_reason = "length"


def _pick(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """One next token per row; -1 for rows that have already finished."""
    tokens = []
    for row, seq in enumerate(seqs):
        if seq.done:
            tokens.append(-1)
            continue
        seen = torch.tensor(seq.prompt_ids + seq.generated, dtype=torch.long)
        tokens.append(pick_next_token(logits[row], seq.request.sampling, seen, seq.generator))
    return tokens


@torch.inference_mode()
def generate_batch(
    model, info: TokenizerInfo, requests: list[GenerationRequest], prompts: list[list[int]],
    new_cache: Callable[[int], Any] = lambda n: None,
) -> list[GenerationResult]:
    """Generate for a batch of already-tokenized, validated requests."""
    seqs = [
        Sequence(req, ids, make_generator(req.sampling.seed) if req.sampling.do_sample else None)
        for req, ids in zip(requests, prompts)
    ]
    start = time.perf_counter()
    input_ids, mask = left_pad(prompts, info.pad_id)
    logits, cache = prefill(model, input_ids, mask, new_cache(len(prompts)))
    prefill_done = time.perf_counter()
    while True:
        tokens = _pick(logits, seqs)
        now = time.perf_counter()
        for seq, token in zip(seqs, tokens):
            if not seq.done:
                _update_finish(seq, token, info)
                if seq.done:
                    seq.finished_at = now
        if all(seq.done for seq in seqs):
            break
        # Finished rows keep feeding a pad token; their logits are ignored.
        step = torch.tensor([info.pad_id if t < 0 else t for t in tokens], dtype=torch.long)
        mask = torch.cat([mask, torch.ones((len(seqs), 1), dtype=torch.long)], dim=1)
        logits, cache = decode_one_token(model, step, mask, cache)

    results = []
    for seq in seqs:
        if seq.finish_reason != "stop":
            seq.text = info.tokenizer.decode(seq.generated, skip_special_tokens=True)
        results.append(
            GenerationResult(
                text=seq.text,
                finish_reason=seq.finish_reason or "length",
                token_ids=tuple(seq.generated),
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.generated) + (seq.finish_reason == "eos"),
                prefill_ms=(prefill_done - start) * 1000,
                decode_ms=(seq.finished_at - prefill_done) * 1000,
            )
        )
    return results
