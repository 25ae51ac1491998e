"""The receiving side of a pipelined cache move (cache_moves.py): a peer's user arrives as a
header (`begin`: pages set aside, a ticket), chunk calls in any order (`chunks`: fetched from
the object store, written at their position), then `finish` (the user registered, reported
from the next stats on) or `cancel`.

Invariants: an open ticket's memory is the import's alone; a ticket its sender leaves open
for `timeout_s` (it died, or lost the way) is cancelled here, so pages never leak; the user
exists here only once `finish` has put every byte in place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import ray

from deployments.engine.cache_export import CacheHeader, add_phases
from deployments.engine.interface import Engine

if TYPE_CHECKING:
    from deployments.cache_moves import MoveCounts

logger = logging.getLogger("ray.serve")
# How long a replica reports when a user moved in (`arrived_users`): routers prefer the copy
# that arrived last while the sender still reports it too (settle_s) and while their stats of
# the sender lag behind its commit; far longer than both.
ARRIVAL_MEMORY_S = 60.0


@dataclass(eq=False)
class Arrival:
    """One import in progress, and what its copies cost so far (seconds, summed over its
    chunk calls)."""

    header: CacheHeader
    expiry: asyncio.TimerHandle | None = None
    get_s: float = 0.0  # fetching chunks from the object store (calls' fetches may overlap)
    import_s: float = 0.0  # the engine's copies in, synchronized (one at a time)
    phases: dict[str, float] = field(default_factory=dict)  # its ring's `in_` phases


async def _fetch(pieces: list[Any]) -> list[Any]:
    """`pieces` with their object-store refs resolved (arrays in the store's memory when it
    is on this node: read, never written)."""
    refs = [i for i, p in enumerate(pieces) if isinstance(p, ray.ObjectRef)]
    if refs:
        got = await asyncio.to_thread(ray.get, [pieces[i] for i in refs])
        for i, value in zip(refs, got, strict=True):
            pieces[i] = value
    return pieces


class MoveReceiver:
    def __init__(self, engine: Engine, timeout_s: float, counts: MoveCounts) -> None:
        """`timeout_s`: how long a ticket may stay open; `counts`: the replica's move counts
        (users and bytes in, the last arrival's phases, imports expired)."""
        self.engine, self.timeout_s, self.counts = engine, timeout_s, counts
        self._open: dict[int, Arrival] = {}
        self._expiring: set[asyncio.Task[Any]] = set()
        self._arrived: dict[str, float] = {}  # user -> time.time() its cache moved in

    @property
    def arriving(self) -> int:
        """Imports open now."""
        return len(self._open)

    async def begin(self, header: CacheHeader) -> int | None:
        """Set memory aside for `header`'s user: a ticket, or None (no room, or it is here).
        LayoutMismatch / ValueError as Engine.begin_import."""
        ticket = await asyncio.to_thread(self.engine.begin_import, header)
        if ticket is not None:
            loop = asyncio.get_running_loop()
            arrival = Arrival(header)
            arrival.expiry = loop.call_later(self.timeout_s, self._expire, ticket)
            self._open[ticket] = arrival
        return ticket

    def _arrival(self, ticket: int) -> Arrival:
        arrival = self._open.get(ticket)
        if arrival is None:
            raise KeyError(f"no import {ticket} is open here (finished, cancelled or expired)")
        return arrival

    async def chunks(self, ticket: int, first: int, refs: list[Any]) -> dict[str, float]:
        """Fetch chunks `first`, `first + 1`, ... (object-store refs, or arrays) and write them
        at their place: seconds by phase, and when the copy ran (`began`, `ended`)."""
        arrival = self._arrival(ticket)
        start = time.perf_counter()
        pieces = await _fetch(list(refs))
        fetched = time.perf_counter()
        phases = await asyncio.to_thread(self.engine.import_chunks, ticket, first, pieces)
        # The copy itself (`began`..`ended`, where the engine says), not the wait for the
        # calls' writes before it: the calls' import_s then add up to no more than the move.
        copy_s = phases["ended"] - phases["began"] if "began" in phases else None
        import_s = time.perf_counter() - fetched if copy_s is None else copy_s
        arrival.get_s += fetched - start
        arrival.import_s += import_s
        add_phases(arrival.phases, {k: v for k, v in phases.items() if k.startswith("in_")})
        return {**phases, "get_s": fetched - start, "import_s": import_s}

    async def finish(self, ticket: int) -> int | None:
        """Adopt the user once every byte is in place: its generation, or None."""
        arrival = self._close(ticket)
        generation = await asyncio.to_thread(self.engine.finish_import, ticket)
        counts = self.counts
        counts.last_get_s, counts.last_import_s = arrival.get_s, arrival.import_s
        counts.last_import_phases = arrival.phases
        if generation is not None:
            counts.users_in += 1
            counts.bytes_in += arrival.header.nbytes
            self._arrived[arrival.header.key] = time.time()
        return generation

    async def cancel(self, ticket: int) -> bool:
        """Free the ticket's memory; False if it is not open (finished, expired)."""
        if ticket not in self._open:
            return False
        self._close(ticket)
        return await asyncio.to_thread(self.engine.cancel_import, ticket)

    def _close(self, ticket: int) -> Arrival:
        arrival = self._open.pop(ticket, None)
        if arrival is None:
            raise KeyError(f"no import {ticket} is open here (finished, cancelled or expired)")
        if arrival.expiry is not None:
            arrival.expiry.cancel()
        return arrival

    def _expire(self, ticket: int) -> None:
        """The sender left the ticket open too long: cancel it (a task: the engine's cancel
        waits for any copy into the pages to end)."""
        if ticket not in self._open:
            return
        key = self._open[ticket].header.key
        logger.warning("an import of %s stayed open %.0f s: cancelled", key, self.timeout_s)
        self.counts.expired_imports += 1
        task = asyncio.get_running_loop().create_task(self.cancel(ticket))
        self._expiring.add(task)
        task.add_done_callback(self._expiring.discard)

    async def withdraw(self, key: str, generation: int) -> bool:
        """Drop an arrived user again (its sender kept it: a request ran there meanwhile)."""
        dropped = await asyncio.to_thread(self.engine.forget_user, key, generation)
        if dropped:
            self.counts.users_in -= 1
            self._arrived.pop(key, None)
        return dropped

    def arrivals(self, resident: list[str]) -> dict[str, float]:
        """The `resident` users that moved in within ARRIVAL_MEMORY_S, with when (stats'
        `arrived_users`: placement.find_home prefers the copy that arrived last)."""
        since = time.time() - ARRIVAL_MEMORY_S
        self._arrived = {k: t for k, t in self._arrived.items() if t >= since}
        return {k: self._arrived[k] for k in resident if k in self._arrived}
