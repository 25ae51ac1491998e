"""Where a moved cache goes and when a replica is under pressure (deployments/move_policy.py),
and the router's share of it: a call naming its replica goes there alone."""

from __future__ import annotations

from deployments.move_policy import pick_receiver, under_pressure
from deployments.placement import PlacementLedger, PlacementPolicy, ReplicaView, decide

MIB = 2**20


def view(rid: str, kv_used: int, budget: int = 100 * MIB, draining: bool = False) -> ReplicaView:
    stats = {
        "free_unified_memory_bytes": 10 * budget,
        "kv_cache_bytes": kv_used,
        "kv_budget_bytes": budget,
        "capacity_bytes": 10 * budget,
        "resident_users": [],
        "draining": draining,
    }
    return ReplicaView.from_stats(rid, stats)


def test_the_peer_with_the_most_room_that_stays_above_its_free_share_takes_the_user():
    views = [view("me", 95 * MIB), view("a", 50 * MIB), view("b", 20 * MIB)]
    assert pick_receiver(views, 10 * MIB, "me", 0.1) == "b"
    # b's room is spoken for by what this sender sent it since its stats: a is next.
    assert pick_receiver(views, 10 * MIB, "me", 0.1, {"b": 60 * MIB}) == "a"
    # Nobody can take 75 MiB and keep 10% free: no room, the user is dropped as before.
    assert pick_receiver(views, 75 * MIB, "me", 0.1) is None


def test_draining_replicas_and_replicas_without_stats_never_receive():
    views = [view("me", 95 * MIB), view("d", 0, draining=True), ReplicaView.from_stats("x", None)]
    assert pick_receiver(views, MIB, "me", 0.1) is None


def test_pressure_is_a_free_share_below_the_threshold():
    assert under_pressure(view("me", 95 * MIB), 0.1)
    assert not under_pressure(view("me", 85 * MIB), 0.1)
    assert not under_pressure(ReplicaView.from_stats("x", None), 0.1)


def test_a_draining_replica_ranks_last_for_new_users():
    views = [view("d", 0, draining=True), view("a", 90 * MIB)]
    ranks = decide("new-user", views, PlacementLedger(), PlacementPolicy(), 0.0).ranks
    assert ranks == [["a"], ["d"]]
