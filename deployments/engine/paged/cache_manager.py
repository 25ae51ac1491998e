"""Who owns which KV pages: free pages, idle users' kept caches, running sequences' pages.

Policy only (the storage is `KVPool`). Pages are never shared: an idle user's cache belongs
to that user alone, and a running sequence holds its own pages (a user's pages move to the
sequence serving it and back when it ends).

Contract:
- every page is in exactly one place: the free list, one idle user, or one running sequence;
- ``can_allocate(n)`` is true iff ``allocate(n)`` succeeds; ``allocate`` never evicts;
- ``evict_lru_idle()`` frees the least recently used idle user's pages, or returns None when
  no idle user holds any page; users whose request is running are never evicted;
- ``check_integrity(running)`` raises AssertionError when any of this does not hold.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from deployments.engine.user_cache import common_prefix_len


@dataclass(eq=False)
class UserKV:
    """A user's kept cache: every token the conversation has seen; KV for a prefix of them."""

    key: str
    token_ids: list[int] = field(default_factory=list)
    kv_len: int = 0  # positions [0, kv_len) have keys and values in `pages`
    pages: list[int] = field(default_factory=list)
    busy: bool = False  # a running sequence holds this user's pages


@dataclass(frozen=True)
class Reuse:
    """What a new request of a user gets from its kept cache."""

    pages: list[int]
    tokens: int  # prompt tokens whose KV is already in `pages`
    private: bool  # the user was busy: this request's cache is not kept


class CacheManager:
    def __init__(self, num_pages: int, page_size: int, reserved: int = 0) -> None:
        """Pages [0, reserved) are never handed out (page 0: scratch for padding rows)."""
        self.num_pages = num_pages
        self.page_size = page_size
        self.reserved = reserved
        self._free: list[int] = list(range(num_pages - 1, reserved - 1, -1))  # low ids first
        self._users: OrderedDict[str, UserKV] = OrderedDict()  # least recently used first
        self.evicted_users = 0

    # ---- pages ----------------------------------------------------------------------------

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    @property
    def free_pages(self) -> int:
        return len(self._free)

    @property
    def usable_pages(self) -> int:
        return self.num_pages - self.reserved

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise MemoryError(f"{n} KV pages asked for, {len(self._free)} free")
        return [self._free.pop() for _ in range(n)]

    def free(self, pages: Iterable[int]) -> None:
        self._free.extend(pages)

    # ---- users ----------------------------------------------------------------------------

    def users(self) -> list[str]:
        return list(self._users)

    def checkout(self, key: str | None, prompt: Sequence[int]) -> Reuse:
        """Hand a new request of `key` its kept pages, trimmed to what its prompt reuses."""
        if key is None:
            return Reuse([], 0, private=True)
        user = self._users.get(key)
        if user is not None and user.busy:
            return Reuse([], 0, private=True)
        if user is None:
            user = self._users[key] = UserKV(key)
        self._users.move_to_end(key)
        # Feed at least one prompt token: its logits give the first new token.
        tokens = min(common_prefix_len(user.token_ids, prompt), user.kv_len, len(prompt) - 1)
        tokens = max(tokens, 0)
        keep = self.pages_for(tokens)
        self.free(user.pages[keep:])
        pages = user.pages[:keep]
        user.pages, user.kv_len, user.busy = [], 0, True
        return Reuse(pages, tokens, private=False)

    def checkin(self, key: str, token_ids: list[int], kv_len: int, pages: list[int]) -> None:
        """A user's request ended: keep its pages as the user's cache (most recently used)."""
        user = self._users[key]
        if kv_len > len(token_ids) or self.pages_for(kv_len) > len(pages):
            raise ValueError("a kept cache must cover exactly its kv_len tokens")
        keep = self.pages_for(kv_len)
        self.free(pages[keep:])
        if kv_len == 0:  # nothing computed (ended at once): nothing to keep
            del self._users[key]
            return
        user.token_ids, user.kv_len, user.pages, user.busy = token_ids, kv_len, pages[:keep], False
        self._users.move_to_end(key)

    def evict_lru_idle(self) -> str | None:
        """Drop the least recently used idle user holding pages; None if there is none."""
        for key, user in self._users.items():
            if not user.busy and user.pages:
                self.free(user.pages)
                del self._users[key]
                self.evicted_users += 1
                return key
        return None

    def check_integrity(self, running: Iterable[Sequence[int]] = ()) -> None:
        owners: dict[int, str] = {}

        def claim(pages: Iterable[int], owner: str) -> None:
            for p in pages:
                assert 0 <= p < self.num_pages, f"{owner}: page {p} out of range"
                assert p not in owners, f"page {p} owned by {owners[p]} and {owner}"
                owners[p] = owner

        claim(self._free, "free list")
        for key, user in self._users.items():
            assert not (user.busy and user.pages), f"busy user {key} still holds pages"
            assert user.kv_len <= len(user.token_ids), f"user {key}: KV beyond its tokens"
            assert self.pages_for(user.kv_len) == len(user.pages), f"user {key}: page count"
            claim(user.pages, f"user {key}")
        for i, pages in enumerate(running):
            claim(pages, f"running sequence {i}")
        claim(range(self.reserved), "reserved")
        assert len(owners) == self.num_pages, (
            f"{self.num_pages - len(owners)} pages are owned by nobody (leaked)"
        )
