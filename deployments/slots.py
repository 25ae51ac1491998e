"""How many requests one ingress replica runs at once, in all and per API key.

Serve's proxy lets an ingress replica hold `max_ongoing_requests` requests, and that is also
its actor's concurrency: with every slot held (by stalled bodies, say) the controller's health
check finds none, misses its deadline, and Serve replaces the replica, dropping every stream
on it. The gate therefore admits fewer (`limit`, a few slots below), answering the rest 429 at
once, and caps each key (`per_key`) so one tenant cannot take every slot. Probes (/health,
/ready) are never counted. One event loop uses an instance: no lock.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field


@dataclass
class Slots:
    """Counts requests in flight; `take` says whether one more may start."""

    limit: int | None = None  # requests in flight in all (None: no limit)
    per_key: int | None = None  # requests in flight for one key (None: no limit)
    in_flight: int = 0
    by_key: collections.Counter[str] = field(default_factory=collections.Counter)

    def take(self, key: str | None) -> str | None:
        """Take a slot for a request of `key` (None: auth off, no per-key cap), or return why
        not: "ingress_busy" (every slot taken) or "key_busy" (this key's share taken)."""
        if self.limit is not None and self.in_flight >= self.limit:
            return "ingress_busy"
        if key is not None and self.per_key is not None and self.by_key[key] >= self.per_key:
            return "key_busy"
        self.in_flight += 1
        if key is not None:
            self.by_key[key] += 1
        return None

    def give_back(self, key: str | None) -> None:
        """Release a slot `take` gave (exactly once per successful take)."""
        self.in_flight -= 1
        if key is not None:
            self.by_key[key] -= 1
            if self.by_key[key] <= 0:
                del self.by_key[key]
