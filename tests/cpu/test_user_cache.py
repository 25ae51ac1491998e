"""The per-user cache policy: prefix reuse, LRU eviction of idle users only, integrity."""

import itertools

import pytest

from deployments.engine.kv_reuse import common_prefix_len
from deployments.engine.user_cache import UserCacheStore


def store(budget_tokens, per_token=10):
    ticks = itertools.count()
    return UserCacheStore(budget_tokens * per_token, per_token, clock=lambda: next(ticks))


def hold(s, key, tokens):
    entry = s.acquire(key)
    s.record(entry, list(range(tokens)), object(), tokens)
    return entry


def test_common_prefix():
    assert common_prefix_len([1, 2, 3, 4], [1, 2, 9]) == 2
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


@pytest.mark.parametrize("seed", range(20))
def test_common_prefix_matches_a_token_by_token_scan_at_every_length(seed):
    """The chunked match against the plain scan, on random histories of up to 3,000 tokens
    whose first difference falls anywhere: inside a chunk, on its edge, or nowhere."""
    import array
    import random

    rng = random.Random(seed)
    a = [rng.randrange(5) for _ in range(rng.randrange(3000))]
    cut = rng.choice([rng.randrange(len(a) + 1), 256, 512, len(a)])
    b = a[:cut] + [rng.randrange(5) for _ in range(rng.randrange(600))]
    pairs = enumerate(zip(a, b, strict=False))
    naive = next((i for i, (x, y) in pairs if x != y), min(len(a), len(b)))
    assert common_prefix_len(a, b) == naive
    assert common_prefix_len(array.array("I", a), b) == naive  # mixed types: still right


def test_idle_users_are_kept_until_the_budget_is_exceeded():
    s = store(budget_tokens=100)
    for key in "abc":
        s.release(hold(s, key, 30))
    assert s.resident_keys() == ["a", "b", "c"] and s.total_bytes == 900
    s.check_integrity()


def test_least_recently_used_idle_user_goes_first():
    s = store(budget_tokens=100)
    for key in "abc":
        s.release(hold(s, key, 30))
    s.release(hold(s, "a", 30))  # a is used again: b is now least recent
    evicted = s.release(hold(s, "d", 30))
    assert evicted == ["b"] and s.resident_keys() == ["c", "a", "d"]
    assert s.evicted_users == 1
    s.check_integrity()


def test_a_running_user_is_never_evicted():
    s = store(budget_tokens=50)
    running = hold(s, "busy", 40)
    s.release(hold(s, "idle", 30))  # over budget: idle goes, busy stays
    assert s.resident_keys() == ["busy"]
    assert s.evict_to(0) == [] and s.resident_keys() == ["busy"]
    s.release(running)
    s.check_integrity()


def test_reserve_makes_room_for_a_prefill():
    s = store(budget_tokens=100)
    for key in "ab":
        s.release(hold(s, key, 40))
    assert s.reserve(50) == ["a"]


def test_concurrent_requests_of_one_user_never_share_a_cache():
    s = store(budget_tokens=100)
    first = s.acquire("u")
    second = s.acquire("u")
    assert first is not second and second.key is None  # private, discarded at release
    s.record(second, [1, 2], object(), 2)
    assert s.total_bytes == 20  # counted while it runs
    s.release(second)
    assert s.total_bytes == 0 and s.resident_keys() == ["u"]
    s.release(first)
    s.check_integrity()


def test_record_refuses_kv_beyond_the_recorded_tokens():
    s = store(budget_tokens=100)
    entry = s.acquire("u")
    with pytest.raises(ValueError):
        s.record(entry, [1, 2], object(), 3)


def test_drop_forgets_only_idle_users():
    s = store(budget_tokens=100)
    busy = hold(s, "busy", 1)
    s.release(hold(s, "idle", 1))
    assert not s.drop("busy") and s.drop("idle") and not s.drop("nobody")
    s.release(busy)
