"""Token sampling for a batch of rows with per-request parameters, on the logits' device.

Per step, in this order, each as one batched tensor operation over the rows that need it:
logit_bias (one scatter-add), presence/frequency/repetition penalties (from per-request token
counts kept on the device), the grammar mask (llguidance bitmasks computed off the critical path,
grammar.py). Then greedy rows take the argmax; sampled rows apply temperature, top-k and top-p on
the sorted distribution and draw with the Gumbel-max trick (argmax of p / Exp(1) noise), the noise
from the request's own generator, so a seed reproduces its tokens whatever else shares the batch.
Logprobs come from the model's raw distribution (before any of this). Nothing here reads a
device value back: the engine's transfer of the sampled ids is the step's one host sync.

A request whose own state fails (a grammar in error) fails alone: `sample` reports its row and
the engine ends that request with the error while the batch goes on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from serving.engine.grammar import (
    MaskWorker,
    apply_bitmask,
    ll_tokenizer,
    mask_words,
    new_matcher,
)
from serving.engine.outputs import Logprob
from serving.engine.params import SamplingParams


def filter_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """logits [B, V] fp32; top_k [B] int (V = off); top_p [B] fp32. Masked entries become -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)
    drop = ranks[None, :] >= top_k[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (the token crossing it included).
    drop |= (probs.cumsum(-1) - probs) >= top_p[:, None]
    drop[:, 0] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> torch.Tensor:
    """logits [B, V] (already processed) -> token ids [B] (int64)."""
    logits = logits.float()
    out = logits.argmax(-1)
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return out
    vocab = logits.shape[-1]
    dev = logits.device
    sub = logits[rows] / torch.tensor([params[i].temperature for i in rows], device=dev)[:, None]
    ks = [min(params[i].top_k, vocab) if params[i].top_k > 0 else vocab for i in rows]
    ps = [params[i].top_p for i in rows]
    if min(ks) < vocab or min(ps) < 1:  # decided on the host: no device read-back
        sub = filter_top_k_top_p(sub, torch.tensor(ks, device=dev), torch.tensor(ps, device=dev))
    probs = sub.softmax(-1)
    noise = torch.stack(
        [torch.empty(vocab, device=dev).exponential_(generator=generators[i]) for i in rows]
    )
    out[rows] = (probs / noise).argmax(-1)
    return out


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor, ks: list[int]) -> list[Logprob]:
    """Raw log-softmax of each row: the chosen token's logprob and the top-k[row] alternatives."""
    lp = logits.float().log_softmax(-1)
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    kmax = max(ks)
    top_v, top_i = lp.topk(kmax, dim=-1) if kmax else (None, None)
    out = []
    for b, (tok, k) in enumerate(zip(tokens.tolist(), ks, strict=True)):
        top = tuple(zip(top_i[b, :k].tolist(), top_v[b, :k].tolist(), strict=True)) if k else ()
        out.append(Logprob(int(tok), float(chosen[b]), top))
    return out


@dataclass
class RequestSampling:
    """A request's sampler state (on `Sequence.sampling`); None parts are unused."""

    counts: torch.Tensor | None = None  # [V] fp32: generated-token counts (penalties)
    prompt_seen: torch.Tensor | None = None  # [V] bool: prompt tokens (repetition penalty)
    bias_ids: np.ndarray | None = None  # logit_bias token ids (int64)
    bias_vals: np.ndarray | None = None  # their biases (fp32)
    matcher: Any = None  # llguidance.LLMatcher
    mask: Any = None  # (Future of an [n, W] bitmask buffer, row) for the next sample


