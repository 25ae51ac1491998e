"""LLMReplica's cache moves: idle users' kept caches go to a peer instead of being dropped.

When: under memory pressure (less than `cache_moves.pressure_free_fraction` of the KV budget
free: least recently used users first, checked every `check_period_s` and after each
request), on graceful shutdown (every resident user, most recently used first, within the
shutdown budget; the rest are dropped and counted) and on an admin drain.

Where (move_policy.pick_receiver): the peer with the most room that keeps its own free share
after taking the user, by the replicas' `/admin/replicas` rows (`DeploymentHandle.broadcast`),
read as the router reads its stats (`placement.ReplicaView`).

How (pipelined): the receiver sets memory aside for the user from its header
(`begin_import`), then the engine copies the user out (`Engine.export_user`; it stays resident
here), putting each chunk of its bytes in Ray's object store as it goes (`ray.put`), and every
`chunks_per_call` chunks their refs go to the receiver's `import_chunks` at once, so the
receiver fetches them (`ray.get`: in place on the same node) and copies them in while the
next ones are still being copied out here (move_send.py, move_receive.py); once all have
landed and the user is unchanged here, `finish_import` adopts it there, into free memory only,
and it is reported from the receiver's next stats on. Every call is routed to the receiver by
our router (`target_replica_id`, router.py) through Serve's public handle API. Then this
replica forgets the user (`Engine.forget_user`), unless a request ran on it meanwhile: then
the receiver's copy is withdrawn and the user stays. A request racing the move is served here,
or by the receiver once it reports the user: from a whole cache either way (the receiver
registers the user only after every byte is in place).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import ray

from deployments.admin import replica_rows
from deployments.config import CacheMovesConfig
from deployments.engine.cache_export import (
    CacheHeader,
    LayoutMismatch,
    MovableUser,
    UserCacheExport,
)
from deployments.engine.interface import Engine
from deployments.move_policy import pick_receiver, under_pressure
from deployments.move_receive import MoveReceiver
from deployments.move_send import PipelinedSend
from deployments.placement import ReplicaView
from deployments.router import TARGET_KWARG

logger = logging.getLogger("ray.serve")
PENDING_TTL_S = 5.0  # how long bytes sent to a peer count against its room (stats lag)


@dataclass
class MoveCounts:
    """What this replica's moves did so far (reported in its stats, `cache_moves`)."""

    users_out: int = 0
    users_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    seconds_out: float = 0.0  # wall time of all moves out, copy to commit
    dropped_no_room: int = 0  # users let go on shutdown: no replica had room, or no time
    raced: int = 0  # moves undone because a request ran on the user meanwhile
    failed: int = 0  # moves whose call to the receiver failed (the user stayed here)
    expired_imports: int = 0  # arriving users whose sender went silent: their pages freed
    last_move_s: float = 0.0
    last_move_bytes: int = 0
    # The last arriving user's copies into this engine and fetches from the object store,
    # summed over its chunk calls (they overlap the sender's copy out).
    last_import_s: float = 0.0
    last_get_s: float = 0.0
    # The last arriving user's copy in by phase (staging_ring.StageTimes, `in_` keys, summed).
    last_import_phases: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CacheMover:
    def __init__(
        self,
        engine: Engine,
        replica_id: str,
        cfg: CacheMovesConfig,
        handle: Any,
        report: Callable[[], dict[str, Any]],
        on_move: Callable[[float, int], None] | None = None,
        settle_s: float = 0.0,
    ) -> None:
        """`handle`: a DeploymentHandle of this replica's own deployment; `report`: this
        replica's routing stats now; `on_move(seconds, bytes)` after each move out;
        `settle_s`: how long a receiver's stats take to reach every router (four stats
        periods, at least a second): the sender keeps reporting the user that long, so no
        router ever sees it nowhere."""
        self.engine, self.replica_id, self.cfg = engine, replica_id, cfg
        self._handle, self._report, self._on_move = handle, report, on_move
        self.counts = MoveCounts()
        self._pending: list[tuple[float, str, int]] = []  # (sent at time.time(), to, bytes)
        self._lock = asyncio.Lock()  # one move out at a time
        self._poke = asyncio.Event()
        self.draining = False  # refuse arriving users (drain, shutdown)
        self.receiver = MoveReceiver(engine, cfg.call_timeout_s, self.counts)
        self.settle_s = settle_s
        self._commits: set[asyncio.Task[str]] = set()  # moves waiting for settle_s to commit
        self.last_timing: dict[str, float] = {}  # the last move out's phases (seconds)

    # ---- the sender's side ----------------------------------------------------------------

    async def peers(self) -> list[ReplicaView]:
        """Every replica that answers, as the router sees it; none when none can be asked
        (the whole deployment stopping)."""
        try:
            rows, _ = await replica_rows(self._handle, "replica_info", self.cfg.call_timeout_s)
        except Exception as exc:
            logger.info("no peers to move users to: %s", exc)
            return []
        return [ReplicaView.from_stats(r["replica_id"], r) for r in rows]

    def _pending_bytes(self, views: list[ReplicaView]) -> dict[str, int]:
        """Bytes sent to each peer after the stats in `views` were made (wall clock, as the
        stats' `as_of`), so not yet in them."""
        now = time.time()
        self._pending = [p for p in self._pending if now - p[0] <= PENDING_TTL_S]
        as_of = {v.replica_id: v.as_of for v in views}
        out: dict[str, int] = {}
        for at, rid, nbytes in self._pending:
            if as_of.get(rid) is None or at > as_of[rid]:  # type: ignore[operator]
                out[rid] = out.get(rid, 0) + nbytes
        return out

    def _call(self, method: str, target: str, **kwargs: Any) -> Any:
        call = self._handle.options(method_name=method)
        return call.remote(**kwargs, **{TARGET_KWARG: target})

    def _sender(self, target: str) -> PipelinedSend:
        def call(method: str, **kwargs: Any) -> Any:
            return self._call(method, target, **kwargs)

        cfg = self.cfg
        return PipelinedSend(self.engine, call, ray.put, cfg.call_timeout_s, cfg.chunks_per_call)

    async def move_user(
        self, user: MovableUser, views: list[ReplicaView], wait: bool = True
    ) -> str:
        """Move one idle user: "moved", "no_room", "busy" (cannot be copied now), "refused"
        (the receiver had no room after all), "raced" or "failed". Without `wait`, "sent":
        the receiver holds it and the commit follows `settle_s` later (`settled()`)."""
        fraction = self.cfg.pressure_free_fraction
        pending = self._pending_bytes(views)
        target = pick_receiver(views, user.nbytes, self.replica_id, fraction, pending)
        if target is None:
            return "no_room"
        async with self._lock:
            start = time.perf_counter()
            sent = await self._sender(target).send(user.key)
            self.last_timing = sent.times.as_dict()
            self.counts.failed += sent.outcome == "failed"
            self.counts.raced += sent.outcome == "raced"
            if sent.export is None or sent.generation is None:
                return sent.outcome
            export, generation = sent.export, sent.generation
            self._pending.append((time.time(), target, export.nbytes))
        commit = self._commit(export, target, generation, start)
        if wait:
            return await commit
        task = asyncio.get_running_loop().create_task(commit)
        self._commits.add(task)
        task.add_done_callback(self._commits.discard)
        return "sent"

    async def settled(self) -> list[str]:
        """Wait for every commit in flight; their outcomes."""
        return list(await asyncio.gather(*self._commits)) if self._commits else []

    async def _commit(
        self, export: UserCacheExport, target: str, generation: int, start: float
    ) -> str:
        """The receiver holds the copy: once its stats have reached the routers, forget
        ours, or withdraw its copy if ours moved on. `start`: the move's time.perf_counter()
        at its first copy."""
        seconds = time.perf_counter() - start
        await asyncio.sleep(self.settle_s)  # both report the user meanwhile: either serves
        if not await asyncio.to_thread(self.engine.forget_user, export.key, export.generation):
            self.counts.raced += 1
            try:
                call = self._call("withdraw_user", target, key=export.key, generation=generation)
                await asyncio.wait_for(call, self.cfg.call_timeout_s)
            except Exception as exc:  # both keep a whole cache: routing picks one
                logger.warning("withdrawing a raced move from %s failed: %s", target, exc)
            return "raced"
        counts = self.counts
        counts.users_out += 1
        counts.bytes_out += export.nbytes
        counts.seconds_out += seconds
        counts.last_move_s, counts.last_move_bytes = seconds, export.nbytes
        if self._on_move is not None:
            self._on_move(seconds, export.nbytes)
        return "moved"

    async def evacuate(self, deadline: float) -> dict[str, int]:
        """Refuse arriving users, let those arriving land, then move every idle user out,
        most recently used first, until `deadline` (time.monotonic()); what moved and what
        stayed."""
        self.draining = True
        while self.receiver.arriving and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        held = set(self.engine.stats().resident_users)
        tried: dict[str, int] = {}  # key -> bytes
        views: list[ReplicaView] | None = None
        while time.monotonic() < deadline:
            users = [u for u in reversed(self.engine.movable_users()) if u.key not in tried]
            if not users:
                break
            views = views if views is not None else await self.peers()
            for user in users:
                if time.monotonic() >= deadline:
                    break
                tried[user.key] = user.nbytes
                await self.move_user(user, views, wait=False)
        await self.settled()
        resident = set(self.engine.stats().resident_users)
        gone = [key for key in tried if key not in resident]
        return {
            "moved_users": len(gone),
            "moved_bytes": sum(tried[key] for key in gone),
            "kept_users": len(resident),
            "held_users": len(held),  # resident when the drain began: moved + kept + lost
        }

    async def move_key(self, key: str, to: str | None = None) -> dict[str, Any]:
        """Move one user now (to `to`, else where the policy says): its outcome, bytes and
        phases (benchmarks, operators)."""
        user = next((u for u in self.engine.movable_users() if u.key == key), None)
        if user is None:
            return {"outcome": "busy"}
        views = await self.peers()
        if to is not None:
            views = [v for v in views if v.replica_id == to]
        outcome = await self.move_user(user, views)
        return {"outcome": outcome, "bytes": user.nbytes, "to": to, **self.last_timing}

    def _pressured(self) -> bool:
        view = ReplicaView.from_stats(self.replica_id, self._report())
        return under_pressure(view, self.cfg.pressure_free_fraction)

    async def relieve(self) -> int:
        """Under pressure: move the least recently used idle users out while a peer has
        room; the users moved."""
        moved, views = 0, None
        for user in self.engine.movable_users():
            if self.draining or not self._pressured():
                break
            views = views if views is not None else await self.peers()
            outcome = await self.move_user(user, views)
            logger.info("memory pressure: moving %s (%d bytes): %s", user.key, user.nbytes, outcome)
            if outcome == "no_room":
                break  # the next user is no smaller a problem: the engine drops as before
            moved += outcome == "moved"
        return moved

    def poke(self) -> None:
        """A request ended: look at the pressure now rather than at the next period."""
        self._poke.set()

    async def run(self) -> None:
        """The pressure loop (a task for the replica's life)."""
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._poke.wait(), self.cfg.check_period_s)
            self._poke.clear()
            try:
                await self.relieve()
            except Exception:
                logger.exception("relieving memory pressure by moving users failed")

    # ---- the receiver's side (move_receive.py) ------------------------------------------------

    async def begin_import(self, header: CacheHeader) -> int | None:
        """An arriving user's header: a ticket, or None (draining, no room, here already,
        or a cache of another layout)."""
        if self.draining:
            return None
        try:
            return await self.receiver.begin(header)
        except LayoutMismatch as exc:
            logger.warning("refused a user's cache: %s", exc)
            return None

    async def import_chunks(self, ticket: int, first: int, refs: list[Any]) -> dict[str, float]:
        return await self.receiver.chunks(ticket, first, refs)

    async def finish_import(self, ticket: int) -> int | None:
        return await self.receiver.finish(ticket)

    async def cancel_import(self, ticket: int) -> bool:
        return await self.receiver.cancel(ticket)

    async def withdraw(self, key: str, generation: int) -> bool:
        return await self.receiver.withdraw(key, generation)

    def arrivals(self, resident: list[str]) -> dict[str, float]:
        return self.receiver.arrivals(resident)
