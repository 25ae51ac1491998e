"""RMM set-up and memory accounting: the "free unified memory" figure the router places users by.

Free unified memory, per platform (bytes):

- **grace** (coherent GH200/GB200): ``limit - rmm_in_use``, where ``limit = HBM +
  host_memory_budget_bytes`` (or ``memory.pool_size_bytes``) and ``rmm_in_use`` is what RMM's
  statistics adaptor reports allocated. Weights and KV caches may spill past HBM into LPDDR
  over NVLink-C2C; that is the point of managed memory there.
- **discrete** (H100/H200 on PCIe): ``min(limit - rmm_in_use, device_free)``, where ``limit``
  is at most the card's free memory minus ``headroom_bytes``: managed memory is never allowed
  to oversubscribe a discrete card (it can hang the GPU). With a pool the card's free memory
  already excludes the pool, so it is ``limit - rmm_in_use`` alone.
- **cpu**: ``cpu_memory_budget_bytes - (weights + KV bytes)``, as the engine reports them.

An accountant reads only its allocator (`reading()`); what the engine holds comes from the
engine's stats, and `capacity.replica_memory` combines the two (`snapshot()` here is the
allocator's view alone, as before an engine exists).

`setup_memory` must run before anything touches `torch.cuda`: it swaps PyTorch's allocator for
RMM's. The limits come from `capacity` (the node memory model the capacity planner uses too).
Imports only `config` and `capacity` of ours; rmm and torch are imported lazily, on GPU replicas
only.
"""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from deployments.capacity import (
    AllocatorReading,
    EngineMemory,
    MemorySnapshot,
    NodeMemory,
    coherent_ceiling_bytes,
    host_budget_bytes,
    memory_snapshot,
)
from deployments.config import GiB, MemoryConfig

if TYPE_CHECKING:
    from deployments.platform import PlatformInfo

logger = logging.getLogger(__name__)


class OversubscriptionError(RuntimeError):
    """A managed pool larger than a discrete GPU's free memory was asked for and refused."""


@dataclass(frozen=True)
class GpuMemoryPlan:
    """What RMM will be set up with, decided before a byte is allocated."""

    resource: Literal["managed", "device"]
    limit_bytes: int  # most bytes RMM hands out; allocations beyond raise MemoryError
    pool: bool
    initial_pool_bytes: int | None
    reason: str


def resolve_mode(cfg: MemoryConfig, platform: PlatformInfo) -> str:
    """The effective memory mode: `auto` is managed on a GPU and off on CPU."""
    if cfg.mode == "auto":
        return "managed" if platform.has_gpu else "off"
    if cfg.mode in ("managed", "device") and not platform.has_gpu:
        raise RuntimeError(f"memory.mode {cfg.mode!r} needs a GPU, but this node has none")
    return cfg.mode


def plan_gpu_memory(
    cfg: MemoryConfig, platform: PlatformInfo, device_free_bytes: int, mode: str = "managed"
) -> GpuMemoryPlan:
    """Decide the RMM limit; refuse an oversubscribing managed pool on a discrete GPU.

    Pure function of its inputs, so the guard is testable without a GPU.
    """
    resource: Literal["managed", "device"] = "device" if mode == "device" else "managed"
    requested = int(cfg.pool_size_bytes) if cfg.pool_size_bytes is not None else None
    gib = GiB
    if platform.kind == "grace" and resource == "managed":
        budget = host_budget_bytes(cfg.host_memory_budget_bytes, platform.host_available_bytes)
        node = NodeMemory.grace(platform.device_total_bytes, budget, int(cfg.headroom_bytes))
        ceiling = coherent_ceiling_bytes(platform.device_total_bytes, platform.host_total_bytes)
        limit = requested if requested is not None else node.limit_bytes
        if limit > ceiling:
            raise OversubscriptionError(
                f"memory.pool_size_bytes {limit / gib:.1f} GiB exceeds this Grace node's HBM + "
                f"LPDDR ({ceiling / gib:.1f} GiB)"
            )
        reason = (
            f"coherent Grace node: managed memory up to {limit / gib:.1f} GiB "
            f"({platform.device_total_bytes / gib:.1f} GiB HBM + the rest in LPDDR over C2C)"
        )
    else:
        cap = NodeMemory.discrete(device_free_bytes, int(cfg.headroom_bytes)).limit_bytes
        limit = requested if requested is not None else cap
        if resource == "managed" and limit > cap and not cfg.allow_oversubscription:
            raise OversubscriptionError(
                f"refusing a managed pool of {limit / gib:.1f} GiB on a discrete GPU "
                f"({platform.device_name}) with {device_free_bytes / gib:.1f} GiB free and "
                f"{int(cfg.headroom_bytes) / gib:.1f} GiB headroom (at most {cap / gib:.1f} GiB): "
                "this GPU is not coherent with host memory, and oversubscribed managed memory "
                "can hang it. Lower memory.pool_size_bytes, or set "
                "memory.allow_oversubscription: true if you accept that risk."
            )
        reason = (
            f"discrete GPU: {resource} memory up to {limit / gib:.1f} GiB "
            f"of {device_free_bytes / gib:.1f} GiB free"
        )
    initial = min(limit, gib) // 256 * 256 if cfg.pool else None
    return GpuMemoryPlan(resource, limit, cfg.pool, initial, reason)


