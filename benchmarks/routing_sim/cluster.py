"""Replicas' memory as the engine manages it, and the stats they report to routers.

A replica keeps one KV cache per user (``UserCacheStore``'s policy): serving a request grows
the user's cache to the conversation's new context; if the replica's caches then exceed its
KV budget, the least recently used *idle* users are dropped (never one whose request is
running). A user may hold caches on several replicas (after being routed away from its
cache); each copy is a prefix of the conversation, kept until evicted.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from benchmarks.routing_sim.workload import KV_BYTES_PER_TOKEN, WEIGHTS_BYTES, NodeType


@dataclass
class Served:
    """What serving one request did on its replica."""

    cached_tokens: int  # prompt tokens found in the user's cache there
    evicted: list[tuple[str, int]]  # (user, tokens) of caches dropped to make room
    overflow: bool  # still over budget after dropping every idle user


class Replica:
    """One replica's KV caches under its budget; LRU order is order of last use."""

    def __init__(self, replica_id: str, node: NodeType) -> None:
        self.replica_id = replica_id
        self.node = node
        self.caches: OrderedDict[str, int] = OrderedDict()  # user -> tokens; LRU first
        self.kv_bytes = 0
        self.busy_until: dict[str, float] = {}
        self._ends: list[float] = []  # end times of requests running here (a heap)
        self.version = 0  # bumped whenever what the stats report changes

    @property
    def kv_room_bytes(self) -> int:
        """KV bytes that fit before the engine starts dropping users."""
        return self.node.kv_budget_bytes - self.kv_bytes

    @property
    def free_unified_bytes(self) -> int:
        return self.node.limit_bytes - WEIGHTS_BYTES - self.kv_bytes

    def queue_len(self, now: float) -> int:
        """Requests running here at `now` (what Serve's queue-length probe would return)."""
        while self._ends and self._ends[0] <= now:
            heapq.heappop(self._ends)
        return len(self._ends)

    def serve(self, user: str, context_tokens: int, now: float, end: float) -> Served:
        """Run one request: the user's cache grows to `context_tokens`, busy until `end`."""
        cached = self.caches.pop(user, 0)
        self.caches[user] = context_tokens  # most recently used
        self.kv_bytes += (context_tokens - cached) * KV_BYTES_PER_TOKEN
        evicted = []
        if self.kv_bytes > self.node.kv_budget_bytes:
            for other, tokens in self.caches.items():
                if self.kv_bytes <= self.node.kv_budget_bytes:
                    break
                if other == user or self.busy_until.get(other, 0.0) > now:
                    continue
                evicted.append((other, tokens))
                self.kv_bytes -= tokens * KV_BYTES_PER_TOKEN
            for other, _ in evicted:
                del self.caches[other]
                self.busy_until.pop(other, None)
        self.busy_until[user] = end
        heapq.heappush(self._ends, end)
        self.version += 1
        return Served(cached, evicted, self.kv_bytes > self.node.kv_budget_bytes)

    def stats(self) -> dict[str, Any]:
        """The routing stats `LLMReplica.record_routing_stats` reports (the fields routers read).

        ``resident_users`` is a frozenset here (a list in Serve) so views are cheap to build.
        """
        return {
            "replica_id": self.replica_id,
            "free_unified_memory_bytes": self.free_unified_bytes,
            "capacity_bytes": self.node.limit_bytes,
            "kv_cache_bytes": self.kv_bytes,
            "kv_budget_bytes": self.node.kv_budget_bytes,
            "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
            "resident_users": frozenset(self.caches),
        }


@dataclass
class Cluster:
    """The live replicas and, for every user, which of them hold a cache of it."""

    replicas: dict[str, Replica] = field(default_factory=dict)
    holders: dict[str, set[str]] = field(default_factory=dict)

    def add(self, replica_id: str, node: NodeType) -> Replica:
        replica = Replica(replica_id, node)
        self.replicas[replica_id] = replica
        return replica

    def remove(self, replica_id: str) -> list[str]:
        """A replica leaves (scaled down or died): its caches are gone. Returns their users."""
        replica = self.replicas.pop(replica_id)
        for user in replica.caches:
            self.holders[user].discard(replica_id)
        return list(replica.caches)

    def holds(self, replica_id: str, user: str) -> bool:
        return replica_id in self.holders.get(user, ())

    def serve(
        self, replica_id: str, user: str, context_tokens: int, now: float, end: float
    ) -> Served:
        served = self.replicas[replica_id].serve(user, context_tokens, now, end)
        self.holders.setdefault(user, set()).add(replica_id)
        for other, _ in served.evicted:
            self.holders[other].discard(replica_id)
        return served

    def check_integrity(self) -> None:
        """Raise AssertionError if byte counts or the holder index disagree (tests call this)."""
        for rid, replica in self.replicas.items():
            total = sum(replica.caches.values()) * KV_BYTES_PER_TOKEN
            assert total == replica.kv_bytes, f"{rid}: kv bytes {replica.kv_bytes} != {total}"
            for user in replica.caches:
                assert rid in self.holders[user], f"{rid} holds {user} but the index disagrees"
        for user, rids in self.holders.items():
            for rid in rids:
                assert user in self.replicas[rid].caches, f"index says {rid} holds {user}"
