"""Calibration samples for SmoothQuant: a JSONL file of {"text": ...} lines, tokenized."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError


@dataclass(frozen=True)
class CalibrationBatch:
    input_ids: torch.Tensor  # (1, seq)
    attention_mask: torch.Tensor
    position_ids: torch.Tensor


def read_texts(path: Path, key: str) -> list[str]:
    """Texts of a JSONL file; a broken line fails the load naming the file and line."""
    if not path.is_file():
        raise ConfigError(key, f"calibration file {path} does not exist")
    texts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            text = json.loads(line)["text"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(key, f"{path}:{number} is not a JSON object with a 'text' field") from None
        texts.append(text)
    if not texts:
        raise ConfigError(key, f"calibration file {path} has no samples")
    return texts


def calibration_batches(tokenizer, texts: list[str], num_samples: int, seq_len: int) -> list[CalibrationBatch]:
    """Up to `num_samples` windows of `seq_len` tokens, cut from the concatenated texts."""
    ids = tokenizer("\n\n".join(texts)).input_ids
    batches = []
    for start in range(0, max(len(ids) - 1, 1), seq_len):
        window = ids[start:start + seq_len]
        if len(window) < 8 or len(batches) == num_samples:
            break
        input_ids = torch.tensor([window])
        batches.append(CalibrationBatch(input_ids, torch.ones_like(input_ids),
                                        torch.arange(len(window))[None]))
    return batches


def stack_equal_lengths(batches: list[CalibrationBatch]) -> list[CalibrationBatch]:
    """The samples as one batch per sequence length (all windows but the last are seq_len long)."""
    lengths = sorted({b.input_ids.shape[1] for b in batches}, reverse=True)
    groups = [[b for b in batches if b.input_ids.shape[1] == n] for n in lengths]
    return [CalibrationBatch(*(torch.cat([getattr(b, f) for b in group]) for f in
                               ("input_ids", "attention_mask", "position_ids"))) for group in groups]


def pad_into_one(batches: list[CalibrationBatch]) -> CalibrationBatch:
    """The samples as one batch, right-padded with attention mask 0: under causal attention no
    real token sees a pad, so each sample's real tokens get what they would alone."""
    ids = torch.zeros(len(batches), max(b.input_ids.shape[1] for b in batches), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, batch in enumerate(batches):
        ids[row, :batch.input_ids.shape[1]] = batch.input_ids[0]
        mask[row, :batch.input_ids.shape[1]] = 1
    return CalibrationBatch(ids, mask, torch.arange(ids.shape[1]).expand_as(ids))


def alpha_candidates(alpha: float | str, low: float, high: float, step: float) -> list[float]:
    if alpha != "auto":
        return [float(alpha)]
    count = int(math.floor((high - low) / step + 1e-9)) + 1
    return [round(low + i * step, 4) for i in range(count)]


def calibration_loss(model, batches: list[CalibrationBatch], new_cache: Callable[[int], tuple]) -> float:
    """Mean next-token cross-entropy over the calibration batches."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in batches:
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           past_key_values=new_cache(batch.input_ids.shape[0]),
                           position_ids=batch.position_ids)[0].float()
            targets = batch.input_ids[:, 1:].masked_fill(batch.attention_mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((targets != -100).sum())
    return total / max(count, 1)
