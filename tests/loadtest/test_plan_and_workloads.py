"""Load-test planning and request generation (no server): saturation sizing, seeded workloads
that respect the length limits, and the /metrics parsing the scenario reads."""

from __future__ import annotations

import random

import pytest

from loadtest import corpus
from loadtest.plan import build_plan, saturation_stages
from loadtest.server import parse_metrics
from loadtest.workloads import (
    FOLLOWUP_TOKENS,
    Conversation,
    WorkloadSpec,
    make_request,
    max_doc_tokens,
)

PLAN = dict(
    duration_s=40,
    model="m",
    max_model_len=4096,
    capacity_tokens=2048,
    capacity_per_replica=1024,
    chars_per_token=1.0,
)


def test_saturation_steps_pass_the_pool():
    stages, fit = saturation_stages(1024, 128, 40, oversubscribe=1.5)
    assert fit == 8
    assert [(s.until_s, s.users) for s in stages] == [(10, 4), (20, 8), (40, 12)]
    with pytest.raises(ValueError, match="oversubscribe"):
        saturation_stages(1024, 128, 40, oversubscribe=1.0)


def test_saturate_plan_sizes_documents_and_users_from_capacity():
    plan = build_plan("saturate", **PLAN)
    lo, hi = plan.workload.doc_tokens
    per_request = plan.workload.mean_request_tokens()
    assert per_request == pytest.approx((lo + hi) / 2 + 64)
    # Documents sized so about 8 fit one replica's pool; users from the whole app's capacity.
    assert 7 <= 1024 / per_request <= 9
    assert plan.requests_fit == pytest.approx(2048 / per_request)
    assert plan.stages[-1].users >= 1.5 * plan.requests_fit
    assert plan.saturated_from_s == 20 and plan.users_at(39.9) == plan.stages[-1].users
    assert plan.users_at(40) is None


def test_constant_scenarios_and_bad_input():
    smoke = build_plan("smoke", **PLAN)
    assert smoke.workload.kind == "chat" and [s.users for s in smoke.stages] == [4]
    long = build_plan("long", users=3, **PLAN)
    # Longest document: one replica's pool (1024) minus the output, not max_model_len (4096).
    assert long.workload.doc_tokens == (479, 959) and long.stages[0].users == 3
    with pytest.raises(ValueError, match="scenario"):
        build_plan("soak", **PLAN)
    with pytest.raises(ValueError, match="doc_tokens"):
        build_plan("long", doc_tokens=5000, **PLAN)
    with pytest.raises(ValueError, match="duration"):
        build_plan("smoke", **{**PLAN, "duration_s": 0})
    with pytest.raises(ValueError, match="max_tokens"):
        max_doc_tokens(128, None, 200)


def test_workloads_are_seeded_and_fit_the_limits(tiny_dir):
    from model.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(tiny_dir("glm_moe_dsa"))
    spec = WorkloadSpec("mix", "m", 16, (2000, 4000), chars_per_token=1.0, docs_share=0.5)

    def draw(seed: int):
        rng = random.Random(seed)
        return [make_request(spec, rng) for _ in range(30)]

    a = draw(3)
    assert [x.body for x in a] == [x.body for x in draw(3)]
    assert [x.body for x in a] != [x.body for x in draw(4)]
    kinds = {x.workload for x in a}
    assert kinds == {"chat", "docs"}
    for req in a:
        body = req.body
        assert body["stream"] and body["ignore_eos"] and body["stream_options"]["include_usage"]
        if req.workload == "docs":
            n = len(tok.encode(body["prompt"]))
            assert 0.9 * 2000 <= n <= 4000, n  # within the drawn range, never above the top
            assert req.path == "/completions" and body["logprobs"] == 0
        else:
            assert req.path == "/chat/completions" and body["logprobs"] is True
    with pytest.raises(ValueError, match="doc_tokens"):
        WorkloadSpec("docs", "m", 16, (10, 5), 1.0)
    with pytest.raises(ValueError, match="workload"):
        WorkloadSpec("poems", "m", 16, (5, 10), 1.0)


