"""The routers compared, each behind one adapter: `choose(user, ...) -> replica id`.

- ``ours``: `deployments.placement.decide` itself, fed `ReplicaView`s built from the replicas'
  stats as of the last stats period, with one `PlacementLedger` per router process (ingress
  replica), recording placements as `UnifiedMemoryRouter.on_request_routed` does. Each
  request reaches one of the router processes at random. The request's KV is what the
  ingress's `RequestShape` counts: its prompt plus its completion (max_tokens taken as the
  reply's length). Real policy code throughout.
- ``power_of_two``: Ray Serve's default, `PowerOfTwoChoicesRequestRouter.choose_replicas`
  (real code) picks two random replicas; Serve then probes both for their queue lengths and
  sends the request to the shorter queue. That probe is re-implemented here: the queue length
  is the number of requests running on the replica at that moment (ties: the first of the two,
  in the router's random order).
- ``consistent_hash``: Ray Serve's experimental `ConsistentHashRouter.choose_replicas` (real
  code; session id = user id); the request goes to its first rank.

No replica rejects a request here (compute is not simulated), so no router's fallback ranks,
and none of Serve's backoff, ever come into play.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from types import SimpleNamespace
from typing import Any, ClassVar

from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve._private.request_router.common import PendingRequest
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter

from benchmarks.routing_sim.cluster import Cluster
from benchmarks.routing_sim.workload import KV_BYTES_PER_TOKEN
from deployments.placement import PlacementLedger, PlacementPolicy, ReplicaView, decide

_DEPLOYMENT = DeploymentID(name="LLMReplica", app_name="llm")


class RoutingPolicy(ABC):
    """A router under test. Call `sync` after replicas join or leave and at every stats period."""

    name: ClassVar[str]
    driven: ClassVar[str]  # what real code runs, and what is re-implemented

    @abstractmethod
    def sync(self, cluster: Cluster, stats_refreshed: bool) -> None:
        """Take in the current replica set; if `stats_refreshed`, the replicas' stats too."""

    @abstractmethod
    async def choose(self, user: str, cluster: Cluster, now: float, request_tokens: int) -> str:
        """The replica this user's request goes to; `request_tokens`: the KV tokens it holds
        when it ends (prompt and reply)."""


class OursPolicy(RoutingPolicy):
    name = "ours"
    driven = (
        "deployments.placement.decide with ReplicaView.from_stats of each replica's "
        "stats as of the last period, and one PlacementLedger per router process "
        "recording placements as UnifiedMemoryRouter.on_request_routed does (real code), "
        "each request's KV counted as the ingress's RequestShape counts it (prompt plus "
        "completion)"
    )

    def __init__(
        self,
        routers: int,
        seed: int,
        tolerance_fraction: float = 0.01,
        sticky_max_wait_s: float = 30.0,
        placement_ttl_s: float = 30.0,
    ) -> None:
        self.policy = PlacementPolicy(tolerance_fraction, sticky_max_wait_s)
        self.ledgers = [PlacementLedger(placement_ttl_s) for _ in range(routers)]
        self.rng = random.Random(seed)
        self._views: dict[str, ReplicaView] = {}
        self._versions: dict[str, int] = {}
        self._ordered: list[ReplicaView] = []

    def sync(self, cluster: Cluster, stats_refreshed: bool) -> None:
        for rid in list(self._views):
            if rid not in cluster.replicas:
                del self._views[rid]
                self._versions.pop(rid, None)
        for rid, replica in cluster.replicas.items():
            if stats_refreshed and self._versions.get(rid) != replica.version:
                self._views[rid] = ReplicaView.from_stats(rid, replica.stats())
                self._versions[rid] = replica.version
            elif rid not in self._views:  # joined since the last stats: none reported yet
                self._views[rid] = ReplicaView.from_stats(rid, None)
        self._ordered = list(self._views.values())

    async def choose(self, user: str, cluster: Cluster, now: float, request_tokens: int) -> str:
        ledger = self.ledgers[self.rng.randrange(len(self.ledgers))]
        nbytes = request_tokens * KV_BYTES_PER_TOKEN
        decision = decide(
            user, self._ordered, ledger, self.policy, now, waited_s=0.0, request_bytes=nbytes
        )
        chosen = decision.ranks[0][0]
        view = self._views[chosen]
        if user not in view.resident:  # as UnifiedMemoryRouter.on_request_routed
            ledger.record(user, chosen, nbytes or view.new_user_bytes, now)
        return chosen


