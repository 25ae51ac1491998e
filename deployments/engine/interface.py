"""The engine contract: what a replica needs from whatever runs the model.

An engine turns a tokenized request into a stream of sampled token ids, keeping a KV cache per
user between requests. The shared `Engine.generate` adds counts and the finish reason, so every
engine behaves the same at the API; text and stop strings are the ingress's (it detokenizes).
Engines never import Ray; they are constructed as ``EngineClass(args, memory)``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from deployments.capacity import EngineMemory
from deployments.engine.cache_export import (
    CacheHeader,
    MovableUser,
    Sink,
    UserCacheExport,
    add_phases,
    copy_piece,
)

if TYPE_CHECKING:
    import numpy as np

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A client's mistake found by the engine (e.g. prompt too long); becomes a 4xx."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


MAX_LOGPROBS = 20  # most top logprobs a token may ask for (OpenAI's and vLLM's default)
# A token's logprob and the most likely tokens' (id, logprob), most likely first.
TokenLogprob = tuple[float, tuple[tuple[int, float], ...]]


class CapacityError(RuntimeError):
    """The replica cannot hold this request's KV even when empty; becomes a 503."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request draws its tokens (plain values: the engine builds its device plan)."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: the smallest set of top tokens holding this much mass
    seed: int | None = None  # the same seed and prompt give the same tokens
    top_k: int = 0  # only the k most likely tokens; 0: no limit
    min_p: float = 0.0  # only tokens at least this share of the top token's probability
    ignore_eos: bool = False  # generate max_tokens even past end-of-sequence tokens
    min_tokens: int = 0  # end-of-sequence tokens cannot be drawn before this many tokens
    # Logprobs of the raw model distribution (log_softmax of the logits, before any rule
    # below, as vLLM's default `raw_logprobs`): None: none; k >= 0: the drawn token's, and the
    # k most likely tokens'.
    logprobs: int | None = None
    # Rules on the logits before temperature, in vLLM's order: logit_bias, then repetition
    # (on prompt and output tokens), frequency and presence penalties (on output tokens).
    presence_penalty: float = 0.0  # minus this for every token already generated
    frequency_penalty: float = 0.0  # minus this times how often a token was generated
    repetition_penalty: float = 1.0  # seen tokens' logits divided (>0) or multiplied (<0) by it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    # JSON the output must match: {"type": "json_object"} or {"type": "json_schema",
    # "json_schema": {"schema": ...}} as OpenAI's response_format (as text); None: free text.
    response_format: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise RequestError("max_tokens must be at least 1", param="max_tokens")
        if self.top_k < 0:
            raise RequestError("top_k must be 0 (off) or positive", param="top_k")
        if not 0 <= self.min_p <= 1:
            raise RequestError("min_p must be in [0, 1]", param="min_p")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError("min_tokens must be in [0, max_tokens]", param="min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise RequestError(f"logprobs must be in [0, {MAX_LOGPROBS}]", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise RequestError(f"{name} must be in [-2, 2]", param=name)
        if not self.repetition_penalty > 0:
            raise RequestError("repetition_penalty must be > 0", param="repetition_penalty")
        if any(not -100 <= bias <= 100 for _, bias in self.logit_bias):
            raise RequestError("logit_bias values must be in [-100, 100]", param="logit_bias")

    def features(self) -> set[str]:
        """The optional sampling fields this request uses (see Engine.sampling_features)."""
        used = {
            "logprobs": self.logprobs is not None,
            "logit_bias": bool(self.logit_bias),
            "presence_penalty": self.presence_penalty != 0,
            "frequency_penalty": self.frequency_penalty != 0,
            "repetition_penalty": self.repetition_penalty != 1,
            "response_format": self.response_format is not None,
        }
        return {name for name, on in used.items() if on}

    @property
    def penalized(self) -> bool:
        """Whether a penalty needs this request's token counts."""
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
        )

    def finish_reason(self, is_eos: bool, count: int) -> str | None:
        """Why a request ends with its `count`-th token, or None if it goes on: an EOS token
        ends it ("stop") unless EOS is ignored or comes within min_tokens; max_tokens ends it
        ("length"). The one place this rule lives; every engine asks it."""
        if is_eos and not self.ignore_eos and count > self.min_tokens:
            return "stop"
        return "length" if count >= self.max_tokens else None


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    user_key: str | None  # opaque user key (identity.user_key); None: cache not kept
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams
    tenant: str = ""  # the API key's id (auth.tenant_of): whose KV share the user draws on