def test_corpus_documents_have_the_asked_length():
    rng = random.Random(0)
    assert len(corpus.corpus_text()) > corpus.MIN_CHARS
    for n in (1, 500, len(corpus.corpus_text()) + 10):  # longer than the corpus: it wraps
        assert len(corpus.document(rng, n)) == n
    assert all(40 <= len(s) <= 240 for s in corpus.sentences())


METRICS = """\
# TYPE indexcache_kv_cache_usage_ratio gauge
indexcache_kv_cache_usage_ratio{model="m",role="decode",replica="a"} 1.0
indexcache_kv_cache_usage_ratio{model="m",role="decode",replica="b"} 0.5
indexcache_kv_cache_usage_ratio{model="m",role="prefill",replica="p"} 0.9
# TYPE indexcache_kv_cache_capacity_tokens gauge
indexcache_kv_cache_capacity_tokens{model="m",role="decode",replica="a"} 1000.0
indexcache_kv_cache_capacity_tokens{model="m",role="decode",replica="b"} 3000.0
indexcache_kv_cache_capacity_tokens{model="m",role="prefill",replica="p"} 500.0
# TYPE indexcache_num_requests_waiting gauge
indexcache_num_requests_waiting{model="m",role="prefill",replica="p"} 2.0
indexcache_num_requests_waiting{model="m",role="decode",replica="a"} 3.0
# TYPE indexcache_num_preemptions counter
indexcache_num_preemptions_total{model="m",role="decode",replica="a"} 7.0
# TYPE indexcache_e2e_request_latency_seconds histogram
indexcache_e2e_request_latency_seconds_count{model="m",role="ingress",replica="i"} 11.0
"""


def test_metrics_parse_weights_kv_by_capacity_and_skips_prefill():
    s = parse_metrics(METRICS, t=1.0)
    assert s.kv_usage == pytest.approx((1.0 * 1000 + 0.5 * 3000) / 4000)
    assert s.kv_capacity_tokens == 4000  # prefill pools are freed as payloads leave ...
    assert s.kv_capacity_per_replica == 500  # ... but a document must fit them too
    assert s.waiting == 5 and s.preemptions == 7 and s.requests_finished == 11


def test_multiturn_conversations_resend_their_history():
    plan = build_plan("multiturn", turns=3, **PLAN)
    spec = plan.workload
    assert spec.kind == "multiturn" and spec.turns == 3
    # the last turn holds the document, two replies and two questions within one pool
    assert spec.doc_tokens[1] + 2 * (spec.max_tokens + FOLLOWUP_TOKENS) <= 1024 - spec.max_tokens
    chat = Conversation(spec, random.Random(0))
    bodies = []
    for i in range(4):
        req = chat.request()
        bodies.append(req.body["messages"])
        assert req.workload == ("turn1" if i % 3 == 0 else "followup")
        chat.reply(f"reply {i}")
    first, second, third, fresh = bodies
    assert second[:1] == first and second[1] == {"role": "assistant", "content": "reply 0"}
    assert third[:3] == second and len(third) == 5
    assert len(fresh) == 1 and fresh != first  # after 3 turns a new conversation begins
    again = Conversation(spec, random.Random(0))
    assert again.request().body["messages"] == first  # seeded
    again.reset()
    assert len(again.request().body["messages"]) == 1
    with pytest.raises(ValueError, match="Conversation"):
        make_request(spec, random.Random(0))
    with pytest.raises(ValueError, match="turns"):
        build_plan("multiturn", turns=40, **PLAN)


def test_report_prefix_hit_rate_from_metrics():
    from loadtest.report import _prefix

    rows = [
        {"prefix_queries": 100.0, "prefix_hits": 10.0},
        {"prefix_queries": 600.0, "prefix_hits": 410.0},
    ]
    assert _prefix(rows) == {"queries": 500.0, "hits": 400.0, "hit_rate": 0.8}
    assert _prefix(rows[:1])["hit_rate"] is None
    s = parse_metrics(
        'indexcache_prefix_cache_queries_total{model="m",role="decode",replica="d"} 9.0\n'
        'indexcache_prefix_cache_hits_total{model="m",role="prefill",replica="p"} 4.0\n',
        t=1.0,
    )
    assert (s.prefix_queries, s.prefix_hits) == (9.0, 4.0)
