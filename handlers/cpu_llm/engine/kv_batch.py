"""The KV cache of a continuously batched set of rows: rows join and leave between decode steps.

Rows are left-padded: every row's newest token sits in the last column, padding on the left is
masked out. A group of new requests is prefilled on its own and then joined to the running rows
by padding the shorter of the two caches on the left; a finished row is dropped by selecting the
others, and columns that became padding in every row are trimmed away. Copies happen only at
these join/leave events, never per decode step.

transformers' `DynamicCache` is the cache type (both supported versions); its layout differs
between 4.51 (`key_cache` / `value_cache` lists) and 5.x (`layers[i].keys` / `.values`), which
`cache_layers` and `to_cache` hide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache

Layers = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [rows, heads, length, dim]


def cache_layers(cache: Any) -> Layers:
    """(keys, values) of every layer of a transformers cache."""
    if isinstance(cache, DynamicCache):
        if hasattr(cache, "layers"):  # transformers 5
            return [(layer.keys, layer.values) for layer in cache.layers]
        return list(zip(cache.key_cache, cache.value_cache))  # transformers 4.x
    raise TypeError(f"continuous batching needs transformers' DynamicCache, the model returned {type(cache).__name__}")


def to_cache(layers: Layers) -> DynamicCache:
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers):
        cache.update(keys, values, index)
    return cache


@dataclass
class RunningBatch:
    """The rows being decoded together: their KV cache and attention mask, row-aligned."""

    cache: Any
    mask: torch.Tensor  # [rows, length]; 1 = a real token, 0 = left padding

    @property
    def rows(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]


def _pad_left(layers: Layers, mask: torch.Tensor, columns: int) -> tuple[Layers, torch.Tensor]:
    if columns == 0:
        return layers, mask
    padded = [(torch.nn.functional.pad(k, (0, 0, columns, 0)), torch.nn.functional.pad(v, (0, 0, columns, 0)))
              for k, v in layers]
    return padded, torch.nn.functional.pad(mask, (columns, 0))


def join(running: RunningBatch | None, new: RunningBatch) -> RunningBatch:
    """`running` rows first, then `new` rows, aligned on their last column."""
    if running is None:
        return new
    old_layers, old_mask = cache_layers(running.cache), running.mask
    new_layers, new_mask = cache_layers(new.cache), new.mask
    width = max(running.length, new.length)
    old_layers, old_mask = _pad_left(old_layers, old_mask, width - running.length)
    new_layers, new_mask = _pad_left(new_layers, new_mask, width - new.length)
    layers = [(torch.cat([ok, nk]), torch.cat([ov, nv])) for (ok, ov), (nk, nv) in zip(old_layers, new_layers)]
    return RunningBatch(to_cache(layers), torch.cat([old_mask, new_mask]))


def keep_rows(batch: RunningBatch, rows: list[int]) -> RunningBatch | None:
    """Only `rows` (in that order), without the columns that are now padding in all of them."""
    if not rows:
        return None
    if rows == list(range(batch.rows)):
        return batch
    index = torch.tensor(rows, dtype=torch.long)
    mask = batch.mask.index_select(0, index)
    used = mask.any(0).nonzero()
    first = int(used[0]) if used.numel() else mask.shape[1]
    layers = [(k.index_select(0, index)[:, :, first:].contiguous(), v.index_select(0, index)[:, :, first:].contiguous())
              for k, v in cache_layers(batch.cache)]
    return RunningBatch(to_cache(layers), mask[:, first:].contiguous())


def grow(batch: RunningBatch) -> torch.Tensor:
    """The mask for the next decode step: one more real column for every row."""
    return torch.cat([batch.mask, torch.ones((batch.rows, 1), dtype=batch.mask.dtype)], dim=1)
