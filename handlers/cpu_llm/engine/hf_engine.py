"""The engine of the Hugging Face path (transformers' forward pass, IPEX's included): one padded
batch of rows over the model's own KV cache.

Each `step` drops the rows whose client went away, advances every running row by one token,
prefills the newcomers (their first token) and joins them to the batch, then removes the rows
that finished. Rows join and leave only where the cache is transformers' `DynamicCache`
(kv_batch.py): IPEX's indirect-access cache keeps one write position for the whole batch, so there
a batch starts together (dynamic batching) and its finished rows keep feeding a pad token, their
logits ignored, until the last one finishes.

The loop is written out instead of calling `model.generate()` because every request carries its
own max_new_tokens, sampling parameters, seed and stop strings. Left padding plus explicit
position ids and attention mask keep each row's result independent of its neighbours.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import torch
from transformers import DynamicCache

from ..core.params import TokenizerInfo
from ..decode.sequence import Sequence, finish, pick_tokens, record_token
from .base import Engine
from .hf_steps import decode_one_token, left_pad, prefill
from .kv_batch import RunningBatch, grow, join, keep_rows

logger = logging.getLogger(__name__)


class HFEngine(Engine):
    """The running rows of one worker, keyed by request id, in row order."""

    def __init__(self, model: torch.nn.Module, info: TokenizerInfo, request_timeout_s: float,
                 new_cache: Callable[[int], Any] = lambda n: None, max_batch: int | None = None) -> None:
        self.model, self.info, self.request_timeout_s = model, info, request_timeout_s
        self.new_cache, self.max_batch = new_cache, max_batch  # new_cache(n): the backend's empty cache for n rows
        self.ids: list[str] = []
        self.seqs: dict[str, Sequence] = {}
        self.batch: RunningBatch | None = None

    @torch.inference_mode()
    def step(self, new: dict[str, Sequence], wanted: set[str]) -> tuple[dict[str, Sequence], int]:
        cancelled = [rid for rid in self.ids if rid not in wanted]
        for rid in cancelled:
            logger.info("request %s: client gone after %d tokens; freeing its slot", rid, len(self.seqs[rid].generated))
        self._keep([rid for rid in self.ids if rid in wanted])
        touched = {rid: self.seqs[rid] for rid in self.ids}
        now = time.perf_counter()
        for seq in touched.values():
            if not seq.done and now - seq.arrived_at > self.request_timeout_s:
                finish(seq, "timeout", self.info)
        self._keep([rid for rid in self.ids if not self.seqs[rid].done])
        if any(not seq.done for seq in self.seqs.values()):
            self._decode()
        if new:
            self._prefill(new)
        touched.update(new)
        for seq in touched.values():
            seq.batch_size = max(seq.batch_size, len(self.ids))
        self._keep([rid for rid in self.ids if not self.seqs[rid].done])
        return touched, len(cancelled)

    def clear(self) -> None:
        self.ids, self.seqs, self.batch = [], {}, None

    def _decode(self) -> None:
        seqs = [self.seqs[rid] for rid in self.ids]
        # A finished row still in the batch (a fixed batch) feeds a pad token; its logits are ignored.
        last = torch.tensor([self.info.pad_id if seq.done else seq.generated[-1] for seq in seqs], dtype=torch.long)
        mask = grow(self.batch)
        logits, cache = decode_one_token(self.model, last, mask, self.batch.cache)
        self.batch = RunningBatch(cache, mask)
        for seq, token in zip(seqs, pick_tokens(logits, seqs, self.info.eos_ids)):
            if not seq.done:
                record_token(seq, token, self.info)

    def _prefill(self, new: dict[str, Sequence]) -> None:
        if self.batch is not None and not self._rows_move():
            raise RuntimeError(f"requests cannot join a running batch on a {type(self.batch.cache).__name__} KV cache")
        started = time.perf_counter()
        seqs = list(new.values())
        input_ids, mask = left_pad([seq.prompt_ids for seq in seqs], self.info.pad_id)
        logits, cache = prefill(self.model, input_ids, mask, self.new_cache(len(seqs)))
        prefill_ms = (time.perf_counter() - started) * 1000
        for seq, token in zip(seqs, pick_tokens(logits, seqs, self.info.eos_ids)):
            seq.prefill_ms = prefill_ms
            record_token(seq, token, self.info)
        self.batch = join(self.batch, RunningBatch(cache, mask))
        self.ids += list(new)
        self.seqs.update(new)

    def _rows_move(self) -> bool:
        """Whether rows can join and leave the running batch (kv_batch.py needs a DynamicCache)."""
        return self.batch is None or isinstance(self.batch.cache, DynamicCache)

    def _keep(self, ids: list[str]) -> None:
        """Keep only `ids` (a subsequence of the current rows) in the batch; a batch whose rows cannot
        leave is kept whole until none of its rows is wanted."""
        if ids == self.ids or (ids and not self._rows_move()):
            return
        if not ids:
            self.clear()
            return
        position = {rid: row for row, rid in enumerate(self.ids)}
        self.batch = keep_rows(self.batch, [position[rid] for rid in ids])
        for rid in set(self.ids) - set(ids):
            del self.seqs[rid]
        self.ids = list(ids)
