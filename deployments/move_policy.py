"""Where a user's cache moves, and when a replica is under memory pressure: pure policy.

Both read the router's own view of a replica (`placement.ReplicaView`: room for new caches is
free unified memory, but no more than what is left of the KV budget), so a move goes where
the router would have placed a new user of that size, and the router then finds the user
there. Free of Ray, torch and clocks, like `placement`.

- A receiver must hold the cache and still keep `keep_free_fraction` of its KV budget free
  after taking it (so it does not, in turn, feel pressure and move users back); of those, the
  one with the most room wins. The sender, draining replicas and replicas without stats
  never receive. `pending` holds bytes this sender sent each replica that its stats may not
  show yet (stats lag by one period).
- A replica is under pressure when less than `keep_free_fraction` of its KV budget is free.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from deployments.placement import ReplicaView


def size_of(view: ReplicaView) -> int:
    """The bytes a replica's free share is a share of: its KV budget, else its capacity."""
    return view.kv_budget_bytes or view.capacity_bytes


def free_share(view: ReplicaView, pending: int = 0) -> float:
    """Share of the replica's cache memory free (1.0 when it reports no size)."""
    if view.free_bytes is None:
        return 0.0
    size = size_of(view)
    return (view.free_bytes - pending) / size if size else 1.0


def under_pressure(view: ReplicaView, keep_free_fraction: float) -> bool:
    return view.free_bytes is not None and free_share(view) < keep_free_fraction


def pick_receiver(
    views: Sequence[ReplicaView],
    nbytes: int,
    sender: str,
    keep_free_fraction: float,
    pending: Mapping[str, int] | None = None,
) -> str | None:
    """The replica to take a cache of `nbytes` (see module docstring), or None: no room."""
    pending = pending or {}
    best, best_room = None, None
    for view in views:
        if view.replica_id == sender or view.free_bytes is None or view.draining:
            continue
        room = view.free_bytes - pending.get(view.replica_id, 0) - nbytes
        if room < keep_free_fraction * size_of(view):
            continue
        if best_room is None or room > best_room:
            best, best_room = view.replica_id, room
    return best
