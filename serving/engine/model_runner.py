"""Turns a scheduled batch into one model forward and returns logits for the rows that sample.

Per step the host walks the batch once, building flat lists (input ids, positions, slots, query
offsets, key counts, table rows, logits rows, block-table updates and, for prefill, the indexer's
tile plan), and step_state moves them in one pinned copy; no per-sequence device op runs. A
decode-only batch that fits a captured bucket replays its CUDA graph; anything else runs eagerly.

Only a sequence whose pending tokens all ran in this step samples; a prefill chunk that stops
short of the prompt's end produces KV only, so its logits are never computed. The exception is
opt-in: a request asking for prompt logprobs gets logits for its prompt rows too (after the
sampling rows, in the same lm_head call). Such a chunk always runs eagerly; a CUDA graph replays
only batches in which every row is its sequence's one pending token.

Tensor parallelism (model.par.size > 1): the runner of rank 0, the driver, walks the batch and
broadcasts the step's flat lists to the other ranks' runners (`serve`), which build the same
tensors and run the same forward on their shards; KV page bookkeeping stays on the driver,
whose block-table updates every rank applies. Start-up (the KV pool size, graph capture,
profiling) and KV imports are broadcast the same way, so every rank's cache is the driver's.
"""

from __future__ import annotations

import math

import torch

from kernels.dispatch import resolve_impl
from kernels.indexer.plan import PrefillTiles, plan_prefill, prefill_config
from model.context import ForwardContext
from model.dsa import DSAForCausalLM
from model.kv_cache import KVCache
from model.layers import glue
from serving.engine.config import EngineConfig
from serving.engine.cuda_graph import DecodeGraphs, pad_rows
from serving.engine.kv_copy import KVCopier
from serving.engine.memory import Profile
from serving.engine.scheduler import ScheduledBatch
from serving.engine.step_state import BlockTables, StepPacker