class Sampler:
    """The engine's sampler: per-request state plus the batched step `sample` -> `advance`."""

    def __init__(self, vocab: int, device: torch.device, tokenizer, eos_ids=()):
        self.vocab, self.device = vocab, torch.device(device)
        self.tokenizer, self.eos_ids = tokenizer, tuple(eos_ids)
        self._masks: MaskWorker | None = None

    # -- per request -----------------------------------------------------------------------
    def init_request(self, params: SamplingParams, prompt: list[int]) -> RequestSampling | None:
        """State for a new request; ValueError (naming the field) when it cannot run here."""
        if not (params.logit_bias or params.penalized or params.grammar):
            return None
        st = RequestSampling()
        if params.logit_bias:
            ids = np.array([t for t, _ in params.logit_bias], dtype=np.int64)
            if ids.max() >= self.vocab:
                raise ValueError(f"logit_bias token ids must be < {self.vocab}, got {ids.max()}")
            st.bias_ids = ids
            st.bias_vals = np.array([b for _, b in params.logit_bias], dtype=np.float32)
        if params.penalized:
            st.counts = torch.zeros(self.vocab, device=self.device)
            if params.repetition_penalty != 1.0:
                st.prompt_seen = torch.zeros(self.vocab, dtype=torch.bool, device=self.device)
                st.prompt_seen[torch.tensor(prompt, device=self.device)] = True
        if params.grammar:
            lltok = ll_tokenizer(self.tokenizer, self.vocab, self.eos_ids)
            st.matcher = new_matcher(params.grammar, lltok)
            st.mask = (self._worker().submit([st.matcher]), 0)  # overlaps the prefill
        return st

    def replay(self, st: RequestSampling | None, tokens: list[int]) -> None:
        """Tokens sampled elsewhere (the prefill side's first token, a resumed request's tokens):
        bring the state to where it would be had this sampler drawn them."""
        if st is None or not tokens:
            return
        if st.counts is not None:
            for token in tokens:
                st.counts[token] += 1
        if st.matcher is not None:
            _settle(st)  # the matcher is not shared with a running mask job
            for token in tokens:
                if not st.matcher.consume_token(token):
                    raise ValueError(f"grammar: token {token} is refused: {st.matcher.get_error()}")
            st.mask = (self._worker().submit([st.matcher]), 0)

    def _worker(self) -> MaskWorker:
        if self._masks is None:
            self._masks = MaskWorker(self.vocab)
        return self._masks

    # -- per step --------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, seqs: list) -> tuple[torch.Tensor, dict[int, Exception]]:
        """logits [B, V] of the sampling rows -> (token ids [B] on the device, {row: error})."""
        failed: dict[int, Exception] = {}
        states = [s.sampling for s in seqs]
        work = logits.float()
        if any(st is not None for st in states):
            work = work.clone()  # logprobs read the raw logits
            self._bias(work, states)
            self._penalize(work, seqs, states)
            self._mask(work, states, failed)
        tokens = sample(work, [s.params for s in seqs], [s.generator for s in seqs])
        rows = [i for i, st in enumerate(states) if st is not None and st.counts is not None]
        if rows:  # count the new tokens, on the device
            counts = torch.stack([states[i].counts for i in rows])
            counts.scatter_add_(
                1, tokens[rows][:, None], torch.ones(len(rows), 1, device=work.device)
            )
            for j, i in enumerate(rows):
                states[i].counts = counts[j]
        return tokens, failed

    def _bias(self, work: torch.Tensor, states: list) -> None:
        rows = [i for i, st in enumerate(states) if st is not None and st.bias_ids is not None]
        if not rows:
            return
        v = work.shape[1]
        idx = np.concatenate([states[i].bias_ids + i * v for i in rows])
        vals = np.concatenate([states[i].bias_vals for i in rows])
        work.view(-1).index_add_(
            0, torch.from_numpy(idx).to(work.device), torch.from_numpy(vals).to(work.device)
        )

    def _penalize(self, work: torch.Tensor, seqs: list, states: list) -> None:
        rows = [i for i, st in enumerate(states) if st is not None and st.counts is not None]
        if not rows:
            return
        d = work.device
        ps = [seqs[i].params for i in rows]
        counts = torch.stack([states[i].counts for i in rows])
        freq = torch.tensor([p.frequency_penalty for p in ps], device=d)[:, None]
        pres = torch.tensor([p.presence_penalty for p in ps], device=d)[:, None]
        sub = work[rows] - freq * counts - pres * (counts > 0)
        if any(p.repetition_penalty != 1.0 for p in ps):
            rep = torch.tensor([p.repetition_penalty for p in ps], device=d)[:, None]
            seen = counts > 0
            prompt = [
                states[i].prompt_seen
                if states[i].prompt_seen is not None
                else torch.zeros(self.vocab, dtype=torch.bool, device=d)
                for i in rows
            ]
            seen |= torch.stack(prompt)
            sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        work[rows] = sub

    def _mask(self, work: torch.Tensor, states: list, failed: dict) -> None:
        rows, words = [], []
        for i, st in enumerate(states):
            if st is None or st.matcher is None:
                continue
            try:
                future, row = st.mask
                word = future.result()[row]  # waits only if the job is still running
            except Exception as e:  # a mask that could not be computed fails its request only
                failed[i] = ValueError(f"grammar: {e}")
                continue
            if st.matcher.is_error():
                failed[i] = ValueError(f"grammar: {st.matcher.get_error()}")
                continue
            words.append(word)
            rows.append(i)
        if rows:
            w = torch.stack(words)
            if w.shape[1] != mask_words(work.shape[1]):
                raise RuntimeError("grammar bitmask width does not match the vocabulary")
            w = w.to(work.device, non_blocking=True)
            if len(rows) == work.shape[0]:
                apply_bitmask(work, w)
            else:
                sub = work[rows]
                apply_bitmask(sub, w)
                work[rows] = sub

    def advance(self, seqs: list, tokens: list[int]) -> dict[int, Exception]:
        """After the host has the sampled ids: feed grammars, start the next masks."""
        failed: dict[int, Exception] = {}
        live = []
        for i, (seq, tok) in enumerate(zip(seqs, tokens, strict=True)):
            st = seq.sampling
            if st is None or st.matcher is None:
                continue
            if not st.matcher.consume_token(tok):
                failed[i] = ValueError(f"grammar: {st.matcher.get_error() or 'token refused'}")
            else:  # a finished grammar's mask allows EOS only
                live.append(st)
        if live:  # one job for the batch; it runs while the next forward does
            future = self._worker().submit([st.matcher for st in live])
            for j, st in enumerate(live):
                st.mask = (future, j)
        return failed

    def shutdown(self) -> None:
        if self._masks is not None:
            self._masks.shutdown()


def _settle(st: RequestSampling) -> None:
    if st.mask is not None:
        try:
            st.mask[0].result()
        except Exception:  # reported when the mask is used
            pass
