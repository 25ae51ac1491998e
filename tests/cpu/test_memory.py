"""The oversubscription guard and the free-unified-memory figure on each platform."""

from types import SimpleNamespace

import pytest

from deployments.capacity import EngineMemory, memory_snapshot
from deployments.config import GiB, MemoryConfig
from deployments.memory import (
    GpuMemoryPlan,
    HostAccountant,
    OversubscriptionError,
    RmmAccountant,
    is_out_of_memory,
    plan_gpu_memory,
    resolve_mode,
    setup_memory,
)
from deployments.platform import PlatformInfo


def platform(kind, hbm_gib=80, host_gib=480, available_gib=400):
    return PlatformInfo(
        kind=kind,
        device_name="test GPU",
        device_total_bytes=hbm_gib * GiB,
        host_total_bytes=host_gib * GiB,
        host_available_bytes=available_gib * GiB,
        pageable_memory_access=kind == "grace",
        uses_host_page_tables=kind == "grace",
        concurrent_managed_access=True,
    )


H100 = platform("discrete", hbm_gib=80, host_gib=128)
GH200 = platform("grace", hbm_gib=96, host_gib=480, available_gib=400)


class TestGuard:
    def test_discrete_default_limit_is_free_memory_minus_headroom(self):
        plan = plan_gpu_memory(MemoryConfig(), H100, device_free_bytes=70 * GiB)
        assert plan.limit_bytes == 68 * GiB
        assert plan.resource == "managed"

    def test_discrete_refuses_a_managed_pool_beyond_free_memory(self):
        cfg = MemoryConfig(pool_size_bytes=100 * GiB)
        with pytest.raises(OversubscriptionError) as err:
            plan_gpu_memory(cfg, H100, device_free_bytes=70 * GiB)
        message = str(err.value)
        assert "not coherent" in message and "hang" in message
        assert "allow_oversubscription" in message

    def test_headroom_counts_against_the_pool(self):
        cfg = MemoryConfig(pool_size_bytes=69 * GiB, headroom_bytes=2 * GiB)
        with pytest.raises(OversubscriptionError):
            plan_gpu_memory(cfg, H100, device_free_bytes=70 * GiB)

    def test_explicit_opt_in_allows_oversubscription(self):
        cfg = MemoryConfig(pool_size_bytes=100 * GiB, allow_oversubscription=True)
        assert plan_gpu_memory(cfg, H100, 70 * GiB).limit_bytes == 100 * GiB

    def test_plain_device_memory_cannot_hang_the_gpu_so_is_not_refused(self):
        cfg = MemoryConfig(pool_size_bytes=100 * GiB)
        plan = plan_gpu_memory(cfg, H100, 70 * GiB, mode="device")
        assert plan.resource == "device"

    def test_grace_pool_may_exceed_hbm(self):
        # The point of Grace: Llama 3.1 70B (140 GB) in a 96 GB HBM node.
        cfg = MemoryConfig(pool_size_bytes=300 * GiB)
        plan = plan_gpu_memory(cfg, GH200, device_free_bytes=94 * GiB)
        assert plan.limit_bytes == 300 * GiB > GH200.device_total_bytes

    def test_grace_default_is_hbm_plus_host_budget(self):
        plan = plan_gpu_memory(MemoryConfig(), GH200, 94 * GiB)
        assert plan.limit_bytes == 96 * GiB + int(0.9 * 400 * GiB)
        cfg = MemoryConfig(host_memory_budget_bytes=200 * GiB)
        assert plan_gpu_memory(cfg, GH200, 94 * GiB).limit_bytes == 296 * GiB

    def test_grace_cannot_exceed_hbm_plus_lpddr(self):
        with pytest.raises(OversubscriptionError, match="HBM"):
            plan_gpu_memory(MemoryConfig(pool_size_bytes=600 * GiB), GH200, 94 * GiB)

    def test_pool_initial_size_is_bounded(self):
        plan = plan_gpu_memory(MemoryConfig(pool=True), H100, 70 * GiB)
        assert plan.pool and plan.initial_pool_bytes == GiB


def fake_rmm(current_bytes):
    return SimpleNamespace(allocation_counts=SimpleNamespace(current_bytes=current_bytes))


class TestFreeUnifiedMemory:
    def test_grace_counts_hbm_and_host_budget_minus_rmm_use(self):
        plan = GpuMemoryPlan("managed", 296 * GiB, False, None, "test")
        acc = RmmAccountant(GH200, plan, fake_rmm(150 * GiB), device_free=lambda: 0)
        snap = acc.snapshot()
        # HBM is full (device_free 0) but LPDDR still has room: Grace ignores device_free.
        assert snap.free_unified_memory_bytes == 146 * GiB
        assert snap.capacity_bytes == 296 * GiB and snap.used_bytes == 150 * GiB

    def test_discrete_is_bounded_by_the_cards_free_memory(self):
        plan = GpuMemoryPlan("managed", 68 * GiB, False, None, "test")
        acc = RmmAccountant(H100, plan, fake_rmm(20 * GiB), device_free=lambda: 30 * GiB)
        assert acc.snapshot().free_unified_memory_bytes == 30 * GiB
        acc = RmmAccountant(H100, plan, fake_rmm(60 * GiB), device_free=lambda: 30 * GiB)
        assert acc.snapshot().free_unified_memory_bytes == 8 * GiB

    def test_discrete_pool_counts_only_the_pool(self):
        plan = GpuMemoryPlan("managed", 68 * GiB, True, GiB, "test")
        acc = RmmAccountant(H100, plan, fake_rmm(20 * GiB), device_free=lambda: 1 * GiB)
        assert acc.snapshot().free_unified_memory_bytes == 48 * GiB

    def test_cpu_counts_down_from_the_budget(self):
        acc = HostAccountant(budget_bytes=1000)

        def free(held, spare=0):  # what the engine reports it holds, in its stats
            snap = memory_snapshot(acc.reading(), EngineMemory(held, spare))
            return snap.free_unified_memory_bytes

        assert free(300) == 700  # weights
        assert free(300 + 200) == 500  # and KV
        assert free(500, spare=50) == 550  # e.g. empty pages of a preallocated pool
        assert free(500) == 500  # the pool's engine shut down: those pages no longer exist
        # No engine at all: the allocator alone counts nothing on CPU.
        assert acc.snapshot().free_unified_memory_bytes == 1000


def test_cpu_setup_needs_no_gpu_libraries():
    cpu = platform("cpu", hbm_gib=0)
    cpu = PlatformInfo(
        "cpu", None, 0, cpu.host_total_bytes, cpu.host_available_bytes, False, False, False
    )
    assert resolve_mode(MemoryConfig(), cpu) == "off"
    acc = setup_memory(MemoryConfig(cpu_memory_budget_bytes=GiB), cpu)
    assert acc.device == "cpu" and acc.snapshot().capacity_bytes == GiB
    with pytest.raises(RuntimeError, match="needs a GPU"):
        resolve_mode(MemoryConfig(mode="managed"), cpu)


def test_rmm_out_of_memory_counts_as_out_of_memory():
    assert is_out_of_memory(MemoryError("std::bad_alloc: out_of_memory"))
    assert not is_out_of_memory(ValueError("nope"))
