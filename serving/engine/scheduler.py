"""Continuous batching with chunked prefill under a per-step token budget.

Each step spends at most `max_num_batched_tokens` tokens. Running sequences go first, oldest
first: a decoding sequence takes one token, a sequence in the middle of its prompt takes the next
chunk. Waiting sequences are then admitted while budget, pages and `max_num_seqs` allow, the last
one possibly with a partial chunk. So one forward may mix decode rows and prefill chunks.

Admission starts a sequence from its longest cached prefix (block_manager.py: shared full pages;
the chunks then start right after them) and reserves pages for the rest of the whole prompt, not
just its first chunk: admitting long prompts chunk by chunk would start more of them than the pool
can finish, and they would then preempt each other and recompute; reserved, a prompt once admitted
always completes its prefill. While anything runs, admission also leaves `watermark` pages free:
decoding sequences grow into new pages, and a request admitted into a full pool would be the one
preempted on the next step, its prefill thrown away.

The queue is FIFO, but a head that does not fit (a long prompt) does not block the requests
behind it forever: those that fit may go first, at most `max_bypass` of them, and then admission
waits for the head (pages free up as running requests finish), so the head cannot starve either.
Nor does a long prompt being prefilled hold the queue for all its chunks: while requests wait,
running prefill chunks take at most half the step budget (the rest admits them), and whatever
admission leaves unused is handed back to those chunks, so a prompt alone runs at full speed and
a crowded one still gets half of every step.

When a running sequence needs a page and none is free, the running sequence with the least
progress (fewest computed tokens: the least work lost; the newest on ties) among those not yet
scheduled this step is preempted by recompute: its references are dropped (its full pages stay in
the prefix cache, so readmission recomputes only what was evicted meanwhile) and it goes back to
the front of the queue with its generated tokens kept. The sequence with the most progress is
never the victim while another candidate remains, so it always advances and the loop cannot
livelock.

Decode role, KV handoffs: a payload's pages are reserved before its bytes move. `reserve` queues
a handoff (it holds nothing yet); `admit_reservations` gives queued handoffs, oldest first, pages
for the payload's rows and the first token, and a seat among `max_num_seqs`, under the same
watermark as admission, and only while no request waits in the queue (a preempted request there
has already streamed tokens, and is served first). A reserved sequence holds its pages but is
never scheduled; the engine fills them (serving/engine/kv_connector.py) and then `activate`s it,
with the prompt cached and the first token pending, as a decoding sequence. Reserved sequences
are never preempted: their pages are about to be written by a copy the scheduler does not see.

A request that asks for prompt logprobs needs logits for every prompt row it computes: it skips
the prefix cache (cached rows would have none) and its chunks are capped at `max_num_seqs`
tokens, so a long prompt's [rows, vocab] logits come a slice of the sampling rows' size at a time.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from serving.engine.block_manager import BlockManager
from serving.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new: list[int] = field(default_factory=list)  # tokens computed for each sequence

    def add(self, seq: Sequence, n: int) -> None:
        self.seqs.append(seq)
        self.num_new.append(n)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new)

    def __bool__(self) -> bool:
        return bool(self.seqs)


@dataclass
class PrefixStats:
    """Prompt tokens looked up in the prefix cache on first admission, and those found there
    (vLLM's prefix_cache_queries / prefix_cache_hits)."""

    queries: int = 0
    hits: int = 0


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        *,
        watermark: int = 1,
        max_bypass: int = 8,
    ):
        self.bm = block_manager
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.watermark, self.max_bypass = watermark, max_bypass
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserving: deque[Sequence] = deque()  # KV handoffs waiting for pages
        self.reserved: list[Sequence] = []  # handoffs holding pages, not yet filled
        self.num_preemptions = 0
        self.prefix = PrefixStats()

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and free its pages, whatever its phase."""
        for queue in (self.running, self.waiting, self.reserving, self.reserved):
            if seq in queue:
                queue.remove(seq)
                break
        self.bm.free(seq)

    # -- KV handoffs (decode role) -----------------------------------------------------------
    def reserve(self, seq: Sequence) -> None:
        """Queue a handoff for pages: its prompt rows arrive computed, its first token pending."""
        seq.status = SequenceStatus.RESERVING
        self.reserving.append(seq)

    def admit_reservations(self) -> list[Sequence]:
        """Give queued handoffs pages (their cached prefix first) and a seat, oldest first;
        -> those reserved now."""
        out = []
        while self.reserving and not self.waiting and self._seats_left():
            seq = self.reserving[0]
            reserve = self.watermark if self.running or self.reserved else 0
            max_hit = (seq.num_tokens - 1) // self.bm.page_size  # rows before the first token
            if not self.bm.admit(seq, seq.num_tokens, max_hit, reserve):
                break
            self.reserving.popleft()
            seq.status = SequenceStatus.RESERVED
            self.reserved.append(seq)
            out.append(seq)
        return out

    def activate(self, seq: Sequence) -> None:
        """A reserved handoff's rows are in its pages: it decodes from the next step on."""
        self.reserved.remove(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def _seats_left(self) -> bool:
        return len(self.running) + len(self.reserved) < self.max_num_seqs

    def schedule(self) -> ScheduledBatch:
        for seq in self.running:  # pages the last step filled can serve other requests now
            self.bm.commit(seq)
        batch, budget = ScheduledBatch(), self.budget
        # While requests wait, running prefills share half the step, so a long prompt's chunks
        # leave room to admit the next request; what admission leaves unused goes back to them.
        prefill_left = self.budget // 2 if self.waiting else self.budget
        capped: list[tuple[int, Sequence]] = []  # (batch row, sequence) cut short this step
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._cap(seq, min(seq.num_pending, budget))
            if n > 1:  # a prompt chunk (or a recompute), not a decode row
                if prefill_left <= 0:
                    capped.append((-1, seq))
                    i += 1
                    continue
                if n > prefill_left:
                    n = prefill_left
                    capped.append((len(batch.seqs), seq))
                prefill_left -= n
            while not self.bm.can_allocate(seq, seq.num_cached + n):
                victim = min(self.running[i:], key=lambda s: (s.num_cached, -s.arrival))
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.bm.allocate(seq, seq.num_cached + n)
                batch.add(seq, n)
                budget -= n
                i += 1
        if preempted:
            return batch  # pages are short: admit nothing new this step
        budget = self._admit(batch, budget)
        for row, seq in capped:  # the budget admission did not use
            if budget <= 0:
                break
            have = batch.num_new[row] if row >= 0 else 0
            extra = min(self._cap(seq, seq.num_pending) - have, budget)
            if extra <= 0 or not self.bm.can_allocate(seq, seq.num_cached + have + extra):
                continue
            self.bm.allocate(seq, seq.num_cached + have + extra)
            if row >= 0:
                batch.num_new[row] += extra
            else:
                batch.add(seq, extra)
            budget -= extra
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> int:
        """Admit waiting sequences into `batch`; -> the budget left."""
        k = 0  # queue position tried next; > 0 while the head is being bypassed
        while k < len(self.waiting) and budget > 0 and self._seats_left():
            head = self.waiting[0]
            if k > 0 and head.num_bypassed >= self.max_bypass:
                break  # the head has waited long enough: nothing more goes ahead of it
            seq = self.waiting[k]
            n = self._try_admit(seq, budget)
            if n is None:
                if self.max_bypass == 0:
                    break
                k += 1
                continue
            del self.waiting[k]
            if k > 0:
                head.num_bypassed += 1
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return budget

    def _try_admit(self, seq: Sequence, budget: int) -> int | None:
        """Pages for a waiting sequence (its cached prefix first); -> tokens it computes this
        step, or None (nothing changed) when the pool cannot take it now."""
        # Alone, a request may use every page.
        reserve = self.watermark if self.running or self.reserved else 0
        total = seq.num_tokens  # the whole (re)computation is reserved; chunks run inside it
        max_hit = (total - 1) // self.bm.page_size  # at least one token left to compute
        if seq.prompt_logits_pending:
            max_hit = 0
        if not self.bm.admit(seq, total, max_hit, reserve):
            return None
        if not seq.completion_token_ids:  # a first admission, not a recompute
            self.prefix.queries += seq.num_prompt_tokens
            self.prefix.hits += seq.num_cached
        return self._cap(seq, min(seq.num_pending, budget))

    def _cap(self, seq: Sequence, n: int) -> int:
        return min(n, self.max_num_seqs) if seq.prompt_logits_pending else n

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)  # registers its computed pages first: readmission can hit them
        seq.num_cached = 0
        seq.num_bypassed = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
