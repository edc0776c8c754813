"""Continuous (iteration-level) batching: requests join the running batch between decode steps
and leave it as soon as they finish.

Each `step` call receives the requests that just arrived and the ids of those still wanted (a
client that went away is no longer wanted): it drops the unwanted rows, advances every running
row by one token, prefills the newcomers (their first token) and joins them to the batch, then
removes the rows that finished. The caller (TorchServe's continuous batching in the handler)
turns the touched sequences into response chunks.
"""

from __future__ import annotations

import logging
import time
import torch

from .generation import Sequence, TokenizerInfo, decode_one_token, finish, left_pad, pick_tokens, prefill, record_token
from .kv_batch import RunningBatch, grow, join, keep_rows

logger = logging.getLogger(__name__)


class ContinuousEngine:
    """Holds the running sequences of one worker, keyed by request id, in row order."""

    def __init__(self, model: torch.nn.Module, info: TokenizerInfo, request_timeout_s: float) -> None:
        self.model, self.info, self.request_timeout_s = model, info, request_timeout_s
        self.ids: list[str] = []
        self.seqs: dict[str, Sequence] = {}
        self.batch: RunningBatch | None = None

    @property
    def in_flight(self) -> int:
        return len(self.ids)

    @torch.inference_mode()
    def step(self, new: dict[str, Sequence], wanted: set[str]) -> tuple[dict[str, Sequence], int]:
        """Advance everything by one token; returns the sequences of `new` and of the running rows,
        and how many rows were dropped because their client went away."""
        cancelled = [rid for rid in self.ids if rid not in wanted]
        for rid in cancelled:
            logger.info("request %s: client gone after %d tokens; freeing its slot", rid, len(self.seqs[rid].generated))
        self._keep([rid for rid in self.ids if rid in wanted])
        touched = {rid: self.seqs[rid] for rid in self.ids}
        now = time.perf_counter()
        for seq in touched.values():
            if now - seq.arrived_at > self.request_timeout_s:
                finish(seq, "timeout", self.info)

        running = [rid for rid in self.ids if not self.seqs[rid].done]
        self._keep(running)
        if running:
            self._decode()
        if new:
            self._prefill(new)
        touched.update(new)
        for seq in touched.values():
            seq.batch_size = max(seq.batch_size, len(self.ids))
        self._keep([rid for rid in self.ids if not self.seqs[rid].done])
        return touched, len(cancelled)

    def _decode(self) -> None:
        seqs = [self.seqs[rid] for rid in self.ids]
        last = torch.tensor([seq.generated[-1] for seq in seqs], dtype=torch.long)
        mask = grow(self.batch)
        logits, cache = decode_one_token(self.model, last, mask, self.batch.cache)
        self.batch = RunningBatch(cache, mask)
        for seq, token in zip(seqs, pick_tokens(logits, seqs, self.info.eos_ids)):
            record_token(seq, token, self.info)

    def _prefill(self, new: dict[str, Sequence]) -> None:
        started = time.perf_counter()
        seqs = list(new.values())
        input_ids, mask = left_pad([seq.prompt_ids for seq in seqs], self.info.pad_id)
        logits, cache = prefill(self.model, input_ids, mask)
        prefill_ms = (time.perf_counter() - started) * 1000
        for seq, token in zip(seqs, pick_tokens(logits, seqs, self.info.eos_ids)):
            seq.prefill_ms = prefill_ms
            record_token(seq, token, self.info)
        self.batch = join(self.batch, RunningBatch(cache, mask))
        self.ids += list(new)
        self.seqs.update(new)

    def _keep(self, ids: list[str]) -> None:
        """Keep only `ids` (a subsequence of the current rows) in the batch."""
        if ids == self.ids:
            return
        position = {rid: row for row, rid in enumerate(self.ids)}
        self.batch = keep_rows(self.batch, [position[rid] for rid in ids])
        for rid in set(self.ids) - set(ids):
            del self.seqs[rid]
        self.ids = list(ids)
