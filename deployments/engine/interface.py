"""The engine contract: what a replica needs from whatever runs the model.

An engine turns a tokenized request into a stream of sampled token ids, keeping a KV cache per
user between requests. The shared `Engine.generate` turns those ids into text deltas, applies
stop strings and reports usage, so every engine behaves the same at the API. Engines never
import Ray; they are constructed as ``EngineClass(args, memory)``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from deployments.detokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


class RequestError(ValueError):
    """A client's mistake found by the engine (e.g. prompt too long); becomes a 4xx."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


class CapacityError(RuntimeError):
    """The replica cannot hold this request's KV even when empty; becomes a 503."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request draws its tokens (plain values: the engine builds its device plan)."""

    max_tokens: int
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # nucleus: the smallest set of top tokens holding this much mass
    stop: tuple[str, ...] = ()
    seed: int | None = None  # the same seed and prompt give the same tokens
    top_k: int = 0  # only the k most likely tokens; 0: no limit
    min_p: float = 0.0  # only tokens at least this share of the top token's probability
    ignore_eos: bool = False  # generate max_tokens even past end-of-sequence tokens
    min_tokens: int = 0  # end-of-sequence tokens cannot be drawn before this many tokens

    def __post_init__(self) -> None:
        if self.max_tokens <= 0:
            raise RequestError("max_tokens must be at least 1", param="max_tokens")
        if self.top_k < 0:
            raise RequestError("top_k must be 0 (off) or positive", param="top_k")
        if not 0 <= self.min_p <= 1:
            raise RequestError("min_p must be in [0, 1]", param="min_p")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise RequestError("min_tokens must be in [0, max_tokens]", param="min_tokens")

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


@dataclass
class RequestProgress:
    """What an engine reports about a request besides its tokens."""

    cached_tokens: int = 0  # prompt tokens served from the user's kept KV cache


@dataclass(frozen=True)
class GenerationOutput:
    """One step of a request: the new text and tokens since the previous output."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None  # "stop" or "length" on the last output, else None


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


class Engine(ABC):
    """Runs one model; subclasses implement `stream_tokens` and `stats`."""

    model_name: str
    max_model_len: int
    tokenizer: Any  # a transformers tokenizer
    eos_token_ids: frozenset[int]
    # "rmm": every PyTorch allocation goes through the replica's RMM resource; "native": only
    # weights and KV caches do (allocated in `memory.allocation_scope()`), so CUDA graphs work.
    torch_allocator: str = "rmm"

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

    def check_health(self) -> None:
        """Raise if the engine cannot serve (default: healthy)."""

    async def shutdown(self) -> None:
        """Release resources (default: nothing)."""

    # ---- shared behaviour -----------------------------------------------------------------

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Apply the model's chat template (with the assistant's turn opened) and tokenize."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_prompt(self, prompt_len: int, max_tokens: int) -> None:
        """Refuse prompts that cannot fit the context window (a client error)."""
        if prompt_len == 0:
            raise RequestError("the prompt is empty", param="prompt", code="empty_prompt")
        if prompt_len >= self.max_model_len:
            raise RequestError(
                f"the prompt has {prompt_len} tokens but this model's context is "
                f"{self.max_model_len} tokens (prompt plus at least one new token must fit)",
                param="messages",
                code="context_length_exceeded",
            )

    def clamp_max_tokens(self, prompt_len: int, max_tokens: int) -> int:
        """The completion length that fits the context window after the prompt."""
        return max(1, min(max_tokens, self.max_model_len - prompt_len))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationOutput]:
        """Stream text deltas with stop strings applied, one output per batch of tokens; the
        last output has a finish_reason."""
        progress = RequestProgress()
        sampling = request.sampling
        detok = IncrementalDetokenizer(self.tokenizer, sampling.stop)
        prompt_tokens = len(request.prompt_token_ids)
        batches = self.stream_tokens(request, progress)
        count = 0
        try:
            async for batch in batches:
                pieces: list[str] = []
                taken, finish = [], None
                for token in batch:
                    count += 1
                    taken.append(token)
                    finish = self._finish_reason(token, count, sampling, detok, pieces)
                    if finish:
                        break
                yield GenerationOutput("".join(pieces), tuple(taken), prompt_tokens,
                                       progress.cached_tokens, count, finish)
                if finish:
                    return
            # The engine ended the stream itself (EOS or length seen there).
            reason = "length" if count >= sampling.max_tokens else "stop"
            yield GenerationOutput(
                detok.flush(), (), prompt_tokens, progress.cached_tokens, count, reason
            )
        finally:
            await batches.aclose()  # type: ignore[attr-defined]

    def _finish_reason(self, token: int, count: int, sampling: SamplingParams,
                       detok: IncrementalDetokenizer, pieces: list[str]) -> str | None:
        """Detokenize one token into `pieces`; why the request ends with it, if it does."""
        reason = sampling.finish_reason(token in self.eos_token_ids, count)
        if reason == "stop":
            pieces.append(detok.flush())
            return reason
        pieces.append(detok.push([token]).text)
        if detok.stopped:
            return "stop"
        if reason:
            pieces.append(detok.flush())  # a stop string may complete in the flush
            return "stop" if detok.stopped else reason
        return reason
