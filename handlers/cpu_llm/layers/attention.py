"""Attention over a preallocated KV cache in slots (one slot per running request).

`SlotKVCache` is one buffer per keys and values, (layers, slots, kv_heads, length, head_dim),
allocated once at load and never copied: each request owns a slot and writes its keys at its own
positions, as gpt-fast writes `k_out[:, :, input_pos]`; a request that joins or leaves only takes
or returns a slot number. Memory is committed page by page as positions are first written, so
the resident size follows what is in use. `RotaryTable` holds cos/sin per position, computed
exactly as Hugging Face does (from the loaded model's own inverse frequencies, so Llama 3's and
linear rope scaling come for free).
"""

from __future__ import annotations

import logging

import torch

from .. import kernels

logger = logging.getLogger(__name__)


class SlotKVCache:
    """Keys and values of every layer for `slots` requests of up to `length` tokens each."""

    def __init__(self, layers: int, slots: int, kv_heads: int, length: int, head_dim: int) -> None:
        shape = (layers, slots, kv_heads, length, head_dim)
        self.keys = torch.empty(shape)  # (layers, slots, kv_heads, length, head_dim)
        self.values = torch.empty(shape)
        self.layer_keys, self.layer_values = list(self.keys.unbind(0)), list(self.values.unbind(0))  # views per layer
        self.slots, self.length = slots, length
        self.free = list(range(slots))  # the least recently given back first
        # The tokens whose keys and values each slot holds at positions 0, 1, ...: what a new
        # request may reuse (engine/prefix_cache.py). The runner records every token it wrote once
        # its forward pass succeeded, whoever called it.
        self.held: list[list[int]] = [[] for _ in range(slots)]

    @staticmethod
    def bytes_needed(layers: int, slots: int, kv_heads: int, length: int, head_dim: int) -> int:
        return 2 * layers * slots * kv_heads * length * head_dim * 4

    def take(self, slot: int, keep: int) -> None:
        """Take free `slot` for a request that reuses its first `keep` positions."""
        self.free.remove(slot)
        del self.held[slot][keep:]

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    def record(self, tokens: list[int], positions: list[int], slots: list[int]) -> None:
        """Token i was written at `positions[i]` of slot `slots[i]`. A slot's later positions were
        computed from the token it replaced, so they no longer count; a token written past a gap
        does not count either (`held` is what a prompt's prefix may reuse, so it has no holes)."""
        for token, position, slot in zip(tokens, positions, slots):
            held = self.held[slot]
            if position <= len(held):
                del held[position:]
                held.append(token)

    def copy_prefix(self, source: int, target: int, start: int, end: int) -> None:
        """Give `target` the keys and values of `source` at positions start..end-1 (one memory copy
        per buffer: ~46 KiB a token for SmolLM2, where recomputing a token is a whole forward row)."""
        self.keys[:, target, :, start:end] = self.keys[:, source, :, start:end]
        self.values[:, target, :, start:end] = self.values[:, source, :, start:end]
        self.record(self.held[source][start:end], list(range(start, end)), [target] * (end - start))


class RotaryTable:
    """cos and sin of every position's rotary angles, (length, head_dim / 2) each."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float, length: int) -> None:
        angles = torch.outer(torch.arange(length, dtype=torch.float32), inv_freq.float())  # (length, D / 2)
        self.cos = (angles.cos() * scaling).contiguous()
        self.sin = (angles.sin() * scaling).contiguous()


def attention(qkv: torch.Tensor, rotary: RotaryTable, positions: torch.Tensor, slots: torch.Tensor,
              cache: SlotKVCache, layer: int, heads: int, kv_heads: int, scale: float) -> torch.Tensor:
    """Rotate q and k, write k and v at each token's (slot, position), attend over each token's
    own slot up to its position. qkv (N, (heads + 2 kv_heads) * D) -> (N, heads * D)."""
    return kernels.slot_attention(qkv, rotary.cos, rotary.sin, positions, slots, cache.layer_keys[layer],
                              cache.layer_values[layer], heads, kv_heads, scale)
