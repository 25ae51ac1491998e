"""Where managed memory should live: CUDA memory advice for the unified-memory tiers on Grace.

On a coherent Grace node a replica's tiers are all managed memory from one RMM resource; advice
decides where each range lives. Hot data (resident weights, the device KV pool) is advised to
prefer the GPU's HBM; cold data (weight layers beyond the device budget, the host KV tier) to
prefer the Grace CPU's LPDDR and to stay mapped for the GPU, which then reads it in place over
NVLink-C2C instead of faulting it over. `prefetch` moves a range ahead of use.

`DriverAdvisor` calls the CUDA driver (cuMemAdvise, cuMemPrefetchAsync) through ctypes and reads
the effect back (cuMemRangeGetAttribute), so tests can check it on any GPU with managed memory.
"""

from __future__ import annotations

import ctypes
from typing import Any, Literal, Protocol

Where = Literal["host", "device"]

CU_DEVICE_CPU = -1
_SET_PREFERRED_LOCATION, _SET_ACCESSED_BY = 3, 5  # CUmem_advise
_RANGE_PREFERRED_LOCATION, _RANGE_LAST_PREFETCH_LOCATION = 2, 4  # CUmem_range_attribute


class MemoryAdvisor(Protocol):
    """Advice on managed tensors (each a contiguous range)."""

    def prefer(self, tensor: Any, where: Where) -> None:
        """Make `where` the range's home; the GPU keeps a mapping of host-preferred ranges."""

    def prefetch(self, tensor: Any, where: Where, stream: Any = None) -> None:
        """Start moving the range to `where` on `stream` (the current one when None)."""


class _Location(ctypes.Structure):
    """CUmemLocation: {type, id}; type 1 is a device (id: its ordinal), 2 the host."""

    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class DriverAdvisor:
    """MemoryAdvisor through the CUDA driver API, for the GPU of ordinal `device`.

    Uses the location-based entry points (cuMemAdvise_v2, cuMemPrefetchAsync_v2, CUDA >= 12.2)
    where the driver has them, else the device-ordinal ones.
    """

    def __init__(self, device: int = 0, lib: ctypes.CDLL | None = None) -> None:
        self.device = device
        self._lib = lib or ctypes.CDLL("libcuda.so.1")
        self._v2 = hasattr(self._lib, "cuMemAdvise_v2") and hasattr(
            self._lib, "cuMemPrefetchAsync_v2")
        if self._v2:
            self._advise = self._lib.cuMemAdvise_v2
            self._advise.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, _Location]
            self._prefetch = self._lib.cuMemPrefetchAsync_v2
            self._prefetch.argtypes = [ctypes.c_uint64, ctypes.c_size_t, _Location,
                                       ctypes.c_uint, ctypes.c_void_p]
        else:
            self._advise = self._lib.cuMemAdvise
            self._advise.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int,
                                     ctypes.c_int]
            self._prefetch = self._lib.cuMemPrefetchAsync
            self._prefetch.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int,
                                       ctypes.c_void_p]
        self._lib.cuMemRangeGetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_size_t,
                                                     ctypes.c_int, ctypes.c_uint64,
                                                     ctypes.c_size_t]

    @staticmethod
    def _range(tensor: Any) -> tuple[int, int]:
        return tensor.data_ptr(), tensor.numel() * tensor.element_size()

    def _target(self, where: Where) -> Any:
        if self._v2:
            return _Location(2, 0) if where == "host" else _Location(1, self.device)
        return CU_DEVICE_CPU if where == "host" else self.device

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with CUresult {status} (is the range managed?)")

    def prefer(self, tensor: Any, where: Where) -> None:
        ptr, size = self._range(tensor)
        if not size:
            return
        _bind_context()
        self._check(self._advise(ptr, size, _SET_PREFERRED_LOCATION, self._target(where)),
                    "cuMemAdvise(preferred location)")
        if where == "host":  # read in place over the link rather than migrated on touch
            self._check(self._advise(ptr, size, _SET_ACCESSED_BY, self._target("device")),
                        "cuMemAdvise(accessed by)")

    def prefetch(self, tensor: Any, where: Where, stream: Any = None) -> None:
        import torch

        ptr, size = self._range(tensor)
        if not size:
            return
        _bind_context()
        handle = (stream or torch.cuda.current_stream()).cuda_stream
        if self._v2:
            status = self._prefetch(ptr, size, self._target(where), 0, handle)
        else:
            status = self._prefetch(ptr, size, self._target(where), handle)
        self._check(status, "cuMemPrefetchAsync")

    def _attribute(self, tensor: Any, attribute: int) -> int:
        ptr, size = self._range(tensor)
        value = ctypes.c_int()
        self._check(self._lib.cuMemRangeGetAttribute(ctypes.byref(value), 4, attribute, ptr,
                                                     size), "cuMemRangeGetAttribute")
        return value.value

    def preferred_location(self, tensor: Any) -> int:
        """The range's preferred location: a device ordinal, CU_DEVICE_CPU, or -2 (none or
        mixed)."""
        return self._attribute(tensor, _RANGE_PREFERRED_LOCATION)

    def last_prefetch_location(self, tensor: Any) -> int:
        return self._attribute(tensor, _RANGE_LAST_PREFETCH_LOCATION)


def _bind_context() -> None:
    """Driver calls need the CUDA context current on this thread: PyTorch's runtime makes
    its primary context current on first use in a thread."""
    import torch

    torch.cuda.current_stream().query()
