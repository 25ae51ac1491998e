"""What node this replica runs on: a coherent Grace superchip, a discrete GPU, or CPU only.

Detection talks to the CUDA driver (libcuda) through ctypes, never through PyTorch: any
`torch.cuda` call would initialise PyTorch's allocator, and the replica must swap it for RMM
first. A Grace node is one whose GPU reads pageable host memory coherently through the host's
page tables (`cudaDevAttrPageableMemoryAccess` and `...UsesHostPageTables` both 1).
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from typing import Literal, Protocol

logger = logging.getLogger(__name__)

PlatformKind = Literal["grace", "discrete", "cpu"]

# CUdevice_attribute values from cuda.h (the runtime's cudaDevAttr* use the same numbers).
ATTR_MANAGED_MEMORY = 83
ATTR_PAGEABLE_MEMORY_ACCESS = 88
ATTR_CONCURRENT_MANAGED_ACCESS = 89
ATTR_PAGEABLE_USES_HOST_PAGE_TABLES = 100


@dataclass(frozen=True)
class PlatformInfo:
    """The memory facts of this node that the replica and the router plan with (bytes)."""

    kind: PlatformKind
    device_name: str | None
    device_total_bytes: int  # HBM of the GPU this replica uses; 0 without one
    host_total_bytes: int  # system memory (LPDDR5X on Grace)
    host_available_bytes: int  # system memory free for use when detected
    pageable_memory_access: bool
    uses_host_page_tables: bool
    concurrent_managed_access: bool

    @property
    def has_gpu(self) -> bool:
        return self.kind != "cpu"

    def describe(self) -> str:
        gib = 1 << 30
        if self.kind == "cpu":
            return f"CPU only, {self.host_total_bytes / gib:.0f} GiB host memory"
        coherent = "coherent" if self.kind == "grace" else "not coherent"
        return (
            f"{self.device_name} ({self.device_total_bytes / gib:.0f} GiB), "
            f"{self.host_total_bytes / gib:.0f} GiB host memory, {coherent}"
        )


class CudaProbe(Protocol):
    """The few CUDA driver queries detection needs; tests pass a fake."""

    def device_count(self) -> int: ...
    def attribute(self, attr: int, device: int) -> int: ...
    def name(self, device: int) -> str: ...
    def total_memory(self, device: int) -> int: ...


class DriverProbe:
    """CUDA driver queries through ctypes; creates no context and loads no allocator."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._check(self._lib.cuInit(0), "cuInit")

    @classmethod
    def load(cls) -> DriverProbe | None:
        """The driver probe, or None where there is no usable driver or device."""
        try:
            probe = cls(ctypes.CDLL("libcuda.so.1"))
            return probe if probe.device_count() > 0 else None
        except (OSError, RuntimeError) as exc:
            logger.debug("no CUDA driver: %s", exc)
            return None

    @staticmethod
    def _check(status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with CUresult {status}")

    def _device(self, ordinal: int) -> ctypes.c_int:
        dev = ctypes.c_int()
        self._check(self._lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        return dev

    def device_count(self) -> int:
        count = ctypes.c_int()
        self._check(self._lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
        return count.value

    def attribute(self, attr: int, device: int) -> int:
        value = ctypes.c_int()
        status = self._lib.cuDeviceGetAttribute(ctypes.byref(value), attr, self._device(device))
        self._check(status, f"cuDeviceGetAttribute({attr})")
        return value.value

    def name(self, device: int) -> str:
        buf = ctypes.create_string_buffer(256)
        self._check(self._lib.cuDeviceGetName(buf, 256, self._device(device)), "cuDeviceGetName")
        return buf.value.decode()

    def driver_version(self) -> int:
        """The CUDA version the driver supports, as 1000 * major + 10 * minor (13000: 13.0)."""
        version = ctypes.c_int()
        self._check(self._lib.cuDriverGetVersion(ctypes.byref(version)), "cuDriverGetVersion")
        return version.value

    def total_memory(self, device: int) -> int:
        total = ctypes.c_size_t()
        status = self._lib.cuDeviceTotalMem_v2(ctypes.byref(total), self._device(device))
        self._check(status, "cuDeviceTotalMem")
        return total.value


def host_memory(meminfo_path: str = "/proc/meminfo") -> tuple[int, int]:
    """(total, available) system memory in bytes."""
    fields: dict[str, int] = {}
    try:
        with open(meminfo_path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields[key] = int(rest.split()[0]) * 1024  # values are in kB
    except OSError:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        return pages * size, pages * size
    total = fields.get("MemTotal", 0)
    return total, fields.get("MemAvailable", total)


def detect_platform(
    probe: CudaProbe | None = None, device: int = 0, use_gpu: bool = True
) -> PlatformInfo:
    """Classify this node. `probe` defaults to the real driver; `use_gpu=False` forces CPU."""
    host_total, host_available = host_memory()
    if use_gpu and probe is None:
        probe = DriverProbe.load()
    if not use_gpu or probe is None or probe.device_count() <= device:
        return PlatformInfo("cpu", None, 0, host_total, host_available, False, False, False)
    pageable = probe.attribute(ATTR_PAGEABLE_MEMORY_ACCESS, device) == 1
    host_tables = probe.attribute(ATTR_PAGEABLE_USES_HOST_PAGE_TABLES, device) == 1
    concurrent = probe.attribute(ATTR_CONCURRENT_MANAGED_ACCESS, device) == 1
    kind: PlatformKind = "grace" if pageable and host_tables else "discrete"
    return PlatformInfo(
        kind=kind,
        device_name=probe.name(device),
        device_total_bytes=probe.total_memory(device),
        host_total_bytes=host_total,
        host_available_bytes=host_available,
        pageable_memory_access=pageable,
        uses_host_page_tables=host_tables,
        concurrent_managed_access=concurrent,
    )