class _SortedIdSet(set):
    """A set that iterates in replica-id order: Serve's routers draw from `tuple(set)`, whose
    order otherwise follows per-process string hashing; this keeps runs reproducible."""

    def __iter__(self) -> Any:
        return iter(sorted(set.__iter__(self), key=lambda r: r.unique_id))


async def _no_probe(*args: Any, **kwargs: Any) -> list[Any]:
    return []


class _ServeRouterPolicy(RoutingPolicy):
    """Drives a real Serve RequestRouter subclass with stand-in replicas (no actors)."""

    router_cls: ClassVar[type]

    def __init__(self, seed: int, **router_kwargs: Any) -> None:
        self.router = self.router_cls(
            deployment_id=_DEPLOYMENT, handle_source=DeploymentHandleSource.UNKNOWN
        )
        self.router.initialize_state(**router_kwargs)
        # Serve pings new replicas for their queue lengths in the background; there are no
        # actors to ping here (queue lengths come from the simulation).
        self.router._probe_queue_lens = _no_probe
        self._members: frozenset[str] = frozenset()
        self._requests = 0
        self.seed = seed

    def sync(self, cluster: Cluster, stats_refreshed: bool) -> None:
        if frozenset(cluster.replicas) == self._members:
            return
        self._members = frozenset(cluster.replicas)
        self.router.update_replicas([_running_replica(rid) for rid in sorted(cluster.replicas)])
        self.router._replica_id_set = _SortedIdSet(self.router._replica_id_set)

    async def _ranks(self, user: str) -> list[list[str]]:
        self._requests += 1
        request_id = f"req{self._requests}"
        metadata = RequestMetadata(
            request_id=request_id, internal_request_id=request_id, session_id=user
        )
        pending = PendingRequest(args=[], kwargs={"user_id": user}, metadata=metadata)
        ranks = await self.router.choose_replicas(self.router._replicas_list, pending)
        return [[r.replica_id.unique_id for r in rank] for rank in ranks]


def _running_replica(replica_id: str) -> SimpleNamespace:
    """What a RequestRouter reads of a RunningReplica (no actor behind it)."""
    return SimpleNamespace(
        replica_id=ReplicaID(unique_id=replica_id, deployment_id=_DEPLOYMENT),
        node_id=f"node-{replica_id}",
        availability_zone=None,
        multiplexed_model_ids=set(),
        max_ongoing_requests=64,
        routing_stats={},
    )


class PowerOfTwoPolicy(_ServeRouterPolicy):
    name = "power_of_two"
    driven = (
        "ray.serve._private.request_router.pow_2_router.PowerOfTwoChoicesRequestRouter"
        ".choose_replicas (real code) picks two random replicas; Serve's queue-length "
        "probe is re-implemented: the request goes to the one with fewer requests "
        "running at that moment (ties: the first of the two)"
    )
    router_cls = PowerOfTwoChoicesRequestRouter

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        random.seed(seed)  # the router draws from the `random` module

    async def choose(self, user: str, cluster: Cluster, now: float, request_tokens: int) -> str:
        (pair,) = await self._ranks(user)
        return min(pair, key=lambda rid: cluster.replicas[rid].queue_len(now))


class ConsistentHashPolicy(_ServeRouterPolicy):
    name = "consistent_hash"
    driven = (
        "ray.serve.experimental.consistent_hash_router.ConsistentHashRouter"
        ".choose_replicas (real code; session id = user id, 100 virtual nodes per "
        "replica); the request goes to its first rank (no replica rejects)"
    )
    router_cls = ConsistentHashRouter

    async def choose(self, user: str, cluster: Cluster, now: float, request_tokens: int) -> str:
        return (await self._ranks(user))[0][0]


POLICIES: dict[str, type[RoutingPolicy]] = {
    p.name: p for p in (OursPolicy, PowerOfTwoPolicy, ConsistentHashPolicy)
}


def make_policy(name: str, seed: int, routers: int) -> RoutingPolicy:
    """A fresh router of the named policy (`routers`: router processes, for ours)."""
    if name == OursPolicy.name:
        return OursPolicy(routers=routers, seed=seed)
    return POLICIES[name](seed=seed)  # type: ignore[call-arg]
