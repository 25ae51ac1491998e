"""Per-user KV caches kept between requests, under a byte budget (the generic engine's policy).

Each user owns one entry: every token the user's conversation has seen, and an engine-specific
KV object holding the keys and values of a prefix of them. A new request reuses the longest
common prefix of its prompt with those tokens (`kv_reuse.reusable_tokens`, the paged engine's
rule too). When the budget is exceeded, the least recently
used *idle* users are dropped; a user with a running request is never dropped.

Contract:
- ``entry.kv_tokens <= len(entry.token_ids)``: KV exists for a prefix of the recorded tokens;
  the last sampled token is recorded but gets its KV in the next request's prefill.
- ``total_bytes`` equals the sum over entries (resident and anonymous running) of their bytes.
- ``evict_to(budget, requester)`` only drops idle entries, and of those only the ones `shares`
  lets `requester`'s tenant drop; evicting down to the current total is a no-op.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deployments.engine.kv_reuse import reusable_tokens
from deployments.engine.kv_shares import Idle, KVShares, victims


@dataclass(eq=False)
class UserEntry:
    key: str | None  # user key; None for a request whose cache is not kept
    token_ids: list[int] = field(default_factory=list)
    kv: Any = None
    kv_tokens: int = 0
    running: bool = False
    last_used: float = 0.0
    tenant: str = ""  # the API key's id the user belongs to (kv_shares)
    generation: int = 0  # requests acquired so far: an export's copy is current while equal


class UserCacheStore:
    """Who holds which KV cache, how many bytes that is, and who goes when memory is short."""

    def __init__(
        self,
        budget_bytes: int,
        bytes_per_token: int,
        clock: Callable[[], float] = time.monotonic,
        shares: KVShares | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.shares = shares or KVShares()
        self.bytes_per_token = bytes_per_token
        self._clock = clock
        self._users: OrderedDict[str, UserEntry] = OrderedDict()  # least recently used first
        self._anonymous: set[UserEntry] = set()
        self.evicted_users = 0
        # The engine's event loop changes entries; a move to or from another replica runs on
        # the replica's worker threads: every change and every walk holds this lock.
        self.lock = threading.RLock()

    # ---- queries --------------------------------------------------------------------------

    def entry_bytes(self, entry: UserEntry) -> int:
        return entry.kv_tokens * self.bytes_per_token

    @property
    def total_bytes(self) -> int:
        with self.lock:
            entries = list(self._users.values()) + list(self._anonymous)
        return sum(self.entry_bytes(e) for e in entries)

    def resident_keys(self) -> list[str]:
        with self.lock:
            return list(self._users)

    def running_count(self) -> int:
        with self.lock:
            return sum(e.running for e in self._users.values()) + len(self._anonymous)

    def reusable(self, entry: UserEntry, prompt: Sequence[int]) -> int:
        """Prompt tokens whose KV `entry` supplies (kv_reuse.reusable_tokens)."""
        if entry.kv is None:
            return 0
        return reusable_tokens(entry.token_ids, entry.kv_tokens, prompt)

    def is_busy(self, key: str) -> bool:
        entry = self._users.get(key)
        return entry is not None and entry.running

    # ---- lifecycle ------------------------------------------------------------------------

    def acquire(self, key: str | None, tenant: str = "") -> UserEntry:
        """Pin the user's entry (creating it) for one running request.

        A user already running a request, or an anonymous request, gets a private entry that
        is discarded at release: two requests never share one cache.
        """
        with self.lock:
            if key is not None and not self.is_busy(key):
                entry = self._users.pop(key, None) or UserEntry(key, tenant=tenant)
                self._users[key] = entry  # most recently used
                entry.running = True
                entry.last_used = self._clock()
                entry.generation += 1
                return entry
            entry = UserEntry(None, running=True, last_used=self._clock(), tenant=tenant)
            self._anonymous.add(entry)
            return entry

    def record(self, entry: UserEntry, token_ids: list[int], kv: Any, kv_tokens: int) -> None:
        """Note what a running entry holds now (its bytes count toward the total at once)."""
        if kv_tokens > len(token_ids):
            raise ValueError(f"kv_tokens {kv_tokens} > recorded tokens {len(token_ids)}")
        with self.lock:
            entry.token_ids, entry.kv, entry.kv_tokens = token_ids, kv, kv_tokens

    def release(self, entry: UserEntry) -> list[str]:
        """End the entry's request; keep it if it belongs to a user. Returns evicted keys."""
        with self.lock:
            entry.running = False
            entry.last_used = self._clock()
            if entry.key is None:
                self._anonymous.discard(entry)
                entry.kv = None
            else:
                self._users.move_to_end(entry.key)  # most recently used
            return self.evict_to(self.budget_bytes, entry.tenant)

    def reserve(self, new_tokens: int, requester: str = "") -> list[str]:
        """Drop idle users so `new_tokens` more tokens of KV fit the budget, if possible."""
        return self.evict_to(self.budget_bytes - new_tokens * self.bytes_per_token, requester)

    def evict_to(
        self, target_bytes: int, requester: str | None = "", ignore_shares: bool = False
    ) -> list[str]:
        """Drop least recently used idle users until the total is at most `target_bytes`,
        those the shares let `requester`'s tenant drop (all with `ignore_shares`)."""
        with self.lock:
            idle = [
                Idle(key, e.tenant, self.entry_bytes(e), self.entry_bytes(e))
                for key, e in self._users.items()
                if not e.running
            ]
            evicted, _ = victims(
                KVShares() if ignore_shares else self.shares,
                idle,
                self.total_bytes - target_bytes,
                requester,
                self.budget_bytes,
            )
            for key in evicted:
                self.drop(key)
            self.evicted_users += len(evicted)
            return evicted

    def drop(self, key: str) -> bool:
        """Forget an idle user's cache; returns whether there was one to drop."""
        with self.lock:
            entry = self._users.get(key)
            if entry is None or entry.running:
                return False
            del self._users[key]
            entry.kv = None
            return True

    # ---- moves to and from other replicas (engine/cache_export.py) ---------------------------

    def idle(self) -> list[UserEntry]:
        """Idle users holding KV, least recently used first."""
        with self.lock:
            return [e for e in self._users.values() if not e.running and e.kv_tokens]

    def adopt(self, entry: UserEntry) -> bool:
        """Keep an arrived user's entry (most recently used) if it fits the budget as it
        stands (nobody is dropped for it) and the user is not here already."""
        with self.lock:
            fits = self.total_bytes + self.entry_bytes(entry) <= self.budget_bytes
            if entry.key is None or entry.key in self._users or not fits:
                return False
            entry.running, entry.last_used = False, self._clock()
            self._users[entry.key] = entry
            return True

    def forget(self, key: str, generation: int) -> bool:
        """Drop an idle user still of `generation` (a move out committed; not an eviction)."""
        with self.lock:
            entry = self._users.get(key)
            if entry is None or entry.running or entry.generation != generation:
                return False
            return self.drop(key)

    def check_integrity(self) -> None:
        """Raise AssertionError if the store's invariants do not hold (tests call this)."""
        for key, entry in self._users.items():
            assert entry.key == key, f"entry under {key} claims {entry.key}"
            assert 0 <= entry.kv_tokens <= len(entry.token_ids), f"{key}: kv beyond tokens"
            assert entry.kv_tokens == 0 or entry.kv is not None, f"{key}: kv_tokens without kv"
        for entry in self._anonymous:
            assert entry.key is None and entry.running, "anonymous entry not running"
        stamps = [e.last_used for e in self._users.values()]
        assert stamps == sorted(stamps), "LRU order broken"
