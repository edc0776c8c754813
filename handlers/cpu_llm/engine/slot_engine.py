"""Scheduling requests onto the model runner: each step is one forward pass that advances every
running request by one token and prefills the next chunk of the waiting prompts.

A request gets a KV-cache slot when its prefill starts and gives it back when it finishes or its
client goes away: nothing is copied when requests join or leave, and no row is padded. The slot
keeps its keys and values after that, and a later prompt that starts the same way reuses them
(prefix_cache.py). A prompt is prefilled `prefill_chunk` tokens per step, in the same forward pass
as the decode tokens of the running requests, so a long prompt arriving delays each running
stream's next token by one chunk's worth of compute at a time instead of by its whole prefill
(chunked prefill). With speculation on, a decoding request's row is followed by its drafted
tokens, verified in the same pass (decode/speculative.py).

Continuous batching calls `step`; dynamic batching calls `generate` (base.py), which steps
until the batch is done: one decode loop for both.
"""

from __future__ import annotations

import logging
import time

from ..core.params import TokenizerInfo
from ..decode.sequence import Sequence, finish, pick_tokens, record_token
from ..decode.speculative import accept_drafts
from ..runner.model_runner import ModelRunner
from .base import Engine
from .ngram_drafter import NgramDrafter
from .prefix_cache import PrefixCache

logger = logging.getLogger(__name__)


class SlotEngine(Engine):
    """The requests of one worker, keyed by request id in arrival order, and their slots."""

    def __init__(self, runner: ModelRunner, info: TokenizerInfo, request_timeout_s: float,
                 prefix_cache: bool = True, speculative_tokens: int = 0, speculative_max_batch: int = 1) -> None:
        """`speculative_tokens` > 0 drafts that many tokens per step for each decoding request
        (n-gram lookup) while at most `speculative_max_batch` requests decode."""
        self.runner, self.info, self.request_timeout_s = runner, info, request_timeout_s
        self.prefix_cache = PrefixCache(runner.cache, reuse=prefix_cache)
        self.speculative_tokens, self.speculative_max_batch = speculative_tokens, speculative_max_batch
        self.drafters: dict[str, NgramDrafter] = {}
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
        # (request, index of its first token in `tokens`, drafts after it): one logits row per token
        rows: list[tuple[str, int, list[int]]] = []
        decoding = [rid for rid, seq in self.seqs.items() if seq.generated and rid in self.slot]
        speculate = self.speculative_tokens > 0 and len(decoding) <= self.speculative_max_batch
        for rid in decoding:  # decode: the newest token of every request past its prefill, and its drafts
            seq, position = self.seqs[rid], self.cached[rid]
            drafts = self._drafts(rid, seq, position) if speculate else []
            rows.append((rid, len(tokens), drafts))
            tokens += [seq.generated[-1], *drafts]
            positions += range(position, position + 1 + len(drafts))
            slots += [self.slot[rid]] * (1 + len(drafts))
            self.cached[rid] += 1  # + the drafts kept, once verified
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
                rows.append((rid, len(tokens) - 1, []))
        if not tokens:
            # Only requests waiting for a slot, and no slot will come back: never spin on that.
            raise RuntimeError(f"{len(self.seqs)} requests wait for a KV-cache slot and all "
                               f"{self.runner.cache.slots} are taken by requests this engine does not hold")
        logits = self.runner.run(tokens, positions, slots,
                                 [index + i for _, index, drafts in rows for i in range(1 + len(drafts))])
        first_rows = [0]  # where each request's logits rows start
        for _, _, drafts in rows:
            first_rows.append(first_rows[-1] + 1 + len(drafts))
        single = [i for i, (_, _, drafts) in enumerate(rows) if not drafts]
        seqs = [self.seqs[rows[i][0]] for i in single]
        picked = pick_tokens(logits if len(single) == len(rows) else logits[[first_rows[i] for i in single]], seqs,
                             self.info.eos_ids)
        now = time.perf_counter()
        for i, seq, token in zip(single, seqs, picked):
            rid = rows[i][0]
            if not seq.generated and rid in self.prefill_started:
                seq.prefill_ms = (now - self.prefill_started.pop(rid)) * 1000
            record_token(seq, token, self.info)
        for i, (rid, _, drafts) in enumerate(rows):
            seq = self.seqs[rid]
            if drafts:
                kept = accept_drafts(logits[first_rows[i]:first_rows[i + 1]], seq, drafts, self.info)
                self.cached[rid] += kept
                seq.draft_tokens, seq.accepted_tokens = seq.draft_tokens + len(drafts), seq.accepted_tokens + kept
                self.drafters[rid].feedback(len(drafts), kept)
            if not seq.done and len(seq.prompt_ids) + len(seq.generated) >= self.runner.length:
                finish(seq, "length", self.info)  # the slot is full (max_prompt_tokens + max_new_tokens)

    def _drafts(self, rid: str, seq: Sequence, position: int) -> list[int]:
        """The tokens drafted for `seq`: no more than it may still generate, nor than its slot holds."""
        room = min(self.speculative_tokens, seq.request.max_new_tokens - len(seq.generated) - 1,
                   self.runner.length - 1 - position)
        if room <= 0:
            return []
        if rid not in self.drafters:
            self.drafters[rid] = NgramDrafter()
        return self.drafters[rid].propose(seq, room)

    def _release(self, rid: str) -> None:
        del self.seqs[rid]
        self.cached.pop(rid, None)
        self.prefill_started.pop(rid, None)
        self.drafters.pop(rid, None)
        if rid in self.slot:
            self.prefix_cache.give_back(self.slot.pop(rid))

    def _release_done(self) -> None:
        for rid in [rid for rid, seq in self.seqs.items() if seq.done]:
            self._release(rid)

