"""The synchronous engine: requests in, `step()` runs one scheduled forward, outputs out.

    batch = scheduler.schedule()          # decode rows + prefill chunks within the token budget
    logits = runner.run(batch)            # one forward; the model writes KV into the pages
    tokens = sample(logits)               # only sequences whose pending tokens all ran
    postprocess: stop checks, detokenize, export (prefill role), free finished pages

Roles share everything: `unified` runs whole requests; `prefill` ends a request after its first
token and returns a KV payload of the prompt; `decode` imports payloads into fresh pages and
continues (and prefills a prompt itself when the ingress sends one straight to it). With prefix
caching (the default) each role reuses the cached full pages of earlier requests' prefixes, and
a decode engine registers the pages it imports, so the next turn of a conversation can hit there.
Bad requests raise ValueError naming the field before anything is allocated, so the
engine keeps serving the others.
"""

from __future__ import annotations

import itertools
import secrets
from pathlib import Path

import torch
from tqdm import tqdm

from model.dsa import DSAForCausalLM
from model.index_cache import IndexCacheConfig
from model.kv_cache import KVCache
from model.tokenizer import Tokenizer
from serving.engine.block_manager import BlockManager
from serving.engine.config import EngineConfig, resolve_num_blocks, watermark_pages
from serving.engine.detokenizer import Detokenizer
from serving.engine.model_runner import ModelRunner
from serving.engine.outputs import EngineStats, Output, PrefillResult, StepOutput
from serving.engine.params import SamplingParams
from serving.engine.payload import KVPayload, check_payload, export_rows, import_rows
from serving.engine.prefix_cache import model_fingerprint, root_hash
from serving.engine.sampler import logprobs_of, sample
from serving.engine.scheduler import ScheduledBatch, Scheduler
from serving.engine.sequence import Sequence, SequenceStatus


