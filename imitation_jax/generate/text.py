"""Incremental detokenization and stop strings, one `TextTracker` per request.

Decoding the whole reply after every token would cost O(n^2); decoding only the new token would
lose SentencePiece's word-initial spaces and split multi-byte characters. Each step decodes a short
window instead: the text of ids[prefix:] minus the text of ids[prefix:read] is the new text, and
a window that ends inside a UTF-8 character (decodes to U+FFFD) waits for the next token.
"""

from __future__ import annotations

from typing import Sequence

from imitation_jax.data.tokenizer import Tokenizer

_INCOMPLETE = "\ufffd"


class TextTracker:
    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False  # a stop string appeared; `text` ends right before it
        self._prefix = 0
        self._read = 0
        self._emitted = 0  # characters of `text` already handed out by `pop_delta`

    def add(self, token: int) -> bool:
        """Append a token; True once a stop string has appeared (text trimmed before it)."""
        if self.stopped:
            return True
        self.ids.append(token)
        return self._advance(final=False)

    def finish(self) -> bool:
        """The reply is complete: text still waiting for the rest of a character is taken as it is."""
        return self.stopped or self._advance(final=True)

    def _advance(self, final: bool) -> bool:
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith(_INCOMPLETE) and not final):
            return False
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        return self._find_stop(start)

    def _find_stop(self, start: int) -> bool:
        hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True
        return self.stopped

    def pop_delta(self, final: bool = False) -> str:
        """New text safe to show: held back while the end of the text could begin a stop string."""
        end = len(self.text)
        if not final and not self.stopped:
            end -= self._held_back()
        delta = self.text[self._emitted:end] if end > self._emitted else ""
        self._emitted = max(self._emitted, end)
        return delta

    def _held_back(self) -> int:
        longest = max((len(s) for s in self.stop), default=0)
        for k in range(min(longest - 1, len(self.text)), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stop):
                return k
        return 0
