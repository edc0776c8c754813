"""Protocol-neutral request parameters: what the native and OpenAI APIs both turn a body into, and
what the engine needs from the tokenizer. No HTTP and no tensors here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. Greedy unless `do_sample` is true."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filtering
    repetition_penalty: float = 1.0
    # OpenAI's: subtracted from the logit of every token already generated (presence), and once
    # per time it was generated (frequency).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request. Exactly one of `prompt` / `messages` is set."""

    prompt: str | None
    messages: tuple[Mapping[str, str], ...] | None
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    stream: bool = False  # send the text as it is generated, one JSON line per chunk
    min_new_tokens: int = 0  # the end-of-sequence token cannot be chosen before this many tokens
    ignore_eos: bool = False  # keep generating after end-of-sequence (benchmarks: exact output lengths)


@dataclass(frozen=True)
class TokenizerInfo:
    """What the decode loop needs from the tokenizer, resolved once at load."""

    tokenizer: object
    eos_ids: frozenset[int]
    pad_id: int
