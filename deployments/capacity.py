"""One model of a replica's memory, shared by the replica (`memory.py`) and the planner.

A replica's allocator (RMM) hands out at most a *limit* of bytes:

- **coherent** node (Grace: GH200, GB200): ``limit = HBM + host budget``. The GPU reads host
  memory (LPDDR5X) coherently over NVLink-C2C, so managed memory may spill past HBM; the host
  budget is the LPDDR a replica may use (default: ``DEFAULT_HOST_BUDGET_FRACTION`` of the host
  memory available when it starts). HBM plus all of LPDDR is the hard ceiling.
- **discrete** GPU (H100/H200 on PCIe): ``limit = device memory - headroom``. Nothing may
  spill to host memory: oversubscribed managed memory on a GPU that is not coherent with the
  host can hang it, so the limit never exceeds what the card has.

Within the limit the planner keeps ``headroom`` of HBM free of weights and KV caches (CUDA
context, activations, CUDA graphs). On a discrete GPU that headroom lies outside the limit (the
replica leaves it untouched); on a coherent node it is inside (activations come from the same
managed memory), so the room for weights and KV is ``limit - headroom`` there.

A replica's memory *figures* come from one function, `replica_memory`: it combines what the
replica's allocator reads (`AllocatorReading`, from `memory`) with what the engine reports it
holds (`EngineMemory`, in the engine's stats) into the snapshot the router places users by, the
most KV one request may take (admission) and the KV bytes per tier (the routing report). No
callbacks run from `memory` into the engine.

Imports only `config` of ours (the dependency rule for `platform` and `memory`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from deployments.config import MemoryConfig

# memory.host_memory_budget_bytes unset: this share of the host memory available at start.
DEFAULT_HOST_BUDGET_FRACTION = 0.9
# memory.headroom_bytes unset: the same default the replica uses.
DEFAULT_HEADROOM_BYTES = int(MemoryConfig().headroom_bytes)


def host_budget_bytes(configured: int | None, host_available_bytes: int) -> int:
    """LPDDR a coherent replica may use beyond HBM: the configured budget, else the default."""
    if configured is not None:
        return int(configured)
    return int(DEFAULT_HOST_BUDGET_FRACTION * host_available_bytes)


@dataclass(frozen=True)
class NodeMemory:
    """One replica's memory tiers (bytes).

    `device_bytes` is HBM: the card's total on a coherent node, the memory free for this
    replica on a discrete GPU (what `cudaMemGetInfo` reports at start). `host_budget_bytes` is
    0 wherever the node is not coherent.
    """

    coherent: bool
    device_bytes: int
    host_budget_bytes: int
    headroom_bytes: int = DEFAULT_HEADROOM_BYTES

    @classmethod
    def grace(
        cls, hbm_bytes: int, host_budget: int, headroom_bytes: int = DEFAULT_HEADROOM_BYTES
    ) -> NodeMemory:
        return cls(True, hbm_bytes, host_budget, headroom_bytes)

    @classmethod
    def discrete(
        cls, device_free_bytes: int, headroom_bytes: int = DEFAULT_HEADROOM_BYTES
    ) -> NodeMemory:
        return cls(False, device_free_bytes, 0, headroom_bytes)

    @property
    def limit_bytes(self) -> int:
        """Most bytes the replica's allocator hands out (RMM's limit by default)."""
        if self.coherent:
            return self.device_bytes + self.host_budget_bytes
        return max(0, self.device_bytes - self.headroom_bytes)

    @property
    def device_room_bytes(self) -> int:
        """HBM for weights and KV caches: HBM less the headroom."""
        return max(0, self.device_bytes - self.headroom_bytes)

    @property
    def host_room_bytes(self) -> int:
        """Host memory for weights and KV caches: the host budget, only where coherent."""
        return self.host_budget_bytes if self.coherent else 0

    @property
    def room_bytes(self) -> int:
        """All memory for weights and KV caches (HBM room + host room)."""
        return self.device_room_bytes + self.host_room_bytes


def coherent_ceiling_bytes(hbm_bytes: int, host_total_bytes: int) -> int:
    """Most a coherent replica could ever address: all of HBM and all of host memory."""
    return hbm_bytes + host_total_bytes


ResourceKind = Literal["managed", "device", "torch", "host"]


@dataclass(frozen=True)
class MemorySnapshot:
    """One reading of a replica's memory (bytes)."""

    platform: str
    resource: ResourceKind
    capacity_bytes: int
    used_bytes: int
    free_unified_memory_bytes: int
    device_free_bytes: int | None = None

    def describe(self) -> str:
        """One log line's worth: resource, capacity, in use, free unified memory (GiB)."""
        gib = 1 << 30
        return (
            f"{self.resource} on {self.platform}, {self.capacity_bytes / gib:.2f} GiB "
            f"capacity, {self.used_bytes / gib:.2f} GiB in use, "
            f"{self.free_unified_memory_bytes / gib:.2f} GiB free unified memory"
        )


