"""PagedEngine: continuous batching over a paged per-user KV pool, on one engine thread.

Requests from the event loop join the scheduler through an inbox; the engine thread runs one
step at a time (schedule, run the model, sample, deliver tokens back to each request's queue
on its event loop). Users' caches live in pages of one pool allocated through the replica's
memory resource (RMM managed memory on a GPU), kept between requests and reused by prefix.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import torch

from deployments.advice_check import AdviceCheck
from deployments.capacity import EngineMemory
from deployments.config import AppArgs
from deployments.engine.cache_export import (
    CacheHeader,
    MovableUser,
    Sink,
    UserCacheExport,
    copy_piece,
)
from deployments.engine.grammar import Grammar
from deployments.engine.interface import (
    ALL_SAMPLING_FEATURES,
    CapacityError,
    Engine,
    EngineStats,
    GenerationRequest,
    KVFigures,
    RequestProgress,
    TokenLogprob,
)
from deployments.engine.loader import eos_token_ids, load_tokenizer, resolve_model_path
from deployments.engine.paged.build import (
    build_kv,
    build_runner,
    load_weights,
    torch_dtype,
    warm,
)
from deployments.engine.paged.cache_transfer import CacheTransfer
from deployments.engine.paged.placer import Placer
from deployments.engine.paged.rank_loop import RankBuild, refuse_unsupported
from deployments.engine.paged.runner import Launched
from deployments.engine.paged.sampler import draw_base
from deployments.engine.paged.scheduler import Batch, Scheduler
from deployments.engine.paged.sequence import Sequence, Status
from deployments.engine.paged.step_times import StepTimes
from deployments.engine.paged.tensor_parallel import SINGLE, TensorParallel, shard_spec
from deployments.engine.paged.warmup import compiled_variants
from deployments.engine.token_stream import Outbox, TokenStream
from deployments.layout import plan_layout
from deployments.memory import MemoryAccountant
from deployments.memory_advice import DriverAdvisor, MemoryAdvisor
from deployments.model_spec import ModelSpec

logger = logging.getLogger(__name__)

# While tier copies are in flight and nothing can run until one is done, the engine thread
# looks again this often (a device copy signals nothing to the host).
MOVE_POLL_S = 0.001


def load_spec(args: AppArgs) -> tuple[str, ModelSpec]:
    from transformers import AutoConfig

    path = resolve_model_path(args.model.model_id, args.model.revision)
    config = AutoConfig.from_pretrained(
        path, revision=args.model.revision, trust_remote_code=args.model.trust_remote_code
    )
    return path, ModelSpec.from_hf_config(config)


class PagedEngine(Engine):
    """The fast engine for Llama-family checkpoints (see model_spec.SUPPORTED_ARCHITECTURES)."""

    sampling_features = ALL_SAMPLING_FEATURES  # logits_rules.py, grammar.py

    torch_allocator = "native"  # graphs need PyTorch's pools; weights and KV go to RMM
    # Advised ranges sit alone in whole 2 MiB blocks (memory_advice.isolated_empty); False
    # only to reproduce the packed layout in diagnostics (scripts/advice_diagnosis.py).
    isolate_advised_ranges = True

    def __init__(
        self,
        args: AppArgs,
        memory: MemoryAccountant,
        advisor: MemoryAdvisor | None = None,
        tp: TensorParallel = SINGLE,
    ) -> None:
        """Plan the layout (deployments/layout.py), then allocate from it (build.py); on
        Grace, `advisor` places managed memory (default: the CUDA driver's advice). `tp`: a
        joined tensor-parallel group whose rank 0 this is; the other ranks run
        rank_loop.serve_rank."""
        self.tp = tp
        path, self.spec = load_spec(args)
        self.device, self.model_name = memory.device, args.model.name
        if self.device == "cpu" and args.engine.cpu_threads:
            torch.set_num_threads(args.engine.cpu_threads)
        self.tokenizer = load_tokenizer(path, args.model)
        self._eos_token_ids = eos_token_ids(path, self.spec.hf_config, self.tokenizer)
        self._plan_layout(args, memory, advisor)
        self._build(args, memory, path)
        warm(self.runner, self.layout, self._placer)  # every kernel compiled: none on requests
        self._start_loop(args.cache_moves.chunk_bytes)

    def _plan_layout(
        self, args: AppArgs, memory: MemoryAccountant, advisor: MemoryAdvisor | None
    ) -> None:
        """The layout, planned before a byte is allocated (the snapshot is all free), and the
        placer of managed memory (Grace only)."""
        self.layout = plan_layout(
            self.spec,
            args,
            memory.platform,
            memory.snapshot().free_unified_memory_bytes,
            device=self.device,
            managed=memory.managed or advisor is not None,
        )
        self.dtype, self.max_model_len = torch_dtype(self.layout), self.layout.max_model_len
        self.page_bytes, self.host_tier_kind = self.layout.page_bytes, self.layout.host_tier
        advisor = (advisor or DriverAdvisor()) if self.layout.advise else None  # Grace only
        self._placer = Placer.of(advisor, self.isolate_advised_ranges)

    def _build(self, args: AppArgs, memory: MemoryAccountant, path: str) -> None:
        """Weights, the KV pool and its cache, the model runner and the scheduler (build.py);
        under tensor parallelism this rank's parts, after sending the other ranks theirs."""
        placer, tp = self._placer, self.tp
        refuse_unsupported(self.layout, tp)
        tp.send(RankBuild(args, self.layout, self.spec, path, self._eos_token_ids))
        spec = shard_spec(self.spec, tp.size)  # this rank's heads and widths
        weights = load_weights(self.layout, spec, args, memory, placer, path, tp)
        self.weights_bytes = weights.nbytes
        kv = build_kv(self.layout, spec, args, memory, placer)
        self.pool, self.cache, self.mover, self._host_pool = (
            kv.pool,
            kv.cache,
            kv.mover,
            kv.host_pool,
        )
        self.runner = build_runner(
            self.layout, spec, args, memory, weights, kv.pool, self._eos_token_ids, placer, tp
        )
        self.scheduler = Scheduler(
            self.cache, args.engine.max_num_seqs, args.engine.max_batched_tokens, self.mover
        )

    @property
    def advice(self) -> AdviceCheck | None:
        """Where the driver says each advised range lives, read back by build phase (Grace)."""
        return self._placer.check if self._placer else None

    def _start_loop(self, chunk_bytes: int) -> None:
        """The step loop's state and its thread; the engine is ready once it runs.
        `chunk_bytes`: the cache moves' staging chunks (cache_transfer.py)."""
        self._keep_free = self.layout.keep_free_pages  # moved down ahead of need each step
        self._lock = threading.Lock()  # guards scheduler and cache state
        self._wake = threading.Condition(self._lock)
        self._inbox: list[Sequence] = []
        self._kicked = False  # a request arrived or was aborted since the loop last looked
        self._outbox = Outbox()  # a step's tokens, handed to the event loops once per step
        self._stopping = False
        self.steps_ahead = 0  # steps launched before the previous step's tokens were read
        self._steps = StepTimes()  # recent step timings: stats, and testing.step_log
        self._transfer = CacheTransfer(
            self._lock,
            self.cache,
            self.pool,
            self._host_pool,
            self.model_name,
            self._keep_free,
            chunk_bytes,
        )
        self._thread = threading.Thread(target=self._loop, name="paged-engine", daemon=True)
        self._thread.start()
        logger.info(
            "PagedEngine ready: %s (%s), %d KV pages of %d tokens (%.2f GiB), context %d",
            self.model_name,
            self.spec.arch,
            self.cache.usable_pages,
            self.layout.page_size,
            self.pool.nbytes / 2**30,
            self.max_model_len,
        )

    @property
    def eos_token_ids(self) -> frozenset[int]:  # type: ignore[override]
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:
        """Tests and benchmarks change them; the sampler's EOS bans follow."""
        self._eos_token_ids = frozenset(ids)
        if hasattr(self, "runner"):
            self.runner.set_eos(self._eos_token_ids)

    # ---- engine thread --------------------------------------------------------------------

    def _loop(self) -> None:
        """One step an iteration, each launched before the previous one's results land.

        While step k runs on the device, the host schedules and launches step k+1 (its decode
        rows read step k's tokens on the device), then lands step k's results
        (`_postprocess`, the one place they land): the GPU never waits for the host's
        scheduling and bookkeeping. The engine runs ahead only while nothing needs the host's
        view to be exact: no new or aborted request, and pages to spare for every running
        sequence; otherwise that iteration launches nothing and only lands step k.
        """
        last: Launched | None = None
        stalled = False  # the last schedule found nothing it could run
        while self._wait_for_work(last is not None, stalled):
            started = time.perf_counter()  # an iteration: schedule, launch, land the last
            step, failed = None, None
            with self._lock:
                ahead = last is not None and self._may_run_ahead()
            if last is None or ahead:
                step, failed = self._launch_next(feed=last)
                self.steps_ahead += ahead and step is not None
            stalled = last is None and step is None and failed is None
            if last is not None:
                self._postprocess(last)
            if failed is not None:  # every token in flight is known on the host now
                self._isolate(*failed)
            if step is not None:
                self._log_step(step.batch, time.perf_counter() - started)
            last = step

    def _log_step(self, batch: Batch, seconds: float) -> None:
        self._steps.record(len(batch), sum(batch.num_tokens), batch.decode_only, seconds)

    def _wait_for_work(self, in_flight: bool, stalled: bool) -> bool:
        """Block until there is something to do; False when the engine stops. With nothing in
        flight, wait on the inbox's condition (a request, an abort, shutdown), polling only
        while a stalled schedule waits for tier copies."""
        with self._wake:
            # A request still in the inbox is work even when its kick was taken by an
            # iteration that only landed a step (it may not launch while the inbox is full).
            while not (self._stopping or in_flight or self._kicked or self._inbox) and (
                stalled or not self.scheduler.has_work()
            ):
                timeout = MOVE_POLL_S if stalled and self.cache.moves else None
                if not self._wake.wait(timeout) and timeout is not None:
                    break  # a copy may be done: schedule again
            self._kicked = False
            return not self._stopping

    def _launch_next(
        self, feed: Launched | None
    ) -> tuple[Launched | None, tuple[Batch, Exception] | None]:
        """Take the inbox and aborts, schedule, launch and advance the next step: the step (None
        when nothing could be scheduled) or the batch that failed to launch, with its error."""
        with self._lock:
            for seq in self._inbox:
                self.scheduler.add(seq)
            self._inbox.clear()
            for seq in [*self.scheduler.running, *self.scheduler.waiting]:
                if seq.aborted:
                    self.scheduler.finish(seq)
            batch = self.scheduler.schedule()
        if not batch:
            return None, None
        try:
            launched = self.runner.launch(batch, feed=feed)
        except Exception as exc:  # a poison row, out of memory: find whom it concerns
            return None, (batch, exc)
        with self._lock:
            self.scheduler.advance(batch)
        return launched, None

    def _may_run_ahead(self) -> bool:
        """Whether the next step may be scheduled before the step in flight is delivered."""
        sched, cache = self.scheduler, self.cache
        if self._inbox or sched.waiting or any(seq.aborted for seq in sched.running):
            return False
        if any(seq.grammar is not None for seq in sched.running):
            return False  # a grammar's next mask needs the token in flight on the host
        # The next schedule must find its pages free: no preemption while a step is in flight.
        need = 0
        for seq in sched.running:
            n = 1 if seq.is_decoding else min(seq.to_compute, sched.max_batched_tokens)
            need += cache.window.need(seq, seq.num_computed + n)
        return cache.can_allocate(need)

    def _postprocess(self, step: Launched) -> None:
        """Where a launched step's results land: wait for its tokens, deliver them (one
        hand-off to the event loops per step), then keep pages free."""
        try:
            tokens = step.result()  # a host sync on this step's tokens only
        except Exception as exc:
            self._fail(step.batch, exc)
            return
        logprobs = step.logprobs()
        with self._lock:
            self._deliver(step.batch, tokens, logprobs)
            self.scheduler.keep_free(self._keep_free)
        self._outbox.flush()

    def _isolate(self, batch: Batch, exc: Exception) -> None:
        """After `batch` failed to launch: run each of its rows as a step of its own, so only
        the rows that fail alone fail. Nothing of the failed launch was advanced (its rows'
        KV writes are rewritten, identically, by their own steps), and no step is in flight,
        so each row feeds from the host. A batch of one row simply fails."""
        if len(batch) == 1:
            self._fail(batch, exc)
            return
        logger.warning(
            "a step of %d rows failed (%s: %s); running its rows one by one",
            len(batch),
            type(exc).__name__,
            exc,
        )
        for seq, n in zip(batch.seqs, batch.num_tokens, strict=True):
            if seq.status is not Status.RUNNING or seq.aborted:
                continue  # ended by the tokens just delivered, or gone
            alone = Batch()
            alone.add(seq, n)
            try:
                step = self.runner.launch(alone)
            except Exception as row_exc:
                self._fail(alone, row_exc)
                continue
            with self._lock:
                self.scheduler.advance(alone)
            self._postprocess(step)

    def _fail(self, batch: Batch, exc: Exception) -> None:
        logger.error("engine step failed", exc_info=exc)
        with self._lock:
            for seq in batch.seqs:
                if seq.status is not Status.FINISHED:
                    self.scheduler.finish(seq)
                    if seq.stream is not None:
                        self._outbox.end(seq.stream, exc)
        self._outbox.flush()

    def _deliver(
        self, batch: Batch, tokens: list[int | None], logprobs: list[TokenLogprob | None]
    ) -> None:
        """The one place a sampled token lands: in its sequence (and grammar), then in its
        stream (with its logprobs). A row whose delivery fails ends with that error; the
        others still get their tokens."""
        for seq, token, logprob in zip(batch.seqs, tokens, logprobs, strict=True):
            if token is None or seq.aborted or seq.status is Status.FINISHED:
                continue
            try:
                self._deliver_one(seq, token, logprob)
            except Exception as exc:
                logger.error("delivering a token failed", exc_info=exc)
                self.scheduler.finish(seq)
                if seq.stream is not None:
                    self._outbox.end(seq.stream, exc)

    def _deliver_one(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> None:
        """One row's token: into its sequence and grammar, then its stream; ends it if it is
        the last."""
        seq.land(token)
        if seq.grammar is not None:
            seq.grammar.accept(token)
        if seq.stream is not None:
            self._outbox.put(seq.stream, token, logprob)
        if self._ends(seq, token):
            self.scheduler.finish(seq)
            if seq.stream is not None:
                self._outbox.end(seq.stream)

    def _ends(self, seq: Sequence, token: int) -> bool:
        return (
            seq.sampling.finish_reason(token in self.eos_token_ids, seq.num_generated) is not None
        )

    # ---- event-loop side ------------------------------------------------------------------

    def _check_capacity(self, request: GenerationRequest) -> None:
        need = self.cache.window.peak_pages(
            len(request.prompt_token_ids) + request.sampling.max_tokens,
            self.scheduler.max_batched_tokens,
        )
        if need > self.cache.usable_pages:
            raise CapacityError(
                f"this request needs {need} KV pages but the replica's pool has "
                f"{self.cache.usable_pages} ({self.cache.usable_pages * self.cache.page_size} "
                "tokens); shorten the prompt or max_tokens"
            )

    async def stream_tokens(
        self, request: GenerationRequest, progress: RequestProgress
    ) -> AsyncIterator[list[int]]:
        self._check_capacity(request)
        stream = TokenStream(asyncio.get_running_loop())
        seq = Sequence(
            request_id=request.request_id,
            user_key=request.user_key,
            token_ids=list(request.prompt_token_ids),
            sampling=request.sampling,
            stream=stream,
            tenant=request.tenant,
        )
        seq.sample_seed = draw_base(request.sampling.seed)  # the generic engine's too
        if request.sampling.response_format is not None:  # a bad schema: RequestError, a 400
            seq.grammar = Grammar(
                request.sampling.response_format,
                self.tokenizer,
                self.spec.vocab_size,
                self.eos_token_ids,
            )
        progress.logprobs = stream.logprobs  # filled on this loop as tokens land
        with self._wake:
            self._inbox.append(seq)
            self._kicked = True
            self._wake.notify()
        try:
            async for batch in stream:
                progress.cached_tokens = seq.cached_tokens
                yield batch
        finally:
            if not stream.ended:
                with self._wake:
                    seq.aborted = True
                    self._kicked = True
                    self._wake.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            cache = self.cache
            used = cache.usable_pages - cache.free_pages
            return EngineStats(
                kv_cache_bytes=self._kv_cache_bytes(),
                kv_budget_bytes=self.layout.kv_capacity_bytes,
                kv_bytes_per_token=self.layout.kv_bytes_per_token,
                resident_users=cache.users(),
                running_requests=len(self.scheduler.running),
                waiting_requests=len(self.scheduler.waiting) + len(self._inbox),
                evicted_users=cache.evicted_users,
                extra={
                    **self._kv_extra(used),
                    **self._steps.recent_decode(),
                    "preempted_requests": self.scheduler.preemptions,
                    "kv_share_overrides": self.cache.share_overrides,
                    "steps_launched_ahead": self.steps_ahead,
                    "steps_by_path": dict(self.runner.steps_by_path),
                    "kernel_variants_compiled": compiled_variants(),
                },
                memory=self._memory(),
            )

    def kv_figures(self) -> KVFigures:
        """`stats`' KV bytes and held memory without the rest (decode-step medians, compiled
        kernel variants, resident users): the engine's lock held for a few reads only."""
        with self._lock:
            return KVFigures(
                self._kv_cache_bytes(),
                self.layout.kv_capacity_bytes,
                self.layout.kv_bytes_per_token,
                self._memory(),
            )

    def _kv_cache_bytes(self) -> int:
        """KV bytes users hold, in every tier (under the lock)."""
        cache = self.cache
        used = cache.usable_pages - cache.free_pages + cache.host_used_pages()
        return used * self.page_bytes

    def _kv_extra(self, used: int) -> dict[str, Any]:
        """The KV pages and tiers, for the routing report and metrics (under the lock)."""
        cache, page = self.cache, self.page_bytes
        return {
            "kv_pages_total": cache.usable_pages,
            "kv_pages_free": cache.free_pages,
            "kv_page_size": cache.page_size,
            "kv_bytes_by_tier": {
                "device": used * page,
                **({"host": cache.host_used_pages() * page} if cache.host_pages_total else {}),
            },
            "kv_host_pages_total": cache.host_pages_total,
            "kv_host_tier": self.host_tier_kind,
            "kv_host_pages_free": cache.host_free_pages,
            "offloaded_users": cache.offloaded_users,
            "restored_users": cache.restored_users,
            "kv_bytes_moved": self.mover.bytes_moved if self.mover else 0,
        }

    def _memory(self) -> EngineMemory:
        """What this engine holds (under the lock). Empty pages are free unified memory: the
        router places new users by them. A host tier in the replica's resource (Grace) is
        held there; a pinned one is a tier of its own."""
        cache, page = self.cache, self.page_bytes
        host = self._host_pool.nbytes if self._host_pool is not None else 0
        if self.layout.advise:
            return EngineMemory(
                self.weights_bytes + self.pool.nbytes + host,
                (cache.free_pages + cache.host_free_pages) * page,
            )
        return EngineMemory(
            self.weights_bytes + self.pool.nbytes,
            cache.free_pages * page,
            host,
            cache.host_used_pages() * page if host else 0,
        )

    # ---- moving users' caches between replicas (cache_transfer.py) -------------------------

    # Under tensor parallelism rank 0's pool holds only its KV heads: no user moves yet
    # (none offered, exported or begun).

    def movable_users(self) -> list[MovableUser]:
        return self._transfer.movable() if self.tp.size == 1 else []

    def export_header(self, key: str) -> CacheHeader | None:
        return self._transfer.header(key) if self.tp.size == 1 else None

    def export_user(
        self,
        key: str,
        sink: Sink = copy_piece,
        on_piece: Callable[[int, Any], None] | None = None,
    ) -> UserCacheExport | None:
        return self._transfer.export(key, sink, on_piece) if self.tp.size == 1 else None

    def begin_import(self, header: CacheHeader) -> int | None:
        return self._transfer.imports.begin(header) if self.tp.size == 1 else None

    def import_chunks(self, ticket: int, first: int, pieces: list[np.ndarray]) -> dict[str, float]:
        return self._transfer.imports.write(ticket, first, pieces)

    def finish_import(self, ticket: int) -> int | None:
        return self._transfer.imports.finish(ticket)

    def cancel_import(self, ticket: int) -> bool:
        return self._transfer.imports.cancel(ticket)

    def forget_user(self, key: str, generation: int) -> bool:
        return self._transfer.forget(key, generation)

    def check_integrity(self) -> None:
        """Raise AssertionError if pages leaked or are shared (tests call this)."""
        with self._lock:
            self.scheduler.check_integrity()

    def check_health(self) -> None:
        if not self._thread.is_alive():
            raise RuntimeError("the engine thread stopped")

    async def shutdown(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=10)
        self._transfer.ring.close()
        self.runner.close()  # the other tensor-parallel ranks' loops end
