"""A user's cache arriving in this paged engine in chunks (the receiving half of a pipelined
move, cache_export.py): pages set aside from the header, bytes written into them by position
as chunks arrive, in any order, the user registered only once every byte is in place.

Invariants:
- a reservation's pages belong to its import (`CacheManager.reserve_import`) until `finish`
  gives them to the user or `cancel` frees them; nobody else reads or writes them meanwhile;
- writes run one at a time per engine (`_writing`: the staging ring is one), and `cancel`
  and `finish` take the same lock, so no page is freed or handed out while a copy into it
  runs;
- a write covers stream bytes [offset, offset + its bytes) of the user's pages in order
  (staging_ring.slice_runs), so chunks may arrive in any order, or twice.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from deployments.engine.cache_export import CacheHeader
from deployments.engine.paged.cache_manager import CacheManager, Import
from deployments.engine.paged.staging_ring import Run, StagingRing, slice_runs

if TYPE_CHECKING:
    from deployments.engine.paged.cache_transfer import CacheTransfer


@dataclass(eq=False)
class Incoming:
    """One import in progress: what arrives, where it lands, which bytes are there."""

    header: CacheHeader
    reserved: Import
    on_device: bool  # the reservation's tier
    runs: list[Run]  # the reserved pages in order, as byte ranges of their tier
    written: list[Run] = field(default_factory=list)  # stream byte ranges in place

    def complete(self) -> bool:
        """Whether the written ranges cover every byte of the cache."""
        end = 0
        for start, n in sorted(self.written):
            if start > end:
                return False
            end = max(end, start + n)
        return end >= self.header.nbytes


class CacheImports:
    def __init__(
        self, lock: threading.Lock, cache: CacheManager, ring: StagingRing, tiers: CacheTransfer
    ) -> None:
        """`lock` guards `cache` (the engine's lock); `ring` stages the copies in; `tiers`
        (its `tier`, `runs`, `page_bytes`, `layout`, `keep_free`) says where pages live."""
        self._lock, self.cache, self.ring, self._tiers = lock, cache, ring, tiers
        self._writing = threading.Lock()  # one write at a time; cancel/finish wait for it
        self._open: dict[int, Incoming] = {}
        self._tickets = itertools.count(1)

    def begin(self, header: CacheHeader) -> int | None:
        """Reserve free pages for `header`'s cache: a ticket, or None (no room, or the user
        is here already). LayoutMismatch / ValueError for a cache that cannot fit here."""
        t = self._tiers
        header.check(t.layout)
        n = self.cache.kept_pages(header.kv_len)  # all lanes (chunk_window.py)
        if header.nbytes != n * t.page_bytes:
            raise ValueError(f"{header.nbytes} bytes for {n} pages of {t.page_bytes}")
        with self._lock:
            if header.key in self.cache.users() or any(
                i.header.key == header.key for i in self._open.values()
            ):
                return None
            reserved = self.cache.reserve_import(n, t.keep_free)
            if reserved is None:
                return None
            ticket = next(self._tickets)
            on_device = bool(reserved.pages)
            runs = t.runs(reserved.pages or reserved.host_pages)
            self._open[ticket] = Incoming(header, reserved, on_device, runs)
        return ticket

    def write(self, ticket: int, first: int, pieces: list[np.ndarray]) -> dict[str, float]:
        """Copy `pieces`, laid end to end, into the ticket's pages from chunk `first` on
        (stream byte first * chunk_bytes); returns once they are in place: the copy's seconds
        by phase (`in_` keys) and when it ran (`began`, `ended`: time.time()). KeyError for
        an unknown ticket, ValueError for bytes outside the cache."""
        nbytes = sum(p.nbytes for p in pieces)
        with self._writing:
            with self._lock:
                incoming = self._open[ticket]
            offset = first * incoming.header.chunk_bytes
            if first < 0 or (first and not incoming.header.chunk_bytes):
                raise ValueError(f"chunk {first} of a cache without a chunk size")
            if offset + nbytes > incoming.header.nbytes:
                raise ValueError(
                    f"bytes [{offset}, {offset + nbytes}) of a {incoming.header.nbytes}-byte cache"
                )
            began = time.time()
            dst = self._tiers.tier(incoming.on_device)
            times = self.ring.write(pieces, dst, slice_runs(incoming.runs, offset, offset + nbytes))
            incoming.written.append((offset, nbytes))
            return {**times.as_dict("in_"), "began": began, "ended": time.time()}

    def finish(self, ticket: int) -> int | None:
        """Register the user once every byte is in place: its generation, or None (pages
        freed) if it appeared here meanwhile. KeyError for an unknown ticket; ValueError
        (import cancelled) if bytes are missing."""
        with self._writing, self._lock:
            incoming = self._open.pop(ticket)
            h = incoming.header
            if not incoming.complete():
                self.cache.cancel_import(incoming.reserved)
                raise ValueError(f"the import of {h.key!r} lacks bytes: cancelled")
            return self.cache.adopt(h.key, h.tenant, h.token_ids, h.kv_len, incoming.reserved)

    def cancel(self, ticket: int) -> bool:
        """Free the ticket's pages (after any write into them ends); False if it is not open."""
        with self._writing, self._lock:
            incoming = self._open.pop(ticket, None)
            if incoming is not None:
                self.cache.cancel_import(incoming.reserved)
            return incoming is not None
