"""Continuous batching with chunked prefill under a per-step token budget.

Each step spends at most `max_num_batched_tokens` tokens. Running sequences go first, oldest
first: a decoding sequence takes one token, a sequence in the middle of its prompt takes the next
chunk. Waiting sequences are then admitted while budget, pages and `max_num_seqs` allow, the last
one possibly with a partial chunk. So one forward may mix decode rows and prefill chunks.

Admission reserves pages for the whole prompt, not just its first chunk: admitting long prompts
chunk by chunk would start more of them than the pool can finish, and they would then preempt
each other and recompute; reserved, a prompt once admitted always completes its prefill.

When a running sequence needs a page and none is free, the newest running sequence is preempted
by recompute: its pages are freed and it goes back to the front of the queue with its generated
tokens kept, to be prefilled again (prompt + generated) when pages free up. The oldest sequence
always makes progress, so the loop cannot livelock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
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


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        importer: Callable[[Sequence], None],
    ):
        self.bm = block_manager
        self.max_num_seqs, self.budget = max_num_seqs, max_num_batched_tokens
        self.importer = importer  # copies a decode-role payload into the sequence's fresh pages
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and free its pages, whatever its phase."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.bm.free(seq)

    def schedule(self) -> ScheduledBatch:
        batch, budget = ScheduledBatch(), self.budget
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_pending, budget)
            while not self.bm.can_allocate(seq, seq.num_cached + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                self.bm.allocate(seq, seq.num_cached + n)
                batch.add(seq, n)
                budget -= n
                i += 1
                continue
            break  # `seq` itself was preempted: everything after it is gone too
        if preempted:
            return batch  # pages are short: admit nothing new this step
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.payload is not None:  # decode role: the prompt arrives cached
                n, total = 1, seq.payload.num_tokens + 1
            else:  # the whole (re)computation is reserved; chunks then run inside it
                n, total = min(seq.num_pending, budget), seq.num_tokens
            if not self.bm.can_allocate(seq, total):
                break
            self.waiting.popleft()
            self.bm.allocate(seq, total)
            if seq.payload is not None:
                self.importer(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.add(seq, n)
            budget -= n
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.bm.free(seq)
        seq.num_cached = 0  # recompute prompt + generated tokens on readmission
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