class LLMEngine:
    def __init__(self, model: DSAForCausalLM, tokenizer: Tokenizer, config: EngineConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.role = config.role
        mcfg = model.config
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len {self.max_model_len} exceeds the model's "
                f"max_position_embeddings {mcfg.max_position_embeddings}"
            )
        self.layout = model.kv_layout(config.index_fp8)
        num_blocks = resolve_num_blocks(config, mcfg, self.layout, self.max_model_len, model.device)
        self.cache = KVCache(self.layout, num_blocks, model.device)
        # Prefix-cache hashes start from the model's identity and the layout (plan id included).
        root = root_hash(model_fingerprint(model, mcfg), self.layout)
        self.block_manager = BlockManager(
            num_blocks, self.layout.page_size, root if config.enable_prefix_caching else None
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self._import,
            watermark=watermark_pages(config, num_blocks),
            max_bypass=config.max_queue_bypass,
        )
        self.runner = ModelRunner(model, self.cache)
        # A sequence can never outgrow the pool, so the effective limit is the smaller one.
        self.max_len = min(self.max_model_len, self.kv_capacity_tokens)
        self.eos_token_ids = set(tokenizer.eos_token_ids) | set(mcfg.eos_token_id)
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
        role: str = "unified",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        num_blocks: int | None = None,
        kv_memory_bytes: int | None = None,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
        index_fp8: bool = False,
        gpu_memory_utilization: float = 0.9,
        enable_prefix_caching: bool = True,
        kv_watermark: float = 0.01,
        max_queue_bypass: int = 8,
    ) -> LLMEngine:
        """`index_cache` takes load_model's forms (IndexCacheConfig, "FSSF..." or None for the
        checkpoint's plan); the rest are EngineConfig fields."""
        from model.loader import load_model

        config = EngineConfig(
            role=role,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=max_model_len,
            num_blocks=num_blocks,
            kv_memory_bytes=kv_memory_bytes,
            index_fp8=index_fp8,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=enable_prefix_caching,
            kv_watermark=kv_watermark,
            max_queue_bypass=max_queue_bypass,
        )
        model = load_model(path, index_cache, dtype=dtype, device=device)
        return cls(model.eval(), Tokenizer.from_pretrained(path), config)

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
        self, request_id: str | None, prompt: str | list[int], params: SamplingParams
    ) -> str:
        """Unified and prefill roles; a decode engine takes a prompt too and prefills it itself
        (selective disaggregation: short uncached parts skip the prefill pool)."""
        return self._enqueue(self._new_seq(request_id, self.tokenize(prompt), params))

    def import_payload(
        self, payload: KVPayload, params: SamplingParams, request_id: str | None = None
    ) -> str:
        """Decode role: continue a request prefilled elsewhere. Pages are allocated and filled
        when the scheduler admits it; the first token (in the payload) is not re-emitted."""
        return self._admit_payload(self._payload_seq(payload, params, request_id))

    def _payload_seq(
        self, payload: KVPayload, params: SamplingParams, request_id: str | None
    ) -> Sequence:
        if self.role == "prefill":
            raise ValueError("role: a prefill engine does not import payloads")
        check_payload(payload, self.layout)
        if payload.num_tokens + 1 > self.max_len:
            raise ValueError(
                f"payload has {payload.num_tokens} prompt tokens; this engine holds "
                f"at most {self.max_len - 1} plus the first token"
            )
        seq = self._new_seq(request_id, payload.prompt_token_ids, params)
        seq.payload = payload
        if (
            payload.rng_state is not None
            and seq.generator is not None
            and payload.rng_device == seq.generator.device.type
        ):
            seq.generator.set_state(payload.rng_state)
        self._append_token(seq, payload.first_token, None)
        seq.num_streamed = 1
        seq.detok.delta(final=False)  # the prefill side already streamed the first token's text
        return seq

    def _admit_payload(self, seq: Sequence) -> str:
        if seq.finish_reason is None:
            return self._enqueue(seq)
        # The first token already ends the request (the prefill side said so): no forward.
        seq.payload = None
        seq.status = SequenceStatus.FINISHED
        self._done.append(self._step_output(seq))
        return seq.request_id

    def _new_seq(self, request_id: str | None, ids: list[int], params: SamplingParams) -> Sequence:
        self.validate(ids, params, request_id)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.seqs:
            raise ValueError(f"request_id {rid!r} is already in use")
        gen = None
        if not params.greedy:
            gen = torch.Generator(self.model.device)
            # Unseeded requests draw a fresh seed without touching torch's global RNG.
            gen.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
        return Sequence(rid, ids, params, Detokenizer(self.tokenizer, params), gen)

    def _enqueue(self, seq: Sequence) -> str:
        self.seqs[seq.request_id] = seq
        self.scheduler.add(seq)
        return seq.request_id

    def abort(self, request_id: str) -> bool:
        """Drop a request and free its pages, whatever its phase; False if it is not here."""
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if not seq.is_finished:
            self.scheduler.remove(seq)
            seq.finish_reason = "abort"
            seq.status = SequenceStatus.FINISHED
        return True

    def cached_prefix_tokens(self, token_ids: list[int]) -> int:
        """Prompt tokens a request would find in the prefix cache now (safe from any thread)."""
        return self.block_manager.probe(token_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._done)

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            role=self.role,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_preemptions=self.scheduler.num_preemptions,
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
        outputs, self._done = self._done, []
        batch = self.last_batch = self.scheduler.schedule()
        if not batch:
            return outputs
        logits, sampling = self.runner.run(batch)
        for seq, n in zip(batch.seqs, batch.num_new, strict=True):
            first_prefill = not seq.completion_token_ids  # recomputation is not counted again
            seq.num_cached += n
            if first_prefill and seq.num_cached == seq.num_prompt_tokens:
                self.prompt_tokens_total += seq.num_prompt_tokens
        self.indexer_run_total += batch.num_tokens * self._n_full
        self.indexer_skipped_total += batch.num_tokens * self._n_shared
        if logits is None:
            return outputs
        seqs = [batch.seqs[i] for i in sampling]
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        lps: list = [None] * len(seqs)
        want = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        if want:
            got = logprobs_of(logits[want], tokens[want], [seqs[i].params.logprobs for i in want])
            for i, lp in zip(want, got, strict=True):
                lps[i] = lp
        for seq, tok, lp in zip(seqs, tokens.tolist(), lps, strict=True):
            self._append_token(seq, tok, lp)
            self.generation_tokens_total += 1
            if self.role == "prefill":
                outputs.append(self._export(seq))
                continue
            if seq.finish_reason is not None:
                self._finish(seq)
            outputs.append(self._step_output(seq))
        return outputs

    def _append_token(self, seq: Sequence, tok: int, lp) -> None:
        seq.token_ids.append(tok)
        if lp is not None:
            seq.logprobs.append(lp)
        p = seq.params
        if (tok in self.eos_token_ids and not p.ignore_eos) or tok in p.stop_token_ids:
            seq.finish_reason = "stop"  # the stop token is kept in token_ids, not in the text
        elif seq.detok.add(tok):
            seq.finish_reason = "stop"
        elif len(seq.token_ids) - seq.num_prompt_tokens >= p.max_tokens:
            seq.finish_reason = "length"
        elif seq.num_tokens >= self.max_len:
            seq.finish_reason = "length"

    def _finish(self, seq: Sequence) -> None:
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
        return StepOutput(seq.request_id, new, seq.detok.delta(final), seq.finish_reason, lps)

    def _export(self, seq: Sequence) -> StepOutput:
        """Prefill role: the prompt's KV leaves as a payload; the pages are freed right after."""
        self.scheduler.running.remove(seq)
        seq.status = SequenceStatus.EXPORTING
        payload = export_rows(
            self.cache,
            seq.pages,
            seq.num_prompt_tokens,
            seq.prompt_token_ids,
            seq.token_ids[-1],
            seq.generator,
        )
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        self.seqs.pop(seq.request_id, None)
        out = self._step_output(seq)
        out.prefill = PrefillResult(
            seq.request_id,
            seq.token_ids[-1],
            payload,
            seq.num_prompt_tokens,
            seq.finish_reason,
            out.text,
            out.logprobs,
        )
        return out

    def _import(self, seq: Sequence) -> None:
        import_rows(self.cache, seq.pages, seq.payload, start=seq.num_cached)
        seq.num_cached = seq.payload.num_tokens
        seq.payload = None  # the CPU copy is no longer needed

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
        seqs = [self._payload_seq(p, sp, None) for p, sp in zip(payloads, ps, strict=True)]
        for s in seqs:
            self._admit_payload(s)
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
        )
