"""Imports in pieces for an engine that copies a cache in only once it has all of it (the
generic engine): each ticket's arriving pieces are held, by position, until `take` lays them
end to end. The simplest form of the Engine's begin/import_chunks/finish/cancel_import.
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass, field

import numpy as np

from deployments.engine.cache_export import CacheHeader


@dataclass(eq=False)
class Held:
    header: CacheHeader
    pieces: dict[int, list[np.ndarray]] = field(default_factory=dict)  # byte offset -> pieces


class HeldImports:
    def __init__(self) -> None:
        self._lock = threading.Lock()  # calls come from several threads
        self._open: dict[int, Held] = {}
        self._tickets = itertools.count(1)

    def arriving(self, key: str) -> bool:
        with self._lock:
            return any(h.header.key == key for h in self._open.values())

    def begin(self, header: CacheHeader) -> int:
        with self._lock:
            ticket = next(self._tickets)
            self._open[ticket] = Held(header)
            return ticket

    def add(self, ticket: int, first: int, pieces: list[np.ndarray]) -> None:
        """Hold `pieces` as the bytes from chunk `first` on. KeyError: unknown ticket."""
        with self._lock:
            held = self._open[ticket]
            held.pieces[first * held.header.chunk_bytes] = list(pieces)

    def take(self, ticket: int) -> tuple[CacheHeader, np.ndarray]:
        """Close the ticket: its header and every byte, in order. KeyError: unknown ticket;
        ValueError: bytes missing or overlapping."""
        with self._lock:
            held = self._open.pop(ticket)
        parts, at = [], 0
        for offset in sorted(held.pieces):
            if offset != at:
                raise ValueError(f"the import of {held.header.key!r} lacks bytes at {at}")
            parts += held.pieces[offset]
            at += sum(p.nbytes for p in held.pieces[offset])
        if at != held.header.nbytes:
            raise ValueError(f"{at} bytes arrived for a {held.header.nbytes}-byte cache")
        data = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return held.header, data

    def cancel(self, ticket: int) -> bool:
        with self._lock:
            return self._open.pop(ticket, None) is not None