@dataclass(frozen=True)
class AllocatorReading:
    """What the replica's allocator alone reports (bytes); `memory` makes these."""

    platform: str
    resource: ResourceKind
    capacity_bytes: int  # most bytes it hands out (RMM's limit; the CPU budget)
    used_bytes: int  # what it counts as allocated (0 on CPU: nothing counts there)
    device_free_bytes: int | None = None  # cudaMemGetInfo's free figure, on a GPU
    counts_engine: bool = True  # its count includes the engine's weights and KV (not on CPU)
    device_bound: bool = False  # free memory is at most the card's free memory (discrete GPU
    # without a pool: managed memory must never oversubscribe it)


@dataclass(frozen=True)
class EngineMemory:
    """What an engine holds, as it reports it in its stats (bytes)."""

    held_bytes: int = 0  # weights and KV storage in the replica's memory resource
    spare_bytes: int = 0  # of those, KV pages allocated but empty: free for new users
    tier_bytes: int = 0  # KV storage outside the resource (a pinned host tier), all of it
    tier_used_bytes: int = 0  # of which users' caches fill


def memory_snapshot(reading: AllocatorReading, engine: EngineMemory) -> MemorySnapshot:
    """Free unified memory: the allocator's room, the engine's empty KV pages counting as
    free, and any KV tier outside the resource added in (so the figure covers every tier)."""
    held = 0 if reading.counts_engine else engine.held_bytes
    used = reading.used_bytes + held - engine.spare_bytes
    free = reading.capacity_bytes - used
    if reading.device_bound and reading.device_free_bytes is not None:
        free = min(free, reading.device_free_bytes + engine.spare_bytes)
    return MemorySnapshot(
        reading.platform,
        reading.resource,
        reading.capacity_bytes + engine.tier_bytes,
        used + engine.tier_used_bytes,
        free + engine.tier_bytes - engine.tier_used_bytes,
        reading.device_free_bytes,
    )


class KVHeld(Protocol):
    """The KV figures `kv_capacity_bytes` reads (engine.EngineStats or engine.KVFigures)."""

    @property
    def kv_cache_bytes(self) -> int: ...
    @property
    def kv_budget_bytes(self) -> int: ...


class EngineFigures(KVHeld, Protocol):
    """The part of an engine's stats (`engine.EngineStats`) the replica's figures need."""

    @property
    def memory(self) -> EngineMemory: ...
    @property
    def extra(self) -> Mapping[str, Any]: ...


def kv_capacity_bytes(stats: KVHeld, snap: MemorySnapshot) -> int:
    """Most KV bytes this replica could hold for one request with every other cache dropped:
    the KV budget, or less when free unified memory plus today's KV bytes is smaller."""
    return min(stats.kv_budget_bytes, snap.free_unified_memory_bytes + stats.kv_cache_bytes)


def kv_bytes_by_tier(stats: EngineFigures, snap: MemorySnapshot) -> dict[str, int]:
    """KV bytes per memory tier: the engine's own split if it reports one, else all bytes in
    the replica's memory resource (`host` on CPU, `managed` for RMM unified memory, ...)."""
    tiers = stats.extra.get("kv_bytes_by_tier")
    if isinstance(tiers, dict) and tiers:
        return {str(k): int(v) for k, v in tiers.items()}
    return {snap.resource: stats.kv_cache_bytes}


@dataclass(frozen=True)
class ReplicaMemory:
    """A replica's memory figures at one moment: what admission and the routing report use."""

    snapshot: MemorySnapshot
    kv_capacity_bytes: int  # most KV one request may take here (admission)
    kv_bytes_by_tier: dict[str, int]


def replica_memory(reading: AllocatorReading, stats: EngineFigures) -> ReplicaMemory:
    """The one place the allocator's reading and the engine's stats combine."""
    snap = memory_snapshot(reading, stats.memory)
    return ReplicaMemory(snap, kv_capacity_bytes(stats, snap), kv_bytes_by_tier(stats, snap))
