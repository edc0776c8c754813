"""Streaming text: what a client may be sent so far, so that the pieces add up to the final text.

Two things make "decode the new token" wrong: a character split over several byte-level tokens
decodes to U+FFFD until its last byte arrives, and a stop string is removed from the final text,
so its first characters must not be sent before we know whether the rest follows. Each call
therefore decodes everything generated so far and releases only the part that can no longer
change.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.generation import Sequence, TokenizerInfo
from ..engine.stop_strings import REPLACEMENT


def _held_back(text: str, stop: tuple[str, ...]) -> int:
    """How many trailing characters could still change: an incomplete character, or the start
    of a stop string."""
    hold = len(text) - len(text.rstrip(REPLACEMENT))
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


@dataclass
class TextStream:
    """The part of one sequence's text already sent to its client."""

    sent: str = ""

    def next_piece(self, seq: Sequence, info: TokenizerInfo) -> str:
        """New text that is safe to send now (everything that is left once `seq` is done)."""
        if seq.done:
            text = seq.text
        else:
            text = info.tokenizer.decode(seq.generated, skip_special_tokens=True)
            text = text[: len(text) - _held_back(text, seq.request.stop)]
        if not text.startswith(self.sent):
            # A tokenizer whose decoding of a prefix is not a prefix of the decoding: wait for
            # the end rather than send text that would then be contradicted.
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece
