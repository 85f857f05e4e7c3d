"""Per-request sampling parameters, validated on construction (ValueError naming the field)."""

from __future__ import annotations

import math
from dataclasses import dataclass

# Below this temperature a request is greedy: dividing logits by 1e-38 overflows to inf/nan and
# the draw degenerates, while the limit of sampling as T -> 0 is the argmax anyway.
GREEDY_TEMPERATURE = 1e-5
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_LOGIT_BIAS = 100.0
# A repetition penalty divides positive logits of seen tokens by it: a 100x boost is already a
# forced repeat, and below ~1e-37 the fp32 logits overflow to inf (the draw then degenerates).
MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY = 0.01, 10.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # generated tokens, the first one included
    temperature: float = 1.0  # 0 (or below GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0  # (0, 1]
    top_k: int = -1  # -1 = off; values above the vocabulary size mean off too
    seed: int | None = None  # per-request generator: the same seed gives the same tokens
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # matched on the detokenized text, trimmed from the output
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; k >= 0: sampled token's logprob + k alternatives
    # None = off; k >= 0: each prompt token's logprob + k alternatives, with the first output
    # (the completions API's echo). Costs logits for every prompt row and skips the prefix cache.
    prompt_logprobs: int | None = None
    # OpenAI penalties over the generated tokens: logit -= frequency * count + presence * (count>0)
    presence_penalty: float = 0.0  # [-2, 2]
    frequency_penalty: float = 0.0  # [-2, 2]
    # vLLM's: logits of tokens seen in the prompt or the output are divided (if > 0) or
    # multiplied (if < 0) by it; 1 = off.
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias in [-100, 100])
    # A serialized llguidance grammar (serving/engine/grammar.py) the output must match.
    grammar: str | None = None
    skip_special_tokens: bool = True  # False: special tokens (tool-call markers) stay in the text

    def __post_init__(self):
        # Lists are accepted for convenience and frozen to tuples so params stay hashable.
        if isinstance(self.stop_token_ids, list):
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        if isinstance(self.logit_bias, dict):
            items = tuple(sorted((int(k), float(v)) for k, v in self.logit_bias.items()))
            object.__setattr__(self, "logit_bias", items)
        elif isinstance(self.logit_bias, list):
            object.__setattr__(self, "logit_bias", tuple(tuple(x) for x in self.logit_bias))
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_real(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not _is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or (self.top_k != -1 and self.top_k < 1):
            raise ValueError(f"top_k must be -1 (off) or an integer >= 1, got {self.top_k!r}")
        if self.seed is not None and (
            not _is_int(self.seed) or not INT64_MIN <= self.seed <= INT64_MAX
        ):
            raise ValueError(f"seed must be None or a 64-bit signed integer, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, tuple) or not all(
            _is_int(t) and t >= 0 for t in self.stop_token_ids
        ):
            raise ValueError(
                f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}"
            )
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not _is_int(v) or v < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {v!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_real(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
        lo, hi = MIN_REPETITION_PENALTY, MAX_REPETITION_PENALTY
        if not _is_real(self.repetition_penalty) or not lo <= self.repetition_penalty <= hi:
            raise ValueError(
                f"repetition_penalty must be in [{lo}, {hi}], got {self.repetition_penalty!r}"
            )
        if not isinstance(self.logit_bias, tuple) or not all(
            isinstance(e, tuple)
            and len(e) == 2
            and _is_int(e[0])
            and e[0] >= 0
            and _is_real(e[1])
            and abs(e[1]) <= MAX_LOGIT_BIAS
            for e in self.logit_bias
        ):
            raise ValueError(
                "logit_bias must map token ids >= 0 to biases in [-100, 100], "
                f"got {self.logit_bias[:5]!r}"
            )
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar):
            raise ValueError("grammar must be None or a non-empty llguidance grammar string")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def stop_holdback(self) -> int:
        """Characters withheld from streamed text: they may be the start of a stop string."""
        return max((len(s) for s in self.stop), default=1) - 1


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
