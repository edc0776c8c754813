"""Streaming text: what a client may be sent so far, so that the pieces add up to the final text.

The text comes from the sequence's one incremental detokenizer (decode/detokenizer.py), which
already holds back what could still change: a character still incomplete, and characters that
may begin a stop string (removed from the final text if the rest follows).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..decode.sequence import Sequence


@dataclass
class TextStream:
    """The part of one sequence's text already sent to its client."""

    sent: str = ""

    def next_piece(self, seq: Sequence) -> str:
        """New text that is safe to send now (everything that is left once `seq` is done)."""
        text = seq.text if seq.done else seq.detokenizer.settled()
        if not text.startswith(self.sent):
            # A tokenizer whose decoding of a prefix is not a prefix of the decoding: wait for
            # the end rather than send text that would then be contradicted.
            return ""
        piece, self.sent = text[len(self.sent):], text
        return piece
