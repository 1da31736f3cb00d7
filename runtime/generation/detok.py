"""Incremental detokenization with stop strings.

Why a class: decoding each new token alone breaks multi-byte characters and merges; decoding
the whole output each step is quadratic. ``TextStream`` decodes a short window (the vLLM
offsets scheme) and holds back text that may be the start of a stop string, so a client never
sees text that a later token turns into a stop.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    """The text of one sequence, fed token by token."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window
        self._read = 0  # tokens whose text is already in self._text
        self._text = ""  # all decoded text so far
        self._emitted = 0  # characters of self._text already handed out
        self._stop = tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self._stop), default=1) - 1
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Feed one token; return the text that is now safe to emit (maybe ""). After a stop
        string appears, ``stopped`` is True and the text before it is returned."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before):]
            self._prefix = self._read
            self._read = len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The text held back, at the end of the stream."""
        if self.stopped:
            return ""
        tail = self._decode(self._ids[self._prefix:])
        head = self._decode(self._ids[self._prefix:self._read])
        if len(tail) > len(head):
            self._text += tail[len(head):]
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self._stop:
            start = max(0, self._emitted - self._hold)
            hits = [i for i in (self._text.find(s, start) for s in self._stop) if i >= 0]
            if hits:
                cut = min(hits)
                out = self._text[self._emitted:cut] if cut > self._emitted else ""
                self._emitted = max(self._emitted, cut)
                self.stopped = True
                return out
        end = len(self._text)
        if not final and self._stop:
            for k in range(min(self._hold, end - self._emitted), 0, -1):
                tail = self._text[end - k:]
                if any(s.startswith(tail) for s in self._stop):
                    end -= k
                    break
        out = self._text[self._emitted:end]
        self._emitted = end
        return out
