"""The generic engine: any Hugging Face causal LM, one KV cache per user, kept between requests.

Each request runs prefill and then one decode step at a time on a single model thread, so many
users' requests interleave step by step without blocking the event loop. A user's cache is a
transformers `DynamicCache`; a new request crops it to the longest prefix it shares with the
new prompt and prefills only the rest. It serves every architecture the paged engine does not
run, by the paged engine's policies, imported and never restated: EOS ids (loader), draw keys,
EOS bans, logit rules and the draw (paged sampler, runner.sampling_plan, logits_rules), prefix
reuse (kv_reuse), eviction (kv_shares), the KV budget (layout.kv_budget_bytes);
tests/cpu/test_engine_parity.py holds the two to the same answers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import torch

from deployments.capacity import EngineMemory, memory_snapshot
from deployments.config import AppArgs
from deployments.engine.cache_export import (
    CacheHeader,
    MovableUser,
    Sink,
    UserCacheExport,
    as_bytes,
    copy_piece,
    from_bytes,
)
from deployments.engine.grammar import Grammar
from deployments.engine.held_imports import HeldImports
from deployments.engine.interface import (
    ALL_SAMPLING_FEATURES,
    Engine,
    EngineStats,
    GenerationRequest,
    RequestProgress,
    SamplingParams,
    TokenLogprob,
)
from deployments.engine.kv_shares import KVShares
from deployments.engine.loader import (
    eos_token_ids,
    kv_bytes_per_token,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from deployments.engine.paged.logits_rules import (
    DeviceRules,
    TokenCounts,
    build_rules,
    draw,
    host_entries,
    needs_rules,
    raw_logprobs,
)
from deployments.engine.paged.runner import sampling_plan
from deployments.engine.paged.sampler import DevicePlan, draw_base
from deployments.engine.paged.sequence import Sequence
from deployments.engine.user_cache import UserCacheStore, UserEntry
from deployments.layout import kv_budget_bytes
from deployments.memory import MemoryAccountant, is_out_of_memory

logger = logging.getLogger(__name__)


class HFEngine(Engine):
    """transformers forward passes, per-user DynamicCache, step-interleaved concurrency."""

    sampling_features = ALL_SAMPLING_FEATURES  # logits_rules.py, grammar.py

    def __init__(self, args: AppArgs, memory: MemoryAccountant) -> None:
        self.device = memory.device
        if self.device == "cpu" and args.engine.cpu_threads:
            torch.set_num_threads(args.engine.cpu_threads)
        path = resolve_model_path(args.model.model_id, args.model.revision)
        self.tokenizer = load_tokenizer(path, args.model)
        self.model = load_model(path, args.model, self.device)
        self.model_name = args.model.name
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        wanted = args.model.max_model_len or limit or 4096
        self.max_model_len = min(wanted, limit) if limit else wanted
        self.eos_token_ids = eos_token_ids(path, self.model.config, self.tokenizer)
        self.vocab = self.model.config.get_text_config().vocab_size
        self.counts: TokenCounts | None = None  # made when a request first needs penalties
        element = next(self.model.parameters()).element_size()
        self.weights_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        self.store = UserCacheStore(
            0,
            kv_bytes_per_token(self.model.config, element),
            shares=KVShares(args.kv_cache.key_share),
        )
        self._imports = HeldImports()  # users' caches arriving in pieces (cache moves)
        # The model is loaded: free memory now is what the KV budget's share is taken of.
        free = memory_snapshot(memory.reading(), self._memory()).free_unified_memory_bytes
        self.store.budget_bytes = kv_budget_bytes(
            args.kv_cache.budget_bytes, args.kv_cache.budget_fraction, free
        )
        params = inspect.signature(self.model.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="hf-model")
        self._slots = asyncio.Semaphore(args.engine.max_concurrent_requests)
        self._waiting = 0
        logger.info(
            "HFEngine ready: %s, context %d, KV %d B/token, KV budget %.1f MiB",
            self.model_name,
            self.max_model_len,
            self.store.bytes_per_token,
            self.store.budget_bytes / 2**20,
        )

    @property
    def eos_token_ids(self) -> frozenset[int]:  # type: ignore[override]
        return self._eos_token_ids

    @eos_token_ids.setter
    def eos_token_ids(self, ids: frozenset[int]) -> None:
        """Tests and benchmarks change them; the sampler's EOS bans follow (as the paged
        engine's do)."""
        self._eos_token_ids = frozenset(ids)
        self._eos = torch.tensor(sorted(self._eos_token_ids), dtype=torch.int32, device=self.device)

    # ---- model thread ---------------------------------------------------------------------

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older signatures
            return DynamicCache()

    def _step(
        self,
        feed: list[int],
        cache: Any,
        plan: DevicePlan,
        rules: DeviceRules | None,
        logprobs: int | None,
    ) -> tuple[int, TokenLogprob | None]:
        """Feed tokens through the model (appending to `cache`); sample the next token by the
        paged engine's rules (logits_rules.draw), with its raw logprobs when asked."""
        with torch.inference_mode():
            ids = torch.tensor([feed], device=self.device)
            out = self.model(
                input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache}
            )
            logits = out.logits[0, -1:].float()
            token = draw(logits, plan, rules, self.counts, self._eos)
            entry = None
            if logprobs is not None:
                lp = raw_logprobs(logits, token, logprobs)
                entry = host_entries(*(t.tolist() for t in lp), [logprobs])[0]
            return int(token[0]), entry

    def _rules(
        self, params: SamplingParams, slot: int, prompt: list[int] | None, grammar: Grammar | None
    ) -> DeviceRules | None:
        """The one-row logit rules of a draw; `prompt` on the request's first draw."""
        if not needs_rules(params):
            return None
        fresh = [(slot, prompt)] if slot and prompt is not None else []
        masks = [(0, grammar.mask_words())] if grammar is not None else []
        return build_rules([params], [slot], fresh, self.vocab, masks).to_device(
            torch.device(self.device)
        )

    def _plan(self, params: SamplingParams, base: int, generated: int) -> DevicePlan:
        """The one-row plan of the draw after `generated` tokens: the paged engine's own
        (runner.sampling_plan: keyed by `base` and the draw's index, EOS banned before
        min_tokens), for a sequence that has drawn that many."""
        row = Sequence("", None, [], params, sample_seed=base, num_generated=generated)
        return sampling_plan([row]).to_device(self.device)

    def _run_step(self, *args: Any) -> concurrent.futures.Future[tuple[int, Any]]:
        return self._executor.submit(self._step, *args)

    # ---- request flow ---------------------------------------------------------------------

    def _reuse(self, entry: UserEntry, prompt: list[int]) -> tuple[Any, int]:
        """The cache to extend and how many prompt tokens it already covers."""
        reuse = self.store.reusable(entry, prompt)  # the paged engine's rule (kv_reuse)
        if reuse <= 0:
            return self._new_cache(), 0
        if reuse < entry.kv_tokens:
            try:
                entry.kv.crop(reuse - entry.kv_tokens)  # negative: drop that many tokens
            except (RuntimeError, ValueError) as exc:  # e.g. sliding window past its size
                logger.debug("cannot crop cache (%s); recomputing", exc)
                return self._new_cache(), 0
        return entry.kv, reuse

    async def stream_tokens(
        self, request: GenerationRequest, progress: RequestProgress
    ) -> AsyncIterator[list[int]]:
        prompt = list(request.prompt_token_ids)
        params = request.sampling
        self._waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self._waiting -= 1
        grammar = None
        if params.response_format is not None:
            try:  # a bad schema: RequestError, a 400
                grammar = Grammar(
                    params.response_format, self.tokenizer, self.vocab, self.eos_token_ids
                )
            except BaseException:
                self._slots.release()
                raise
        slot = 0
        if params.penalized:
            if self.counts is None:
                self.counts = TokenCounts(self.vocab, torch.device(self.device))
            slot = self.counts.assign()
        entry = self.store.acquire(request.user_key, request.tenant)
        seen: list[int] = []
        fed = 0  # tokens of `seen` whose KV is in the cache
        pending: concurrent.futures.Future[int] | None = None
        cache: Any = None
        try:
            cache, fed = self._reuse(entry, prompt)
            progress.cached_tokens = fed
            seen = list(prompt)
            self.store.record(entry, seen, cache, fed)
            self.store.reserve(len(prompt) - fed + params.max_tokens, request.tenant)
            base = draw_base(params.seed)  # the paged engine's draw keys
            feed = prompt[fed:]
            for produced in range(1, params.max_tokens + 1):
                rules = self._rules(params, slot, prompt if produced == 1 else None, grammar)
                pending = self._run_step(
                    feed, cache, self._plan(params, base, produced - 1), rules, params.logprobs
                )
                token, logprob = await self._await_step(pending, entry)
                pending = None
                fed = len(seen)
                seen.append(token)
                self.store.record(entry, seen, cache, fed)
                if grammar is not None:
                    grammar.accept(token)
                if logprob is not None:
                    progress.logprobs.append(logprob)
                yield [token]  # one step, one token: this engine runs one request a step
                if params.finish_reason(token in self.eos_token_ids, produced):
                    return
                feed = [token]
        finally:
            if slot:
                self.counts.release(slot)  # type: ignore[union-attr]  (steps run in order)
            self._finish(entry, seen, cache, fed, pending)

    async def _await_step(
        self, step: concurrent.futures.Future[tuple[int, Any]], entry: UserEntry
    ) -> tuple[int, Any]:
        try:
            return await asyncio.wrap_future(step)
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # Out of memory mid-request: drop idle users' caches and tell the client.
            dropped = self.store.evict_to(0, ignore_shares=True)
            logger.warning("out of memory; dropped %d idle users' caches", len(dropped))
            raise MemoryError("the replica ran out of memory for this request") from exc

    def _finish(
        self,
        entry: UserEntry,
        seen: list[int],
        cache: Any,
        fed: int,
        pending: concurrent.futures.Future[int] | None,
    ) -> None:
        """Release the entry once no step is running on its cache (event-loop thread)."""
        loop = asyncio.get_running_loop()

        def settle(step: concurrent.futures.Future[int] | None) -> None:
            kv_tokens = fed
            if step is not None and not step.cancelled():  # a cancelled step never ran
                # A cancelled request's last step still ran: its tokens are in the cache,
                # unless it failed, in which case the cache's state is unknown.
                kv_tokens = len(seen) if step.exception() is None else 0
            if kv_tokens == 0:
                self.store.record(entry, seen, None, 0)
            else:
                self.store.record(entry, seen, cache, kv_tokens)
            self.store.release(entry)
            self._slots.release()

        if pending is None or pending.done():
            settle(pending)
        else:
            pending.add_done_callback(lambda step: loop.call_soon_threadsafe(settle, step))

    # ---- moving users' caches between replicas (cache_export.py) ----------------------------

    @property
    def cache_layout(self) -> str:
        """What an export must match here: model, dtype and each layer's KV shape."""
        text = self.model.config.get_text_config()
        heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        dtype = next(self.model.parameters()).dtype
        return f"hf:{self.model_name}:{dtype}:{text.num_hidden_layers}x{heads}x{head_dim}"

    def _kv_shape(self, kv_len: int) -> tuple[int, ...]:
        """An export's one buffer: [layers, 2, heads, kv_len, head_dim]."""
        layers, heads, head_dim = (int(x) for x in self.cache_layout.rsplit(":", 1)[1].split("x"))
        return (layers, 2, heads, kv_len, head_dim)

    def movable_users(self) -> list[MovableUser]:
        return [MovableUser(e.key, self.store.entry_bytes(e)) for e in self.store.idle() if e.key]

    def export_header(self, key: str) -> CacheHeader | None:
        entry = next((e for e in self.store.idle() if e.key == key), None)
        if entry is None or entry.kv is None:
            return None
        with self.store.lock:
            generation, kv_tokens, tokens = entry.generation, entry.kv_tokens, list(entry.token_ids)
        size = next(self.model.parameters()).element_size()
        nbytes = int(np.prod(self._kv_shape(kv_tokens))) * size
        header = CacheHeader(key, entry.tenant, tokens, kv_tokens, self.cache_layout, generation)
        header.nbytes = header.chunk_bytes = nbytes  # one piece
        return header

    def export_user(
        self,
        key: str,
        sink: Sink = copy_piece,
        on_piece: Callable[[int, Any], None] | None = None,
    ) -> UserCacheExport | None:
        """All layers' keys and values as one buffer [layers, 2, heads, tokens, head_dim].
        A request that takes the user meanwhile makes the copy stale: None then."""
        entry = next((e for e in self.store.idle() if e.key == key), None)
        header = self.export_header(key)
        if entry is None or header is None:
            return None
        start = time.perf_counter()
        with self.store.lock:
            layers = cache_layers(entry.kv)
        if any(k is None or k.shape[0] != 1 or k.shape[-2] != header.kv_len for k, _ in layers):
            return None  # an empty, batched or windowed layer: not this exporter's shape
        stacked = torch.stack([torch.stack([k[0], v[0]]) for k, v in layers]).cpu()
        if entry.generation != header.generation or entry.running:
            return None
        copied = UserCacheExport(**vars(header))
        data = as_bytes(stacked)
        piece = sink(data)
        copied.hold([piece], [data.nbytes])
        if on_piece is not None:
            on_piece(0, piece)
        copied.copy_s = time.perf_counter() - start
        return copied

    # Imports in pieces, in their simplest form: held until finish_import copies them in.

    def begin_import(self, header: CacheHeader) -> int | None:
        header.check(self.cache_layout)
        size = next(self.model.parameters()).element_size()
        if header.nbytes != int(np.prod(self._kv_shape(header.kv_len))) * size:
            raise ValueError(f"{header.nbytes} bytes for {header.kv_len} KV tokens")
        room = self.store.budget_bytes - self.store.total_bytes
        if self.store.entry_bytes(UserEntry(None, kv_tokens=header.kv_len)) > room:
            return None
        if header.key in self.store.resident_keys() or self._imports.arriving(header.key):
            return None
        return self._imports.begin(header)

    def import_chunks(self, ticket: int, first: int, pieces: list[np.ndarray]) -> dict[str, float]:
        self._imports.add(ticket, first, pieces)
        return {}

    def finish_import(self, ticket: int) -> int | None:
        header, data = self._imports.take(ticket)
        dtype = next(self.model.parameters()).dtype
        kv = from_bytes(data, dtype, self._kv_shape(header.kv_len)).to(self.device, copy=True)
        cache = self._new_cache()
        for i in range(kv.shape[0]):
            cache.update(kv[i, 0].unsqueeze(0), kv[i, 1].unsqueeze(0), i)
        entry = UserEntry(
            header.key, list(header.token_ids), cache, header.kv_len, tenant=header.tenant
        )
        return 0 if self.store.adopt(entry) else None

    def cancel_import(self, ticket: int) -> bool:
        return self._imports.cancel(ticket)

    def forget_user(self, key: str, generation: int) -> bool:
        return self.store.forget(key, generation)

    # ---- reporting ------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        return EngineStats(
            kv_cache_bytes=self.store.total_bytes,
            kv_budget_bytes=self.store.budget_bytes,
            kv_bytes_per_token=self.store.bytes_per_token,
            resident_users=self.store.resident_keys(),
            running_requests=self.store.running_count(),
            waiting_requests=self._waiting,
            evicted_users=self.store.evicted_users,
            memory=self._memory(),
        )

    def _memory(self) -> EngineMemory:
        """What this engine holds: the model and its users' caches."""
        return EngineMemory(held_bytes=self.weights_bytes + self.store.total_bytes)

    def check_health(self) -> None:
        if self._executor._shutdown:
            raise RuntimeError("model thread stopped")

    async def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def cache_layers(cache: Any) -> list[tuple[Any, Any]]:
    """(keys, values) of every layer of a transformers cache, whichever version made it."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))
