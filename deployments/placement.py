"""Where a request goes: a returning user to its cache, a new user to the freest replica.

Pure policy, free of Ray, torch and clocks, so the router, the routing simulation and the tests
all run the same code. Inputs are what every router process can know: the replicas' reported
stats, plus this router's own recent placements (stats lag by one period).

- A *returning* user (its key in a replica's reported ``resident_users``, or placed by this
  router moments ago) goes to that replica alone, waiting for it while it is busy, for at most
  ``sticky_max_wait_s``; then to the others, where its history is recomputed.
- A *new* user goes to the replica with the largest share of its cache memory free, less this
  router's unconfirmed placements there. Room is free unified memory, but no more than what is
  left of the replica's KV budget where it reports one (beyond its budget the engine drops idle
  users' caches however much memory is free); the share is room / KV budget (/ capacity where
  no budget is reported). Replicas of unequal memory thus fill in proportion to their memory:
  all of them serve from the start, and their free shares stay level. The request's own KV
  (``request_bytes``, estimated from its prompt) is taken off every replica's room first, so a
  long first prompt goes where it takes the smallest share, not onto a small replica that
  merely had the largest share free. Replicas within
  ``tolerance_fraction`` (a share) of the best count as tied, and ties break by rendezvous hash
  of the user key, so every router process, seeing the same stats, picks the same replica for
  the same user.
- A replica being drained (its users' caches moving out, `draining` in its stats) ranks
  with the replicas without stats, after every other, for new users.
- A request without a user has no cache to keep: all replicas form one rank and Serve picks
  the shortest queue.
- A replica whose last stats are older than ``stale_after_s`` (a frozen or overloaded process
  that stopped answering Serve's polls; Serve keeps its last stats however old) ranks after
  every replica with fresh stats, in every decision: it may be gone, and a user sent there
  would wait for it. A returning user whose home went stale is served elsewhere meanwhile.
- A user two replicas report holds the copy that arrived last (each replica reports when
  users moved in, ``arrived_users``): while a cache move settles, sender and receiver both
  report the user, and the user's next request must go to where it went. Copies that never
  moved (a fallback's recompute) rank after any that arrived, by rendezvous hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

DEFAULT_NEW_USER_TOKENS = 256  # KV estimate for a user when a replica has no users yet


def rendezvous_score(user: str, replica_id: str) -> int:
    """Highest-random-weight hash of (user, replica): same everywhere, stable across restarts."""
    digest = hashlib.sha256(f"{user}\x00{replica_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True)
class ReplicaView:
    """What a router knows of one replica, from its last reported stats."""

    replica_id: str
    free_bytes: int | None  # room for new caches, bytes (module docstring); None: no stats
    capacity_bytes: int
    resident: frozenset[str]
    new_user_bytes: int  # estimated bytes a new user adds there
    kv_budget_bytes: int = 0  # the replica's KV budget; 0: not reported
    as_of: float | None = None  # when the replica made these stats (its time.time())
    draining: bool = False  # moving its users out (admin drain): new users go elsewhere
    # user -> when its cache moved in (the replica's time.time()), for a minute after
    arrived: Mapping[str, float] = field(default_factory=dict, hash=False)

    def arrival(self, user: str) -> float:
        """When `user`'s cache moved in here (the replica's time.time()); -inf: never."""
        return self.arrived.get(user, float("-inf"))

    @classmethod
    def from_stats(cls, replica_id: str, stats: Mapping[str, Any] | None) -> ReplicaView:
        stats = stats or {}
        if "free_unified_memory_bytes" not in stats:
            return cls(replica_id, None, 0, frozenset(), 0)
        resident = frozenset(stats.get("resident_users") or ())
        kv_bytes = int(stats.get("kv_cache_bytes", 0))
        per_token = int(stats.get("kv_bytes_per_token", 0))
        per_user = kv_bytes // len(resident) if resident and kv_bytes else 0
        free = int(stats["free_unified_memory_bytes"])
        budget = int(stats.get("kv_budget_bytes") or 0)
        if budget:
            free = min(free, budget - kv_bytes)
        return cls(
            replica_id=replica_id,
            free_bytes=free,
            capacity_bytes=int(stats.get("capacity_bytes", 0)),
            resident=resident,
            new_user_bytes=per_user or per_token * DEFAULT_NEW_USER_TOKENS,
            kv_budget_bytes=budget,
            as_of=float(stats["as_of"]) if "as_of" in stats else None,
            draining=bool(stats.get("draining", False)),
            arrived=dict(stats.get("arrived_users") or {}),
        )


@dataclass
class _Placed:
    replica_id: str
    at: float
    nbytes: int


@dataclass
class PlacementLedger:
    """This router's placements that replica stats may not show yet."""

    ttl_s: float = 30.0
    _placed: dict[str, _Placed] = field(default_factory=dict)

    def record(self, user: str, replica_id: str, nbytes: int, now: float) -> None:
        self._placed[user] = _Placed(replica_id, now, nbytes)

    def home(self, user: str, now: float) -> str | None:
        placed = self._placed.get(user)
        return placed.replica_id if placed and now - placed.at <= self.ttl_s else None

    def pending_bytes(self, replica_id: str, now: float) -> int:
        return sum(
            p.nbytes
            for p in self._placed.values()
            if p.replica_id == replica_id and now - p.at <= self.ttl_s
        )

    def reconcile(self, views: Sequence[ReplicaView], now: float) -> None:
        """Forget placements the stats now confirm, and those too old to matter."""
        resident = {v.replica_id: v.resident for v in views}
        for user, placed in list(self._placed.items()):
            confirmed = user in resident.get(placed.replica_id, frozenset())
            if confirmed or now - placed.at > self.ttl_s:
                del self._placed[user]

    def __len__(self) -> int:
        return len(self._placed)