class ModelRunner:
    def __init__(self, model: DSAForCausalLM, config: EngineConfig):
        self.model, self.config = model, config
        self.par = model.par
        self.device = model.device
        self.packer = StepPacker(self.device)
        self.cache: KVCache | None = None
        self.tables: BlockTables | None = None
        self.graphs: DecodeGraphs | None = None
        self.page_size = model.kv_layout().page_size
        # The Triton indexer takes its prefill tiles from the runner (the reference needs none).
        triton = resolve_impl(None, self.device) == "triton"
        self._plans_tiles = bool(model.plan.full_layers) and triton
        self._tile_cfg = None
        if self._plans_tiles:
            dt = torch.float8_e4m3fn if config.index_fp8 else model.dtype
            self._tile_cfg = prefill_config(dt, interpret=self.device.type != "cuda")

    def _glue(self) -> None:
        """This engine's compile choice for the model's glue (a process-wide switch, so it is
        set before each forward: engines with different choices may share a process)."""
        glue.set_compile(self.config.torch_compile and self.device.type == "cuda")

    def _send(self, *msg) -> None:
        """Driver: the other ranks run what this message says, in step with this rank (on the
        others, the same code path sends nothing: they are the receivers)."""
        if self.par.size > 1 and self.par.driver:
            self.par.broadcast(msg)

    @torch.inference_mode()
    def serve(self) -> None:
        """Ranks other than the driver: run the driver's start-up, forwards and imports until it
        says stop. If the driver dies, the next broadcast raises (the group's timeout) and so
        does this; a dead peer likewise makes the driver's next collective raise."""
        while True:
            kind, *args = self.par.broadcast()
            if kind == "stop":
                return
            getattr(self, "_on_" + kind)(*args)

    def shutdown(self) -> None:
        """Driver: release the other ranks' serve loops and leave the group."""
        if self.par.size > 1:
            try:
                self._send("stop")
            finally:
                self.par.close()

    def _on_bind(self, num_blocks: int, max_len: int) -> None:
        self.bind(
            KVCache(self.model.kv_layout(self.config.index_fp8), num_blocks, self.device), max_len
        )

    def _on_profile(self, max_model_len: int) -> None:
        self.profile(max_model_len)

    def _on_eager(self, segs: dict, width: int, decode: bool, groups, all_rows: bool) -> None:
        self._eager_forward(segs, width, decode, groups, all_rows)

    def _on_replay(self, segs: dict, bs: int) -> None:
        self._replay_forward(segs, bs)

    def _on_import(self, pages: list[int], payload, start: int) -> None:
        # in step with the driver's own copy, so the rows are in before the next forward
        KVCopier(self.cache).import_(pages, payload, start).wait()

    def mirror_import(self, pages: list[int], payload, start: int) -> None:
        """Driver: the other ranks write the imported KV payload into the same pages (the
        driver's own copy is the KV connector's)."""
        self._send("import", pages, payload, start)

    def bind(self, cache: KVCache, max_len: int) -> None:
        """Attach the KV pool; on CUDA (unless enforce_eager) capture the decode graphs."""
        self._send("bind", cache.num_blocks, max_len)
        self._glue()
        self.cache = cache
        max_pages = math.ceil(max_len / self.page_size)
        self.tables = BlockTables(self.config.max_num_seqs, max_pages, self.device)
        if self.config.use_cuda_graphs:
            bs = min(self.config.cuda_graph_max_batch, self.config.max_num_seqs)
            self.graphs = DecodeGraphs(self.model, cache, self.tables, bs)
            self.graphs.capture()

    def release(self, request_id: str) -> None:
        if self.tables is not None:
            self.tables.release(request_id)

    # -- one step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int], list[tuple]]:
        """Forward the batch (writing its KV); -> (logits, sampling, prompt). `logits` [S + P, V]:
        first the S sampling rows, whose indices into batch.seqs are `sampling`, then P prompt
        rows; `prompt` lists (index into batch.seqs, first position, rows) in that order, the
        row at position p predicting prompt token p + 1. Logits are None when no row needs them."""
        self._glue()
        seqs, num_new = batch.seqs, batch.num_new
        rows, upd_idx, upd_pages = self.tables.rows_and_updates(seqs)
        decode = all(n == 1 for n in num_new)
        if (
            decode
            and self.graphs is not None
            and len(seqs) <= self.graphs.max_batch
            and all(s.num_cached + 1 == s.num_tokens for s in seqs)  # no 1-token prompt chunk
        ):
            return self._replay(seqs, rows, upd_idx, upd_pages), list(range(len(seqs))), []
        return self._eager(seqs, num_new, rows, upd_idx, upd_pages, decode)

    def _replay(self, seqs, rows, upd_idx, upd_pages) -> torch.Tensor:
        ps = self.page_size
        ids, pos, slots, lens = [], [], [], []
        for seq in seqs:
            c = seq.num_cached
            ids.append(seq.token_ids[c])
            pos.append(c)
            slots.append(seq.pages[c // ps] * ps + c % ps)
            lens.append(c + 1)
        g = self.graphs
        flat = pad_rows([ids, pos, slots, lens, rows], len(seqs), g.max_batch, self.tables.pad_row)
        segs = {"graph": flat, "upd_idx": upd_idx, "upd_pages": upd_pages}
        self._send("replay", segs, len(seqs))
        return self._replay_forward(segs, len(seqs))

    def _replay_forward(self, segs: dict, bs: int) -> torch.Tensor:
        v = self.packer.pack(segs)
        self.tables.apply(v["upd_idx"], v["upd_pages"])
        return self.graphs.replay(v["graph"], bs)

    def _eager(self, seqs, num_new, rows, upd_idx, upd_pages, decode: bool):
        ps = self.page_size
        ids, pos, slots, cu, lens, logit_rows, sampling = [], [], [], [0], [], [], []
        prompt, prompt_rows = [], []  # opt-in prompt logprobs: (b, first position, rows), rows
        width = 0
        for b, (seq, n) in enumerate(zip(seqs, num_new, strict=True)):
            c, end = seq.num_cached, seq.num_cached + n
            ids.extend(seq.token_ids[c:end])
            pos.extend(range(c, end))
            pages = seq.pages
            for p in range(c // ps, (end - 1) // ps + 1):  # slots page by page
                lo, hi = max(c, p * ps), min(end, (p + 1) * ps)
                base = pages[p] * ps - p * ps
                slots.extend(range(base + lo, base + hi))
            cu.append(cu[-1] + n)
            lens.append(end)
            width = max(width, len(pages))
            if end == seq.num_tokens:
                sampling.append(b)
                logit_rows.append(cu[-1] - 1)  # the sequence's last row predicts its next token
            if seq.prompt_logits_pending:
                # positions not yet recorded whose next token is a prompt token
                lo, hi = max(c, len(seq.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1)
                if lo < hi:
                    prompt.append((b, lo, hi - lo))
                    prompt_rows.extend(range(cu[-2] + lo - c, cu[-2] + hi - c))
        segs = {
            "ids": ids,
            "pos": pos,
            "slots": slots,
            "cu": cu,
            "lens": lens,
            "rows": rows,
            "logits": logit_rows + prompt_rows,
            "upd_idx": upd_idx,
            "upd_pages": upd_pages,
        }
        groups = None
        if self._plans_tiles and not decode:
            tiles, groups = plan_prefill(cu, lens, self._tile_cfg)
            segs["tiles"] = [x for t in tiles for x in t]
        all_rows = len(sampling) == len(ids) and not prompt
        self._send("eager", segs, width, decode, groups, all_rows)
        logits = self._eager_forward(segs, width, decode, groups, all_rows)
        return (logits if sampling or prompt else None), sampling, prompt

    def _eager_forward(
        self, segs: dict, width: int, decode: bool, groups, all_rows: bool
    ) -> torch.Tensor:
        v = self.packer.pack(segs)
        plan = None
        self.tables.apply(v["upd_idx"], v["upd_pages"])
        if groups is not None:
            plan = PrefillTiles(v["tiles"].view(-1, 4), tuple(groups), v["pos"] + 1, self._tile_cfg)
        ctx = ForwardContext(
            positions=v["pos"],
            cu_seqlens_q=v["cu"],
            seq_lens=v["lens"],
            block_tables=self.tables.table[:, :width].index_select(0, v["rows"]),
            slot_mapping=v["slots"],
            cache=self.cache,
            is_decode=decode,
            logits_indices=None if all_rows else v["logits"],
            indexer_plan=plan,
        )
        return self.model(v["ids"], ctx)

    # -- start-up -------------------------------------------------------------------------------
    @torch.inference_mode()
    def profile(self, max_model_len: int) -> Profile:
        """Peak memory of the largest eager step (one full chunk) and of the largest graph batch,
        each above the steady state, measured on a scratch cache before the KV pool exists."""
        self._send("profile", max_model_len)
        self._glue()
        dev = self.device
        chunk = min(self.config.chunk, max_model_len)
        layout = self.model.kv_layout(self.config.index_fp8)
        pages = math.ceil(chunk / self.page_size)
        scratch = KVCache(layout, pages + 1, dev)
        saved = self.cache, self.tables
        self.cache = scratch
        self.tables = BlockTables(self.config.max_num_seqs, math.ceil(max_model_len / 64), dev)
        try:
            torch.cuda.synchronize(dev)
            base = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            self._run_dummy([chunk])
            torch.cuda.synchronize(dev)
            act = torch.cuda.max_memory_allocated(dev) - base
            # Sampling works on fp32 copies of the logits of up to max_num_seqs rows.
            act += 4 * self.config.max_num_seqs * self.model.config.vocab_size * 4
            graph = 0
            if self.config.use_cuda_graphs:
                bs = min(self.config.cuda_graph_max_batch, self.config.max_num_seqs)
                torch.cuda.reset_peak_memory_stats(dev)
                self._run_dummy([1] * bs, full_width=True)
                torch.cuda.synchronize(dev)
                graph = torch.cuda.max_memory_allocated(dev) - base
        finally:
            self.cache, self.tables = saved
            del scratch
            torch.cuda.empty_cache()
        return Profile(activation_bytes=int(act), graph_bytes=int(graph))

    def _run_dummy(self, lens: list[int], full_width: bool = False) -> None:
        """A forward of fresh sequences of these lengths on page 0.. of the scratch cache."""
        dev = self.device
        t = sum(lens)
        ids = torch.zeros(t, dtype=torch.long, device=dev)
        width = self.tables.max_pages if full_width else math.ceil(max(lens) / self.page_size)
        tables = torch.zeros(len(lens), width, dtype=torch.int32, device=dev)
        if not full_width:
            tables[0] = torch.arange(width, dtype=torch.int32, device=dev)
        ctx = ForwardContext.for_batch(lens, [0] * len(lens), tables, self.cache)
        if full_width:
            ctx.slot_mapping.fill_(-1)  # profiling must not depend on what it would overwrite
        ctx.logits_indices = torch.cumsum(torch.tensor(lens, device=dev), 0) - 1
        self.model(ids, ctx)
