"""Locust load test of an OpenAI-compatible streaming server (IndexCache Serve or vLLM-like).

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8000 \
        --scenario saturate --duration 120 --out-dir runs/sat --csv runs/sat/locust

(`indexcache loadtest` wraps exactly this and then writes the report.) At start the file reads
the model card (/v1/models), one replica's and the whole app's KV capacity (/metrics), and the
tokenizer's characters per token (one 1-token completion), then builds the scenario's plan
(loadtest/plan.py). Each user streams requests back to back and reports, besides Locust's own
POST row (time to response headers, which this server sends with the first token):

    TTFT  time from sending to the first token          (one per request)
    ITL   gap between successive token events            (one per gap, pooled as vLLM does)
    TPOT  (e2e - ttft) / (output tokens - 1)             (one per request with >= 2 tokens)
    E2E   time from sending to the end of the stream     (response_length = output tokens)

Every request also goes to OUT/requests.jsonl (report.py computes goodput from it), /metrics is
sampled every second into OUT/metrics.csv, and OUT/run.json records the plan, the counts of
requests sent, completed, failed and lost (in flight when Locust stopped), and whether the server
drained (KV usage, running and waiting back to zero) after the load. A failure is "clean" when the
server said so (an OpenAI error body, or an SSE error event before [DONE]) and "broken" otherwise
(a cut stream, a non-JSON error page, a client-side exception): broken requests are lost too.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import time
from pathlib import Path

from locust import HttpUser, LoadTestShape, constant, events, task
from locust.runners import WorkerRunner

from loadtest import server
from loadtest.plan import SCENARIOS, build_plan
from loadtest.workloads import WORKLOADS, Conversation, make_request

log = logging.getLogger("loadtest")
DEFAULT_STOP_TIMEOUT_S = 600  # users finish their request when the run ends: none is cut off


class _State:
    plan = None
    recorder: server.MetricsRecorder | None = None
    out: Path | None = None
    log_file = None
    meta: dict = {}
    sent = completed = failed = failed_clean = 0
    load_started = load_stopped = None
    user_ids = itertools.count()


STATE = _State()


@events.init_command_line_parser.add_listener
def _args(parser) -> None:
    g = parser.add_argument_group("IndexCache load test")
    g.add_argument("--scenario", choices=SCENARIOS, default="smoke")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    g.add_argument(
        "--out-dir",
        default="loadtest-out",
        help="where requests.jsonl, metrics.csv and run.json go",
    )
    g.add_argument(
        "--workload", choices=WORKLOADS, default=None, help="override the scenario's workload"
    )
    g.add_argument("--max-tokens", type=int, default=None, help="output tokens per request")
    g.add_argument(
        "--doc-tokens",
        type=int,
        default=None,
        help="largest document prompt in tokens (documents draw from [N/2, N])",
    )
    g.add_argument("--turns", type=int, default=4, help="multiturn: turns per conversation")
    g.add_argument(
        "--oversubscribe",
        type=float,
        default=1.5,
        help="saturate: users at the top step, as a multiple of what the KV pool holds",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--api-key", default="", help="Bearer key of the server")
    g.add_argument("--scrape-interval", type=float, default=1.0)
    g.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to wait after the load for KV usage to return to zero",
    )
    g.add_argument(
        "--no-ignore-eos",
        action="store_true",
        help="let requests stop at EOS (default: exactly max_tokens each)",
    )
    g.add_argument(
        "--no-logprobs",
        action="store_true",
        help="do not ask for logprobs (then tokens with no text send no event)",
    )


@events.init.add_listener
def _init(environment, **_kw) -> None:
    opts = environment.parsed_options
    if opts is None or isinstance(environment.runner, WorkerRunner):
        return  # distributed workers take the plan from the master's shape
    if not environment.host:
        raise SystemExit("loadtest: --host is required (the server's base URL)")
    host, key = environment.host.rstrip("/"), opts.api_key or None
    try:
        card = server.model_info(host, key)
        sample = server.wait_for_capacity(host, key)
        limit = min(card.max_model_len, sample.kv_capacity_per_replica)
        cpt = server.chars_per_token(host, card.id, key, sample_chars=int(min(2000, limit // 4)))
        STATE.plan = build_plan(
            opts.scenario,
            duration_s=opts.duration,
            model=card.id,
            max_model_len=card.max_model_len,
            capacity_tokens=sample.kv_capacity_tokens,
            capacity_per_replica=sample.kv_capacity_per_replica,
            chars_per_token=cpt,
            workload=opts.workload,
            users=opts.num_users,
            max_tokens=opts.max_tokens,
            doc_tokens=opts.doc_tokens,
            oversubscribe=opts.oversubscribe,
            ignore_eos=not opts.no_ignore_eos,
            logprobs=not opts.no_logprobs,
            turns=opts.turns,
        )
    except (server.ServerError, ValueError) as e:
        raise SystemExit(f"loadtest: {e}") from e
    if not environment.stop_timeout:
        environment.stop_timeout = DEFAULT_STOP_TIMEOUT_S
    STATE.out = Path(opts.out_dir)
    STATE.out.mkdir(parents=True, exist_ok=True)
    for name in ("requests.jsonl", "metrics.csv"):
        (STATE.out / name).unlink(missing_ok=True)
    STATE.log_file = open(STATE.out / "requests.jsonl", "a")  # closed at quit
    STATE.recorder = server.MetricsRecorder(
        host, STATE.out / "metrics.csv", key, opts.scrape_interval
    )
    STATE.meta = {
        "host": host,
        "model": card.id,
        "max_model_len": card.max_model_len,
        "kv_capacity_tokens": sample.kv_capacity_tokens,
        "kv_capacity_per_replica": sample.kv_capacity_per_replica,
        "chars_per_token": cpt,
        "seed": opts.seed,
        "plan": STATE.plan.to_json(),
    }
    stages = ", ".join(f"{s.users} users until {s.until_s:.0f}s" for s in STATE.plan.stages)
    log.info(
        "loadtest %s on %s (KV %d tokens): %s",
        opts.scenario,
        card.id,
        sample.kv_capacity_tokens,
        stages,
    )
    _write_meta()


def _write_meta() -> None:
    counts = {
        "sent": STATE.sent,
        "completed": STATE.completed,
        "failed": STATE.failed,
        "failed_clean": STATE.failed_clean,
        "failed_broken": STATE.failed - STATE.failed_clean,
        "lost": STATE.sent - STATE.completed - STATE.failed,
    }
    meta = {
        **STATE.meta,
        "requests": counts,
        "load_started": STATE.load_started,
        "load_stopped": STATE.load_stopped,
    }
    (STATE.out / "run.json").write_text(json.dumps(meta, indent=1))


@events.test_start.add_listener
def _start(environment, **_kw) -> None:
    if STATE.recorder is not None:
        STATE.load_started = time.time()
        STATE.recorder.start()


@events.test_stop.add_listener
def _stop(environment, **_kw) -> None:
    """Fired once every user has finished its last request: wait for the server to drain."""
    if STATE.recorder is None or STATE.load_stopped is not None:
        return
    STATE.load_stopped = time.time()
    idle, waited = STATE.recorder.drain(environment.parsed_options.drain_timeout)
    STATE.recorder.stop()
    last = STATE.recorder.samples[-1] if STATE.recorder.samples else None
    STATE.meta["drain"] = {
        "idle": idle,
        "seconds": round(waited, 2),
        "last_sample": last.as_row() if last else None,
        "scrape_errors": STATE.recorder.errors,
    }
    STATE.log_file.flush()
    _write_meta()
    log.info(
        "load stopped: %d sent, %d completed, %d failed; server %s after %.1fs",
        STATE.sent,
        STATE.completed,
        STATE.failed,
        "idle" if idle else "NOT idle",
        waited,
    )


@events.quitting.add_listener
def _quit(environment, **_kw) -> None:
    if STATE.log_file is not None:
        _write_meta()
        STATE.log_file.close()
        STATE.log_file = None


class ScenarioShape(LoadTestShape):
    """Users over time from the plan (constant, or saturate's steps); ends after --duration."""

    use_common_options = True  # -u overrides the scenario's user count

    def tick(self):
        if STATE.plan is None:
            return None
        users = STATE.plan.users_at(self.get_run_time())
        return None if users is None else (users, max(users, 1))


class OpenAIStreamingUser(HttpUser):
    wait_time = constant(0)  # closed loop: the next request as soon as the last one ends

    def on_start(self) -> None:
        seed = self.environment.parsed_options.seed
        self.rng = random.Random(seed * 1_000_003 + next(STATE.user_ids))
        key = self.environment.parsed_options.api_key
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        spec = STATE.plan.workload if STATE.plan is not None else None
        self.chat = Conversation(spec, self.rng) if spec and spec.kind == "multiturn" else None

    @task
    def stream(self) -> None:
        spec = STATE.plan.workload
        req = self.chat.request() if self.chat is not None else make_request(spec, self.rng)
        STATE.sent += 1
        rec = {"workload": req.workload, "start": time.time()}
        t0 = time.perf_counter()
        try:
            stamps, usage, error, clean, text = self._stream(req, t0)
        except Exception as e:  # any client-side failure is the request's failure
            stamps, usage, error, clean, text = [], None, f"{type(e).__name__}: {e}", False, ""
        end = time.perf_counter()
        rec["e2e_s"] = end - t0
        if error is None:
            STATE.completed += 1
            self._report(req.workload, t0, end, stamps, usage, rec)
        else:
            STATE.failed += 1
            STATE.failed_clean += clean
            rec["error"] = error
            rec["failure"] = "clean" if clean else "broken"
        if self.chat is not None and error is None:
            self.chat.reply(text)  # the reply joins the history
        elif self.chat is not None:
            self.chat.reset()  # a failed turn starts a new conversation
        STATE.log_file.write(json.dumps(rec) + "\n")

    def _stream(self, req, t0: float):
        """(token stamps, usage, error or None, whether a failure was reported cleanly, the
        completion's text)."""
        stamps: list[tuple[float, int]] = []  # (time, tokens in the event)
        usage, done, error, clean, text = None, False, None, False, []
        with self.client.post(
            "/v1" + req.path,
            json=req.body,
            headers=self.headers,
            stream=True,
            catch_response=True,
            name=req.workload,
        ) as resp:
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}: {resp.text[:300]}"
                resp.failure(error)
                return stamps, usage, error, _is_error_json(resp.text), ""
            for line in resp.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    error = f"stream error: {chunk['error'].get('message', chunk['error'])}"
                    clean = True  # the server ended the stream with a reason
                    break
                if chunk.get("usage"):
                    usage = chunk["usage"]
                text.append(_text_in(chunk))
                n = _tokens_in(chunk)
                if n:
                    stamps.append((time.perf_counter(), n))
            if error is None and not done:
                error = "stream ended without [DONE]"
            if error is None and not stamps:
                error = "stream carried no token"
            if error is None:
                resp.success()
            else:
                resp.failure(error)
        return stamps, usage, error, clean, "".join(text)

    def _report(self, workload: str, t0: float, end: float, stamps, usage, rec: dict) -> None:
        fire = self.environment.events.request.fire
        out_tokens = usage["completion_tokens"] if usage else sum(n for _, n in stamps)
        prompt_tokens = usage["prompt_tokens"] if usage else 0
        ttft = stamps[0][0] - t0
        gaps = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]
        tpot = (end - t0 - ttft) / (out_tokens - 1) if out_tokens > 1 else None
        fire(
            request_type="TTFT",
            name=workload,
            response_time=ttft * 1000,
            response_length=prompt_tokens,
        )
        for g in gaps:
            fire(request_type="ITL", name=workload, response_time=g * 1000, response_length=1)
        if tpot is not None:
            fire(
                request_type="TPOT",
                name=workload,
                response_time=tpot * 1000,
                response_length=out_tokens,
            )
        fire(
            request_type="E2E",
            name=workload,
            response_time=(end - t0) * 1000,
            response_length=out_tokens,
        )
        rec.update(
            ttft_s=ttft,
            tpot_s=tpot,
            prompt_tokens=prompt_tokens,
            output_tokens=out_tokens,
            itl_ms=[round(g * 1000, 3) for g in gaps],
        )


def _is_error_json(text: str) -> bool:
    try:
        return isinstance(json.loads(text).get("error"), dict)
    except (ValueError, AttributeError):
        return False


def _text_in(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    text = c.get("text")
    if text is None:
        text = (c.get("delta") or {}).get("content")
    return text or ""


def _tokens_in(chunk: dict) -> int:
    """Tokens an SSE chunk carries: counted from its logprobs when present (one entry per token),
    else 1 for a chunk with text (a role-only or usage-only chunk carries none)."""
    choices = chunk.get("choices") or []
    if not choices:
        return 0
    c = choices[0]
    lp = c.get("logprobs")
    if lp:
        return len(lp.get("content") or lp.get("tokens") or [])
    text = c.get("text")
    if text is None:
        text = (c.get("delta") or {}).get("content")
    return 1 if text else 0
