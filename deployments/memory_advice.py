"""Where managed memory should live: CUDA memory advice for the unified-memory tiers on Grace.

On a coherent Grace node a replica's tiers are all managed memory from one RMM resource; advice
decides where each range lives. Hot data (resident weights, the device KV pool) is advised to
prefer the GPU's HBM; cold data (weight layers beyond the device budget, the host KV tier) to
prefer the Grace CPU's LPDDR and to stay mapped for the GPU, which then reads it in place over
NVLink-C2C instead of faulting it over. `prefetch` moves a range ahead of use.

`DriverAdvisor` calls the CUDA driver (cuMemAdvise, cuMemPrefetchAsync) through ctypes and reads
the effect back (cuMemRangeGetAttribute), so tests can check it on any GPU with managed memory.

The driver keeps managed memory in 2 MiB blocks (`ADVICE_PAGE`): advice is recorded per page,
but migration, prefetch and a neighbour's first touch act on whole blocks. A range advised while
it shares a block with another allocation (a caching allocator packs several tensors into one
segment; RMM's pool packs segments) can therefore see its edge pages placed by that neighbour.
`isolated_empty` allocates a tensor alone in whole 2 MiB blocks of its own, and the advisor
advises and prefetches the whole blocks a tensor's storage owns (`advised_span`), never a
fraction of one. After every advice call the advisor reads the advice back and records any
mismatch (`mismatches`); `advice_check.AdviceCheck` reads every range back at later moments.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any, Literal, Protocol

logger = logging.getLogger(__name__)

Where = Literal["host", "device"]

ADVICE_PAGE = 2 << 20  # bytes: the driver's managed-memory block (migration and prefetch unit)
CU_DEVICE_CPU = -1
CU_DEVICE_INVALID = -2  # a range attribute read over pages that disagree (or have none)
_SET_PREFERRED_LOCATION, _SET_ACCESSED_BY = 3, 5  # CUmem_advise
_RANGE_PREFERRED_LOCATION, _RANGE_ACCESSED_BY, _RANGE_LAST_PREFETCH_LOCATION = 2, 3, 4


def round_up(n: int, page: int = ADVICE_PAGE) -> int:
    return -(-n // page) * page


def isolated_empty(numel: int, dtype: Any, device: Any, page: int = ADVICE_PAGE) -> Any:
    """An uninitialised 1-D tensor of `numel` elements that starts on a `page` boundary and
    whose storage owns every `page` block it touches (allocated in the caller's allocation
    scope, padded by at most 2 pages): no other allocation shares a block with it, so advice
    and migration of its blocks concern it alone."""
    import torch

    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.empty(round_up(max(nbytes, 1), page) + page, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % page
    return raw[offset : offset + nbytes].view(dtype)


def advised_span(tensor: Any, page: int = ADVICE_PAGE) -> tuple[int, int, bool]:
    """(start, bytes, isolated): the whole `page` blocks around `tensor` when its storage owns
    them (isolated), else exactly the tensor's bytes (its blocks are shared with neighbours)."""
    ptr, size = tensor.data_ptr(), tensor.numel() * tensor.element_size()
    storage = tensor.untyped_storage()
    low, high = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    start, end = ptr - ptr % page, round_up(ptr + size, page)
    if size and low <= start and end <= high:
        return start, end - start, True
    return ptr, size, False


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
            self._lib, "cuMemPrefetchAsync_v2"
        )
        if self._v2:
            self._advise = self._lib.cuMemAdvise_v2
            self._advise.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, _Location]
            self._prefetch = self._lib.cuMemPrefetchAsync_v2
            self._prefetch.argtypes = [
                ctypes.c_uint64,
                ctypes.c_size_t,
                _Location,
                ctypes.c_uint,
                ctypes.c_void_p,
            ]
        else:
            self._advise = self._lib.cuMemAdvise
            self._advise.argtypes = [ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int, ctypes.c_int]
            self._prefetch = self._lib.cuMemPrefetchAsync
            self._prefetch.argtypes = [
                ctypes.c_uint64,
                ctypes.c_size_t,
                ctypes.c_int,
                ctypes.c_void_p,
            ]
        self._lib.cuMemRangeGetAttribute.argtypes = [
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_int,
            ctypes.c_uint64,
            ctypes.c_size_t,
        ]
        self.mismatches: list[str] = []  # advice that read back otherwise right after a call

    def _target(self, where: Where) -> Any:
        if self._v2:
            return _Location(2, 0) if where == "host" else _Location(1, self.device)
        return CU_DEVICE_CPU if where == "host" else self.device

    def expected(self, where: Where) -> int:
        """What `preferred_location` reads for a range advised to `where`."""
        return CU_DEVICE_CPU if where == "host" else self.device

    def _check(self, status: int, what: str) -> None:
        if status != 0:
            raise RuntimeError(f"{what} failed with CUresult {status} (is the range managed?)")

    def prefer(self, tensor: Any, where: Where) -> None:
        """Advise the whole blocks `tensor`'s storage owns (see `advised_span`), then read the
        advice back: a mismatch is logged and kept in `mismatches`."""
        ptr, size, _ = advised_span(tensor)
        if not size:
            return
        _bind_context()
        self._check(
            self._advise(ptr, size, _SET_PREFERRED_LOCATION, self._target(where)),
            "cuMemAdvise(preferred location)",
        )
        if where == "host":  # read in place over the link rather than migrated on touch
            self._check(
                self._advise(ptr, size, _SET_ACCESSED_BY, self._target("device")),
                "cuMemAdvise(accessed by)",
            )
        got = self.read(ptr, size, _RANGE_PREFERRED_LOCATION)
        if got != self.expected(where):
            note = (
                f"advice to prefer {where} over {size} bytes at {ptr:#x} (offset "
                f"{ptr % ADVICE_PAGE} in its 2 MiB block) reads back {got} right after"
            )
            self.mismatches.append(note)
            logger.warning("%s", note)

    def prefetch(self, tensor: Any, where: Where, stream: Any = None) -> None:
        import torch

        ptr, size, _ = advised_span(tensor)
        if not size:
            return
        _bind_context()
        handle = (stream or torch.cuda.current_stream()).cuda_stream
        if self._v2:
            status = self._prefetch(ptr, size, self._target(where), 0, handle)
        else:
            status = self._prefetch(ptr, size, self._target(where), handle)
        self._check(status, "cuMemPrefetchAsync")

    def read(self, ptr: int, size: int, attribute: int) -> int:
        """One CUmem_range_attribute of [ptr, ptr + size): a device ordinal, CU_DEVICE_CPU, or
        CU_DEVICE_INVALID when the pages disagree or have none."""
        value = ctypes.c_int()
        self._check(
            self._lib.cuMemRangeGetAttribute(ctypes.byref(value), 4, attribute, ptr, size),
            "cuMemRangeGetAttribute",
        )
        return value.value

    def accessed_by(self, ptr: int, size: int, slots: int = 4) -> list[int]:
        """The devices the range is mapped for (the advice's accessed-by set)."""
        values = (ctypes.c_int * slots)()
        self._check(
            self._lib.cuMemRangeGetAttribute(values, 4 * slots, _RANGE_ACCESSED_BY, ptr, size),
            "cuMemRangeGetAttribute",
        )
        return [v for v in values if v != CU_DEVICE_INVALID]

    def _attribute(self, tensor: Any, attribute: int) -> int:
        return self.read(tensor.data_ptr(), tensor.numel() * tensor.element_size(), attribute)

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
