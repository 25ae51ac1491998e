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

Imports only `config` of ours (the dependency rule for `platform` and `memory`).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    def grace(cls, hbm_bytes: int, host_budget: int,
              headroom_bytes: int = DEFAULT_HEADROOM_BYTES) -> NodeMemory:
        return cls(True, hbm_bytes, host_budget, headroom_bytes)

    @classmethod
    def discrete(cls, device_free_bytes: int,
                 headroom_bytes: int = DEFAULT_HEADROOM_BYTES) -> NodeMemory:
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
