"""Incremental detokenization with stop strings.

Decoding the whole completion every step costs O(n^2) over a long answer; instead only the tokens
since the last stable point are decoded (vLLM's prefix/read offsets). A byte-level token may end
inside a UTF-8 character, which decodes to U+FFFD: such text is held until the character completes.
Streamed text also withholds the last (longest stop string - 1) characters, which could still turn
out to start a stop string; they are released when the request finishes.

The engine detokenizes a whole step at once (`add_tokens`): one call into the Rust tokenizer for
every sequence of the step, not two per token.
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
        return add_tokens([self], [token_id])[0]

    def _push(self, token_id: int) -> tuple[list[int], list[int]]:
        """Append; -> the two id spans whose decoded texts tell what the token added."""
        self.ids.append(token_id)
        return self.ids[self.prefix : self.read], self.ids[self.prefix :]

    def _settle(self, before: str, after: str) -> bool:
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


def add_tokens(detoks: list[Detokenizer], tokens: list[int]) -> list[bool]:
    """One generated token for each detokenizer, decoded in one batch; -> stop string found."""
    if not detoks:
        return []
    out: list[bool] = [False] * len(detoks)
    for skip in {d.skip_special for d in detoks}:  # one decode call per special-token setting
        idx = [i for i, d in enumerate(detoks) if d.skip_special == skip]
        spans = [span for i in idx for span in detoks[i]._push(tokens[i])]
        try:
            texts = detoks[idx[0]].tok.decode_batch(spans, skip)
        except BaseException:
            for i in idx:  # undo the pushes, so a retry one by one starts from the same state
                detoks[i].ids.pop()
            raise
        for j, i in enumerate(idx):
            out[i] = detoks[i]._settle(texts[2 * j], texts[2 * j + 1])
    return out