@dataclass
class RequestProgress:
    """What an engine reports about a request besides its tokens."""

    cached_tokens: int = 0  # prompt tokens served from the user's kept KV cache
    # One entry per token yielded so far, in order, when the request asks for logprobs:
    # an engine appends a token's entry before yielding the token.
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class GenerationOutput:
    """A batch of a request's tokens: those since the previous output."""

    token_ids: tuple[int, ...]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None  # "stop" or "length" on the last output, else None
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token id, when asked for


@dataclass(frozen=True)
class EngineStats:
    """What the replica reports for routing and /admin/replicas."""

    kv_cache_bytes: int
    kv_budget_bytes: int
    kv_bytes_per_token: int
    resident_users: list[str]  # user keys (hashed ids) whose KV cache this engine holds
    running_requests: int
    waiting_requests: int
    evicted_users: int
    extra: dict[str, Any] = field(default_factory=dict)
    # What the engine holds, for the replica's free-memory figure (capacity.replica_memory).
    memory: EngineMemory = field(default_factory=EngineMemory)


@dataclass(frozen=True)
class KVFigures:
    """The part of the stats a request's admission reads (LLMReplica._room): bytes, not users."""

    kv_cache_bytes: int
    kv_budget_bytes: int
    kv_bytes_per_token: int
    memory: EngineMemory


ALL_SAMPLING_FEATURES = frozenset(
    {
        "logprobs",
        "logit_bias",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "response_format",
    }
)


