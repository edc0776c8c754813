"""Calibration samples for SmoothQuant: a JSONL file of {"text": ...} lines, tokenized."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError


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
