"""UnifiedMemoryRouter: Serve's request router for LLMReplica, driving `placement.decide`.

Lives in every process that holds a handle to LLMReplica (each ingress replica, each driver),
so it keeps nothing that must be shared: the replicas' reported stats are the truth, and the
small ledger of its own recent placements only covers the lag until the next stats arrive.
Set it from a Serve config with::

    request_router_config:
      request_router_class: deployments.router:UnifiedMemoryRouter

Never imports torch or rmm (it runs in proxy and ingress processes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    ReplicaResult,
    RequestRouter,
    RunningReplica,
)

from deployments.admission import RequestShape
from deployments.placement import (
    PlacementLedger,
    PlacementPolicy,
    ReplicaView,
    decide,
)

logger = logging.getLogger("ray.serve")


TARGET_KWARG = "target_replica_id"  # a call for one replica only (cache moves, admin drain)


def request_target(pending_request: PendingRequest | None) -> str | None:
    """The replica a call names for itself (`target_replica_id=` in its keyword arguments):
    a cache move's receiver, a drained replica. Never set by the ingress for a request."""
    if pending_request is None:
        return None
    target = pending_request.kwargs.get(TARGET_KWARG)
    return target if isinstance(target, str) else None


def request_shape(pending_request: PendingRequest | None) -> RequestShape | None:
    """The shape the ingress computed for this call (admission.py); None for calls that carry
    none (model info, stats)."""
    if pending_request is None:
        return None
    shape = pending_request.kwargs.get("shape")
    return shape if isinstance(shape, RequestShape) else None


class UnifiedMemoryRouter(RequestRouter):
    """Returning users to the replica holding their cache; new users by free unified memory;
    a call naming its replica (`target_replica_id`) to that replica alone."""

    def initialize_state(
        self,
        free_memory_tolerance_fraction: float = 0.01,
        sticky_max_wait_s: float = 30.0,
        placement_ttl_s: float = 30.0,
        stale_stats_s: float = float("inf"),
        **kwargs: Any,
    ) -> None:
        self._policy = PlacementPolicy(
            free_memory_tolerance_fraction, sticky_max_wait_s, stale_stats_s
        )
        self._ledger = PlacementLedger(placement_ttl_s)
        # replica id -> (the stats object a view was built from, that view): stats arrive as
        # new objects once a period, so a view (hashing every resident user) is built once.
        self._views: dict[str, tuple[Any, ReplicaView]] = {}

    def _view(self, replica_id: str, stats: Any) -> ReplicaView:
        cached = self._views.get(replica_id)
        if cached is not None and cached[0] is stats and stats is not None:
            return cached[1]
        view = ReplicaView.from_stats(replica_id, stats)
        self._views[replica_id] = (stats, view)
        return view

    @staticmethod
    def _user(pending_request: PendingRequest | None) -> str | None:
        shape = request_shape(pending_request)
        return shape.user_key if shape else None

    @staticmethod
    def _request_bytes(
        pending_request: PendingRequest | None, replicas: list[RunningReplica]
    ) -> int:
        """KV bytes the request holds when it ends (its prompt and all it generates, as the
        ingress counted them), at the replicas' reported bytes/token."""
        shape = request_shape(pending_request)
        if shape is None:
            return 0
        per_token = max(
            (int((r.routing_stats or {}).get("kv_bytes_per_token", 0)) for r in replicas),
            default=0,
        )
        return shape.kv_bytes(per_token)

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        target = request_target(pending_request)
        if target is not None:
            # That replica or none: while it is not a candidate (starting, gone), Serve backs
            # off and asks again; the caller's timeout ends the wait.
            if pending_request is not None:
                pending_request.routing_context.should_backoff = True
            return [[by_id[target]]] if target in by_id else []
        views = [self._view(rid, r.routing_stats) for rid, r in by_id.items()]
        now = time.time()
        waited = now - pending_request.created_at if pending_request else 0.0
        decision = decide(
            self._user(pending_request),
            views,
            self._ledger,
            self._policy,
            now,
            waited,
            self._request_bytes(pending_request, candidate_replicas),
        )
        if pending_request is not None:
            # Always back off between rounds: with every rank full, retrying at once would spin.
            pending_request.routing_context.should_backoff = True
        return [[by_id[rid] for rid in rank] for rank in decision.ranks]

    def on_request_routed(
        self, pending_request: PendingRequest, replica_id: ReplicaID, result: ReplicaResult
    ) -> None:
        user = self._user(pending_request)
        if user is None:
            return
        replica = self.curr_replicas.get(replica_id)
        view = self._view(replica_id.unique_id, replica.routing_stats if replica else None)
        if user not in view.resident:
            nbytes = self._request_bytes(pending_request, [replica] if replica else [])
            self._ledger.record(
                user, replica_id.unique_id, nbytes or view.new_user_bytes, time.time()
            )
