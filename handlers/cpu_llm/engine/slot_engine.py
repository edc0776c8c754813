"""Scheduling requests onto the model runner: each step is one forward pass that advances every
running request by one token and prefills the next chunk of the waiting prompts.

A request gets a KV-cache slot when its prefill starts and gives it back when it finishes or its
client goes away: nothing is copied when requests join or leave, and no row is padded. The slot
keeps its keys and values after that, and a later prompt that starts the same way reuses them
(prefix_cache.py). A prompt is
prefilled `prefill_chunk` tokens per step, in the same forward pass as the decode tokens of the
running requests, so a long prompt arriving delays each running stream's next token by one
chunk's worth of compute at a time instead of by its whole prefill (chunked prefill).

Continuous batching calls `step`; dynamic batching calls `generate` (base.py), which steps
until the batch is done: one decode loop for both.
"""

from __future__ import annotations

import logging
import time

from ..core.params import TokenizerInfo
from ..decode.sequence import Sequence, finish, pick_tokens, record_token
from ..runner.model_runner import ModelRunner
from .base import Engine
from .prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class SlotEngine(Engine):
    """The requests of one worker, keyed by request id in arrival order, and their slots."""

    def __init__(self, runner: ModelRunner, info: TokenizerInfo, request_timeout_s: float,
                 prefix_cache: bool = True) -> None:
        self.runner, self.info, self.request_timeout_s = runner, info, request_timeout_s
        self.prefix_cache = PrefixCache(runner.cache, reuse=prefix_cache)
        self.seqs: dict[str, Sequence] = {}
        self.slot: dict[str, int] = {}
        self.cached: dict[str, int] = {}  # tokens of the request already in its slot
        self.prefill_started: dict[str, float] = {}

    def step(self, new: dict[str, Sequence], wanted: set[str]) -> tuple[dict[str, Sequence], int]:
        """One forward pass; returns the sequences of `new` and of the running requests, and how
        many requests were dropped because their client went away."""
        cancelled = [rid for rid in self.seqs if rid not in wanted]
        for rid in cancelled:
            logger.info("request %s: client gone after %d tokens; freeing its slot", rid, len(self.seqs[rid].generated))
            self._release(rid)
        touched = dict(self.seqs)
        now = time.perf_counter()
        for seq in touched.values():
            if now - seq.arrived_at > self.request_timeout_s:
                finish(seq, "timeout", self.info)
        self.seqs.update(new)
        touched.update(new)
        self._release_done()
        if self.seqs:
            self._forward()
        for seq in touched.values():
            seq.batch_size = max(seq.batch_size, len(self.seqs))
        self._release_done()
        return touched, len(cancelled)

    def clear(self) -> None:
        for rid in list(self.seqs):
            self._release(rid)

    def _forward(self) -> None:
        tokens: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        rows: list[tuple[str, int]] = []  # (request, index of its token in `tokens`) for each logits row
        for rid, seq in self.seqs.items():  # decode: the newest token of every request past its prefill
            if seq.generated and rid in self.slot:
                rows.append((rid, len(tokens)))
                tokens.append(seq.generated[-1])
                positions.append(self.cached[rid])
                slots.append(self.slot[rid])
                self.cached[rid] += 1
        budget = self.runner.prefill_chunk
        for rid, seq in self.seqs.items():  # prefill: the next chunk of each waiting prompt, oldest first
            done = self.cached.get(rid, 0)
            if budget == 0 or done >= len(seq.prompt_ids):
                continue
            if rid not in self.slot:
                taken = self.prefix_cache.take(seq.prompt_ids)
                if taken is None:
                    break  # every slot is in use: wait for one to come back
                self.slot[rid], done = taken
                self.cached[rid] = seq.cached_tokens = done
                self.prefill_started[rid] = time.perf_counter()
            piece = seq.prompt_ids[done:done + budget]
            tokens += piece
            positions += range(done, done + len(piece))
            slots += [self.slot[rid]] * len(piece)
            self.cached[rid] = done + len(piece)
            budget -= len(piece)
            if self.cached[rid] == len(seq.prompt_ids):
                rows.append((rid, len(tokens) - 1))
        if not tokens:
            # Only requests waiting for a slot, and no slot will come back: never spin on that.
            raise RuntimeError(f"{len(self.seqs)} requests wait for a KV-cache slot and all "
                               f"{self.runner.cache.slots} are taken by requests this engine does not hold")
        logits = self.runner.run(tokens, positions, slots, [index for _, index in rows])
        seqs = [self.seqs[rid] for rid, _ in rows]
        now = time.perf_counter()
        for (rid, _), seq, token in zip(rows, seqs, pick_tokens(logits, seqs, self.info.eos_ids)):
            if not seq.generated and rid in self.prefill_started:
                seq.prefill_ms = (now - self.prefill_started.pop(rid)) * 1000
            record_token(seq, token, self.info)
            if not seq.done and len(seq.prompt_ids) + len(seq.generated) >= self.runner.length:
                finish(seq, "length", self.info)  # the slot is full (max_prompt_tokens + max_new_tokens)

    def _release(self, rid: str) -> None:
        del self.seqs[rid]
        self.cached.pop(rid, None)
        self.prefill_started.pop(rid, None)
        if rid in self.slot:
            self.prefix_cache.give_back(self.slot.pop(rid))

    def _release_done(self) -> None:
        for rid in [rid for rid, seq in self.seqs.items() if seq.done]:
            self._release(rid)

