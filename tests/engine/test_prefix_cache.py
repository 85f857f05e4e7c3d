"""Prefix caching: greedy tokens equal those of an engine without the cache, for hits on a page
boundary, a few tokens past one, a whole cached prompt, chunks that start right after the cached
pages, mixed batches of hits and misses, decode-side registration of imported pages, eviction and
preemption; a test with teeth for indexer keys and for plan/model isolation; no page leaked."""

from __future__ import annotations

import pytest
import torch

from serving.engine import LLMEngine, SamplingParams
from serving.engine.prefix_cache import extend_hashes, root_hash
from tests.engine.conftest import GREEDY
from tests.engine.test_greedy_equivalence import spy_batches

PS = 64
SP = SamplingParams(**GREEDY)


def rand(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(5, 300, (n,), generator=g).tolist()


PREFIX = rand(200, 7)  # shared by the conversation-like requests below
WARM = PREFIX[:128] + rand(9, 8)  # registers pages 0 and 1 of PREFIX
HITS = [
    PREFIX[:128] + rand(7, 9),  # the cached prefix ends on a page boundary: compute from 128
    PREFIX[: PS + 5] + rand(20, 10),  # shares a page and 5 tokens: 1 page hit, 5 recomputed
    PREFIX[:128],  # a whole cached prompt: its last page is recomputed (a token must run)
]
HIT_TOKENS = [128, 64, 64]
MISSES = [rand(90, 11), rand(90, 11)]  # a miss, twice in one batch (nothing cached yet)


def engine(model_dir, plan, cache: bool = True, **kw) -> LLMEngine:
    kw.setdefault("num_blocks", 24)
    return LLMEngine.from_pretrained(model_dir(), plan, enable_prefix_caching=cache, **kw)


def tokens(eng: LLMEngine, prompts: list[list[int]], sp: SamplingParams = SP) -> list[list[int]]:
    return [o.token_ids for o in eng.generate(prompts, sp)]


def assert_no_leak(eng: LLMEngine) -> None:
    bm = eng.block_manager
    bm.check()
    assert bm.num_used == 0 and bm.num_free == bm.num_blocks  # each page free or cached-unref
    assert not eng.scheduler.has_work() and not eng.seqs


@pytest.mark.parametrize(
    ("plan", "chunk", "fp8"),
    [(None, 512, False), ("FSSF", 512, False), ("FSSF", 7, False), ("FSFS", 64, False)]
    + [("FSSF", 512, True)],
)
def test_hits_match_no_cache(model_dir, plan, chunk, fp8):
    """FSSF: layer 1 is an S layer right after F layer 0, so the first computed rows after the
    cached pages take the top-k that layer 0 scores over the cached indexer keys plus the new
    ones; chunk 7 puts a chunk boundary right after the cached prefix too."""
    kw = {"max_num_batched_tokens": chunk, "index_fp8": fp8}
    ref = engine(model_dir, plan, cache=False, **kw)
    want = [tokens(ref, [WARM]), tokens(ref, HITS + MISSES)]
    eng = engine(model_dir, plan, **kw)
    batches = spy_batches(eng)
    assert tokens(eng, [WARM]) == want[0]
    assert eng.stats().prefix_cache_hits_total == 0
    assert eng.block_manager.num_cached == 2  # WARM's two full pages
    assert tokens(eng, HITS + MISSES) == want[1]  # one mixed batch of hits and misses
    s = eng.stats()
    # With small chunks the second copy of the miss may be admitted after the first filled a
    # page, and then hits that page.
    extra = {0} if chunk >= 512 else {0, PS}
    assert s.prefix_cache_hits_total - sum(HIT_TOKENS) in extra
    assert s.prefix_cache_queries_total == len(WARM) + sum(map(len, HITS + MISSES))
    # the first computed position of each hit is right after its cached pages
    firsts = {c for b in batches for k, _, c in b if k == "prefill"}
    assert set(HIT_TOKENS) <= firsts
    assert_no_leak(eng)
    assert eng.block_manager.num_cached_free > 0


def test_corrupt_indexer_keys_of_cached_pages_change_tokens(model_dir):
    """Teeth: the equality above holds only because cached pages carry correct indexer keys.
    Zero the F layers' keys of the cached pages (a cache that kept attention rows but lost or
    staled the indexer's) and the tokens of a hit differ from the uncached ones."""
    want = tokens(engine(model_dir, "FSSF", cache=False), [HITS[0]])
    for corrupt in (False, True):
        eng = engine(model_dir, "FSSF")
        tokens(eng, [WARM])
        pages = list(eng.block_manager.index.page_of.values())
        assert len(pages) == 2
        if corrupt:
            for layer in eng.layout.index_layers:
                eng.cache.index_k[layer][pages] = 0
        got = tokens(eng, [HITS[0]])
        assert eng.stats().prefix_cache_hits_total == 128
        assert (got != want) if corrupt else (got == want)


def test_pages_are_keyed_by_model_and_plan(model_dir, tiny_dir):
    """Pages registered under plan A are not found by plan B's (or another model's) hash chain
    for the same tokens, only by A's. Engines of the same model and plan agree on the root."""
    a = engine(model_dir, "FSSF")
    tokens(a, [WARM])

    def found(root: bytes) -> int:
        hashes = extend_hashes([], WARM, PS, root, 2)
        return len(a.block_manager.index.lookup(hashes))

    other_model = LLMEngine.from_pretrained(
        tiny_dir("glm_moe_dsa", seed=1, index_n_heads=16), "FSSF", num_blocks=4
    )
    roots = {
        "same": engine(model_dir, "FSSF").block_manager.root,
        "plan FSFS": engine(model_dir, "FSFS").block_manager.root,
        "all-F": engine(model_dir, None).block_manager.root,
        "fp8 keys": engine(model_dir, "FSSF", index_fp8=True).block_manager.root,
        "other weights": other_model.block_manager.root,
    }
    assert roots["same"] == a.block_manager.root and found(roots["same"]) == 2
    for name, root in roots.items():
        if name != "same":
            assert found(root) == 0, name
    assert root_hash("m", a.layout) != root_hash("n", a.layout)


@pytest.mark.parametrize("plan", [None, "FSSF"])
def test_decode_registers_imported_pages_for_the_next_turn(model_dir, plan):
    """Turn 1 goes prefill -> payload -> decode; turn 2 (turn 1 + its reply + a question) hits on
    the decode engine, both prefilled there (selective disaggregation) and imported again (only
    the rows past the decode engine's cached prefix are copied)."""
    ref = engine(model_dir, plan, cache=False)
    pre = engine(model_dir, plan, role="prefill")
    dec = engine(model_dir, plan, role="decode")
    turn1 = PREFIX[:150]
    reply = dec.decode([r.payload for r in pre.prefill([turn1], SP)], SP)[0].token_ids
    assert reply == tokens(ref, [turn1])[0]
    assert dec.block_manager.num_cached == 2  # the payload's full pages, registered on import
    turn2 = turn1 + reply + rand(12, 12)
    want = tokens(ref, [turn2])[0]
    # local prefill on the decode engine
    assert dec.cached_prefix_tokens(turn2) == 128
    dec.add_request("local", turn2, SP)
    got: list[int] = []
    while dec.has_unfinished():
        got += [t for o in dec.step() for t in o.token_ids]
    assert got == want and dec.stats().prefix_cache_hits_total == 128
    # remote prefill: the prefill engine hits its own cache, decode imports past its prefix
    res = pre.prefill([turn2], SP)[0]
    assert pre.stats().prefix_cache_hits_total == 128
    assert [res.first_token] + dec.decode([res.payload], SP)[0].token_ids[1:] == want
    assert_no_leak(pre)
    assert_no_leak(dec)


def test_eviction_in_a_small_pool_keeps_tokens(model_dir):
    """6 pages for requests of 2-3 pages each: cached pages are evicted to make room (LRU), and
    the tokens still equal the roomy uncached engine's."""
    reqs = [[WARM], [MISSES[0]], [rand(200, 13)], [HITS[0]], HITS[1:], [MISSES[0], WARM]]
    ref = engine(model_dir, "FSSF", cache=False)
    want = [tokens(ref, r) for r in reqs]
    eng = engine(model_dir, "FSSF", num_blocks=6, max_num_batched_tokens=64)
    assert [tokens(eng, r) for r in reqs] == want
    s = eng.stats()
    assert s.prefix_cache_evictions_total > 0 and s.prefix_cache_hits_total > 0
    assert_no_leak(eng)


@pytest.mark.parametrize("plan", [None, "FSSF"])
def test_preempting_a_request_that_shares_its_prefix(model_dir, plan):
    """a and b share 2 cached pages; a grows into a 4th page of a 4-page pool and b, the least
    advanced, is preempted: a's tokens are unchanged (its shared pages stay referenced), and b
    is readmitted from the cache and ends with the same tokens too."""
    sp = SamplingParams(**{**GREEDY, "max_tokens": 12})
    a, b = PREFIX[:128] + rand(60, 14), PREFIX[:128] + rand(3, 15)
    ref = engine(model_dir, plan, cache=False)
    want = tokens(ref, [a, b], sp)
    eng = engine(model_dir, plan, num_blocks=4, kv_watermark=0)
    tokens(eng, [WARM], sp)
    assert tokens(eng, [a, b], sp) == want
    s = eng.stats()
    assert s.num_preemptions > 0 and s.prefix_cache_hits_total >= 2 * 128
    assert_no_leak(eng)


def test_abort_and_cache_off_keep_counts(model_dir):
    eng = engine(model_dir, "FSSF", max_num_batched_tokens=100)
    tokens(eng, [WARM])
    eng.add_request("x", HITS[0], SP)
    eng.step()  # admitted with 2 shared pages, prefilled
    assert eng.block_manager.num_used == 3
    eng.abort("x")
    assert_no_leak(eng)
    # Aborted mid-prefill: only the pages it had computed are cached, so the same prompt later
    # reuses 64 tokens and computes the rest, with the tokens of an uncached engine.
    long = rand(230, 16)
    eng.add_request("y", long, SP)
    eng.step()  # 100 of 230 computed: page 0 done, page 1 half, pages 2-3 untouched
    eng.abort("y")
    hits = eng.stats().prefix_cache_hits_total
    assert tokens(eng, [long]) == tokens(engine(model_dir, "FSSF", cache=False), [long])
    assert eng.stats().prefix_cache_hits_total - hits == PS
    assert_no_leak(eng)
    off = engine(model_dir, "FSSF", cache=False)
    tokens(off, [WARM, WARM])
    assert off.block_manager.num_cached == 0 and off.stats().prefix_cache_hits_total == 0
    assert_no_leak(off)
