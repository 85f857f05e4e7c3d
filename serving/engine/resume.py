"""Continuing a request on another engine after the replica that served it died mid-stream.

The client has seen `token_ids` (generated so far) and the first `text_chars` characters of
their text. The new engine recomputes prompt + token_ids in one prefill, as after a preemption,
and its sequence starts as if it had generated them itself: `max_tokens` counts them, and the
detokenizer is rebuilt from them with `text_chars` already handed out, so the stream goes on
exactly where it broke (text held back for a stop string or an unfinished UTF-8 character
included). Greedy output equals a run without the fault; a seeded sampler restarts from its seed
(its state died with the replica).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from serving.engine.params import SamplingParams
    from serving.engine.sequence import Sequence


@dataclass(frozen=True)
class Resume:
    token_ids: tuple[int, ...]  # generated tokens the client already has
    text_chars: int  # characters of their text the client already has

    def __post_init__(self):
        if isinstance(self.token_ids, list):
            object.__setattr__(self, "token_ids", tuple(self.token_ids))
        if not self.token_ids or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.token_ids
        ):
            raise ValueError(f"resume.token_ids must be non-negative ints, got {self.token_ids!r}")
        if not isinstance(self.text_chars, int) or self.text_chars < 0:
            raise ValueError(f"resume.text_chars must be an integer >= 0, got {self.text_chars!r}")

    def check(self, num_prompt_tokens: int, params: SamplingParams, max_len: int) -> None:
        """ValueError if nothing is left to generate."""
        n = len(self.token_ids)
        if n >= params.max_tokens:
            raise ValueError(f"resume has {n} tokens, max_tokens is {params.max_tokens}")
        if num_prompt_tokens + n >= max_len:
            raise ValueError(
                f"prompt ({num_prompt_tokens}) + resumed tokens ({n}) fill the context "
                f"({max_len} tokens)"
            )


def resume_sequence(seq: Sequence, resume: Resume) -> None:
    """Make a fresh sequence continue after `resume`'s tokens (none of them has KV yet)."""
    for tok in resume.token_ids:
        seq.token_ids.append(tok)
        seq.detok.add(tok)
    seq.detok.emitted = min(resume.text_chars, len(seq.detok.text))
    seq.num_streamed = len(resume.token_ids)
