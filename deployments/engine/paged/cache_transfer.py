"""A user's pages out of this engine and into another one (the paged engine's half of
cache_export.py): one contiguous buffer of the user's pages, from whichever tier holds them.

Copies run outside the engine lock wherever they can: the lock is held only to look the user
up, to enqueue the device-to-host copies (an idle user's pages are never written, and a page
freed later is reused only by work queued after this copy on the same stream), and to
register an arrived cache once every byte is in place. A copy out of the host tier (pinned
host memory) runs under the lock; a copy in runs into pages set aside for it
(`CacheManager.reserve_import`), which nobody else reads until `adopt`.
"""

from __future__ import annotations

import threading
import time

import torch

from deployments.engine.cache_export import (
    MovableUser,
    UserCacheExport,
    as_bytes,
    from_bytes,
)
from deployments.engine.paged.cache_manager import CacheManager, UserKV
from deployments.engine.paged.host_pool import HostKVPool
from deployments.engine.paged.kv_pool import KVPool
from deployments.engine.paged.tier_mover import contiguous_runs


class CacheTransfer:
    def __init__(
        self,
        lock: threading.Lock,
        cache: CacheManager,
        pool: KVPool,
        host_pool: HostKVPool | None,
        model_name: str,
        keep_free: int = 0,
    ) -> None:
        """`lock` guards `cache` (the engine's lock); `keep_free`: device pages an import
        leaves free (the engine keeps that many free for the next step)."""
        self._lock, self.cache, self.pool, self.host_pool = lock, cache, pool, host_pool
        self.keep_free = keep_free
        buf = pool.buffer
        self.page_shape = tuple(buf.shape[1:])
        self.layout = f"paged:{model_name}:{buf.dtype}:{self.page_shape}"

    def _tier(self, on_device: bool) -> torch.Tensor:
        return self.pool.buffer if on_device else self.host_pool.buffer  # type: ignore[union-attr]

    def movable(self) -> list[MovableUser]:
        with self._lock:
            page = self.pool.buffer[0].numel() * self.pool.buffer.element_size()
            return [
                MovableUser(u.key, (len(u.pages) + len(u.host_pages)) * page, bool(u.pages))
                for u in self.cache.movable()
            ]

    def export(self, key: str) -> UserCacheExport | None:
        """A copy of `key`'s pages (see module docstring); None when it cannot move now."""
        start = time.perf_counter()
        with self._lock:
            user = self.cache.idle(key)
            if user is None:
                return None
            seen = (user.generation, len(user.pages), len(user.host_pages))
        # Allocated outside the lock: pinning GiBs of host memory takes a while.
        src = self._tier(bool(user.pages))
        n = seen[1] or seen[2]
        out = torch.empty((n, *self.page_shape), dtype=src.dtype, pin_memory=src.is_cuda)
        staged = time.perf_counter() - start
        with self._lock:
            user = self.cache.idle(key)
            if user is None or (user.generation, len(user.pages), len(user.host_pages)) != seen:
                return None  # it changed meanwhile: the caller may try again
            done = self._copy_out(user, out)
            copied = UserCacheExport(
                key, user.tenant, list(user.token_ids), user.kv_len, self.layout
            )
            copied.generation = user.generation
        if done is not None:
            done.synchronize()
        copied.buffers = [as_bytes(out)]
        copied.copy_s, copied.stage_s = time.perf_counter() - start, staged
        return copied

    def _copy_out(self, user: UserKV, out: torch.Tensor) -> torch.cuda.Event | None:
        """Enqueue the copies of `user`'s pages into `out` (under the lock); the event to wait
        for on a GPU (None: done)."""
        src = self._tier(bool(user.pages))
        pages = user.pages or user.host_pages
        for s, d, n in contiguous_runs(pages, list(range(len(pages)))):
            out[d : d + n].copy_(src[s : s + n], non_blocking=src.is_cuda)
        if not src.is_cuda:
            return None
        event = torch.cuda.Event()
        event.record()
        return event

    def import_(self, export: UserCacheExport) -> int | None:
        """Adopt `export` into free pages (see Engine.import_user)."""
        export.check(self.layout)
        n = self.cache.kept_pages(export.kv_len)  # all lanes (chunk_window.py)
        if len(export.buffers) != 1:
            raise ValueError(f"a paged export has one buffer, not {len(export.buffers)}")
        data = from_bytes(export.buffers[0], self.pool.buffer.dtype, (n, *self.page_shape))
        with self._lock:
            if export.key in self.cache.users():
                return None
            reserved = self.cache.reserve_import(n, self.keep_free)
        if reserved is None:
            return None
        try:
            dst = self._tier(bool(reserved.pages))
            pages = reserved.pages or reserved.host_pages
            for s, d, run in contiguous_runs(list(range(n)), pages):
                dst[d : d + run].copy_(data[s : s + run])
            if dst.is_cuda:
                torch.cuda.current_stream().synchronize()  # in place before anyone reads it
        except BaseException:
            with self._lock:
                self.cache.cancel_import(reserved)
            raise
        with self._lock:
            return self.cache.adopt(
                export.key, export.tenant, export.token_ids, export.kv_len, reserved
            )

    def forget(self, key: str, generation: int) -> bool:
        with self._lock:
            return self.cache.forget(key, generation)
