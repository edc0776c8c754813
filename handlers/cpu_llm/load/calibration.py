"""Calibration for SmoothQuant: samples from a JSONL file of {"text": ...} lines, tokenized, and
where the calibration result is kept (a given file, or a cache entry keyed by all it depends on)."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..config.quantization import SECTION, QuantizationConfig
from ..core.errors import ConfigError

CACHE_DIR_ENV = "LLM_CPU_CACHE_DIR"  # where SmoothQuant calibrations are cached


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


def smoothquant_summary_path(q: QuantizationConfig, backend: str, model_source: str, model_dir: str,
                             calibration: Path) -> Path:
    """A given summary file, or a cache entry keyed by everything the calibration depends on."""
    sq = q.smoothquant
    if sq.qconfig_summary_file:
        path = Path(sq.qconfig_summary_file)
        path = path if path.is_absolute() else Path(model_dir) / path
        if not path.is_file():
            raise ConfigError(f"{SECTION}.smoothquant.qconfig_summary_file", f"{path} does not exist")
        return path
    digest = hashlib.sha256()
    for part in (Path(model_source) / "config.json", calibration):
        digest.update(part.read_bytes() if part.is_file() else str(part).encode())
    weights = sorted(Path(model_source).glob("*.safetensors"))
    digest.update(json.dumps([(w.name, w.stat().st_size) for w in weights]).encode())
    digest.update(json.dumps(sq.__dict__, sort_keys=True, default=str).encode())
    digest.update(json.dumps(q.keep_full_precision).encode())
    cache = Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "torchserve-llm-cpu"))
    prefix = "" if backend == "ipex" else f"{backend}-"  # the two backends' files differ in format
    return cache / "smoothquant" / f"{prefix}{digest.hexdigest()[:16]}.json"


def smoothquant_batches(tokenizer, q: QuantizationConfig, calibration: Path) -> list[CalibrationBatch]:
    """The calibration samples `q.smoothquant` asks for, from the JSONL file `calibration`."""
    texts = read_texts(calibration, f"{SECTION}.smoothquant.calibration_data")
    return calibration_batches(tokenizer, texts, q.smoothquant.num_samples, q.smoothquant.seq_len)
