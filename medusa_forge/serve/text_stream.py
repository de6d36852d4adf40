"""Append-only text deltas from a growing token sequence, for streaming responses.

Decoding each chunk of tokens on its own breaks words and multi-byte characters apart, so we decode
the running sequence and send what is new. Two kinds of tail are held back until they are settled:
an incomplete UTF-8 character (the tokenizer shows it as U+FFFD) and anything that could still turn
out to be the start of a stop string (the final text ends before the stop string). The deltas of
one request concatenate to exactly its final ``text_output``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

REPLACEMENT = "\ufffd"


class TextDeltas:
    def __init__(self, decode: Callable[[list[int]], str], stop_strings: Sequence[str] = ()):
        self.decode = decode
        self.stops = tuple(s for s in stop_strings if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.ids: list[int] = []
        self.sent = ""

    def push(self, new_ids: Sequence[int]) -> str:
        """Add tokens; return the text that is now safe to send (possibly empty)."""
        self.ids.extend(int(t) for t in new_ids)
        text = self.decode(self.ids)
        safe = len(text.rstrip(REPLACEMENT))
        if self.stops:
            hits = [text.find(s) for s in self.stops if s in text]
            safe = min([safe - self.hold, *hits])
        if safe <= len(self.sent) or not text.startswith(self.sent):
            return ""
        delta = text[len(self.sent) : safe]
        self.sent += delta
        return delta

    def finish(self, final_text: str) -> str:
        """The rest of ``final_text`` after what was sent (it always extends what was sent)."""
        if not final_text.startswith(self.sent):  # a tokenizer that re-decodes earlier text: send the tail we can
            return final_text[len(self.sent) :]
        delta = final_text[len(self.sent) :]
        self.sent = final_text
        return delta
