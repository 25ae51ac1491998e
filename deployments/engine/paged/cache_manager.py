"""Who owns which KV pages: free pages, idle users' kept caches, running sequences, and pages
in flight between the device tier and an optional host tier.

Policy only (the storage is `KVPool` and `HostKVPool`; copies are the engine's `TierMover`).
Pages are never shared: an idle user's cache belongs to that user alone, and a running sequence
holds its own pages (a user's pages move to the sequence serving it and back when it ends).

Tiers. An idle user's cache lives in device pages or, with a host tier, in host pages. When
device pages run short, `start_offload` moves the least recently used idle user down (dropping
the least recently used host-resident users if the host tier is full); a returning user's cache
comes back up at `checkout`. A move's source pages stay reserved until the engine reports the
copy done (`complete`); copies run in order on one stream, so a page freed by one move may be
written by the next.

Contract:
- every device page is in exactly one place: the free list, one idle user, one running or
  admitted sequence, the source of a move down, or an import from another replica; every
  host page likewise: the host free list, one idle user, the source of a move up, or an import;
- ``can_allocate(n)`` is true iff ``allocate(n)`` succeeds; ``allocate`` never evicts;
- ``evict_lru_idle(requester)`` drops the least recently used idle user holding device pages
  that `shares` lets `requester`'s tenant drop, or returns None; host-tier drops follow the
  same rule; users whose request is running are never evicted or moved;
- ``check_integrity(running)`` raises AssertionError when any of this does not hold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from deployments.engine.kv_reuse import reusable_tokens
from deployments.engine.kv_shares import Idle, KVShares, victims
from deployments.engine.paged.chunk_window import ChunkWindow


@dataclass(eq=False)
class UserKV:
    """A user's kept cache: every token the conversation has seen; KV for a prefix of them."""

    key: str
    token_ids: list[int] = field(default_factory=list)
    kv_len: int = 0  # positions [0, kv_len) have keys and values in `pages` or `host_pages`
    # Flat over lanes (ChunkWindow.flatten): every block's full-layer page, then each chunked
    # lane's pages of its current chunk.
    pages: list[int] = field(default_factory=list)  # device tier
    host_pages: list[int] = field(default_factory=list)  # host tier
    busy: bool = False  # a running sequence holds this user's pages
    tenant: str = ""  # the API key's id the user belongs to (kv_shares)
    generation: int = 0  # requests checked out so far: an export's copy is current while equal


@dataclass(eq=False)
class Move:
    """Pages in flight between tiers: `src` is read by the copy, then freed by `complete`."""

    key: str
    src: list[int]
    dst: list[int]
    down: bool  # device -> host; else host -> device
    handle: Any = None  # the mover's completion handle


@dataclass(eq=False)
class Import:
    """Free pages set aside for a user's cache arriving from another replica: owned by the
    import until `adopt` gives them to the user or `cancel_import` frees them."""

    pages: list[int] = field(default_factory=list)  # device tier
    host_pages: list[int] = field(default_factory=list)  # host tier


@dataclass(frozen=True)
class Reuse:
    """What a new request of a user gets from its kept cache."""

    pages: list[int]  # every block's full-layer page
    tokens: int  # prompt tokens whose KV is already in the pages (or on its way up)
    private: bool  # the user was busy: this request's cache is not kept
    restore: Move | None = None  # the copy up that must finish before the pages are read
    chunk_pages: tuple[list[int], ...] = ()  # chunked lanes' pages of blocks chunk_base on
    chunk_base: int = 0


