"""Stop strings, found incrementally: each new token decodes a few tokens and searches only the
new end of the text.

Decoding everything generated so far after every token costs time in proportion to the length,
per token and per request. Here the text grows from a short window instead, as vLLM's incremental
detokenizer does: the tokens since the last read point, with the tokens read last time as left
context (byte-level BPE and SentencePiece both need it to get spaces right); the text is kept
once the window no longer ends in an incomplete character, and the text before such a character
is searched at once. A hit is confirmed on the whole decoded text, which is the text the client
gets, so a window that decoded differently could delay a stop but never cut the text anywhere
else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPLACEMENT = "\ufffd"  # what a character split over several byte-level tokens decodes to


@dataclass
class StopScanner:
    """One request's stop strings and the part of its text already searched."""

    stops: tuple[str, ...]
    text: str = ""  # the generated text as far as it is known
    prefix: int = 0  # first token of the left context
    read: int = 0  # tokens whose text is in `text`
    searched: int = 0  # characters of `text` already searched

    def feed(self, tokenizer: Any, ids: list[int]) -> str | None:
        """After a new token: the final text, cut before the first stop string, or None."""
        context = tokenizer.decode(ids[self.prefix:self.read], skip_special_tokens=True)
        window = tokenizer.decode(ids[self.prefix:], skip_special_tokens=True)
        if len(window) <= len(context):
            return None  # no new character yet
        new = window[len(context):]
        # Text before a character still incomplete is final: search it now, keep it once complete.
        candidate = self.text + new.rstrip(REPLACEMENT)
        complete = not new.endswith(REPLACEMENT)
        # A stop string may straddle the old end: look back by the longest one, less a character.
        start = max(0, self.searched - max(map(len, self.stops)) + 1)
        found = any(stop in candidate[start:] for stop in self.stops)
        if complete:
            self.text, self.searched = candidate, len(candidate)
            self.prefix, self.read = self.read, len(ids)
        if not found:
            return None
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        hits = [i for i in (whole.find(stop) for stop in self.stops) if i >= 0]
        if hits:
            return whole[:min(hits)]
        if complete:  # the window decoded differently from the whole text: resync
            self.text, self.searched = whole, len(whole)
        return None
