"""One request's generated text, decoded once, incrementally: the one source of the text that stop
strings search, that streaming sends and that the client finally gets.

Decoding everything generated so far after every token costs time in proportion to the length,
per token and per request. Here the text grows from a short window instead, as vLLM's incremental
detokenizer does: the tokens since the last read point, with the tokens read last time as left
context (byte-level BPE and SentencePiece both need it to get spaces right). A character split
over several byte-level tokens decodes to U+FFFD until its last byte arrives: the window's text is
committed once it no longer ends in such a character, and the complete characters before one are
already searched (and may be streamed) meanwhile.

A stop string is removed from the final text, so the characters that could begin one are held back
from streaming until the next token decides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPLACEMENT = "\ufffd"  # what a character split over several byte-level tokens decodes to


@dataclass
class Detokenizer:
    """The text of one sequence's generated tokens, as far as it is known."""

    stops: tuple[str, ...] = ()
    text: str = ""  # committed: the text of the tokens up to `read`
    tail: str = ""  # complete characters after `read` that precede a character still incomplete
    prefix: int = 0  # first token of the left context
    read: int = 0  # tokens whose text is in `text`
    searched: int = 0  # characters of text + tail already searched for stop strings
    stopped: bool = False  # a stop string was found: `text` ends right before it

    def add(self, tokenizer: Any, ids: list[int]) -> bool:
        """After a new token at the end of `ids`: extend the text; True when a stop string has
        appeared (the text is then cut before its first occurrence, and final)."""
        new = self._unread(tokenizer, ids)
        self.tail = new.rstrip(REPLACEMENT)
        if new and not new.endswith(REPLACEMENT):
            self.text, self.tail = self.text + new, ""
            self.prefix, self.read = self.read, len(ids)
        if not self.stops:
            return False
        visible = self.text + self.tail
        # A stop string may straddle the old end: look back by the longest one, less a character.
        start = max(0, self.searched - max(map(len, self.stops)) + 1)
        hits = [i for i in (visible.find(stop, start) for stop in self.stops) if i >= 0]
        self.searched = len(visible)
        if hits:
            self.text, self.tail, self.stopped = visible[:min(hits)], "", True
        return self.stopped

    def settled(self) -> str:
        """The text that can no longer change: without a character still incomplete, and without
        trailing characters that may be the start of a stop string."""
        visible = self.text + self.tail
        if self.stopped:
            return visible
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(visible)), 0, -1):
                if visible.endswith(stop[:n]):
                    hold = max(hold, n)
                    break
        return visible[:len(visible) - hold]

    def final(self, tokenizer: Any, ids: list[int]) -> str:
        """The whole text once generation has ended: a character left incomplete at the end is
        decoded as it is (U+FFFD), as a full decoding would."""
        return self.text if self.stopped else self.text + self._unread(tokenizer, ids)

    def _unread(self, tokenizer: Any, ids: list[int]) -> str:
        """The text of the tokens after `read`, decoded with the tokens from `prefix` as left context."""
        context = tokenizer.decode(ids[self.prefix:self.read], skip_special_tokens=True)
        window = tokenizer.decode(ids[self.prefix:], skip_special_tokens=True)
        return window[len(context):] if len(window) > len(context) else ""