class MemoryAccountant(ABC):
    """Reads a replica's allocator: the allocator's half of the router's free-memory figure
    (the engine's half is in its stats; `capacity.replica_memory` joins them)."""

    device: str  # torch device string the engine should use
    platform: PlatformInfo | None = None  # the node this replica runs on, where known
    managed: bool = False  # allocations in `allocation_scope()` are CUDA managed memory

    def allocation_scope(self) -> contextlib.AbstractContextManager[None]:
        """Allocate weights and KV caches inside this so they land in the replica's resource."""
        return contextlib.nullcontext()

    @abstractmethod
    def reading(self) -> AllocatorReading:
        """What the allocator counts now: capacity, use, the card's free memory."""

    def snapshot(self) -> MemorySnapshot:
        """The allocator's view alone (no engine's figures): before an engine allocates."""
        return memory_snapshot(self.reading(), EngineMemory())


class HostAccountant(MemoryAccountant):
    """CPU-only replica: a configured budget minus what the engine reports it holds."""

    device = "cpu"

    def __init__(self, budget_bytes: int) -> None:
        self._budget = budget_bytes

    def reading(self) -> AllocatorReading:
        return AllocatorReading("cpu", "host", self._budget, 0, counts_engine=False)


class RmmAccountant(MemoryAccountant):
    """GPU replica whose weights and KV caches are allocated through RMM's statistics adaptor.

    With `global_allocator` every PyTorch allocation goes through RMM; otherwise only what is
    allocated inside `allocation_scope()` does (an RMM-backed `torch.cuda.MemPool`), and
    PyTorch's own allocator keeps activations and CUDA-graph pools, which count as used too.
    """

    device = "cuda"

    def __init__(
        self,
        platform: PlatformInfo,
        plan: GpuMemoryPlan,
        stats_mr: Any,
        device_free: Callable[[], int] | None = None,
        global_allocator: bool = True,
    ) -> None:
        self.platform = platform
        self._plan = plan
        self._stats_mr = stats_mr
        self._device_free = device_free or _rmm_device_free
        self._global = global_allocator
        self._pool: Any = None

    @property
    def plan(self) -> GpuMemoryPlan:
        return self._plan

    def rmm_statistics(self) -> Any:
        """RMM's counters: current_bytes, peak_bytes, total_bytes, current_count, ..."""
        return self._stats_mr.allocation_counts

    @contextlib.contextmanager
    def allocation_scope(self) -> Iterator[None]:
        if self._global:
            yield
            return
        import torch
        from rmm.allocators.torch import rmm_torch_allocator

        if self._pool is None:
            self._pool = torch.cuda.MemPool(rmm_torch_allocator.allocator())
        with torch.cuda.use_mem_pool(self._pool):
            yield

    def _native_bytes(self) -> int:
        """Bytes PyTorch's own allocator holds outside RMM (0 when RMM is the allocator)."""
        if self._global:
            return 0
        import torch

        # memory_reserved counts the RMM-backed pool's segments as well: subtract them.
        return max(0, int(torch.cuda.memory_reserved()) - int(self.rmm_statistics().current_bytes))

    def reading(self) -> AllocatorReading:
        used = int(self.rmm_statistics().current_bytes) + self._native_bytes()
        return AllocatorReading(
            self.platform.kind,
            self._plan.resource,
            self._plan.limit_bytes,
            used,
            int(self._device_free()),
            device_bound=self.platform.kind == "discrete" and not self._plan.pool,
        )


