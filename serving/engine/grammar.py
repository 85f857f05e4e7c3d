"""Constrained decoding with llguidance: a matcher per request, bitmasks off the critical path.

A request's `SamplingParams.grammar` is a serialized llguidance grammar (JSON schema, Lark with
embedded `%json{...}`, regex), made and validated by the ingress. The engine compiles it into an
`LLMatcher` when the request arrives; after every sampled token the matcher consumes it and a
worker thread computes the next step's bitmask (1 bit per vocabulary entry) while the next
forward runs. The sampler waits for the mask only when it needs it, moves it to the device and
masks the logits there (sampler.py).
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future, ThreadPoolExecutor

import torch

_LOCK = threading.Lock()
_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer, n_vocab: int | None = None, eos_ids=()):
    """The llguidance tokenizer of a model.tokenizer.Tokenizer (built once: ~1 s on big vocabs)."""
    import llguidance

    key = (n_vocab, tuple(eos_ids))
    with _LOCK:
        per = _TOKENIZERS.setdefault(tokenizer, {})
        if key not in per:
            eos = list(eos_ids) or list(tokenizer.eos_token_ids) or None
            per[key] = llguidance.LLTokenizer(
                tokenizer.tok.to_str(), n_vocab=n_vocab, eos_token=eos
            )
        return per[key]


def check_grammar(grammar: str, lltok) -> str | None:
    """The grammar's error message, or None when it compiles for this tokenizer."""
    import llguidance

    try:
        err = llguidance.LLMatcher.validate_grammar(grammar, lltok)
    except Exception as e:  # malformed grammar JSON
        return str(e)
    return err or None


def new_matcher(grammar: str, lltok):
    import llguidance

    m = llguidance.LLMatcher(lltok, grammar, log_level=0)
    if m.is_error():
        raise ValueError(f"grammar: {m.get_error()}")
    return m


def mask_words(vocab: int) -> int:
    return (vocab + 31) // 32


class MaskWorker:
    """Computes bitmasks of many matchers at once, in a background thread (llguidance's executor
    spreads them over its own threads and releases the GIL)."""

    def __init__(self, vocab: int):
        import llguidance

        self.words = mask_words(vocab)
        self._executor = llguidance.LLExecutor()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-mask")

    def submit(self, matchers: list) -> Future:
        return self._pool.submit(self._compute, matchers)

    def compute(self, matchers: list) -> torch.Tensor:
        return self._compute(matchers)

    def _compute(self, matchers: list) -> torch.Tensor:
        n = len(matchers)
        buf = torch.zeros(n, self.words, dtype=torch.int32, pin_memory=torch.cuda.is_available())
        self._executor.unsafe_compute_mask_ptr(
            [(m, i) for i, m in enumerate(matchers)], buf.data_ptr(), self.words * 4, n
        )
        return buf

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class _FusedMask:
    """llguidance's fused mask helper: one torch.compile'd kernel (dynamic shapes), 0.07 ms on one
    CPU core at a 49K vocabulary and batch 16 against 5.7 ms for the plain ops. Its first call
    compiles (~8 s cold on CPU), which on the engine thread would stall every stream of the
    replica; so it compiles on a background thread, once per device type, and the plain ops
    serve until it is ready (and for good where it cannot compile)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._ready: dict[str, Future] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="grammar-compile")

    def get(self, device: torch.device):
        with self._lock:
            fut = self._ready.get(device.type)
            if fut is None:
                fut = self._ready[device.type] = self._pool.submit(self._compile, device)
        return fut.result() if fut.done() else None

    def wait(self, device: torch.device):
        """The compiled helper, or None if it cannot compile (blocks: for tests and warm-up)."""
        self.get(device)
        return self._ready[device.type].result()

    @staticmethod
    def _compile(device: torch.device):
        try:
            from llguidance.torch import apply_token_bitmask_inplace

            words = torch.zeros(2, 3, dtype=torch.int32, device=device)
            apply_token_bitmask_inplace(torch.zeros(2, 70, device=device), words)
            return apply_token_bitmask_inplace
        except Exception:  # no compiler here: the plain ops give the same result
            return None


FUSED = _FusedMask()


def apply_bitmask(logits: torch.Tensor, words: torch.Tensor) -> None:
    """logits [n, vocab] (float) masked in place by [n, W] int32 bitmasks on the same device."""
    fused = FUSED.get(logits.device)
    if fused is not None:
        fused(logits, words)
        return
    allowed = allowed_from_bitmask(words, logits.shape[1])
    logits.masked_fill_(~allowed, float("-inf"))


def allowed_from_bitmask(words: torch.Tensor, vocab: int) -> torch.Tensor:
    """[n, W] int32 bitmask (on the logits' device) -> [n, vocab] bool, all on the device."""
    idx = torch.arange(vocab, device=words.device)
    bits = words[:, idx >> 5] >> (idx & 31).to(torch.int32)
    return (bits & 1).bool()
