"""Prometheus metrics through Ray Serve's metrics API (`ray.serve.metrics`).

Ray exports them on every node's metrics port with a `ray_` prefix (counters also get a
`_total` suffix) and Serve adds `deployment`, `replica` and `application` tags. Names:

- ingress: `grace_serve_time_to_first_token_seconds` (histogram, request arrival to first
  token), `grace_serve_time_per_output_token_seconds` (histogram, mean gap after the first
  token, one observation per request), both tagged `endpoint`; `grace_serve_rejected_requests`
  (error responses, by `reason`) and `grace_serve_failed_streams` (streams that ended in an
  error chunk after their first token, by `reason`).
- replica: counters `grace_serve_prompt_tokens`, `_completion_tokens`, `_cached_prompt_tokens`,
  `_evicted_users`, `_preempted_requests` (and the same totals as gauges `_evicted_users_so_far`,
  `_preempted_requests_so_far`, present before the first event); gauges
  `grace_serve_kv_cache_bytes` (by `tier`), `_free_unified_memory_bytes`, `_resident_users`,
  `_running_requests`, `_waiting_requests`, `_kv_pages_total`, `_kv_pages_free` (the last
  two only from engines that page their KV); users' caches moved between replicas
  (cache_moves.py): counters `grace_serve_cache_moved_users` (by `direction`, out / in),
  `_cache_moved_bytes` (by `direction`), `_cache_move_dropped_users` (let go on shutdown: no
  replica had room, or no time) and `_cache_move_failed` (moves that failed or were undone
  by a racing request), and histogram `grace_serve_cache_move_seconds` (copy out to commit).

Never imports torch or rmm (the ingress uses it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

PREFIX = "grace_serve_"
TTFT_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
MOVE_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30]
# Move counts in a replica report's `cache_moves` -> (counter, its tags).
MOVE_COUNTS = {
    "users_out": ("cache_moved_users", {"direction": "out"}),
    "users_in": ("cache_moved_users", {"direction": "in"}),
    "bytes_out": ("cache_moved_bytes", {"direction": "out"}),
    "bytes_in": ("cache_moved_bytes", {"direction": "in"}),
    "dropped_no_room": ("cache_move_dropped_users", {}),
    "failed": ("cache_move_failed", {}),
    "raced": ("cache_move_failed", {}),
}
TPOT_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.5]


class IngressMetrics:
    """Latency seen by clients, and every refusal by reason."""

    def __init__(self) -> None:
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Seconds from a request's arrival at the ingress to its first generated token.",
            TTFT_BUCKETS,
            tag_keys=("endpoint",),
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean seconds per output token after the first, one observation per request.",
            TPOT_BUCKETS,
            tag_keys=("endpoint",),
        )
        self.rejected = Counter(
            PREFIX + "rejected_requests",
            "Requests refused or failed before their first token, by reason.",
            tag_keys=("reason",),
        )
        self.failed_streams = Counter(
            PREFIX + "failed_streams",
            "Requests that failed after their first token (replica lost, timeout).",
            tag_keys=("reason",),
        )

    def reject(self, reason: str) -> None:
        self.rejected.inc(tags={"reason": reason})

    def request_done(self, endpoint: str, ttft_s: float | None, tpot_s: float | None) -> None:
        if ttft_s is not None:
            self.ttft.observe(ttft_s, tags={"endpoint": endpoint})
        if tpot_s is not None:
            self.tpot.observe(tpot_s, tags={"endpoint": endpoint})


class ReplicaMetrics:
    """Tokens served, memory, users and KV of one LLMReplica."""

    _GAUGES = (
        "free_unified_memory_bytes",
        "resident_users",
        "running_requests",
        "waiting_requests",
        "kv_pages_total",
        "kv_pages_free",
    )

    def __init__(self) -> None:
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens received.")
        self.completion_tokens = Counter(PREFIX + "completion_tokens", "Tokens generated.")
        self.cached_tokens = Counter(
            PREFIX + "cached_prompt_tokens", "Prompt tokens served from a kept KV cache."
        )
        self.evicted = Counter(PREFIX + "evicted_users", "Idle users whose KV cache was dropped.")
        self.preempted = Counter(
            PREFIX + "preempted_requests", "Running requests preempted for memory."
        )
        # Ray counters appear only after a first increment; these gauges carry the same
        # totals from the start, so a dashboard shows 0 rather than "no data".
        self.evicted_so_far = Gauge(
            PREFIX + "evicted_users_so_far", "Idle users evicted since the replica started."
        )
        self.preempted_so_far = Gauge(
            PREFIX + "preempted_requests_so_far", "Requests preempted since the replica started."
        )
        self.kv_bytes = Gauge(
            PREFIX + "kv_cache_bytes", "Bytes of KV cache held, by memory tier.", tag_keys=("tier",)
        )
        self.gauges = {
            name: Gauge(PREFIX + name, f"{name.replace('_', ' ')} of this replica.")
            for name in self._GAUGES
        }
        self._seen: dict[str, int] = {"evicted": 0, "preempted": 0}
        self._tiers: set[str] = set()
        self._moves = {
            name: Counter(PREFIX + name, f"{name.replace('_', ' ')} (cache moves).", tag_keys=tags)
            for name, tags in (
                ("cache_moved_users", ("direction",)),
                ("cache_moved_bytes", ("direction",)),
                ("cache_move_dropped_users", ()),
                ("cache_move_failed", ()),
            )
        }
        self.move_seconds = Histogram(
            PREFIX + "cache_move_seconds",
            "Seconds one user's cache move took, from its copy out to its commit.",
            MOVE_BUCKETS,
        )
        self._moves_seen: dict[str, int] = {}

    def cache_moved(self, seconds: float, nbytes: int) -> None:
        """One user's cache moved out of this replica (its counts come with the report)."""
        self.move_seconds.observe(seconds)

    def _update_moves(self, counts: Mapping[str, Any] | None) -> None:
        for field, (name, tags) in MOVE_COUNTS.items():
            total = int((counts or {}).get(field, 0))
            delta = total - self._moves_seen.get(field, 0)
            if delta > 0:
                self._moves[name].inc(delta, tags=tags or None)
            self._moves_seen[field] = max(total, self._moves_seen.get(field, 0))

    def request_started(self, prompt_tokens: int, cached_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        if cached_tokens:
            self.cached_tokens.inc(cached_tokens)

    def tokens_generated(self, count: int) -> None:
        if count:
            self.completion_tokens.inc(count)

    def _count_delta(self, counter: Counter, name: str, total: int) -> None:
        delta = total - self._seen[name]
        if delta > 0:
            counter.inc(delta)
        self._seen[name] = max(total, self._seen[name])

    def update(self, report: Mapping[str, Any], kv_by_tier: Mapping[str, int]) -> None:
        """Set gauges and advance counters from one replica report (see replica._report)."""
        for name, gauge in self.gauges.items():
            value = report.get(name)
            if isinstance(value, list):
                value = len(value)
            if value is not None:
                gauge.set(float(value))
        for tier in self._tiers - set(kv_by_tier):
            self.kv_bytes.set(0, tags={"tier": tier})  # a tier emptied: say so
        for tier, nbytes in kv_by_tier.items():
            self.kv_bytes.set(float(nbytes), tags={"tier": tier})
        self._tiers |= set(kv_by_tier)
        evicted = int(report.get("evicted_users", 0))
        preempted = int(report.get("preempted_requests", 0))
        self._count_delta(self.evicted, "evicted", evicted)
        self._count_delta(self.preempted, "preempted", preempted)
        self.evicted_so_far.set(evicted)
        self.preempted_so_far.set(preempted)
        self._update_moves(report.get("cache_moves"))