class Engine(ABC):
    """Runs one model; subclasses implement `stream_tokens` and `stats`."""

    model_name: str
    max_model_len: int
    tokenizer: Any  # a transformers tokenizer
    eos_token_ids: frozenset[int]
    # "rmm": every PyTorch allocation goes through the replica's RMM resource; "native": only
    # weights and KV caches do (allocated in `memory.allocation_scope()`), so CUDA graphs work.
    torch_allocator: str = "rmm"
    # The optional SamplingParams fields this engine honours (SamplingParams.features); a
    # request using another is refused with a 400 naming it, never silently ignored.
    sampling_features: frozenset[str] = frozenset()

    # ---- what an engine implements -------------------------------------------------------

    @abstractmethod
    def stream_tokens(
        self, request: GenerationRequest, progress: RequestProgress
    ) -> AsyncIterator[list[int]]:
        """Yield the sampled token ids in batches (each: the tokens produced since the last
        batch, at least one), at most `max_tokens` in all, ending after an EOS token unless the
        request ignores EOS.

        Sets `progress.cached_tokens` before the first batch. Closing the iterator early
        (stop string, client gone) must cancel the work and keep the user's cache consistent:
        it then holds exactly the tokens the model has seen.
        """

    @abstractmethod
    def stats(self) -> EngineStats:
        """Current KV usage and resident users."""

    def kv_figures(self) -> KVFigures:
        """What `stats` says of KV bytes and held memory, alone (admission asks per request;
        engines whose stats cost more than these figures override it)."""
        s = self.stats()
        return KVFigures(s.kv_cache_bytes, s.kv_budget_bytes, s.kv_bytes_per_token, s.memory)

    def check_health(self) -> None:
        """Raise if the engine cannot serve (default: healthy)."""

    async def shutdown(self) -> None:
        """Release resources (default: nothing)."""

    # ---- moving a user's cache to another replica (cache_export.py) ----------------------
    # Engines that keep no caches, or cannot copy them, keep these defaults: nothing moves.
    # All are called from the replica's threads, not the event loop (they may copy GiBs).

    def movable_users(self) -> list[MovableUser]:
        """Idle users whose caches `export_user` can copy now, least recently used first."""
        return []

    def export_header(self, key: str) -> CacheHeader | None:
        """What `export_user(key)` would copy now, without its bytes (a receiver reserves
        room from it: `begin_import`); None when the user cannot be copied now."""
        return None

    def export_user(
        self,
        key: str,
        sink: Sink = copy_piece,
        on_piece: Callable[[int, Any], None] | None = None,
    ) -> UserCacheExport | None:
        """A copy of `key`'s kept cache, which stays here until `forget_user`; None when the
        user holds no cache, is running a request, or its pages are moving between tiers (or
        did meanwhile). Each piece of bytes copied goes through `sink`, whose results the
        export holds (cache_export.py), then to `on_piece(its index, the sink's result)`, in
        order, as soon as it is made (a pipelined move sends it on from there)."""
        return None

    # An import in pieces (a pipelined move): begin_import, then import_chunks calls in any
    # order, then finish_import, or cancel_import at any point. Engines that keep no caches
    # keep these defaults: nothing is imported.

    def begin_import(self, header: CacheHeader) -> int | None:
        """Set free memory aside for `header`'s cache (nobody is dropped for it): a ticket,
        or None when there is no room or the user is here (or arriving) already. Raises
        LayoutMismatch for a cache of another layout, ValueError for one that cannot be."""
        return None

    def import_chunks(self, ticket: int, first: int, pieces: list[np.ndarray]) -> dict[str, float]:
        """Take `pieces` (uint8 arrays laid end to end) as the cache's bytes from chunk `first`
        on (byte first * header.chunk_bytes); position-addressed, so calls may come in any
        order (or twice). Seconds by phase of its copy in (`in_` keys; `began`/`ended`:
        time.time() when it ran, where the engine copies now). KeyError: unknown ticket."""
        raise KeyError(ticket)

    def finish_import(self, ticket: int) -> int | None:
        """Adopt the ticket's cache as an idle user's, once every byte is in place: its
        generation, or None when the user appeared here meanwhile (memory freed). The user
        is resident (and reported) only from here on. KeyError: unknown ticket; ValueError
        (import cancelled): bytes missing."""
        raise KeyError(ticket)

    def cancel_import(self, ticket: int) -> bool:
        """Free the ticket's memory (once any copy into it ends); False if it is not open."""
        return False

    def import_user(self, export: UserCacheExport) -> int | None:
        """`export` imported in one go (begin, its pieces from chunk 0, finish): the adopted
        entry's generation, or None (no room, or the user is here already); the copy's phases
        land in `export.phases` (`in_` keys). Raises as `begin_import` does."""
        pieces = export.arrays()
        ticket = self.begin_import(export.header())
        if ticket is None:
            return None
        try:
            phases = self.import_chunks(ticket, 0, pieces)
        except BaseException:
            self.cancel_import(ticket)
            raise
        add_phases(export.phases, {k: v for k, v in phases.items() if k.startswith("in_")})
        return self.finish_import(ticket)

    def forget_user(self, key: str, generation: int) -> bool:
        """Drop `key`'s cache if it is idle and no request ran since the export (or import)
        of that `generation`: a move committed, or an import withdrawn. Not an eviction."""
        return False

    # ---- shared behaviour -----------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """The request's tokens, one output per batch `stream_tokens` yields; the last output
        has a finish_reason. What the replica streams (its text is the ingress's to make)."""
        progress = RequestProgress()
        sampling = request.sampling
        missing = sorted(sampling.features() - self.sampling_features)
        if missing:
            raise RequestError(
                f"{missing[0]} is not supported by {type(self).__name__}",
                param=missing[0],
                code="unsupported_parameter",
            )
        prompt_tokens = len(request.prompt_token_ids)
        batches = self.stream_tokens(request, progress)
        count = 0
        try:
            async for batch in batches:
                finish = None
                for i, token in enumerate(batch):
                    finish = sampling.finish_reason(token in self.eos_token_ids, count + i + 1)
                    if finish:
                        batch = batch[: i + 1]
                        break
                logprobs = None
                if sampling.logprobs is not None:
                    logprobs = tuple(progress.logprobs[count : count + len(batch)])
                count += len(batch)
                yield GenerationOutput(
                    tuple(batch), prompt_tokens, progress.cached_tokens, count, finish, logprobs
                )
                if finish:
                    return
            # The engine ended the stream on a token this rule did not end (never, today).
            reason = "length" if count >= sampling.max_tokens else "stop"
            yield GenerationOutput((), prompt_tokens, progress.cached_tokens, count, reason)
        finally:
            await batches.aclose()  # type: ignore[attr-defined]