def _rmm_device_free() -> int:
    import rmm

    return int(rmm.mr.available_device_memory()[0])  # cudaMemGetInfo


class TorchAccountant(MemoryAccountant):
    """GPU replica left on PyTorch's allocator (memory.mode: off)."""

    device = "cuda"

    def __init__(self, platform: PlatformInfo, headroom_bytes: int) -> None:
        self.platform = platform
        self._capacity = max(0, platform.device_total_bytes - headroom_bytes)

    def reading(self) -> AllocatorReading:
        import torch

        free_dev, _ = torch.cuda.mem_get_info()
        return AllocatorReading(
            self.platform.kind,
            "torch",
            self._capacity,
            int(torch.cuda.memory_reserved()),
            int(free_dev),
            device_bound=True,
        )


def setup_memory(
    cfg: MemoryConfig, platform: PlatformInfo, torch_allocator: str = "rmm"
) -> MemoryAccountant:
    """Set up this process's memory before any `torch.cuda` call; return its accountant.

    On a GPU with mode managed/device: plan (refusing an oversubscribing managed pool on a
    discrete GPU before anything is allocated), build RMM's resource chain
    ``Statistics(Limiting(Pool?(Managed|Cuda)))`` and make it current. With
    ``torch_allocator="rmm"`` all of PyTorch's allocations go through it; with ``"native"``
    only those inside `allocation_scope()` do (weights, KV pool), so PyTorch keeps the private
    pools CUDA graphs need.
    """
    mode = resolve_mode(cfg, platform)
    if mode == "off":
        if platform.has_gpu:
            return TorchAccountant(platform, int(cfg.headroom_bytes))
        host = HostAccountant(int(cfg.cpu_memory_budget_bytes))
        host.platform = platform
        return host

    import rmm

    plan = plan_gpu_memory(cfg, platform, _rmm_device_free(), mode)  # PyTorch untouched
    upstream = (
        rmm.mr.ManagedMemoryResource()
        if plan.resource == "managed"
        else (rmm.mr.CudaMemoryResource())
    )
    if plan.pool:
        upstream = rmm.mr.PoolMemoryResource(
            upstream, initial_pool_size=plan.initial_pool_bytes, maximum_pool_size=plan.limit_bytes
        )
    if plan.resource == "managed" and platform.kind == "discrete":
        # Migrate pages to the card as they are allocated, not on first touch by a kernel.
        upstream = rmm.mr.PrefetchResourceAdaptor(upstream)
    limited = rmm.mr.LimitingResourceAdaptor(upstream, plan.limit_bytes)
    stats_mr = rmm.mr.StatisticsResourceAdaptor(limited)
    rmm.mr.set_current_device_resource(stats_mr)
    if torch_allocator == "rmm":
        swap_torch_allocator()
    logger.info("RMM ready: %s; PyTorch allocator: %s", plan.reason, torch_allocator)
    accountant = RmmAccountant(platform, plan, stats_mr, global_allocator=torch_allocator == "rmm")
    accountant.managed = plan.resource == "managed"
    return accountant


def swap_torch_allocator() -> None:
    """Route PyTorch's CUDA allocations through RMM's current resource.

    Raises a RuntimeError that says why when PyTorch's CUDA allocator is already in use.
    """
    import torch
    from rmm.allocators.torch import rmm_torch_allocator

    try:
        torch.cuda.memory.change_current_allocator(rmm_torch_allocator)
    except RuntimeError as exc:
        raise RuntimeError(
            "could not route PyTorch through RMM: something called torch.cuda before the "
            f"replica set up memory ({exc}). Set up memory first."
        ) from exc


def is_out_of_memory(exc: BaseException) -> bool:
    """True for PyTorch's OOM and for RMM's MemoryError (how RMM OOM surfaces once swapped)."""
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        return isinstance(exc, torch.cuda.OutOfMemoryError)
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