class CacheManager:
    def __init__(
        self,
        num_pages: int,
        page_size: int,
        reserved: int = 0,
        host_pages: int = 0,
        shares: KVShares | None = None,
        window: ChunkWindow | None = None,
    ) -> None:
        """Pages [0, reserved) are never handed out (page 0: scratch for padding rows);
        `shares` says whose idle users a tenant's request may drop (default: anyone's);
        `window`: the chunked-attention lanes' pages (default: none, one lane)."""
        self.num_pages = num_pages
        self.page_size = page_size
        self.window = window or ChunkWindow(page_size=page_size)
        self.reserved = reserved
        self.host_pages_total = host_pages
        self._free: list[int] = list(range(num_pages - 1, reserved - 1, -1))  # low ids first
        self._host_free: list[int] = list(range(host_pages - 1, -1, -1))
        self._users: OrderedDict[str, UserKV] = OrderedDict()  # least recently used first
        self.moves: list[Move] = []  # in flight
        self.imports: list[Import] = []  # pages being filled from another replica
        self.shares = shares or KVShares()
        self.evicted_users = 0
        self.share_overrides = 0  # drops the shares forbade, made so a request could run
        self.offloaded_users = 0
        self.restored_users = 0

    # ---- pages ----------------------------------------------------------------------------

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def kept_pages(self, kv_len: int) -> int:
        """Pages a kept cache of `kv_len` tokens holds (all lanes: ChunkWindow.kept_pages)."""
        return self.window.kept_pages(kv_len)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def usable_pages(self) -> int:
        return self.num_pages - self.reserved

    @property
    def host_free_pages(self) -> int:
        return len(self._host_free)

    def host_used_pages(self) -> int:
        return self.host_pages_total - len(self._host_free)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise MemoryError(f"{n} KV pages asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: Iterable[int]) -> None:
        self._free.extend(pages)

    def draining_pages(self) -> int:
        """Device pages a move down will free when its copy completes."""
        return sum(len(m.src) for m in self.moves if m.down)

    # ---- users ----------------------------------------------------------------------------

    def users(self) -> list[str]:
        return list(self._users)

    def restore_cost(self, key: str | None, prompt: Sequence[int]) -> int:
        """Device pages `checkout` will take to bring this user's cache up from the host."""
        user = self._users.get(key) if key is not None else None
        if user is None or user.busy or not user.host_pages:
            return 0
        tokens = self._reusable(user, prompt)
        return len(self.window.keep(user.host_pages, user.kv_len, tokens)[0])

    def _reusable(self, user: UserKV, prompt: Sequence[int]) -> int:
        tokens = reusable_tokens(user.token_ids, user.kv_len, prompt)  # the generic store's too
        return self.window.reusable(tokens, user.kv_len)

    def checkout(self, key: str | None, prompt: Sequence[int], tenant: str = "") -> Reuse:
        """Hand a new request of `key` its kept pages, trimmed to what its prompt reuses.

        A host-resident cache comes back into freshly allocated device pages (the caller makes
        room first: see `restore_cost`); the returned `restore` move must complete before the
        pages are read.
        """
        if key is None:
            return Reuse([], 0, private=True)
        user = self._users.get(key)
        if user is not None and user.busy:
            return Reuse([], 0, private=True)
        if user is None:
            user = self._users[key] = UserKV(key, tenant=tenant)
        self._users.move_to_end(key)
        tokens = self._reusable(user, prompt)
        restore = None
        if user.host_pages:
            keep, dropped = self.window.keep(user.host_pages, user.kv_len, tokens)
            self._host_free.extend(dropped)
            if keep:
                restore = Move(key, keep, self.allocate(len(keep)), down=False)
                self.moves.append(restore)
                self.restored_users += 1
            pages = restore.dst if restore else []
        else:
            pages, dropped = self.window.keep(user.pages, user.kv_len, tokens)
            self.free(dropped)
        user.pages, user.host_pages, user.kv_len, user.busy = [], [], 0, True
        user.generation += 1
        full, lanes, base = self.window.split(pages, tokens)
        return Reuse(full, tokens, False, restore, tuple(lanes), base)

    def checkin(
        self,
        key: str,
        token_ids: list[int],
        kv_len: int,
        pages: list[int],
        chunk_pages: Sequence[list[int]] = (),
        chunk_base: int = 0,
    ) -> None:
        """A user's request ended: keep its pages as the user's cache (most recently used):
        `pages` of every block, and the chunked lanes' (blocks `chunk_base` on) of its
        current chunk; the rest are freed."""
        user = self._users[key]
        blocks, start = self.pages_for(kv_len), self.window.start(kv_len)
        lanes = list(chunk_pages) or [[] for _ in range(self.window.lanes)]
        if (
            kv_len > len(token_ids)
            or blocks > len(pages)
            or len(lanes) != self.window.lanes
            or (
                self.window.lanes
                and blocks > start
                and not chunk_base <= start < blocks <= chunk_base + len(lanes[0])
            )
        ):
            raise ValueError("a kept cache must cover exactly its kv_len tokens")
        kept = [lane[start - chunk_base : blocks - chunk_base] for lane in lanes]
        flat = self.window.flatten(pages[:blocks], kept)
        held = set(flat)
        self.free([p for p in [*pages, *(p for lane in lanes for p in lane)] if p not in held])
        if kv_len == 0:  # nothing computed (ended at once): nothing to keep
            del self._users[key]
            return
        user.token_ids, user.kv_len, user.pages, user.busy = token_ids, kv_len, flat, False
        self._users.move_to_end(key)

    def evict_lru_idle(self, requester: str | None = "", override: bool = False) -> str | None:
        """Drop the least recently used idle user holding device pages that `requester`'s
        tenant may drop (`override`: any, counted in `share_overrides`); None if none."""
        keys = self._victims(lambda u: len(u.pages), 1, requester)
        if keys is None and override:
            keys = self._victims(lambda u: len(u.pages), 1, None, ignore_shares=True)
            self.share_overrides += keys is not None
        if keys is None:
            return None
        self._drop(keys[0])
        return keys[0]

    def _victims(
        self,
        pages_of: Callable[[UserKV], int],
        need: int,
        requester: str | None,
        ignore_shares: bool = False,
    ) -> list[str] | None:
        """Idle users, least recently used first, whose drops free at least `need` of the
        pages `pages_of` counts, each one the shares let `requester` drop once the earlier
        ones are gone (kv_shares.victims); None when no such choice frees enough."""
        idle = (
            Idle(u.key, u.tenant, pages_of(u) or None, len(u.pages) + len(u.host_pages))
            for u in self._users.values()
            if not u.busy
        )
        keys, enough = victims(
            KVShares() if ignore_shares else self.shares,
            idle,
            need,
            requester,
            self.usable_pages + self.host_pages_total,
        )
        return keys if enough else None

    def _drop(self, key: str) -> None:
        user = self._users.pop(key)
        self.free(user.pages)
        self._host_free.extend(user.host_pages)
        self.evicted_users += 1

    # ---- the host tier ----------------------------------------------------------------------

    def start_offload(self, requester: str | None = "") -> Move | None:
        """Move the least recently used idle device-resident user down to host pages.

        Drops least recently used host-resident users when the host tier is full, those the
        shares let `requester`'s tenant drop. None when there is no host tier, no idle user on
        the device, its cache exceeds the host tier, or the host tier cannot make room.
        """
        user = next((u for u in self._users.values() if not u.busy and u.pages), None)
        if user is None or len(user.pages) > self.host_pages_total:
            return None
        short = len(user.pages) - len(self._host_free)
        victims = self._victims(lambda u: len(u.host_pages), short, requester)
        if victims is None:
            return None
        for key in victims:
            self._drop(key)
        dst = [self._host_free.pop() for _ in range(len(user.pages))]
        move = Move(user.key, user.pages, dst, down=True)
        user.pages, user.host_pages = [], dst
        self.moves.append(move)
        self.offloaded_users += 1
        return move

    def complete(self, move: Move) -> None:
        """A move's copy finished: its source pages are free again."""
        self.moves.remove(move)
        if move.down:
            self.free(move.src)
        else:
            self._host_free.extend(move.src)

    # ---- moving users to and from other replicas (cache_export.py) ---------------------------

    def idle(self, key: str) -> UserKV | None:
        """`key`'s kept cache if it could be copied out now: idle, holding pages, and not
        moving between tiers."""
        user = self._users.get(key)
        if user is None or user.busy or not (user.pages or user.host_pages):
            return None
        return None if any(m.key == key for m in self.moves) else user

    def movable(self) -> list[UserKV]:
        """Every user `idle` would hand out, least recently used first."""
        moving = {m.key for m in self.moves}
        return [
            u
            for u in self._users.values()
            if not u.busy and (u.pages or u.host_pages) and u.key not in moving
        ]

    def reserve_import(self, n: int, keep_free: int = 0) -> Import | None:
        """Set aside `n` free pages for an arriving cache: device pages while `keep_free`
        stay free besides, else host pages; None when neither tier has them free (nobody is
        dropped or moved for an import)."""
        if self.free_pages - n >= keep_free:
            reserved = Import(pages=self.allocate(n))
        elif len(self._host_free) >= n:
            reserved = Import(host_pages=[self._host_free.pop() for _ in range(n)])
        else:
            return None
        self.imports.append(reserved)
        return reserved

    def cancel_import(self, reserved: Import) -> None:
        self.imports.remove(reserved)
        self.free(reserved.pages)
        self._host_free.extend(reserved.host_pages)

    def adopt(
        self, key: str, tenant: str, token_ids: list[int], kv_len: int, reserved: Import
    ) -> int | None:
        """The reserved pages, now filled, become `key`'s idle cache (most recently used);
        its generation, or None (pages freed) if the user appeared here meanwhile."""
        if key in self._users:
            self.cancel_import(reserved)
            return None
        if self.kept_pages(kv_len) != len(reserved.pages) + len(reserved.host_pages):
            self.cancel_import(reserved)
            raise ValueError(f"{kv_len} KV tokens do not fill the reserved pages")
        self.imports.remove(reserved)
        self._users[key] = UserKV(
            key, list(token_ids), kv_len, reserved.pages, reserved.host_pages, tenant=tenant
        )
        return 0

    def forget(self, key: str, generation: int) -> bool:
        """Drop `key`'s cache if `idle` and still of `generation` (a move out committed);
        not counted as an eviction."""
        user = self.idle(key)
        if user is None or user.generation != generation:
            return False
        del self._users[key]
        self.free(user.pages)
        self._host_free.extend(user.host_pages)
        return True

    # ---- checks ---------------------------------------------------------------------------

    def check_integrity(self, running: Iterable[Sequence[int]] = ()) -> None:
        device: dict[int, str] = {}
        host: dict[int, str] = {}

        def claim(owners: dict[int, str], size: int, pages: Iterable[int], owner: str) -> None:
            for p in pages:
                assert 0 <= p < size, f"{owner}: page {p} out of range"
                assert p not in owners, f"page {p} owned by {owners[p]} and {owner}"
                owners[p] = owner

        claim(device, self.num_pages, self._free, "free list")
        claim(device, self.num_pages, range(self.reserved), "reserved")
        claim(host, self.host_pages_total, self._host_free, "host free list")
        for key, user in self._users.items():
            assert not (user.busy and (user.pages or user.host_pages)), f"busy {key} holds pages"
            assert not (user.pages and user.host_pages), f"user {key} in two tiers"
            assert user.kv_len <= len(user.token_ids), f"user {key}: KV beyond its tokens"
            assert min(user.token_ids, default=0) >= 0, f"user {key}: a token never delivered"
            held = len(user.pages) + len(user.host_pages)
            assert self.kept_pages(user.kv_len) == held, f"user {key}: page count"
            claim(device, self.num_pages, user.pages, f"user {key}")
            claim(host, self.host_pages_total, user.host_pages, f"user {key} (host)")
        for move in self.moves:
            if move.down:
                claim(device, self.num_pages, move.src, f"move down of {move.key}")
            else:
                claim(host, self.host_pages_total, move.src, f"move up of {move.key}")
        for i, pages in enumerate(running):
            claim(device, self.num_pages, pages, f"running sequence {i}")
        for reserved in self.imports:
            claim(device, self.num_pages, reserved.pages, "an import")
            claim(host, self.host_pages_total, reserved.host_pages, "an import (host)")
        assert len(device) == self.num_pages, (
            f"{self.num_pages - len(device)} device pages are owned by nobody (leaked)"
        )
        assert len(host) == self.host_pages_total, (
            f"{self.host_pages_total - len(host)} host pages are owned by nobody (leaked)"
        )
