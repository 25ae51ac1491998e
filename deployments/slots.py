"""How many requests one ingress replica runs at once, in all and per API key.

Serve's proxy lets an ingress replica hold `max_ongoing_requests` requests, and that is also
its actor's concurrency: with every slot held (by stalled bodies, say) the controller's health
check finds none, misses its deadline, and Serve replaces the replica, dropping every stream
on it. The gate therefore admits fewer (`limit`, a few slots below), answering the rest 429 at
once, and caps each key (`per_key`) so one tenant cannot take every slot. A request takes its
slot once its body is whole; while the body arrives it is one of the `Readers`, a pool of its
own. Probes (/health, /ready) are never counted. One event loop uses an instance: no lock.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
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


READER_GRACE_S = 1.0  # a whole body takes milliseconds: one still arriving after this stalls


@dataclass
class Readers:
    """Requests whose body is still arriving, oldest first, at most `limit` (None: no limit).

    A body that arrives whole takes milliseconds; one that stalls takes until its timeout. When
    the pool is full, a newcomer makes the oldest reader give up at once (its client gets a 408)
    if that one has been reading for `grace_s` or more, so clients that stall cannot keep out
    clients that send: they only push each other out. If even the oldest is younger, the pool is
    full of bodies still in their first second (a burst, not a stall): the newcomer is refused
    instead (a 429 to retry), so a burst of honest clients never pushes itself out.
    """

    limit: int | None = None
    grace_s: float = READER_GRACE_S
    clock: Callable[[], float] = time.monotonic
    _reading: collections.OrderedDict[int, tuple[float, asyncio.Event]] = field(
        default_factory=collections.OrderedDict
    )
    _next: int = 0
    evicted: int = 0  # readers pushed out so far
    refused: int = 0  # newcomers refused while every reader was within its grace

    def enter(self) -> tuple[int, asyncio.Event] | None:
        """Join as the newest reader: a token for `leave` and an event set if pushed out;
        None when the pool is full and no reader is old enough to push out."""
        now = self.clock()
        if self.limit is not None and len(self._reading) >= self.limit:
            since, oldest = next(iter(self._reading.values()))
            if now - since < self.grace_s:
                self.refused += 1
                return None
            self._reading.popitem(last=False)
            oldest.set()
            self.evicted += 1
        self._next += 1
        pushed = asyncio.Event()
        self._reading[self._next] = (now, pushed)
        return self._next, pushed

    def leave(self, token: int) -> None:
        self._reading.pop(token, None)

    def __len__(self) -> int:
        return len(self._reading)
