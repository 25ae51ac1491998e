"""The sending side of a pipelined cache move (cache_moves.py): the receiver sets pages aside
from the user's header (`begin_import`), then, while the engine copies the user's chunks out
(device -> pinned staging ring -> `ray.put`, engine/paged/staging_ring.py), every
`chunks_per_call` chunks go to the receiver's `import_chunks` without waiting for it, so the
receiver copies chunk i in while this side copies chunk i + k out; once every chunk call has
answered and the user is unchanged here, `finish_import` registers it there. On any failure
the import is cancelled (the receiver also cancels one left open past the timeout).

Timings (seconds, `SendTimes`): begin_s (header and begin_import), export_s (the copy out,
its puts and handing the chunks on), call_s (after the export: the chunk calls still running
and finish_import), move_s (end to end), pipeline_overlap_s (the receiver's copies that ran
while this side was still exporting), and the export's `out_` phases.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from typing import Any

from deployments.engine.cache_export import CacheHeader, Sink, UserCacheExport
from deployments.engine.interface import Engine

logger = logging.getLogger("ray.serve")
Call = Callable[..., Awaitable[Any]]  # (receiver's method name, **kwargs) -> its answer


@dataclass
class SendTimes:
    begin_s: float = 0.0
    export_s: float = 0.0
    call_s: float = 0.0
    move_s: float = 0.0
    pipeline_overlap_s: float = 0.0
    chunk_calls: int = 0
    phases: dict[str, float] = field(default_factory=dict)  # the export's `out_` phases

    def as_dict(self) -> dict[str, float]:
        flat = asdict(self)
        return {**flat.pop("phases"), **flat}


@dataclass
class Sent:
    """What one send did: "sent" (the receiver holds the user: `generation` there), "busy"
    (the user could not be copied now), "refused" (no room there), "raced" (a request ran
    on the user meanwhile) or "failed" (a call failed)."""

    outcome: str
    export: UserCacheExport | None = None
    generation: int | None = None
    times: SendTimes = field(default_factory=SendTimes)


class ChunkCalls:
    """The export's chunks handed to the receiver `group` at a time, as they are made."""

    def __init__(self, loop: asyncio.AbstractEventLoop, call: Call, ticket: int, group: int):
        self._loop, self._call, self._ticket, self._group = loop, call, ticket, group
        self._batch: list[Any] = []
        self._first = 0
        self.futures: list[Future[Any]] = []

    def add(self, i: int, ref: Any) -> None:
        """Chunk `i`'s object-store ref (the export thread calls this, in order)."""
        if not self._batch:
            self._first = i
        self._batch.append(ref)
        if len(self._batch) >= self._group:
            self.flush()

    def flush(self) -> None:
        """Send the chunks held back (the last group), without waiting for the answer."""
        if self._batch:
            send = self._send(self._first, self._batch)  # runs on the loop, not this thread
            # In a context of its own: calls made at once inside one Serve request share its
            # request id, and Serve's router (2.60) keeps one pending call per id: the others
            # were never sent. A fresh context gives each chunk call an id of its own.
            run = asyncio.run_coroutine_threadsafe
            self.futures.append(contextvars.Context().run(run, send, self._loop))
            self._batch = []

    async def _send(self, first: int, refs: list[Any]) -> dict[str, float]:
        return await self._call("import_chunks", ticket=self._ticket, first=first, refs=refs)

    async def answers(self, timeout_s: float) -> list[dict[str, float]]:
        """Every chunk call's answer (raises the first failure, or TimeoutError)."""
        waits = [asyncio.wrap_future(f) for f in self.futures]
        got = await asyncio.wait_for(asyncio.gather(*waits, return_exceptions=True), timeout_s)
        for answer in got:
            if isinstance(answer, BaseException):
                raise answer
        return got


def overlap_s(answers: list[dict[str, float]], exported_at: float) -> float:
    """Seconds of the receiver's copies (`began`..`ended`, time.time()) before `exported_at`."""
    return sum(max(0.0, min(a["ended"], exported_at) - a["began"]) for a in answers if "began" in a)


class PipelinedSend:
    def __init__(self, engine: Engine, call: Call, put: Sink, timeout_s: float, group: int):
        """`call`: the receiver's methods; `put`: what each chunk becomes (`ray.put`);
        `timeout_s`: the whole send's limit; `group`: chunks per import_chunks call."""
        self.engine, self._call, self._put = engine, call, put
        self.timeout_s, self.group = timeout_s, group

    async def _ask(self, deadline: float, method: str, **kwargs: Any) -> Any:
        remaining = max(0.0, deadline - time.perf_counter())
        return await asyncio.wait_for(self._call(method, **kwargs), remaining)

    async def send(self, key: str) -> Sent:
        """Copy `key`'s cache to the receiver (module docstring); the user stays here."""
        times, start = SendTimes(), time.perf_counter()
        deadline = start + self.timeout_s
        header = await asyncio.to_thread(self.engine.export_header, key)
        if header is None:
            return Sent("busy", times=times)
        try:
            ticket = await self._ask(deadline, "begin_import", header=header)
        except Exception as exc:  # a ticket it made anyway expires there
            logger.warning("a move of %s: begin_import failed (%s); it stays here", key, exc)
            return Sent("failed", times=times)
        if ticket is None:
            return Sent("refused", times=times)
        times.begin_s = time.perf_counter() - start
        calls = ChunkCalls(asyncio.get_running_loop(), self._call, ticket, self.group)
        export: UserCacheExport | None = None
        try:
            export, exported_at = await asyncio.to_thread(self._export, key, calls)
            exported = time.perf_counter()
            answers = await calls.answers(max(0.0, deadline - exported))
            now = await asyncio.to_thread(self.engine.export_header, key)
            outcome = self._check(header, export, now)
            if outcome != "sent":
                await self._cancel(ticket)
                return Sent(outcome, times=times)
            generation = await self._ask(deadline, "finish_import", ticket=ticket)
        except Exception as exc:
            logger.warning("a move of %s failed (%s); it stays here", key, exc)
            await self._cancel(ticket)
            return Sent("failed", times=times)
        finally:
            if export is not None:
                export.buffers = []  # the receiver is done with the chunks: free them now
        times.export_s, times.phases = export.copy_s, dict(export.phases)
        times.call_s = time.perf_counter() - exported
        times.move_s = time.perf_counter() - start
        times.pipeline_overlap_s = overlap_s(answers, exported_at)
        times.chunk_calls = len(calls.futures)
        return Sent("sent" if generation is not None else "refused", export, generation, times)

    def _export(self, key: str, calls: ChunkCalls) -> tuple[UserCacheExport | None, float]:
        """The export (its chunks handed on as they come, the last group once it is whole)
        and when it ended (time.time())."""
        export = self.engine.export_user(key, self._put, calls.add)
        if export is not None:
            calls.flush()
        return export, time.time()

    @staticmethod
    def _check(header: CacheHeader, export: UserCacheExport | None, now: CacheHeader | None) -> str:
        """What the copy is worth: "sent" (whole, of the header's user, unchanged here since),
        "busy" (it changed before or while it was copied) or "raced" (a request ran since)."""
        if export is None or not header.same_user(export):
            return "busy"
        return "sent" if export.same_user(now) else "raced"

    async def _cancel(self, ticket: int) -> None:
        try:
            await asyncio.wait_for(self._call("cancel_import", ticket=ticket), self.timeout_s)
        except Exception as exc:  # the receiver cancels it itself after its timeout
            logger.warning("cancelling an import failed (%s); it expires there", exc)