@dataclass(frozen=True)
class PlacementPolicy:
    tolerance_fraction: float = 0.01
    sticky_max_wait_s: float = 30.0
    stale_after_s: float = float("inf")  # stats older than this rank their replica last

    def is_stale(self, view: ReplicaView, now: float) -> bool:
        return view.as_of is not None and now - view.as_of > self.stale_after_s


@dataclass(frozen=True)
class Decision:
    """Ranks of replica ids, most preferred first; Serve tries them in order."""

    ranks: list[list[str]]
    reason: Literal["home", "new", "anonymous", "none"]


def rank_for_new_user(
    user: str,
    views: Sequence[ReplicaView],
    ledger: PlacementLedger,
    policy: PlacementPolicy,
    now: float,
    request_bytes: int = 0,
) -> list[str]:
    """Replica ids for a new user, best first (see module docstring).

    `request_bytes`: estimated KV bytes of the request's prompt; 0 when unknown.
    """
    known = [v for v in views if v.free_bytes is not None and not v.draining]
    unknown = sorted(
        (v for v in views if v.free_bytes is None or v.draining),
        key=lambda v: rendezvous_score(user, v.replica_id),
        reverse=True,
    )
    if not known:
        return [v.replica_id for v in unknown]
    free = {
        v.replica_id: v.free_bytes - ledger.pending_bytes(v.replica_id, now) - request_bytes
        for v in known
    }
    sizes = {v.replica_id: v.kv_budget_bytes or v.capacity_bytes for v in known}
    if all(sizes.values()):
        free = {rid: room / sizes[rid] for rid, room in free.items()}  # share free
        tolerance = policy.tolerance_fraction
    else:  # a replica reported no size: compare bytes
        tolerance = policy.tolerance_fraction * max(sizes.values())
    best = max(free.values())
    band = [v for v in known if free[v.replica_id] >= best - tolerance]
    band.sort(key=lambda v: rendezvous_score(user, v.replica_id), reverse=True)
    rest = [v for v in known if free[v.replica_id] < best - tolerance]
    rest.sort(key=lambda v: free[v.replica_id], reverse=True)
    return [v.replica_id for v in band + rest + unknown]


def find_home(
    user: str, views: Sequence[ReplicaView], ledger: PlacementLedger, now: float
) -> str | None:
    """The replica holding the user's cache by the stats, else by this router's placements."""
    holders = [v for v in views if user in v.resident]
    if holders:
        # More than one holder while a move settles (the copy that arrived last is the
        # user's) or after a fallback (the same one everywhere, by rendezvous).
        return max(
            holders, key=lambda v: (v.arrival(user), rendezvous_score(user, v.replica_id))
        ).replica_id
    placed = ledger.home(user, now)
    return placed if placed in {v.replica_id for v in views} else None


def decide(
    user: str | None,
    views: Sequence[ReplicaView],
    ledger: PlacementLedger,
    policy: PlacementPolicy,
    now: float,
    waited_s: float = 0.0,
    request_bytes: int = 0,
) -> Decision:
    """Rank replicas for one request. `waited_s`: how long it has waited to be routed;
    `request_bytes`: estimated KV bytes of its prompt (0: unknown)."""
    if not views:
        return Decision([], "none")
    stale = {v.replica_id for v in views if policy.is_stale(v, now)}
    if user is None:
        ranks = [
            [v.replica_id for v in views if v.replica_id not in stale],
            [v.replica_id for v in views if v.replica_id in stale],
        ]
        return Decision([rank for rank in ranks if rank], "anonymous")
    ledger.reconcile(views, now)
    home = find_home(user, views, ledger, now)
    if home is not None and home not in stale and waited_s < policy.sticky_max_wait_s:
        return Decision([[home]], "home")  # the usual return: no other replica is ranked
    ranked = _stale_last(rank_for_new_user(user, views, ledger, policy, now, request_bytes), stale)
    if home is None:
        return Decision([[r] for r in ranked], "new")
    if home in stale:  # it may be gone: fresh replicas first, home after them
        return Decision([[r] for r in ranked if r != home] + [[home]], "home")
    return Decision([[home]] + [[r] for r in ranked if r != home], "home")


def _stale_last(ranked: list[str], stale: set[str]) -> list[str]:
    """`ranked` with the stale replicas moved to its end, each part in its order."""
    return [r for r in ranked if r not in stale] + [r for r in ranked if r in stale]
