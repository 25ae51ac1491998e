"""What one run measures, with the definitions the JSON and the README quote."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from benchmarks.routing_sim.cluster import Cluster
from benchmarks.routing_sim.workload import KV_BYTES_PER_TOKEN, WEIGHTS_BYTES, GiB

DEFINITIONS: dict[str, str] = {
    "returning_requests": "requests of a conversation's second or later turn",
    "served_from_kept_cache": "share of returning requests routed to a replica that still holds "
    "a KV cache of that user (the request then prefills only tokens beyond that cache)",
    "served_from_kept_cache_when_kept": "the same share, counting only returning requests "
    "whose user still has a cache on some live replica when routed (misses the router "
    "could have avoided)",
    "cache_kept": "share of returning requests whose user still has a cache on some replica",
    "cached_token_fraction": "prompt tokens served from a kept cache / all prompt tokens, over "
    "returning requests",
    "users_admitted_before_first_eviction": "new users placed (first request served) before any "
    "replica first dropped a cache",
    "evictions": "caches dropped by a replica's LRU eviction to fit its KV budget (a replica "
    "leaving is not counted)",
    "evictions_of_live_users": "evictions of users whose conversation had turns to come",
    "free_kv_share_spread": "at every stats period of the run (the first request to the "
    "last): max minus min over live replicas of (KV budget - KV bytes) / KV budget, the "
    "share of each replica's cache memory still free; p50, p95 and max over the periods",
    "free_kv_share_spread_while_evicting": "the same, over the periods from the first "
    "eviction on (while some replica has had to drop caches)",
    "free_unified_share_spread": "as free_kv_share_spread, of free unified memory / (limit - "
    "weights): what replicas report as free, including memory beyond their KV budgets",
    "overflow_requests": "requests whose replica stayed over its KV budget after dropping "
    "every idle user (the engine would answer 503)",
    "load": "KV bytes of every conversation at its end (what keeping every cache would take) / "
    "the sum of the replicas' KV budgets; above 1, some eviction is unavoidable",
    "moves": "for one replica leaving or joining: every user with a conversation under way and "
    "a cache on some replica at that moment is tracked to its next request. stayed: routed "
    "to a replica still holding its cache; moved_needless: routed elsewhere although such "
    "a replica was alive; moved_must: its cache was on the replica that left (and on no "
    "other); cache_evicted_meanwhile: its cache was dropped before it came back",
}


SPREADS = (
    "free_kv_share_spread",
    "free_kv_share_spread_while_evicting",
    "free_unified_share_spread",
)


def _quantiles(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"p50": None, "p95": None, "max": None, "samples": 0}
    ordered = sorted(samples)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 4)  # noqa: E731
    return {
        "p50": pick(0.5),
        "p95": pick(0.95),
        "max": round(ordered[-1], 4),
        "samples": len(ordered),
    }


@dataclass
class Recorder:
    """Counts as the simulation runs; `summary()` turns them into the reported figures."""

    requests: int = 0
    new_users: int = 0
    returning: int = 0
    hits: int = 0
    kept: int = 0
    hits_when_kept: int = 0
    returning_prompt_tokens: int = 0
    returning_cached_tokens: int = 0
    evictions: int = 0
    evicted_tokens: int = 0
    evictions_of_live_users: int = 0
    first_eviction_at: float | None = None
    admitted_before_first_eviction: int = 0
    overflow_requests: int = 0
    lost_on_leave: int = 0
    spreads: dict[str, list[float]] = field(default_factory=lambda: {key: [] for key in SPREADS})
    timeline: list[dict[str, float]] = field(default_factory=list)

    def request(
        self, turn_index: int, holders_before: set[str], chosen: str, prompt: int, cached: int
    ) -> None:
        self.requests += 1
        if turn_index == 0:
            self.new_users += 1
            return
        self.returning += 1
        self.returning_prompt_tokens += prompt
        self.returning_cached_tokens += cached
        hit = chosen in holders_before
        self.hits += hit
        if holders_before:
            self.kept += 1
            self.hits_when_kept += hit

    def evicted(self, now: float, tokens: int, live: bool) -> None:
        if self.first_eviction_at is None:
            self.first_eviction_at = now
        self.evictions += 1
        self.evicted_tokens += tokens
        self.evictions_of_live_users += live

    def sample(self, cluster: Cluster, now: float, every_s: float = 60.0) -> None:
        """At a stats period: the spreads of free memory, and the timeline every `every_s`."""
        replicas = list(cluster.replicas.values())
        share = [r.kv_room_bytes / r.node.kv_budget_bytes for r in replicas]
        unified = [r.free_unified_bytes / (r.node.limit_bytes - WEIGHTS_BYTES) for r in replicas]
        self.spreads["free_kv_share_spread"].append(max(share) - min(share))
        if self.first_eviction_at is not None:
            self.spreads["free_kv_share_spread_while_evicting"].append(max(share) - min(share))
        self.spreads["free_unified_share_spread"].append(max(unified) - min(unified))
        if not self.timeline or now - self.timeline[-1]["t"] >= every_s:
            self.timeline.append(
                {
                    "t": round(now, 1),
                    "min": round(min(share), 4),
                    "mean": round(sum(share) / len(share), 4),
                    "max": round(max(share), 4),
                }
            )

    def summary(self) -> dict[str, Any]:
        ratio = lambda a, b: round(a / b, 5) if b else None  # noqa: E731
        return {
            "requests": self.requests,
            "new_users": self.new_users,
            "returning_requests": self.returning,
            "served_from_kept_cache": ratio(self.hits, self.returning),
            "served_from_kept_cache_when_kept": ratio(self.hits_when_kept, self.kept),
            "cache_kept": ratio(self.kept, self.returning),
            "cached_token_fraction": ratio(
                self.returning_cached_tokens, self.returning_prompt_tokens
            ),
            "users_admitted_before_first_eviction": self.admitted_before_first_eviction,
            "first_eviction_at_s": (
                round(self.first_eviction_at, 1) if self.first_eviction_at is not None else None
            ),
            "evictions": self.evictions,
            "evicted_gib": round(self.evicted_tokens * KV_BYTES_PER_TOKEN / GiB, 1),
            "evictions_of_live_users": self.evictions_of_live_users,
            **{key: _quantiles(samples) for key, samples in self.spreads.items()},
            "overflow_requests": self.overflow_requests,
            "caches_lost_on_leave": self.lost_on_leave,
        }
