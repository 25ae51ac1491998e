"""Per-key KV shares (issue 11, item 7): one key's flood cannot evict another key's users.

Before shares, one least-recently-used order ran over every key's users, so a key opening many
new users dropped every other key's kept caches. With `kv_cache.key_share`, a key holding no
more than its share of a replica's KV memory keeps its users against other keys' requests.
"""

from __future__ import annotations

import asyncio
import random

import pytest

from deployments.auth import HANDLE_PRINCIPAL, key_id, namespaced_user, tenant_of
from deployments.config import AppArgs, ConfigError, parse_app_args
from deployments.engine import GenerationRequest, SamplingParams, select_engine_class
from deployments.engine.kv_shares import BACKGROUND, KVShares
from deployments.engine.paged.cache_manager import CacheManager
from deployments.engine.user_cache import UserCacheStore
from deployments.memory import setup_memory
from deployments.platform import detect_platform

A, B, C = key_id("key-a"), key_id("key-b"), key_id("key-c")


def keep(cache: CacheManager, key: str, tenant: str, tokens: int) -> None:
    """`key` (of `tenant`) ran a request of `tokens` tokens and is now idle."""
    cache.checkout(key, [1] * tokens, tenant)
    pages = cache.allocate(cache.pages_for(tokens))
    cache.checkin(key, [1] * tokens, tokens, pages)


# ---- the rule ------------------------------------------------------------------------------


def test_a_key_within_its_share_is_kept_and_one_beyond_it_is_not():
    shares = KVShares(0.25)
    assert shares.guaranteed(100) == 25
    assert not shares.may_evict(A, B, {A: 25}, 100)  # at its share: kept against B
    assert shares.may_evict(A, B, {A: 26}, 100)  # beyond it: B's request may drop A's users
    assert shares.may_evict(A, A, {A: 1}, 100)  # a key may always drop its own users
    assert not shares.may_evict(A, BACKGROUND, {A: 25}, 100)
    assert KVShares().may_evict(A, B, {A: 1}, 100)  # no shares: anyone's
    with pytest.raises(ValueError):
        KVShares(0.0)


def test_the_tenant_is_the_key_a_user_id_is_namespaced_under():
    assert tenant_of(namespaced_user(A, "alice")) == A
    assert tenant_of(namespaced_user(A, f"{B}\x1fmallory")) == A  # a user id cannot pick one
    assert tenant_of(namespaced_user(None, "alice")) == "" and tenant_of(None) == ""


def test_shares_need_api_keys():
    with pytest.raises(ConfigError, match=r"kv_cache\.key_share"):
        parse_app_args({"kv_cache": {"key_share": 0.25}})
    with pytest.raises(ConfigError, match=r"kv_cache\.key_share"):
        parse_app_args({"kv_cache": {"key_share": 1.5}, "auth": {"api_keys_env": "K"}})
    args = parse_app_args({"kv_cache": {"key_share": 0.25}, "auth": {"api_keys_env": "K"}})
    assert args.kv_cache.key_share == 0.25


# ---- the paged engine's cache manager --------------------------------------------------------


@pytest.mark.parametrize("seed", range(5))
def test_a_flood_of_new_users_of_one_key_never_drops_a_key_within_its_share(seed):
    rng = random.Random(seed)
    cache = CacheManager(num_pages=41, page_size=16, reserved=1, shares=KVShares(0.25))
    alice = rng.randrange(1, 10 * 16)  # A holds at most 10 of 40 pages: within its share
    keep(cache, "alice", A, alice)
    for i in range(60):  # B's users, each bigger than what is free at times
        tokens = rng.randrange(16, 12 * 16)
        need = cache.pages_for(tokens)
        while not cache.can_allocate(need) and cache.evict_lru_idle(B):
            pass
        if cache.can_allocate(need):
            keep(cache, f"b{i}", B, tokens)
        cache.check_integrity()
    assert "alice" in cache.users() and cache.evicted_users > 0
    assert cache.share_overrides == 0


def test_without_shares_the_same_flood_drops_the_other_keys_user():
    cache = CacheManager(num_pages=41, page_size=16, reserved=1)
    keep(cache, "alice", A, 5 * 16)
    for i in range(10):
        while not cache.can_allocate(5) and cache.evict_lru_idle(B):
            pass
        keep(cache, f"b{i}", B, 5 * 16)
    assert "alice" not in cache.users()


def test_a_key_beyond_its_share_loses_its_least_recently_used_users_first():
    cache = CacheManager(num_pages=41, page_size=16, reserved=1, shares=KVShares(0.25))
    for i in range(6):  # A: 6 users of 2 pages = 12 pages, beyond its 10
        keep(cache, f"a{i}", A, 32)
    keep(cache, "b0", B, 32)
    assert cache.evict_lru_idle(B) == "a0"  # B's own b0 is newer; a0 is A's oldest
    assert cache.evict_lru_idle(B) == "b0"  # A is at its share now: B may drop only its own
    assert cache.evict_lru_idle(B) is None
    assert cache.evict_lru_idle(A) == "a1"  # A may always drop its own


def test_the_host_tier_drops_only_what_the_shares_allow():
    cache = CacheManager(
        num_pages=9, page_size=16, reserved=1, host_pages=8, shares=KVShares(0.25)
    )  # 16 pages in all: 4 each
    keep(cache, "alice", A, 4 * 16)
    cache.complete(cache.start_offload(B))  # alice moves down: kept, not dropped
    keep(cache, "carol", C, 4 * 16)
    cache.complete(cache.start_offload(B))  # carol too: the host tier is now full
    keep(cache, "b0", B, 4 * 16)
    assert cache.start_offload(B) is None  # b0 down would drop alice or carol: both kept
    assert cache.start_offload(BACKGROUND) is None
    assert {"alice", "carol"} <= set(cache.users())
    move = cache.start_offload(A)  # A's own request may drop its own user for room
    assert move is not None and move.key == "b0" and "alice" not in cache.users()
    cache.check_integrity()


