"""A user's pages out of this engine and into another one (the paged engine's half of
cache_export.py): the bytes of the user's pages, from whichever tier holds them, in chunks
through the engine's staging ring (staging_ring.py: pinned, allocated once at start).

Copies run outside the engine lock: it is held only to look the user up, to check after the
copy that the user kept the very pages it had (same entry, generation and pages: an idle
user's pages are never written, and pages it still holds were never freed meanwhile, so every
byte copied is the user's), and to register an arrived cache once every byte is in place.
A copy in (cache_import.py) runs into pages set aside for it from the cache's header
(`CacheManager.reserve_import`), chunk by chunk as they arrive, which nobody else reads until
`adopt`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from deployments.config import MOVE_CHUNK_BYTES
from deployments.engine.cache_export import (
    CacheHeader,
    MovableUser,
    Sink,
    UserCacheExport,
    copy_piece,
)
from deployments.engine.paged.cache_import import CacheImports
from deployments.engine.paged.cache_manager import CacheManager, UserKV
from deployments.engine.paged.host_pool import HostKVPool
from deployments.engine.paged.kv_pool import KVPool
from deployments.engine.paged.staging_ring import Run, StagingRing, flat_bytes
from deployments.engine.paged.tier_mover import contiguous_runs


def _held(user: UserKV) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    return user.generation, tuple(user.pages), tuple(user.host_pages)


class CacheTransfer:
    def __init__(
        self,
        lock: threading.Lock,
        cache: CacheManager,
        pool: KVPool,
        host_pool: HostKVPool | None,
        model_name: str,
        keep_free: int = 0,
        chunk_bytes: int = MOVE_CHUNK_BYTES,
    ) -> None:
        """`lock` guards `cache` (the engine's lock); `keep_free`: device pages an import
        leaves free (the engine keeps that many free for the next step); `chunk_bytes`: the
        staging ring's slot size, cut to whole pages and to the larger tier."""
        self._lock, self.cache, self.pool, self.host_pool = lock, cache, pool, host_pool
        self.keep_free = keep_free
        buf = pool.buffer
        self.page_shape = tuple(buf.shape[1:])
        self.page_bytes = buf[0].numel() * buf.element_size()
        self.layout = f"paged:{model_name}:{buf.dtype}:{self.page_shape}"
        largest = max(pool.nbytes, host_pool.nbytes if host_pool is not None else 0)
        pages = max(1, min(chunk_bytes, largest) // self.page_bytes)
        self.ring = StagingRing(buf.device, pages * self.page_bytes)
        self.imports = CacheImports(lock, cache, self.ring, self)

    def tier(self, on_device: bool) -> torch.Tensor:
        """The device or host tier's pages as one flat uint8 tensor."""
        buffer = self.pool.buffer if on_device else self.host_pool.buffer  # type: ignore[union-attr]
        return flat_bytes(buffer)

    def runs(self, pages: list[int]) -> list[Run]:
        """`pages` in order as byte ranges of their tier's flat bytes."""
        ranges = contiguous_runs(pages, list(range(len(pages))))
        return [(s * self.page_bytes, n * self.page_bytes) for s, _, n in ranges]

    def movable(self) -> list[MovableUser]:
        with self._lock:
            return [
                MovableUser(
                    u.key, (len(u.pages) + len(u.host_pages)) * self.page_bytes, bool(u.pages)
                )
                for u in self.cache.movable()
            ]

    def _header(self, user: UserKV) -> CacheHeader:
        """`user`'s header (the engine lock held)."""
        pages = len(user.pages or user.host_pages)
        return CacheHeader(
            user.key,
            user.tenant,
            list(user.token_ids),
            user.kv_len,
            self.layout,
            user.generation,
            pages * self.page_bytes,
            self.ring.slot_bytes,
        )

    def header(self, key: str) -> CacheHeader | None:
        """What `export(key)` would copy now, without its bytes; None when it cannot move."""
        with self._lock:
            user = self.cache.idle(key)
            return None if user is None else self._header(user)

    def export(
        self,
        key: str,
        sink: Sink = copy_piece,
        on_piece: Callable[[int, Any], None] | None = None,
    ) -> UserCacheExport | None:
        """A copy of `key`'s pages, each chunk through `sink` and then `on_piece` (see
        Engine.export_user); None when it cannot move now, or changed while it was copied
        (the caller may try again)."""
        start = time.perf_counter()
        with self._lock:
            user = self.cache.idle(key)
            if user is None:
                return None
            seen, pages = _held(user), list(user.pages or user.host_pages)
            copied = UserCacheExport(**vars(self._header(user)))
        streamed = self.ring.read(self.tier(bool(user.pages)), self.runs(pages), sink, on_piece)
        with self._lock:
            if self.cache.idle(key) is not user or _held(user) != seen:
                return None  # dropped, moved down or ran meanwhile: the bytes may not be its
        copied.hold(streamed.pieces, streamed.sizes)
        copied.copy_s = time.perf_counter() - start
        copied.phases = streamed.times.as_dict("out_")
        return copied

    def forget(self, key: str, generation: int) -> bool:
        with self._lock:
            return self.cache.forget(key, generation)
