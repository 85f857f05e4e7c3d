"""The synchronous engine: requests in, `step()` runs one scheduled forward, outputs out.

    batch = scheduler.schedule()          # decode rows + prefill chunks within the token budget
    logits = runner.run(batch)            # one forward; the model writes KV into the pages
    tokens = sample(logits)               # only sequences whose pending tokens all ran
    postprocess: stop checks, detokenize, export (prefill role), free finished pages

Roles share everything: `unified` runs whole requests; `prefill` ends a request after its first
token and returns a KV payload of the prompt; `decode` reserves pages for a payload, imports it
into them and continues (and prefills a prompt itself when the ingress sends one straight to
it). The handoff's state and copies live in kv_connector.py and are advanced between steps, never
inside the scheduler or the forward. With prefix
caching (the default) each role reuses the cached full pages of earlier requests' prefixes, and
a decode engine registers the pages it imports, so the next turn of a conversation can hit there.
Bad requests raise ValueError naming the field before anything is allocated, so the
engine keeps serving the others.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from pathlib import Path

import torch
from tqdm import tqdm

from model.dsa import DSAForCausalLM
from model.index_cache import IndexCacheConfig
from model.kv_cache import KVCache
from model.tokenizer import Tokenizer
from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig, watermark_pages
from serving.engine.detokenizer import Detokenizer, add_tokens
from serving.engine.kv_connector import EngineKVConnector
from serving.engine.memory import resolve_num_blocks
from serving.engine.model_runner import ModelRunner
from serving.engine.outputs import EngineStats, Output, PrefillResult, StepOutput
from serving.engine.params import SamplingParams
from serving.engine.payload import KVHeader, KVPayload, check_header, restore_rng
from serving.engine.prefix_cache import model_fingerprint, root_hash
from serving.engine.resume import Resume, resume_sequence
from serving.engine.sampler import Sampler, logprobs_of
from serving.engine.scheduler import ScheduledBatch, Scheduler
from serving.engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        model: DSAForCausalLM,
        tokenizer: Tokenizer,
        config: EngineConfig,
        cache: KVCache | None = None,
    ):
        """`cache`: run over an existing KV pool of this model's layout (KVCache.shared_as) instead
        of allocating one; benchmarks step two plans on the same pool this way."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.role = config.role
        mcfg = model.config
        want = config.torch_device
        if model.device.type != want.type or want.index not in (None, model.device.index):
            raise ValueError(
                f"device: the config says {config.device}, the model is on {model.device}"
            )
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {mcfg.max_position_embeddings}"
            )
        if model.par.size != config.tensor_parallel_size:
            raise ValueError(
                f"tensor_parallel_size: the config says {config.tensor_parallel_size}, the model "
                f"is split over {model.par.size} ranks"
            )
        if not model.par.driver:
            raise ValueError("an engine runs on rank 0; other ranks run ModelRunner.serve()")
        self.layout = model.kv_layout(config.index_fp8)
        self.runner = ModelRunner(model, config)
        if cache is not None:
            if cache.layout != self.layout:
                raise ValueError(f"cache: layout {cache.layout} is not the model's {self.layout}")
            num_blocks = cache.num_blocks
        else:
            num_blocks = resolve_num_blocks(
                config,
                self.layout,
                self.max_model_len,
                lambda: self.runner.profile(self.max_model_len),
            )
            cache = KVCache(self.layout, num_blocks, model.device)
        self.cache = cache
        # Prefix-cache hashes start from the model's identity and the layout (plan id included).
        root = root_hash(model_fingerprint(model, mcfg), self.layout)
        self.block_manager = BlockManager(
            num_blocks,
            self.layout.page_size,
            root if config.enable_prefix_caching else None,
            on_free=self.runner.release,
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.chunk,
            watermark=watermark_pages(config, num_blocks),
            max_bypass=config.max_queue_bypass,
        )
        # A sequence can never outgrow the pool, so the effective limit is the smaller one.
        self.max_len = min(self.max_model_len, self.kv_capacity_tokens)
        self.runner.bind(self.cache, self.max_len)  # captures the decode CUDA graphs
        self.kv = EngineKVConnector(
            self.cache, self.scheduler, config.max_queued_handoffs, mirror=self.runner.mirror_import
        )
        self.eos_token_ids = set(tokenizer.eos_token_ids) | set(mcfg.eos_token_id)
        self.sampler = Sampler(mcfg.vocab_size, model.device, tokenizer, sorted(self.eos_token_ids))
        self.seqs: dict[str, Sequence] = {}
        self._done: list[StepOutput] = []  # finished without a forward (decode of a done request)
        self.last_batch = ScheduledBatch()  # what the latest step ran (benchmarks, metrics)
        self._ids = itertools.count()
        self.prompt_tokens_total = self.generation_tokens_total = 0
        self.indexer_run_total = self.indexer_skipped_total = 0
        self._n_full = len(model.plan.full_layers)
        self._n_shared = mcfg.num_hidden_layers - self._n_full

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        index_cache: IndexCacheConfig | str | None = None,
        **settings,
    ) -> LLMEngine:
        """`index_cache` takes load_model's forms (IndexCacheConfig, "FSSF..." or None for the
        checkpoint's plan); `settings` are EngineConfig fields (unknown ones: ValueError)."""
        from model.loader import load_model

        config = EngineConfig.from_kwargs(**settings)
        if config.tensor_parallel_size > 1:
            raise ValueError(
                f"tensor_parallel_size={config.tensor_parallel_size}: a tensor-parallel engine "
                "needs one process per rank (serving.engine.tp.start_rank, or the Serve replica "
                "in serving/tp_replica.py)"
            )
        model = load_model(
            path,
            index_cache,
            dtype=config.torch_dtype,
            device=config.device,
            keep_fp8=config.fp8_weights,
        )
        return cls(model.eval(), Tokenizer.from_pretrained(path), config)

    def shutdown(self) -> None:
        """Release the other ranks of a tensor-parallel replica (a no-op for one rank)."""
        self.runner.shutdown()

    # -- requests ---------------------------------------------------------------------------
    @property
    def kv_capacity_tokens(self) -> int:
        return self.block_manager.num_blocks * self.layout.page_size

    @property
    def plan(self) -> IndexCacheConfig:
        return self.model.plan

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, list | tuple):
            raise ValueError(
                f"prompt must be a string or a list of token ids, got {type(prompt).__name__}"
            )
        return list(prompt)

    def validate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> None:
        """Checks of one request that need no engine state (safe from any thread)."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id is not None and not isinstance(request_id, str):
            raise ValueError(f"request_id must be a string, got {type(request_id).__name__}")
        n, vocab = len(prompt_token_ids), self.model.config.vocab_size
        if n == 0:
            raise ValueError("prompt is empty")
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}), got {bad[:5]}")
        if n > self.max_model_len:
            raise ValueError(f"prompt has {n} tokens, more than max_model_len {self.max_model_len}")
        if n > self.max_len:
            raise ValueError(
                f"prompt has {n} tokens, more than the KV cache holds "
                f"({self.kv_capacity_tokens} tokens)"
            )

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams,
        resume: Resume | None = None,
        *,
        export_hold_s: float | None = None,
    ) -> str:
        """Unified and prefill roles; a decode engine takes a prompt too and prefills it itself
        (selective disaggregation: short uncached parts skip the prefill pool).
        `resume`: continue a request another engine was generating (resume.py).
        `export_hold_s` (prefill role): keep the pages after export until `release_export` or
        for this long (the decode side's acknowledgement); None frees them once staged."""
        if export_hold_s is not None and not (
            isinstance(export_hold_s, int | float) and export_hold_s > 0
        ):
            raise ValueError(f"export_hold_s must be None or > 0, got {export_hold_s!r}")
        seq = self._new_seq(request_id, self.tokenize(prompt), params)
        if resume is not None:
            resume.check(seq.num_prompt_tokens, params, self.max_len)
            self._resume(seq, resume)
        seq.export_hold_s = export_hold_s
        return self._enqueue(seq)

    def release_export(self, request_id: str) -> bool:
        """Prefill role: the decode side has the payload; free the request's pages."""
        return self.kv.release(request_id)

    def reserve(
        self,
        header: KVHeader,
        params: SamplingParams,
        request_id: str | None = None,
        resume: Resume | None = None,
        timeout_s: float | None = None,
    ) -> str:
        """Decode role: continue a request prefilled elsewhere, in two phases. Now: check the
        payload's header and queue the handoff for pages (HandoffRefused when too many wait).
        When pages are reserved, a `reserved` output goes out; then `fill(request_id, payload)`
        imports the rows and the request decodes. Not filled within `timeout_s`: it fails with
        HandoffTimeout and the pages go back. The first token (in the header) is not re-emitted.
        `resume`: the payload was re-prefilled after a replica died (resume.py); its cached
        tokens end with resume.token_ids."""
        if timeout_s is not None and not (isinstance(timeout_s, int | float) and timeout_s > 0):
            raise ValueError(f"timeout_s must be None or > 0, got {timeout_s!r}")
        seq = self._payload_seq(header, params, request_id, resume)
        return self._admit_handoff(seq, header, timeout_s, None)

    def fill(self, request_id: str, payload: KVPayload) -> None:
        """Decode role: the rows of a reserved handoff (ValueError when they are not the ones
        the header announced, or nothing is reserved under `request_id`)."""
        self.kv.fill(request_id, payload)

    def import_payload(
        self,
        payload: KVPayload,
        params: SamplingParams,
        request_id: str | None = None,
        resume: Resume | None = None,
    ) -> str:
        """Decode role, payload in hand (offline, tests): reserve, and fill once reserved."""
        seq = self._payload_seq(payload.header, params, request_id, resume)
        return self._admit_handoff(seq, payload.header, None, payload)

    def _payload_seq(
        self,
        header: KVHeader,
        params: SamplingParams,
        request_id: str | None,
        resume: Resume | None = None,
    ) -> Sequence:
        if self.role == "prefill":
            raise ValueError("role: a prefill engine does not import payloads")
        check_header(header, self.layout)
        if header.num_tokens + 1 > self.max_len:
            raise ValueError(
                f"payload has {header.num_tokens} prompt tokens; this engine holds "
                f"at most {self.max_len - 1} plus the first token"
            )
        prompt = header.prompt_token_ids
        if resume is not None:
            n = len(resume.token_ids)
            if len(prompt) <= n or tuple(prompt[-n:]) != resume.token_ids:
                raise ValueError("resume.token_ids are not the tail of the payload's tokens")
            prompt = prompt[:-n]
        seq = self._new_seq(request_id, prompt, params)
        if resume is not None:
            self._resume(seq, resume)
        seq.prompt_logprobs = None  # the prefill side computed (and returned) them
        restore_rng(header, seq.generator)
        self._append_token(seq, header.first_token, None)
        self.sampler.replay(seq.sampling, [header.first_token])  # grammar and penalty state
        seq.num_streamed += 1  # after the resumed tokens, if any
        seq.detok.delta(final=False)  # the prefill side already streamed the first token's text
        return seq

    def _resume(self, seq: Sequence, resume: Resume) -> None:
        resume_sequence(seq, resume)
        self.sampler.replay(seq.sampling, list(resume.token_ids))  # grammar and penalty state

    def _admit_handoff(
        self, seq: Sequence, header: KVHeader, timeout_s: float | None, payload: KVPayload | None
    ) -> str:
        if seq.finish_reason is None:
            self.kv.reserve(seq, header, timeout_s, payload)  # may refuse: nothing is held yet
            self.seqs[seq.request_id] = seq
            return seq.request_id
        # The first token already ends the request (the prefill side said so): no forward.
        seq.status = SequenceStatus.FINISHED
        self._done.append(self._step_output(seq))
        return seq.request_id

    def _new_seq(self, request_id: str | None, ids: list[int], params: SamplingParams) -> Sequence:
        self.validate(ids, params, request_id)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs or rid in self.kv:
            raise ValueError(f"request_id {rid!r} is already in use")
        gen = None
        if not params.greedy:
            gen = torch.Generator(self.model.device)
            # Unseeded requests draw a fresh seed without touching torch's global RNG.
            gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        seq = Sequence(rid, ids, params, Detokenizer(self.tokenizer, params), gen)
        seq.sampling = self.sampler.init_request(params, ids)
        return seq

    def _enqueue(self, seq: Sequence) -> str:
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its pages, whatever its phase (an export held for the decode
        side, a handoff waiting for pages or for its rows included); False if it is not here."""
        if self.kv.release(request_id):
            return True
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if not seq.is_finished:
            self.kv.discard(request_id)
            self.scheduler.remove(seq)
            seq.finish_reason = "abort"
            seq.status = SequenceStatus.FINISHED
        return True

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens a request would find in the prefix cache now (safe from any thread)."""
        return self.block_manager.probe(token_ids)

    def has_unfinished(self) -> bool:
        """Work for `step()`: requests to run, outputs to hand out, handoff copies in flight.
        Handoffs waiting for pages, rows or an acknowledgement are not: `poll_handoffs()` (and
        every step) advances them; `next_handoff_deadline()` says when one expires."""
        return self.scheduler.has_work() or bool(self._done) or self.kv.busy

    def poll_handoffs(self) -> list[StepOutput]:
        """Advance KV handoffs (engine thread, between steps; step() does it first)."""
        return self.kv.poll(self._fail)

    def next_handoff_deadline(self) -> float | None:
        """time.monotonic() at which the next handoff expires, if any."""
        return self.kv.next_deadline()

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            role=self.role,
            # Handoffs count as they did as payloads in the queue: waiting until they hold pages.
            num_running=len(self.scheduler.running) + len(self.scheduler.reserved),
            num_waiting=len(self.scheduler.waiting) + len(self.scheduler.reserving),
            num_preemptions=self.scheduler.num_preemptions,
            num_exporting=len(self.kv.exports),
            num_handoffs_waiting=len(self.scheduler.reserving),
            num_handoffs_reserved=len(self.scheduler.reserved),
            kv_blocks_handoff=self.kv.pages_held(),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used,
            kv_usage=bm.num_used / bm.num_blocks,
            kv_blocks_cached_free=bm.num_cached_free,
            prefix_cache_pages=bm.num_cached,
            prefix_cache_queries_total=self.scheduler.prefix.queries,
            prefix_cache_hits_total=self.scheduler.prefix.hits,
            prefix_cache_evictions_total=bm.index.num_evictions,
            kv_capacity_tokens=self.kv_capacity_tokens,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            indexer_layers_run_total=self.indexer_run_total,
            indexer_layers_skipped_total=self.indexer_skipped_total,
            f_layer_ratio=self.plan.retention,
            plan_id=self.plan.plan_id,
            bytes_per_token=self.layout.bytes_per_token,
            index_bytes_per_token=self.layout.index_bytes_per_token,
        )

    # -- stepping ---------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """One forward. A failure fails only the requests it belongs to: a forward that raises
        fails that batch's requests, a sampling or post-processing error only its own request;
        every other request of the step still gets its output."""
        outputs, self._done = self._done, []
        outputs += self.poll_handoffs()
        batch = self.last_batch = self.scheduler.schedule()
        if not batch:
            if self.kv.busy:  # only copies (or pages) to wait for: do not spin
                self.kv.wait_copies(0.002)
            return outputs
        try:
            logits, sampling, prompt = self.runner.run(batch)
        except Exception as e:
            log.exception("forward failed; failing the %d requests of its batch", len(batch.seqs))
            return outputs + [self._fail(seq, e) for seq in batch.seqs]
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            first_prefill = not seq.completion_token_ids  # recomputation is not counted again
            seq.num_cached += n
            if first_prefill and seq.num_cached == seq.num_prompt_tokens:
                self.prompt_tokens_total += seq.num_prompt_tokens
        self.indexer_run_total += batch.num_tokens * self._n_full
        self.indexer_skipped_total += batch.num_tokens * self._n_shared
        if logits is None:
            return outputs
        if prompt:  # opt-in prompt logprobs (rows after the sampling rows)
            logits, sampling = self._prompt_logprobs(logits, sampling, batch.seqs, prompt, outputs)
        seqs = [batch.seqs[i] for i in sampling]
        if not seqs:
            return outputs
        tokens, lps, errors = self._sample(logits, seqs)
        ok = [i for i in range(len(seqs)) if i not in errors]
        advanced = self.sampler.advance([seqs[i] for i in ok], [tokens[i] for i in ok])
        errors.update({ok[j]: e for j, e in advanced.items()})
        ok = [i for i in ok if i not in errors]
        failed = self._append_tokens(
            [seqs[i] for i in ok], [tokens[i] for i in ok], [lps[i] for i in ok]
        )
        errors.update({ok[j]: e for j, e in failed.items()})
        for i, seq in enumerate(seqs):
            if i in errors:
                outputs.append(self._fail(seq, errors[i]))
                continue
            self.generation_tokens_total += 1
            try:
                if self.role == "prefill":
                    self._export(seq)  # its output goes out once the payload is staged
                    continue
                if seq.finish_reason is not None:
                    self._finish(seq)
                outputs.append(self._step_output(seq))
            except Exception as e:
                log.exception("post-processing %s failed", seq.request_id)
                outputs.append(self._fail(seq, e))
        return outputs

    def _prompt_logprobs(self, logits, sampling: list[int], seqs: list[Sequence], prompt, outputs):
        """Record the prompt rows' logprobs on their sequences (one host sync for the step); if
        that fails, only those requests fail. -> (logits, sampling) of the requests still in."""
        rows, targets, ks = logits[len(sampling) :], [], []
        for b, first, n in prompt:
            targets += seqs[b].token_ids[first + 1 : first + 1 + n]
            ks += [seqs[b].params.prompt_logprobs] * n
        try:
            got = logprobs_of(rows, torch.tensor(targets, device=rows.device), ks)
        except Exception as e:
            log.exception("prompt logprobs failed for %d requests", len(prompt))
            outputs.extend(self._fail(seqs[b], e) for b, _, _ in prompt)
            keep = [j for j, i in enumerate(sampling) if not seqs[i].is_finished]
            return logits[keep], [sampling[j] for j in keep]
        at = 0
        for b, _, n in prompt:
            seqs[b].prompt_logprobs.extend(got[at : at + n])
            at += n
        return logits[: len(sampling)], sampling

    def _sample(self, logits, seqs: list[Sequence]):
        """-> (token per row, logprobs per row, {row: error}). The batched sampler runs first; if
        one request's parameters break it, rows are sampled one by one so only that one fails."""
        try:
            return self._sample_rows(logits, seqs)
        except Exception:
            log.warning("batched sampling failed; sampling %d rows one by one", len(seqs))
        toks, lps, errors = [0] * len(seqs), [None] * len(seqs), {}
        for i, seq in enumerate(seqs):
            try:
                (toks[i],), (lps[i],), failed = self._sample_rows(logits[i : i + 1], [seq])
                if failed:
                    errors[i] = failed[0]
            except Exception as e:
                errors[i] = e
        return toks, lps, errors

    def _sample_rows(self, logits, seqs: list[Sequence]):
        """-> (tokens, logprobs, {row: error} of requests whose own sampler state failed)."""
        tokens, failed = self.sampler.sample(logits, seqs)
        lps: list = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            got = logprobs_of(logits[want], tokens[want], [seqs[i].params.logprobs for i in want])
            for i, lp in zip(want, got, strict=True):
                lps[i] = lp
        return tokens.tolist(), lps, failed

    def _append_tokens(
        self, seqs: list[Sequence], toks: list[int], lps: list
    ) -> dict[int, BaseException]:
        """Append one sampled token to each sequence and decide whether it finishes; the text of
        the whole step is decoded in one batch. -> {index: error} of sequences that failed."""
        detok_seqs, detok_toks, where = [], [], []
        for j, (seq, tok, lp) in enumerate(zip(seqs, toks, lps, strict=True)):
            seq.token_ids.append(tok)
            if lp is not None:
                seq.logprobs.append(lp)
            p = seq.params
            if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
                seq.finish_reason = "stop"  # the stop token is kept in token_ids, not in the text
            else:
                detok_seqs.append(seq)
                detok_toks.append(tok)
                where.append(j)
        errors: dict[int, BaseException] = {}
        try:
            stopped = add_tokens([s.detok for s in detok_seqs], detok_toks)
        except Exception:  # one bad sequence: decode one by one so only it fails
            stopped = []
            for j, seq, tok in zip(where, detok_seqs, detok_toks, strict=True):
                try:
                    stopped.append(add_tokens([seq.detok], [tok])[0])
                except Exception as e:
                    errors[j] = e
                    stopped.append(False)
        for seq, hit in zip(detok_seqs, stopped, strict=True):
            if hit:
                seq.finish_reason = "stop"
            elif len(seq.token_ids) - seq.num_prompt_tokens >= seq.params.max_tokens:
                seq.finish_reason = "length"
            elif seq.num_tokens >= self.max_len:
                seq.finish_reason = "length"
        return errors

    def _append_token(self, seq: Sequence, tok: int, lp) -> None:
        errors = self._append_tokens([seq], [tok], [lp])
        if errors:
            raise errors[0]

    def _fail(self, seq: Sequence, err: BaseException) -> StepOutput:
        """Take a request out with its error; its pages are freed."""
        if not seq.is_finished:
            self.kv.discard(seq.request_id)
            self.scheduler.remove(seq)
            seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "abort"
        self.seqs.pop(seq.request_id, None)
        return StepOutput(seq.request_id, [], "", "abort", error=err)

    def _finish(self, seq: Sequence) -> None:
        self.kv.discard(seq.request_id)
        self.scheduler.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.seqs.pop(seq.request_id, None)

    def _step_output(self, seq: Sequence) -> StepOutput:
        new = seq.token_ids[seq.num_prompt_tokens + seq.num_streamed :]
        seq.num_streamed += len(new)
        lps = None
        if seq.logprobs is not None:
            lps = seq.logprobs[seq.num_logprobs_streamed :]
            seq.num_logprobs_streamed = len(seq.logprobs)
        final = seq.finish_reason is not None  # until then the stop-string holdback stays back
        out = StepOutput(seq.request_id, new, seq.detok.delta(final), seq.finish_reason, lps)
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            out.prompt_logprobs, seq.prompt_logprobs_sent = seq.prompt_logprobs, True
        return out

    def _export(self, seq: Sequence) -> None:
        """Prefill role: the prompt's KV leaves as a payload (kv_connector.py); the pages stay
        until it is staged, or until the decode side has it (`export_hold_s`)."""
        self.scheduler.running.remove(seq)
        self.runner.release(seq.request_id)  # its block-table row: no more forwards
        self.seqs.pop(seq.request_id, None)
        out = self._step_output(seq)
        out.prefill = PrefillResult(
            seq.request_id,
            seq.token_ids[-1],
            None,  # the payload, once staged
            seq.num_prompt_tokens,
            seq.finish_reason,
            out.text,
            out.logprobs,
            out.prompt_logprobs,
        )
        self.kv.export(seq, out)

    # -- batch helpers ----------------------------------------------------------------------
    def _run(self, seqs: list[Sequence], use_tqdm: bool) -> None:
        mine = {s.request_id for s in seqs}
        bar = tqdm(total=len(seqs), desc="requests", disable=not use_tqdm)
        bar.update(sum(s.is_finished for s in seqs))
        while any(not s.is_finished for s in seqs):
            bar.update(sum(o.finished for o in self.step() if o.request_id in mine))
        bar.close()
        self._done = [o for o in self._done if o.request_id not in mine]

    def _prepare(self, items: list, params) -> list[SamplingParams]:
        ps = params if isinstance(params, list) else [params] * len(items)
        if len(ps) != len(items):
            raise ValueError(f"params has {len(ps)} entries for {len(items)} prompts")
        return ps

    def generate(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[Output]:
        """Run prompts to completion (unified role); outputs in prompt order."""
        if self.role != "unified":
            raise ValueError(
                f"role: generate needs a unified engine, this one is {self.role!r} "
                "(use prefill() / decode())"
            )
        ps = self._prepare(prompts, params or SamplingParams())
        seqs = [
            self._new_seq(None, self.tokenize(p), sp) for p, sp in zip(prompts, ps, strict=True)
        ]
        for s in seqs:  # all validated before any is queued
            self._enqueue(s)
        self._run(seqs, use_tqdm)
        return [self._output(s) for s in seqs]

    def prefill(
        self,
        prompts: list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[PrefillResult]:
        if self.role != "prefill":
            raise ValueError(f"role: prefill needs a prefill engine, this one is {self.role!r}")
        ps = self._prepare(prompts, params or SamplingParams())
        seqs = [
            self._new_seq(None, self.tokenize(p), sp) for p, sp in zip(prompts, ps, strict=True)
        ]
        for s in seqs:
            self._enqueue(s)
        results: dict[str, PrefillResult] = {}
        while len(results) < len(seqs):
            results.update({o.request_id: o.prefill for o in self.step() if o.prefill})
        return [results[s.request_id] for s in seqs]

    def decode(
        self, payloads: list[KVPayload], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Output]:
        """Continue prefilled requests; token_ids and text include the payload's first token."""
        ps = self._prepare(payloads, params or SamplingParams())
        seqs = [self._payload_seq(p.header, sp, None) for p, sp in zip(payloads, ps, strict=True)]
        for s, p in zip(seqs, payloads, strict=True):
            self._admit_handoff(s, p.header, None, p)
        self._run(seqs, False)
        return [self._output(s) for s in seqs]

    @staticmethod
    def _output(seq: Sequence) -> Output:
        return Output(
            seq.request_id,
            seq.prompt_token_ids,
            seq.completion_token_ids,
            seq.detok.text,
            seq.finish_reason,
            seq.logprobs,
            seq.prompt_logprobs,
        )