def test_a_request_alone_with_no_room_overrides_the_shares_instead_of_waiting_forever():
    cache = CacheManager(num_pages=11, page_size=16, reserved=1, shares=KVShares(0.5))
    keep(cache, "alice", A, 5 * 16)  # at A's share: 5 of 10
    keep(cache, "carol", C, 5 * 16)  # at C's share
    assert cache.evict_lru_idle(B) is None
    assert cache.evict_lru_idle(B, override=True) == "alice"
    assert cache.share_overrides == 1


# ---- the generic engine's store --------------------------------------------------------------


def test_the_generic_engines_store_keeps_a_key_within_its_share():
    store = UserCacheStore(1000, 10, shares=KVShares(0.3))
    entry = store.acquire("alice", A)
    store.record(entry, [1] * 25, object(), 25)  # 250 bytes: within A's 300
    store.release(entry)
    for i in range(10):
        entry = store.acquire(f"b{i}", B)
        store.record(entry, [1] * 30, object(), 30)
        store.release(entry)
        store.check_integrity()
    assert "alice" in store.resident_keys() and store.total_bytes <= 1000
    assert store.evict_to(0, ignore_shares=True) and store.total_bytes == 0


# ---- the whole engine: a returning user of one key after another key's flood ---------------


def paged_engine(key_share: float | None):
    args = AppArgs.model_validate(
        {
            "model": {"model_id": "builtin:tiny-llama", "max_model_len": 512},
            "memory": {"cpu_memory_budget_bytes": "64MiB"},
            "kv_cache": {"budget_bytes": "1MiB", "key_share": key_share},  # 32 pages of 16
            "engine": {"cpu_threads": 1},
            "auth": {"api_keys_env": "UNUSED_HERE"},
        }
    )
    return select_engine_class(args)(
        args, setup_memory(args.memory, detect_platform(use_gpu=False))
    )


async def turn(engine, user: str, tenant: str, prompt: list[int]) -> tuple[list[int], int]:
    tokens: list[int] = []
    cached = 0
    request = GenerationRequest(
        f"{user}-{len(prompt)}",
        user,
        prompt,
        SamplingParams(16, temperature=0.0, ignore_eos=True),
        tenant,
    )
    async for out in engine.generate(request):
        tokens += out.token_ids
        cached = out.cached_tokens
    return tokens, cached


@pytest.mark.parametrize("key_share", [None, 0.25])
def test_a_returning_user_keeps_its_cache_through_another_keys_flood(key_share):
    engine = paged_engine(key_share)
    rng = random.Random(7)

    async def main() -> tuple[int, int]:
        history = [rng.randrange(3, 250) for _ in range(60)]
        history += (await turn(engine, "alice", A, history))[0]  # 76 tokens: 5 pages
        for i in range(8):  # B: 8 users of 5 pages each, more than the pool's 32
            await turn(engine, f"b{i}", B, [rng.randrange(3, 250) for _ in range(60)])
        _, cached = await turn(engine, "alice", A, [*history, 65, 66, 67])
        return cached, len(history)

    try:
        cached, kept = asyncio.run(main())
        assert engine.stats().evicted_users > 0  # the flood did not fit
        engine.check_integrity()
    finally:
        asyncio.run(engine.shutdown())
    if key_share is None:
        assert cached == 0  # plain LRU: B's flood dropped alice
    else:
        assert cached >= kept - 1


def test_the_ingress_sends_the_callers_key_with_each_request(monkeypatch):
    from deployments.readiness import Readiness
    from tests.cpu.test_ingress_failures import (
        REQUEST,
        FakeHandle,
        LocalIngress,
        controller,
        events,
    )

    monkeypatch.setenv("GS_SHARE_KEYS", "key-a key-b")
    handle = FakeHandle(events())
    obj = LocalIngress.__new__(LocalIngress)

    async def construct() -> None:
        await obj.__init__(
            handle, {"auth": {"api_keys_env": "GS_SHARE_KEYS"}, "kv_cache": {"key_share": 0.5}}
        )
        obj._announcer.cancel()  # the start-up line needs Serve's controller

    asyncio.run(construct())
    obj._readiness = Readiness(controller(1), retry_after_s=3)
    asyncio.run(obj.chat(REQUEST, user="alice"))
    assert handle.calls[0]["shape"].tenant == HANDLE_PRINCIPAL


def test_a_request_that_only_an_override_can_serve_runs_rather_than_waiting_forever():
    """Shares adding up to more than 1 (two keys at 0.5 hold all but 2 pages): a third key's
    request, alone in the engine, drops the least recently used user instead of hanging."""
    engine = paged_engine(0.5)
    rng = random.Random(3)

    async def main() -> list[int]:
        for user, tenant in (("alice", A), ("carol", C)):  # 224 + 16 tokens: 15 pages each
            await turn(engine, user, tenant, [rng.randrange(3, 250) for _ in range(224)])
        return (await asyncio.wait_for(turn(engine, "bob", B, [65] * 60), 60))[0]

    try:
        assert len(asyncio.run(main())) == 16
        assert engine.stats().extra["kv_share_overrides"] >= 1
        engine.check_integrity()
    finally:
        asyncio.run(engine.shutdown())
