"""Per-tenant shares of a replica's KV memory: whose idle caches a request may drop.

A tenant is the API key a user belongs to (`auth.tenant_of`; "" for every user when auth is
off). Without shares, a request may drop any idle user's kept cache, least recently used first,
so one key's flood of new users can evict every other key's users. With a share `fraction`,
each tenant holding no more than `fraction` of the replica's KV memory in kept caches is safe
from other tenants: a request may drop an idle user of its own tenant, or of a tenant holding
more than its share, and no other. Both engines' caches (the paged engine's pages, the generic
engine's bytes) ask this one rule.

When the fractions of all keys add up to more than 1, the guarantee holds for the keys that
claimed their share first. An engine that cannot make room any other way and has nothing
running that will free memory may override the rule (and counts it), so no request waits
forever for memory that no one will release.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

BACKGROUND: str | None = None  # the requester of room made between steps: nobody's own users


@dataclass(frozen=True)
class KVShares:
    """The rule; `fraction` None means no shares (plain least-recently-used eviction)."""

    fraction: float | None = None

    def __post_init__(self) -> None:
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"a KV share must be in (0, 1], not {self.fraction}")

    @property
    def enabled(self) -> bool:
        return self.fraction is not None

    def guaranteed(self, total: int) -> int:
        """Units (pages or bytes) of `total` that each tenant keeps against other tenants."""
        return int(total * self.fraction) if self.fraction is not None else 0

    def may_evict(
        self, victim: str, requester: str | None, held: Mapping[str, int], total: int
    ) -> bool:
        """Whether a request of `requester` may drop an idle user of tenant `victim`, given
        the units each tenant's kept caches hold now (`held`) out of `total`."""
        if self.fraction is None or victim == requester:
            return True
        return held.get(victim, 0) > self.guaranteed(total)


@dataclass(frozen=True)
class Idle:
    """An idle user as the victim choice sees it: what dropping it frees of the units asked
    for (None: not a candidate) and all it holds toward its tenant's share."""

    key: str
    tenant: str
    frees: int | None
    holds: int


def victims(
    shares: KVShares, idle: Iterable[Idle], need: int, requester: str | None, total: int
) -> tuple[list[str], bool]:
    """Idle users, least recently used first (`idle` in that order), whose drops free `need`
    units, each one the shares let `requester` drop once the earlier ones are gone; and
    whether they free all of it. The one walk both engines' caches use."""
    idle = list(idle)
    held = held_by_tenant((u.tenant, u.holds) for u in idle) if shares.enabled else {}
    keys: list[str] = []
    for user in idle:
        if need <= 0:
            break
        if user.frees is None or not shares.may_evict(user.tenant, requester, held, total):
            continue
        keys.append(user.key)
        need -= user.frees
        held[user.tenant] = held.get(user.tenant, 0) - user.holds
    return keys, need <= 0


def held_by_tenant(entries: Iterable[tuple[str, int]]) -> dict[str, int]:
    """Sum (tenant, units) pairs per tenant."""
    held: dict[str, int] = {}
    for tenant, units in entries:
        held[tenant] = held.get(tenant, 0) + units
    return held
