"""PagedEngine: continuous batching over a paged per-user KV pool, on one engine thread.

Requests from the event loop join the scheduler through an inbox; the engine thread runs one
step at a time (schedule, run the model, sample, deliver tokens back to each request's queue
on its event loop). Users' caches live in pages of one pool allocated through the replica's
memory resource (RMM managed memory on a GPU), kept between requests and reused by prefix.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import statistics
import threading
import time
from collections.abc import AsyncIterator

import torch

from deployments.config import AppArgs
from deployments.engine.grammar import Grammar
from deployments.engine.interface import (
    ALL_SAMPLING_FEATURES,
    CapacityError,
    Engine,
    EngineStats,
    GenerationRequest,
    RequestProgress,
    TokenLogprob,
)
from deployments.engine.kv_shares import KVShares
from deployments.engine.loader import load_tokenizer, resolve_model_path, torch_dtype
from deployments.engine.paged.cache_manager import CacheManager
from deployments.engine.paged.cuda_graphs import DecodeGraphs
from deployments.engine.paged.host_pool import HostKVPool
from deployments.engine.paged.kv_pool import KVPool
from deployments.engine.paged.model import DecoderModel
from deployments.engine.paged.runner import Launched, ModelRunner
from deployments.engine.paged.scheduler import Batch, Scheduler
from deployments.engine.paged.sequence import Sequence, Status
from deployments.engine.paged.spec import ModelSpec
from deployments.engine.paged.tier_mover import CopyMover
from deployments.engine.paged.warmup import compiled_variants, warm_up
from deployments.engine.paged.weight_stream import WeightStreamer
from deployments.engine.paged.weights import (
    ModelWeights,
    allocate,
    init_random,
    layer_numel,
    load_checkpoint,
)
from deployments.engine.token_stream import Outbox, TokenStream
from deployments.memory import HostAccountant, MemoryAccountant
from deployments.memory_advice import DriverAdvisor, MemoryAdvisor

logger = logging.getLogger(__name__)

# While tier copies are in flight and nothing can run until one is done, the engine thread
# looks again this often (a device copy signals nothing to the host).
MOVE_POLL_S = 0.001


def load_spec(args: AppArgs) -> tuple[str, ModelSpec]:
    from transformers import AutoConfig

    path = resolve_model_path(args.model.model_id, args.model.revision)
    config = AutoConfig.from_pretrained(path, revision=args.model.revision,
                                        trust_remote_code=args.model.trust_remote_code)
    return path, ModelSpec.from_hf_config(config)


class PagedEngine(Engine):
    """The fast engine for Llama-family checkpoints (see spec.SUPPORTED_ARCHITECTURES)."""

    sampling_features = ALL_SAMPLING_FEATURES  # logits_rules.py, grammar.py

    torch_allocator = "native"  # graphs need PyTorch's pools; weights and KV go to RMM

    def __init__(self, args: AppArgs, memory: MemoryAccountant,
                 advisor: MemoryAdvisor | None = None) -> None:
        """`advisor` places managed memory on a coherent node (default: the CUDA driver's
        advice when the platform is Grace and memory is managed)."""
        cfg = args.engine
        path, self.spec = load_spec(args)
        self.device = memory.device
        if self.device == "cpu" and cfg.cpu_threads:
            torch.set_num_threads(cfg.cpu_threads)
        self.dtype = torch_dtype(args.model.dtype, self.device)
        self.tokenizer = load_tokenizer(path, args.model)
        self.model_name = args.model.name
        self.max_model_len = min(args.model.max_model_len or self.spec.max_position,
                                 self.spec.max_position)
        self._eos_token_ids = self._eos_ids(path)
        # On a coherent Grace node every tier is managed memory placed by advice: layers beyond
        # the device budget stay in LPDDR and are read in place over NVLink-C2C (no buffers
        # to stream through); elsewhere they live in pinned host memory and stream in.
        grace = memory.platform is not None and memory.platform.kind == "grace"
        if grace and advisor is None and memory.managed:
            advisor = DriverAdvisor()
        self._advisor = advisor if grace else None
        self._pool_bytes = 0
        self._untrack = []  # memory figures this engine reports; dropped at shutdown
        weights, streamed = self._load_weights(args, memory, path)
        self._build_kv(args, memory)
        self.runner = self._build_runner(args, memory, weights, streamed)
        warm_up(self.runner.model, cfg.page_size, self.runner.eos_ids)  # no compiles later
        self._start_loop()
        logger.info("PagedEngine ready: %s (%s), %d KV pages of %d tokens (%.2f GiB), "
                    "context %d", self.model_name, self.spec.arch, self.cache.usable_pages,
                    cfg.page_size, self.pool.nbytes / 2**30, self.max_model_len)

    def _load_weights(self, args: AppArgs, memory: MemoryAccountant, path: str
                      ) -> tuple[ModelWeights, list[int]]:
        """The weights, allocated and filled, placed by advice on Grace; and the layers that
        stream from pinned host memory (none on Grace: cold layers are read in place)."""
        start = time.perf_counter()
        streamed = self._streamed_layers(args, in_place=self._advisor is not None)
        cold = frozenset(streamed) if self._advisor else frozenset()
        if self._advisor:
            streamed = []
        with memory.allocation_scope():
            weights = allocate(self.spec, self.dtype, self.device, frozenset(streamed))
            if self._advisor:  # before the first touch, so pages start where they belong
                for index, block in enumerate(weights.blocks):
                    self._advisor.prefer(block, "host" if index in cold else "device")
            if args.engine.random_weights:
                init_random(weights, seed=0)
            else:
                load_checkpoint(weights, self.spec, path)
        if self._advisor:
            for index, block in enumerate(weights.blocks):
                self._advisor.prefetch(block, "host" if index in cold else "device")
            if cold:
                logger.info("keeping %d of %d layers (%.2f GB) in host memory, read in place "
                            "over the coherent link", len(cold), self.spec.num_layers,
                            sum(weights.blocks[i].nbytes for i in cold) / 1e9)
        self.weights_bytes = weights.nbytes
        logger.info("weights: %.2f GB in %.1f s", weights.nbytes / 1e9, time.perf_counter() - start)
        if isinstance(memory, HostAccountant):  # on a GPU, RMM counts these bytes itself
            self._untrack.append(memory.track_usage(lambda: self.weights_bytes + self._pool_bytes))
        return weights, streamed

    def _build_kv(self, args: AppArgs, memory: MemoryAccountant) -> None:
        """The KV page pool from the budget, its cache manager, the host tier (managed and
        advised on Grace, pinned elsewhere) with its mover, and the scheduler over them."""
        cfg = args.engine
        page_bytes = KVPool.page_bytes(self.spec, cfg.page_size, self.dtype)
        self.page_bytes = page_bytes
        budget = args.kv_cache.budget_bytes
        free = max(0, memory.snapshot().free_unified_memory_bytes)
        budget = int(budget if budget is not None else args.kv_cache.budget_fraction * free)
        num_pages = max(2, budget // page_bytes) + 1  # +1: the scratch page
        with memory.allocation_scope():
            self.pool = KVPool(self.spec, num_pages, cfg.page_size, self.dtype, self.device)
        if self._advisor:
            self._advisor.prefer(self.pool.buffer, "device")
        host_pages = int(args.kv_cache.host_tier_bytes) // page_bytes
        self.host_tier_kind: str | None = None
        self.cache = CacheManager(num_pages, cfg.page_size, reserved=1, host_pages=host_pages,
                                  shares=KVShares(args.kv_cache.key_share))
        # Empty pages are free unified memory: the router places new users by them.
        self._untrack.append(memory.track_spare(lambda: self.cache.free_pages * self.page_bytes))
        host_pool = self._host_tier(memory, host_pages) if host_pages else None
        self.mover = CopyMover(self.pool, host_pool) if host_pool is not None else None
        self._pool_bytes = self.pool.nbytes + (
            host_pool.nbytes if host_pool is not None and self._advisor else 0)
        self.scheduler = Scheduler(self.cache, cfg.max_num_seqs, cfg.max_batched_tokens,
                                   self.mover)
        # Keep a step's worth of device pages free by moving idle users down ahead of need.
        self._keep_free = min(self.cache.usable_pages // 4, self.cache.pages_for(
            cfg.max_batched_tokens) + cfg.max_num_seqs // 4)

    def _host_tier(self, memory: MemoryAccountant, host_pages: int) -> HostKVPool:
        """The host KV tier: on Grace, managed memory of the replica's own resource (already
        in its capacity) advised to LPDDR, whose empty pages are free unified memory;
        elsewhere pinned host memory, a tier of its own."""
        if self._advisor:
            with memory.allocation_scope():
                host_pool = HostKVPool(self.pool, host_pages, managed=True)
            self._advisor.prefer(host_pool.buffer, "host")
            self.host_tier_kind = "managed memory advised to the host"
            self._untrack.append(memory.track_spare(
                lambda: self.cache.host_free_pages * self.page_bytes))
            return host_pool
        host_pool = HostKVPool(self.pool, host_pages)
        self.host_tier_kind = "pinned host memory"
        self._untrack.append(memory.track_tier(
            host_pool.nbytes, lambda: self.cache.host_used_pages() * self.page_bytes))
        return host_pool

    def _build_runner(self, args: AppArgs, memory: MemoryAccountant, weights: ModelWeights,
                      streamed: list[int]) -> ModelRunner:
        """The model over the weights and KV pool (with its weight streamer when layers
        stream), its decode CUDA graphs where they can run, and the runner around both."""
        cfg = args.engine
        use_gpu = self.device.startswith("cuda")
        streamer = None
        if streamed:
            with memory.allocation_scope():
                streamer = WeightStreamer(weights, self.spec, streamed)
            logger.info("streaming %d of %d layers (%.2f GB a pass) from pinned host memory; "
                        "decode steps run without CUDA graphs", len(streamed),
                        self.spec.num_layers, streamer.bytes_per_pass / 1e9)
        model = DecoderModel(self.spec, weights, self.pool, self.max_model_len, use_triton=use_gpu,
                             triton_prefill=use_gpu and cfg.prefill_attention == "triton",
                             streamer=streamer)
        graphs = None
        if use_gpu and cfg.cuda_graphs and not streamed:
            graphs = DecodeGraphs(model, cfg.max_num_seqs,
                                  self.cache.pages_for(self.max_model_len))
        else:
            logger.info("decode CUDA graphs off: %s", "no GPU" if not use_gpu else
                        "engine.cuda_graphs is false" if not cfg.cuda_graphs else
                        "weights stream from host memory")
        return ModelRunner(model, cfg.page_size, graphs, self._eos_token_ids)

    def _start_loop(self) -> None:
        """The step loop's state and its thread."""
        self._lock = threading.Lock()  # guards scheduler and cache state
        self._wake = threading.Condition(self._lock)
        self._inbox: list[Sequence] = []
        self._kicked = False  # a request arrived or was aborted since the loop last looked
        self._outbox = Outbox()  # a step's tokens, handed to the event loops once per step
        self._stopping = False
        self.steps_ahead = 0  # steps launched before the previous step's tokens were read
        # (sequences, tokens, decode_only, seconds) of recent steps: benchmarks and metrics.
        self.step_log: collections.deque[tuple[int, int, bool, float]] = collections.deque(
            maxlen=100_000)
        self._decode_steps: collections.deque[tuple[int, float]] = collections.deque(maxlen=256)
        self._thread = threading.Thread(target=self._loop, name="paged-engine", daemon=True)
        self._thread.start()

    @property
    def eos_token_ids(self) -> frozenset[int]:  # type: ignore[override]
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:
        """Tests and benchmarks change them; the sampler's EOS bans follow."""
        self._eos_token_ids = frozenset(ids)
        if hasattr(self, "runner"):
            self.runner.set_eos(self._eos_token_ids)

    def _streamed_layers(self, args: AppArgs, in_place: bool = False) -> list[int]:
        """Layers beyond `model.device_weight_budget_bytes` (the last ones): streamed in
        through 3 device buffers, or with `in_place` read where they are (no buffers)."""
        budget = args.model.device_weight_budget_bytes
        if budget is None:
            return []
        size = torch.empty((), dtype=self.dtype).element_size()
        spec = self.spec
        layer = layer_numel(spec) * size
        fixed = (spec.vocab_size * spec.hidden_size * (1 if spec.tie_word_embeddings else 2)
                 + spec.hidden_size) * size
        slots = 0 if in_place else min(3, spec.num_layers)
        resident = max(0, (int(budget) - fixed - slots * layer) // layer)
        if resident >= spec.num_layers:
            return []
        if int(budget) < fixed + slots * layer:
            raise ValueError(
                f"model.device_weight_budget_bytes {int(budget) / 1e9:.2f} GB is less than the "
                f"embeddings and {slots} layer buffers need ({(fixed + slots * layer) / 1e9:.2f} "
                "GB)")
        return list(range(resident, spec.num_layers))

    def _eos_ids(self, path: str) -> frozenset[int]:
        from transformers import GenerationConfig

        ids: set[int] = set()
        try:
            eos = GenerationConfig.from_pretrained(path).eos_token_id
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        except OSError:
            pass
        eos = self.spec.hf_config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

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
        self.step_log.append((len(batch), sum(batch.num_tokens), batch.decode_only, seconds))
        if batch.decode_only:
            self._decode_steps.append((len(batch), seconds))

    def _wait_for_work(self, in_flight: bool, stalled: bool) -> bool:
        """Block until there is something to do; False when the engine stops. With nothing in
        flight, wait on the inbox's condition (a request, an abort, shutdown), polling only
        while a stalled schedule waits for tier copies."""
        with self._wake:
            while not (self._stopping or in_flight or self._kicked) and (
                    stalled or not self.scheduler.has_work()):
                timeout = MOVE_POLL_S if stalled and self.cache.moves else None
                if not self._wake.wait(timeout) and timeout is not None:
                    break  # a copy may be done: schedule again
            self._kicked = False
            return not self._stopping

    def _launch_next(self, feed: Launched | None
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
            need += max(0, cache.pages_for(seq.num_computed + n) - len(seq.pages))
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
        logger.warning("a step of %d rows failed (%s: %s); running its rows one by one",
                       len(batch), type(exc).__name__, exc)
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

    def _deliver(self, batch: Batch, tokens: list[int | None],
                 logprobs: list[TokenLogprob | None]) -> None:
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
        return seq.sampling.finish_reason(token in self.eos_token_ids,
                                          seq.num_generated) is not None

    # ---- event-loop side ------------------------------------------------------------------

    def _check_capacity(self, request: GenerationRequest) -> None:
        need = self.cache.pages_for(len(request.prompt_token_ids) + request.sampling.max_tokens)
        if need > self.cache.usable_pages:
            raise CapacityError(
                f"this request needs {need} KV pages but the replica's pool has "
                f"{self.cache.usable_pages} ({self.cache.usable_pages * self.cache.page_size} "
                "tokens); shorten the prompt or max_tokens")

    async def stream_tokens(
        self, request: GenerationRequest, progress: RequestProgress
    ) -> AsyncIterator[list[int]]:
        self._check_capacity(request)
        stream = TokenStream(asyncio.get_running_loop())
        seq = Sequence(
            request_id=request.request_id, user_key=request.user_key,
            token_ids=list(request.prompt_token_ids), sampling=request.sampling, stream=stream,
            tenant=request.tenant,
        )
        if request.sampling.seed is not None:
            seq.sample_seed = request.sampling.seed % (1 << 63)
        if request.sampling.response_format is not None:  # a bad schema: RequestError, a 400
            seq.grammar = Grammar(request.sampling.response_format, self.tokenizer,
                                  self.spec.vocab_size, self.eos_token_ids)
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
            used = self.cache.usable_pages - self.cache.free_pages
            host_used = self.cache.host_used_pages()
            return EngineStats(
                kv_cache_bytes=(used + host_used) * self.page_bytes,
                kv_budget_bytes=(self.cache.usable_pages + self.cache.host_pages_total)
                * self.page_bytes,
                kv_bytes_per_token=self.page_bytes // self.cache.page_size,
                resident_users=self.cache.users(),
                running_requests=len(self.scheduler.running),
                waiting_requests=len(self.scheduler.waiting) + len(self._inbox),
                evicted_users=self.cache.evicted_users,
                extra={"kv_pages_total": self.cache.usable_pages,
                       "kv_pages_free": self.cache.free_pages,
                       "kv_page_size": self.cache.page_size,
                       "preempted_requests": self.scheduler.preemptions,
                       "kv_share_overrides": self.cache.share_overrides,
                       "steps_launched_ahead": self.steps_ahead,
                       "kv_bytes_by_tier": {"device": used * self.page_bytes,
                                            **({"host": host_used * self.page_bytes}
                                               if self.cache.host_pages_total else {})},
                       "kv_host_pages_total": self.cache.host_pages_total,
                       "kv_host_tier": self.host_tier_kind,
                       "kv_host_pages_free": self.cache.host_free_pages,
                       "offloaded_users": self.cache.offloaded_users,
                       "restored_users": self.cache.restored_users,
                       "kv_bytes_moved": self.mover.bytes_moved if self.mover else 0,
                       "kernel_variants_compiled": compiled_variants(),
                       **self._recent_decode_steps()},
            )

    def _recent_decode_steps(self) -> dict[str, float | None]:
        """Median time and batch of the last decode-only engine iterations."""
        recent = list(self._decode_steps)  # one C-level copy: safe beside the engine thread
        if not recent:
            return {"decode_step_ms_p50": None, "decode_batch_p50": None}
        return {"decode_step_ms_p50": statistics.median(s for _, s in recent) * 1e3,
                "decode_batch_p50": statistics.median(n for n, _ in recent)}

    def logits_for(self, plan: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
        """Run one hand-built step and return each sequence's logits for its new tokens.

        Each (sequence, n) feeds its next n tokens; pages are allocated as needed. For tests
        and benchmarks comparing logits with a reference; call only while no request runs.
        """
        batch = Batch()
        for seq, n in plan:
            seq.pages += self.cache.allocate(
                self.cache.pages_for(seq.num_computed + n) - len(seq.pages))
            batch.add(seq, n)
        tokens, meta, *_ = self.runner._prepare(batch)
        every = torch.arange(tokens.shape[0], device=tokens.device)
        logits = self.runner.model.forward(tokens, meta, every)
        out, start = [], 0
        for seq, n in plan:
            out.append(logits[start:start + n])
            start += n
            seq.num_computed += n
        return out

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
        for untrack in self._untrack:
            untrack()
