"""The event loop: every turn of every conversation, in time order, through one router.

Replica state changes only when a request is served, so the stats a replica reports at a
period boundary are its state after the last request before it: stats are refreshed lazily,
at the first request of each new period, and are exact. Replicas may leave (their caches are
lost) or join (no stats until the next period) at set times; the users a membership change
moves are counted against the replicas that held their caches at that moment.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any

from benchmarks.routing_sim.cluster import Cluster
from benchmarks.routing_sim.metrics import Recorder
from benchmarks.routing_sim.policies import make_policy
from benchmarks.routing_sim.workload import (
    NODE_TYPES,
    Conversation,
    NodeType,
    WorkloadShape,
    make_workload,
    replica_types,
)


@dataclass(frozen=True)
class Scenario:
    """One simulated deployment and workload; `make()` builds it (deterministic in `seed`)."""

    replicas: int = 64
    shape: WorkloadShape = field(default_factory=WorkloadShape)
    load: float = 1.0  # total final KV of all conversations / total KV budget
    seed: int = 0
    stats_period_s: float = 1.0
    routers: int = 2  # router processes (ingress replicas), each with its own ledger
    leave_at_s: float | None = None  # one replica leaves then
    join_at_s: float | None = None  # one replica of the first node type joins then

    def make(self) -> tuple[list[NodeType], list[Conversation], float]:
        types = replica_types(self.replicas, random.Random(self.seed))
        capacity = sum(t.kv_budget_bytes for t in types)
        conversations, scale = make_workload(self.shape, capacity, self.load, self.seed + 1)
        return types, conversations, scale


@dataclass
class _Tracked:
    holders: frozenset[str]  # replicas holding the user's cache at the event
    kind: str  # "leave" or "join"


class MoveCounter:
    """Where users with a conversation under way at a membership change go on their next turn."""

    def __init__(self) -> None:
        self.tracked: dict[str, _Tracked] = {}
        self.counts: dict[str, dict[str, Any]] = {}
        self.left: str | None = None

    def track(self, kind: str, cluster: Cluster, live_users: set[str], **detail: Any) -> None:
        self.counts[kind] = {
            "tracked": 0,
            "stayed": 0,
            "moved_must": 0,
            "moved_needless": 0,
            "cache_evicted_meanwhile": 0,
            **detail,
        }
        for user in live_users:
            holders = cluster.holders.get(user)
            if holders:
                self.tracked[user] = _Tracked(frozenset(holders), kind)
                self.counts[kind]["tracked"] += 1

    def next_request(self, user: str, cluster: Cluster, chosen: str) -> None:
        entry = self.tracked.pop(user, None)
        if entry is None:
            return
        still = {r for r in entry.holders if r in cluster.replicas and cluster.holds(r, user)}
        counts = self.counts[entry.kind]
        if chosen in still:
            counts["stayed"] += 1
        elif still:
            counts["moved_needless"] += 1
        elif self.left in entry.holders and entry.kind == "leave":
            counts["moved_must"] += 1
        else:
            counts["cache_evicted_meanwhile"] += 1


async def simulate(
    scenario: Scenario,
    policy_name: str,
    built: tuple[list[NodeType], list[Conversation], float] | None = None,
) -> dict[str, Any]:
    """Run every request of the scenario through one policy; returns its figures."""
    types, conversations, _ = built or scenario.make()
    cluster = Cluster()
    for i, node in enumerate(types):
        cluster.add(f"r{i:02d}", node)
    policy = make_policy(policy_name, scenario.seed + 2, scenario.routers)
    policy.sync(cluster, stats_refreshed=True)
    recorder, moves = Recorder(), MoveCounter()

    events: list[tuple[float, int, int]] = [  # (time, conversation index, turn index)
        (turn.at, c, k) for c, conv in enumerate(conversations) for k, turn in enumerate(conv.turns)
    ]
    if scenario.leave_at_s is not None:
        events.append((scenario.leave_at_s, -1, 0))
    if scenario.join_at_s is not None:
        events.append((scenario.join_at_s, -2, 0))
    events.sort()
    next_turn = [0] * len(conversations)
    index = {conv.user: c for c, conv in enumerate(conversations)}
    next_refresh = 0.0

    def live_users() -> set[str]:
        return {
            conversations[c].user
            for c, k in enumerate(next_turn)
            if 0 < k < len(conversations[c].turns)
        }

    for now, c, k in events:
        if now >= next_refresh:
            policy.sync(cluster, stats_refreshed=True)
            recorder.sample(cluster, now)
            next_refresh = (math.floor(now / scenario.stats_period_s) + 1) * scenario.stats_period_s
        if c == -1:  # a replica leaves: the first of the first node type, by id
            left = min(rid for rid, r in cluster.replicas.items() if r.node == NODE_TYPES[0])
            moves.left = left
            moves.track("leave", cluster, live_users(), replica=left)
            recorder.lost_on_leave += len(cluster.remove(left))
            policy.sync(cluster, stats_refreshed=False)
            continue
        if c == -2:  # a replica of the first node type joins
            joined = f"r{len(types):02d}-joined"
            moves.track("join", cluster, live_users(), replica=joined)
            cluster.add(joined, NODE_TYPES[0])
            policy.sync(cluster, stats_refreshed=False)
            continue

        conv = conversations[c]
        turn = conv.turns[k]
        holders_before = set(cluster.holders.get(conv.user, ()))
        chosen = await policy.choose(conv.user, cluster, now, turn.context_tokens)
        moves.next_request(conv.user, cluster, chosen)
        next_turn[c] = k + 1
        served = cluster.serve(chosen, conv.user, turn.context_tokens, now, turn.end)
        recorder.request(k, holders_before, chosen, turn.prompt_tokens, served.cached_tokens)
        for user, tokens in served.evicted:
            victim = index[user]
            recorder.evicted(now, tokens, next_turn[victim] < len(conversations[victim].turns))
        recorder.overflow_requests += served.overflow
        if k == 0 and recorder.first_eviction_at is None:
            recorder.admitted_before_first_eviction += 1

    result = recorder.summary()
    if moves.counts:
        result["moves"] = moves.counts
    result["timeline"] = recorder.timeline
    cluster.check_integrity()
    return result
