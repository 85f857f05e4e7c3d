"""Incremental detokenization with stop strings.

Decoding the whole completion every step costs O(n^2) over a long answer; instead only the tokens
since the last stable point are decoded (vLLM's prefix/read offsets). A byte-level token may end
inside a UTF-8 character, which decodes to U+FFFD: such text is held until the character completes.
Streamed text also withholds the last (longest stop string - 1) characters, which could still turn
out to start a stop string; they are released when the request finishes.
"""

from __future__ import annotations

from model.tokenizer import Tokenizer
from serving.engine.params import SamplingParams


class Detokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.tok, self.stop = tokenizer, params.stop
        self.skip_special = params.skip_special_tokens
        self.holdback = params.stop_holdback
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] decode to the tail of `text` already
        self.text = ""  # stable text of all ids (stop string trimmed once found)
        self.emitted = 0  # characters of `text` handed out so far
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Append one generated token; True when a stop string now appears (text is trimmed)."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip_special)
        after = self.tok.decode(self.ids[self.prefix :], self.skip_special)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return False  # nothing new yet, or an incomplete UTF-8 character
        start = len(self.text)
        self.text += after[len(before) :]
        self.prefix, self.read = self.read, len(self.ids)
        return self._check_stop(start)

    def _check_stop(self, start: int) -> bool:
        if not self.stop:
            return False
        # A match may begin up to (len(stop) - 1) characters before the new text.
        first = None
        for s in self.stop:
            i = self.text.find(s, max(0, start - len(s) + 1))
            if i >= 0 and (first is None or i < first):
                first = i
        if first is None:
            return False
        self.text = self.text[:first]
        self.stopped = True
        return True

    def delta(self, final: bool) -> str:
        """Text not yet handed out; while running, the stop-string holdback stays back."""
        end = len(self.text) if final or self.stopped else max(len(self.text) - self.holdback, 0)
        if end <= self.emitted:
            return ""
        out = self.text[self.emitted : end]
        self.emitted = end
        return out
