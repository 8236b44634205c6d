"""Token bytes -> text deltas: UTF-8 reassembly and stop strings that may span tokens."""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextAssembler:
    """Feeds token pieces in, hands out text that is safe to show.

    A multi-byte character split across tokens is held until it is whole, and text that could be
    the start of a stop string is held until it is known not to be one, so a stop string never
    leaks into the output even when it arrives in pieces.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False

    def feed(self, piece: bytes) -> str:
        """Returns the text now safe to emit; sets `stopped` when a stop string was found."""
        text = self._held + self._decoder.decode(piece)
        if not self._stops:
            self._held = ""
            return text
        cut = min((i for i in (text.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        """Whatever is held back, at the end of the generation."""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
