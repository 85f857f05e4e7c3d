"""Admission and preemption policy on the scheduler alone. Each test first reproduces the failure
of the old policy (the fix turned off: no watermark, no bypass) and then shows the fix:

- no headroom: the request just admitted is preempted on the next step, its prefill wasted;
- preemption of the newest request throws away more work than that of the least advanced one;
- a long prompt at the head of the queue blocks the short ones behind it, but bypassing it is
  bounded, so it is not starved either.
"""

from __future__ import annotations

import pytest

from serving.engine.block_manager import BlockManager
from serving.engine.params import SamplingParams
from serving.engine.scheduler import Scheduler
from serving.engine.sequence import Sequence, SequenceStatus

PS = 64


def seq(name: str, n: int, max_new: int) -> Sequence:
    return Sequence(name, list(range(n)), SamplingParams(max_tokens=max_new), detokenizer=None)


class Driver:
    """What the engine does around schedule(): KV becomes cached, finished prompts sample one
    token, requests that reached max_tokens leave. Records the order of first admissions."""

    def __init__(self, sched: Scheduler):
        self.sched, self.admitted, self.steps = sched, [], 0

    def step(self) -> list[tuple[str, int]]:
        batch = self.sched.schedule()
        self.steps += 1
        for s, n in zip(batch.seqs, batch.num_new, strict=True):
            if s.request_id not in self.admitted:
                self.admitted.append(s.request_id)
            s.num_cached += n
            if s.num_pending == 0:
                s.token_ids.append(7)
                if len(s.completion_token_ids) >= s.params.max_tokens:
                    self.sched.remove(s)
                    s.status = SequenceStatus.FINISHED
        return [(s.request_id, n) for s, n in zip(batch.seqs, batch.num_new, strict=True)]

    def run(self, limit: int = 500) -> None:
        while self.sched.has_work():
            self.step()
            assert self.steps < limit, "the scheduler stopped making progress"


@pytest.mark.parametrize("watermark", [0, 1])
def test_watermark_keeps_the_just_admitted_request(watermark):
    bm = BlockManager(4, PS)
    sched = Scheduler(bm, 8, 1000, watermark=watermark, max_bypass=0)
    d = Driver(sched)
    a, b = seq("a", 127, 40), seq("b", 100, 4)
    sched.add(a)
    d.step()  # a's prompt (2 pages); a's next token is its 128th: still page 2
    sched.add(b)
    d.step()  # a decodes; b (2 pages) would fill the pool
    if watermark == 0:  # the old failure: b is admitted with no page to spare ...
        assert b.status is SequenceStatus.RUNNING and b.num_cached == 100 and bm.num_free == 0
        d.step()  # ... a crosses into its 3rd page, and b, just prefilled, is thrown out
        assert sched.num_preemptions == 1 and b.num_cached == 0 and b in sched.waiting
    else:  # b waits for headroom instead; a gets its page without preempting anyone
        assert b.status is SequenceStatus.WAITING and bm.num_free == 2
    d.run()
    assert sched.num_preemptions == (1 if watermark == 0 else 0)
    assert bm.num_free == 4


def test_preemption_takes_the_least_progress():
    """x needs a page; y (10 tokens in) and z (100 tokens in) are the candidates. The old rule
    took the newest, z, losing 10x the work that preempting y loses."""
    bm = BlockManager(5, PS)
    sched = Scheduler(bm, 8, 1000, watermark=0, max_bypass=0)
    d = Driver(sched)
    x, y, z = seq("x", 127, 40), seq("y", 10, 40), seq("z", 100, 40)
    sched.add(x)
    d.step()
    sched.add(y)
    sched.add(z)
    d.step()  # x decodes inside page 2; y (1 page) and z (2 pages) fill the pool
    assert bm.num_free == 0 and (y.num_cached, z.num_cached) == (10, 100)
    d.step()  # x crosses into its 3rd page: y is preempted, z keeps its 100 tokens
    assert sched.num_preemptions == 1
    assert y in sched.waiting and y.num_cached == 0
    assert z.status is SequenceStatus.RUNNING and z.num_cached == 101
    d.run()  # y is readmitted and finishes too
    assert bm.num_free == 5 and not sched.has_work()


@pytest.mark.parametrize("max_bypass", [0, 2])
def test_long_head_is_bypassed_boundedly(max_bypass):
    """x holds 2 of 4 pages for 30 steps; l (3 pages) heads the queue; s1..s4 need 1 page each."""
    bm = BlockManager(4, PS)
    sched = Scheduler(bm, 8, 1000, watermark=0, max_bypass=max_bypass)
    d = Driver(sched)
    sched.add(seq("x", 100, 30))
    d.step()
    long = seq("l", 190, 2)
    sched.add(long)
    for i in range(1, 5):
        sched.add(seq(f"s{i}", 10, 2))
    d.step()
    if max_bypass == 0:  # the old failure: everything waits behind l until x is done
        assert d.admitted == ["x"]
    else:  # two short requests go ahead of l, then l's turn is kept
        assert d.admitted == ["x", "s1", "s2"] and long.num_bypassed == 2
    d.run()
    order = ["x", "l", "s1", "s2", "s3", "s4"] if max_bypass == 0 else ["x", "s1", "s2", "l"]
    assert d.admitted[: len(order)] == order
    assert bm.num_free == 4 and sched.num_preemptions == 0


def test_long_prefill_shares_the_step_with_waiting_requests():
    """The old failure: a 640-token prompt in chunks of 64 took every step's whole budget for 10
    steps, and a 10-token request behind it got its first token only after all of them. Now
    the long prefill takes half the budget while others wait, plus what admission leaves."""
    bm = BlockManager(16, PS)
    sched = Scheduler(bm, 8, 64)
    d = Driver(sched)
    long, short = seq("l", 640, 2), seq("s", 10, 2)
    sched.add(long)
    assert d.step() == [("l", 64)]  # alone: the full budget
    sched.add(short)
    assert d.step() == [("l", 54), ("s", 10)]  # 32 while s waits, + the 22 s left unused
    assert short.completion_token_ids  # s sampled its first token in the step after it came
    while long.num_cached < 640:
        d.step()
    assert d.steps <= 11  # the long prompt lost only what s used
    d.run()
    assert bm.num_free == 16
