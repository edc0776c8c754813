"""Automatic prefix caching: a new request starts from the longest cached prefix of its prompt.

Every slot of the KV cache records which tokens it holds (`SlotKVCache.held`), and keeps them
after its request finishes: a free slot is a cache entry. A new request takes

- the free slot whose held tokens share the longest prefix with its prompt (the least recently
  used among equals, so the oldest entry is the one evicted), and then
- when a slot still in use (or another free one) shares a longer prefix, a copy of those keys and
  values into it: a chat's system prompt, prefilled once, serves every conversation at once.

Matching is exact to the token, not to a block: a prefix that ends mid-block is reused whole. A
request always prefills at least its last prompt token, whose logits pick its first output token.
The reused keys and values are bit-identical to recomputed ones on our runner (its rows do not
depend on their batch or chunk: tests/test_runner.py), so greedy text does not change.
"""

from __future__ import annotations

from ..layers.attention import SlotKVCache

# Lists compared a slice at a time: C-speed equality, ~40 Python steps for a 2,000-token prompt.
_STRIDE = 64


def common_prefix(held: list[int], prompt: list[int], limit: int) -> int:
    """How many leading tokens `held` and `prompt` share, at most `limit`."""
    end = min(len(held), limit)
    start = 0
    while start + _STRIDE <= end and held[start:start + _STRIDE] == prompt[start:start + _STRIDE]:
        start += _STRIDE
    while start < end and held[start] == prompt[start]:
        start += 1
    return start


class PrefixCache:
    """Hands out KV-cache slots; with `reuse` on, each comes with the longest cached prefix of
    the prompt it will hold."""

    def __init__(self, cache: SlotKVCache, reuse: bool) -> None:
        self.cache, self.reuse = cache, reuse

    def take(self, prompt: list[int]) -> tuple[int, int] | None:
        """(slot, prompt tokens already in it) for a request with `prompt`, or None when every slot
        is in use."""
        cache = self.cache
        if not cache.free:
            return None
        if not self.reuse:
            slot = cache.free[0]  # the least recently used
            cache.take(slot, keep=0)
            return slot, 0
        limit = len(prompt) - 1
        shared = [common_prefix(held, prompt, limit) for held in cache.held]
        target = max(cache.free, key=shared.__getitem__)  # the first maximum: the least recently used
        source = max(range(cache.slots), key=shared.__getitem__)
        cache.take(target, keep=shared[target])
        if shared[source] > shared[target]:
            cache.copy_prefix(source, target, shared[target], shared[source])
        return target, shared[source]

    def give_back(self, slot: int) -> None:
        self.cache.give_back(slot)
