"""The replica's memory admission figures, without Ray or a model."""

from deployments.capacity import kv_bytes_by_tier, kv_capacity_bytes
from deployments.engine import EngineStats
from deployments.memory import MemorySnapshot

MiB = 1 << 20


def stats(kv_bytes=0, budget=16 * MiB, extra=None):
    return EngineStats(
        kv_cache_bytes=kv_bytes,
        kv_budget_bytes=budget,
        kv_bytes_per_token=2048,
        resident_users=[],
        running_requests=0,
        waiting_requests=0,
        evicted_users=0,
        extra=extra or {},
    )


def snap(free, resource="host"):
    return MemorySnapshot("cpu", resource, 64 * MiB, 64 * MiB - free, free)


def test_capacity_is_the_budget_when_memory_is_plentiful():
    assert kv_capacity_bytes(stats(kv_bytes=4 * MiB), snap(free=40 * MiB)) == 16 * MiB


def test_capacity_counts_other_users_kv_as_reclaimable_but_not_more_than_memory():
    # 2 MiB free plus 6 MiB of other users' caches that could be dropped: 8 MiB.
    assert kv_capacity_bytes(stats(kv_bytes=6 * MiB), snap(free=2 * MiB)) == 8 * MiB
    assert kv_capacity_bytes(stats(kv_bytes=0), snap(free=-1 * MiB)) == -1 * MiB


def test_kv_tiers_come_from_the_engine_when_it_reports_them():
    assert kv_bytes_by_tier(stats(kv_bytes=5), snap(1, "managed")) == {"managed": 5}
    split = {"hbm": 3, "lpddr": 2}
    assert kv_bytes_by_tier(stats(kv_bytes=5, extra={"kv_bytes_by_tier": split}), snap(1)) == split
