"""LLMReplica: one per node. Memory first, then the engine; streams events; reports stats.

The order in `__init__` is the invariant that matters on a GPU: platform detection (CUDA
driver only), then RMM set-up (which swaps PyTorch's allocator), and only then anything that
touches `torch.cuda` (the engine).

`generate` streams messages, each a list of plain dicts (events), so the ingress can map them
to HTTP: ``{"event": "start", "replica_id", "prompt_tokens", "cached_tokens", "replica_ms"}``
first, then ``{"event": "delta", "token_ids"}`` (with ``"logprobs"`` when asked: per token
``[logprob, [[id, logprob], ...]]``; at most one delta a message: every token since the last
message; the ingress makes the text), then ``{"event": "end", "finish_reason", "usage"}``; or
a single ``{"event": "error", "status", "message", "type", "param", "code"}``. The first
message goes as soon as the first token exists; later ones are paced (deployments/pacing.py) so
the messages of all streams stay within what Serve's transport carries, however many users
stream at once.

Admission: a request whose KV (prompt and completion, `RequestShape.kv_bytes`) cannot fit this
replica even with every other user's cache dropped (`capacity.kv_capacity_bytes`) is refused
with a 503 `insufficient_memory` error event. Admission and the routing report read the same
figures: `capacity.replica_memory` of the allocator's reading and the engine's stats.
The router sends a new user to the replica with the most free unified memory, so when that one
refuses, no replica could hold the prompt. Transient pressure (running requests holding
memory) is the engine's to handle: it queues, evicts idle users, or preempts.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve

from deployments.admission import RequestShape
from deployments.cache_moves import CacheMover
from deployments.capacity import (
    ReplicaMemory,
    kv_capacity_bytes,
    memory_snapshot,
    replica_memory,
)
from deployments.config import AppArgs, parse_app_args
from deployments.cuda_driver import require_cuda_driver
from deployments.engine import (
    CapacityError,
    Engine,
    EngineStats,
    GenerationOutput,
    GenerationRequest,
    RequestError,
    SamplingParams,
    select_engine_class,
)
from deployments.engine.cache_export import CacheHeader
from deployments.memory import MemoryAccountant, is_out_of_memory, setup_memory
from deployments.metrics import ReplicaMetrics
from deployments.pacing import StreamPacing
from deployments.platform import PlatformInfo, detect_platform
from deployments.protocol import usage_dict
from deployments.serve_logging import wire_serve_logging

logger = logging.getLogger("ray.serve")
ROOM_TTL_S = 0.05  # how old the admission figure may be (see LLMReplica._room)


def error_event(
    status: int,
    message: str,
    err_type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict[str, Any]:
    return {
        "event": "error",
        "status": status,
        "message": message,
        "type": err_type,
        "param": param,
        "code": code,
    }


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests constructing the class directly)
        return f"local-{uuid.uuid4().hex[:8]}"


class Refused(Exception):
    """A request this replica cannot take for lack of memory (503)."""


class LLMReplica:
    """A model replica holding per-user KV caches in (unified) memory."""

    def __init__(self, args: AppArgs | dict[str, Any]) -> None:
        wire_serve_logging()  # the engine's INFO lines reach Serve's log and console
        start = time.perf_counter()
        self.args = parse_app_args(args)
        self.replica_id = _replica_id()
        self.platform: PlatformInfo = detect_platform(use_gpu=self.args.replica.num_gpus > 0)
        logger.info("LLMReplica %s starting on %s", self.replica_id, self.platform.describe())
        if self.platform.has_gpu:
            require_cuda_driver()  # before any CUDA call: a clear error for an old driver
        engine_cls = select_engine_class(self.args)  # reads the model's config only
        self.memory: MemoryAccountant = setup_memory(
            self.args.memory, self.platform, engine_cls.torch_allocator
        )
        logger.info("memory: %s", self.memory.snapshot().describe())
        self.engine: Engine = engine_cls(self.args, self.memory)
        self.started_at = time.time()
        self.metrics = ReplicaMetrics()
        self.pacing = StreamPacing(self.args.replica.stream_messages_per_s)
        self._streams = 0  # requests streaming from this replica now
        self._room_at, self._room_figures = float("-inf"), (0, 0)
        self._moves = self._start_moves()
        logger.info(
            "LLMReplica %s ready in %.1f s: %s serving %s, context %d tokens; memory: %s",
            self.replica_id,
            time.perf_counter() - start,
            type(self.engine).__name__,
            self.engine.model_name,
            self.engine.max_model_len,
            self._memory(self.engine.stats()).snapshot.describe(),
        )

    def _start_moves(self) -> CacheMover | None:
        """Cache moves to peers (cache_moves.py), inside Serve only: the handle of this
        replica's own deployment reaches its peers."""
        if not self.args.cache_moves.enabled:
            return None
        try:
            context = serve.get_replica_context()
            handle = serve.get_deployment_handle(context.deployment, context.app_name)
            loop = asyncio.get_running_loop()
        except Exception:  # outside Serve (tests constructing the class directly)
            return None
        mover = CacheMover(
            self.engine,
            self.replica_id,
            self.args.cache_moves,
            handle,
            self._report,
            self.metrics.cache_moved,
            # Four stats periods, at least a second: Serve's polls and pushes to every router.
            settle_s=max(1.0, 4 * self.args.router.stats_period_s),
        )
        self._moves_task = loop.create_task(mover.run())
        return mover

    # ---- requests -------------------------------------------------------------------------

    def _build(self, request: dict[str, Any], shape: RequestShape) -> GenerationRequest:
        """The engine's request from the ingress's token ids, sampling values and shape."""
        ids = list(request["prompt_token_ids"])  # an array of uint32 (prompts.py) or a list
        sampling = request.get("sampling", {})
        if len(ids) != shape.prompt_tokens or shape.kv_tokens > self.engine.max_model_len:
            raise RequestError(
                f"a request of {len(ids)} tokens does not match its shape "
                f"{shape} for a context of {self.engine.max_model_len}"
            )
        self._check_room(shape)
        return GenerationRequest(
            request_id=request.get("request_id") or uuid.uuid4().hex,
            user_key=shape.user_key,
            tenant=shape.tenant,
            prompt_token_ids=ids,
            sampling=SamplingParams(
                max_tokens=shape.max_tokens,
                temperature=float(sampling.get("temperature", 1.0)),
                top_p=float(sampling.get("top_p", 1.0)),
                seed=sampling.get("seed"),
                ignore_eos=bool(sampling.get("ignore_eos", False)),
                min_tokens=int(sampling.get("min_tokens", 0)),
                top_k=int(sampling.get("top_k", 0)),
                min_p=float(sampling.get("min_p", 0.0)),
                logprobs=sampling.get("logprobs"),
                presence_penalty=float(sampling.get("presence_penalty", 0.0)),
                frequency_penalty=float(sampling.get("frequency_penalty", 0.0)),
                repetition_penalty=float(sampling.get("repetition_penalty", 1.0)),
                logit_bias=tuple((int(t), float(b)) for t, b in sampling.get("logit_bias", ())),
                response_format=sampling.get("response_format"),
            ),
        )

    def _error(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """An error event naming this replica (the ingress sets X-Replica-Id from it)."""
        return {**error_event(*args, **kwargs), "replica_id": self.replica_id}

    def _room(self) -> tuple[int, int]:
        """(most KV bytes one request may take here, KV bytes a token), at most ROOM_TTL_S
        old: every request asks, and the engine's stats and the memory snapshot cost enough
        (a lock, driver calls) that 128 arrivals at once each paying them delayed the last
        one's first token by hundreds of milliseconds. A request that slips through a stale
        figure still meets the engine's own page check."""
        now = time.monotonic()
        if now - self._room_at > ROOM_TTL_S:
            kv = self.engine.kv_figures()  # not the whole stats: at one client, every request
            snap = memory_snapshot(self.memory.reading(), kv.memory)  # finds the figure stale
            self._room_figures = (kv_capacity_bytes(kv, snap), kv.kv_bytes_per_token)
            self._room_at = now
        return self._room_figures

    def _memory(self, stats: EngineStats) -> ReplicaMemory:
        """This replica's memory figures: its allocator's reading with the engine's stats."""
        return replica_memory(self.memory.reading(), stats)

    def _check_room(self, shape: RequestShape) -> None:
        room, per_token = self._room()
        need = shape.kv_bytes(per_token)
        if need > room:
            raise Refused(
                f"no replica can hold this request in memory: its {shape.kv_tokens} tokens "
                f"(prompt and completion) need {need / 2**20:.2f} MiB of KV cache, and the "
                f"replica with the most free memory can hold at most {max(room, 0) / 2**20:.2f} "
                "MiB even after dropping every other user's cache; shorten the conversation "
                "or max_tokens"
            )

    async def generate(
        self,
        *,
        request: dict[str, Any],
        shape: RequestShape,
        target_replica_id: str | None = None,
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """Stream one request's messages, each a list of events (see module docstring).
        `shape` is the ingress's (admission.py); the router read it too. Never raises for bad
        input. `target_replica_id` (never set by the ingress) pins the request to that
        replica (router.TARGET_KWARG): tests and benchmarks place a user with it."""
        arrived = time.monotonic()
        try:
            gen_request = self._build(request, shape)
        except Refused as exc:
            yield [self._error(503, str(exc), "server_error", code="insufficient_memory")]
            return
        except RequestError as exc:
            yield [self._error(400, str(exc), param=exc.param, code=exc.code)]
            return
        self._streams += 1
        try:
            async for message in self._messages(gen_request, arrived):
                yield message
        finally:
            self._streams -= 1
            if self._moves is not None:
                self._moves.poke()  # the user's cache grew: memory pressure may have come

    async def _messages(
        self, gen_request: GenerationRequest, arrived: float
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """One message per batch of engine output: the first at once, later ones at least
        `pacing.gap_s()` apart, so a message carries every token that arrived meanwhile."""
        outputs = self.engine.generate(gen_request)
        started = False
        try:
            # A cancel (client gone, deadline) may land inside the engine's await: engines end
            # the request there and keep its user's cache consistent (Engine.stream_tokens).
            async for out in outputs:
                message = []
                if not started:
                    started = True
                    self.metrics.request_started(out.prompt_tokens, out.cached_tokens)
                    message.append(
                        {
                            "event": "start",
                            "replica_id": self.replica_id,
                            "prompt_tokens": out.prompt_tokens,
                            "cached_tokens": out.cached_tokens,
                            # arrival to first token here: admission, the engine's queue, prefill
                            "replica_ms": (time.monotonic() - arrived) * 1e3,
                        }
                    )
                message += self._output_events(out)
                yield message
                if out.finish_reason:
                    return
                await self.pacing.wait(self._streams)  # tokens gather in the engine's stream
        except RequestError as exc:
            yield [self._error(400, str(exc), param=exc.param, code=exc.code)]
        except CapacityError as exc:
            yield [self._error(503, str(exc), "server_error", code="insufficient_memory")]
        except Exception as exc:
            if is_out_of_memory(exc):
                yield [self._error(503, str(exc), "server_error", code="out_of_memory")]
                return
            logger.exception("request %s failed", gen_request.request_id)
            yield [self._error(500, f"internal error: {type(exc).__name__}", "server_error")]
        finally:
            await outputs.aclose()  # type: ignore[attr-defined]

    def _output_events(self, out: GenerationOutput) -> list[dict[str, Any]]:
        self.metrics.tokens_generated(len(out.token_ids))
        events: list[dict[str, Any]] = []
        if out.token_ids:
            delta: dict[str, Any] = {"event": "delta", "token_ids": list(out.token_ids)}
            if out.logprobs is not None:  # per token: [logprob, [[id, logprob], ...]]
                delta["logprobs"] = [[lp, [list(t) for t in top]] for lp, top in out.logprobs]
            events.append(delta)
        if out.finish_reason:
            events.append(
                {
                    "event": "end",
                    "finish_reason": out.finish_reason,
                    "usage": usage_dict(
                        out.prompt_tokens, out.completion_tokens, out.cached_tokens
                    ),
                }
            )
        return events

    # ---- reporting ------------------------------------------------------------------------

    def _report(self) -> dict[str, Any]:
        stats = self.engine.stats()
        figures = self._memory(stats)
        snap = figures.snapshot
        return {
            "replica_id": self.replica_id,
            "platform": self.platform.kind,
            "device_name": self.platform.device_name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "free_unified_memory_bytes": snap.free_unified_memory_bytes,
            "capacity_bytes": snap.capacity_bytes,
            "used_bytes": snap.used_bytes,
            "memory_resource": snap.resource,
            "kv_cache_bytes": stats.kv_cache_bytes,
            "kv_budget_bytes": stats.kv_budget_bytes,
            "kv_bytes_per_token": stats.kv_bytes_per_token,
            "resident_users": stats.resident_users,
            "running_requests": stats.running_requests,
            "waiting_requests": stats.waiting_requests,
            "evicted_users": stats.evicted_users,
            "preempted_requests": int(stats.extra.get("preempted_requests", 0)),
            "kv_share_overrides": int(stats.extra.get("kv_share_overrides", 0)),
            "draining": self._moves is not None and self._moves.draining,
            "cache_moves": self._moves.counts.as_dict() if self._moves else None,
            "arrived_users": self._moves.arrivals(stats.resident_users) if self._moves else {},
            "kv_bytes_by_tier": figures.kv_bytes_by_tier,
            "kv_pages_total": stats.extra.get("kv_pages_total"),
            "kv_pages_free": stats.extra.get("kv_pages_free"),
            # Engine timings (paged engine): what an HTTP run's steps cost against in-process.
            "decode_step_ms_p50": stats.extra.get("decode_step_ms_p50"),
            "decode_batch_p50": stats.extra.get("decode_batch_p50"),
            "kernel_variants_compiled": stats.extra.get("kernel_variants_compiled"),
            "engine": type(self.engine).__name__,
            "model": self.engine.model_name,
            "max_model_len": self.engine.max_model_len,
            "as_of": time.time(),
        }

    def record_routing_stats(self) -> dict[str, Any]:
        """Polled by Serve every `request_routing_stats_period_s`; read by the router.

        Also the moment the replica's gauges are refreshed."""
        report = self._report()
        self.metrics.update(report, report["kv_bytes_by_tier"])
        return report

    def replica_info(self) -> dict[str, Any]:
        """One row of GET /admin/replicas."""
        return self._report()

    def model_info(self) -> dict[str, Any]:
        return {"model": self.engine.model_name, "max_model_len": self.engine.max_model_len}

    def check_health(self) -> None:
        self.engine.check_health()

    # ---- users' caches moving between replicas (cache_moves.py) ---------------------------

    # A peer's user arriving, pipelined (move_receive.py): each call is routed here by
    # `target_replica_id`; begin_import, import_chunks in any order, then finish or cancel.

    async def begin_import(
        self, *, header: CacheHeader, target_replica_id: str | None = None
    ) -> int | None:
        """Set memory aside for an arriving user: a ticket, or None (no room, draining)."""
        return None if self._moves is None else await self._moves.begin_import(header)

    async def import_chunks(
        self, *, ticket: int, first: int, refs: list[Any], target_replica_id: str | None = None
    ) -> dict[str, float]:
        """Chunks `first`, `first + 1`, ... of the ticket's cache (object-store refs), put in
        place: the copy's seconds by phase."""
        if self._moves is None:
            raise KeyError(ticket)
        return await self._moves.import_chunks(ticket, first, refs)

    async def finish_import(
        self, *, ticket: int, target_replica_id: str | None = None
    ) -> int | None:
        """Adopt the arrived user once every byte is in place: its generation here, or None."""
        if self._moves is None:
            raise KeyError(ticket)
        return await self._moves.finish_import(ticket)

    async def cancel_import(self, *, ticket: int, target_replica_id: str | None = None) -> bool:
        return self._moves is not None and await self._moves.cancel_import(ticket)

    async def withdraw_user(
        self, *, key: str, generation: int, target_replica_id: str | None = None
    ) -> bool:
        """Undo an import whose sender kept the user (a request ran on it meanwhile)."""
        return self._moves is not None and await self._moves.withdraw(key, generation)

    async def move_user(
        self, *, key: str, to: str | None = None, target_replica_id: str | None = None
    ) -> dict[str, Any]:
        """Move one idle user's cache to replica `to` (else the peer the policy picks) now:
        its outcome and the move's phases in seconds (benchmarks/cache_move_bench.py)."""
        if self._moves is None:
            return {"outcome": "off"}
        return await self._moves.move_key(key, to)

    async def drain(self, *, target_replica_id: str | None = None) -> dict[str, Any]:
        """Stop taking new users and move every idle user to peers with room (POST
        /admin/replicas/{id}/drain): what moved and what stayed."""
        if self._moves is None:
            return {"replica_id": self.replica_id, "error": "cache moves are off"}
        deadline = time.monotonic() + self.args.cache_moves.call_timeout_s
        return {"replica_id": self.replica_id, **(await self._moves.evacuate(deadline))}

    def __del__(self) -> Any:
        """Serve's graceful shutdown calls this once the requests have finished (and awaits
        what it returns): push every resident user to peers (`_evacuate`). Python's own
        finalizer call, outside Serve or after it, finds nothing to do."""
        moves, self._moves = getattr(self, "_moves", None), None
        return None if moves is None else self._evacuate(moves)

    async def _evacuate(self, moves: CacheMover) -> None:
        """Move every resident user to peers within most of `graceful_shutdown_timeout_s`
        (Serve kills the replica at its end); the rest are dropped, and counted."""
        self._moves_task.cancel()
        budget = 0.8 * self.args.replica.graceful_shutdown_timeout_s
        result = await moves.evacuate(time.monotonic() + budget)
        moves.counts.dropped_no_room += result["kept_users"]
        logger.info(
            "LLMReplica %s stopping: moved %d users' caches (%.1f MiB) to peers, dropped %d "
            "(no replica had room, or no time left)",
            self.replica_id,
            result["moved_users"],
            result["moved_bytes"] / 2**20,
            result["kept_users"],
        )
