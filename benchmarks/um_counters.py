"""The driver's unified-memory counters through CUPTI: bytes migrated, page faults, by address.

CUPTI's activity API reports each managed-memory migration (host to device, device to host)
with the virtual address and size of the range that moved, and each GPU and CPU page fault,
with timestamps. `UmCounters.start()` runs before the process's other CUDA calls: it registers
the buffer callbacks, initialises the driver (cuInit: CUPTI's header says the counter
configuration "should be called after CUDA driver initialization"; an earlier version configured
before any CUDA call, and on the lent H200 cuptiActivityEnable then answered
CUPTI_ERROR_NOT_READY), configures the counters and enables them. Records are collected in the
background and `between(t0, t1)` returns those that started in a window (`timestamp()` reads
CUPTI's clock). Loaded through ctypes from the libcupti that ships with PyTorch's CUDA wheels
(nvidia-cuda-cupti) or the system's; `start()` returns None, with the reason in
`UmCounters.unavailable`, where there is none or it refuses; every call it made and its result
are in `UmCounters.calls`, in order.

Only the stable head of the record is read (CUpti_ActivityUnifiedMemoryCounter2 and 3 agree on
it): kind u32 @0, counterKind u32 @4, value u64 @8, start u64 @16, end u64 @24, address u64 @32.
"""

from __future__ import annotations

import ctypes
import glob
import os
import struct
import sys
import threading
from typing import ClassVar, NamedTuple

KIND_UNIFIED_MEMORY_COUNTER = 25  # CUpti_ActivityKind
HTOD, DTOH, CPU_PAGE_FAULT, GPU_PAGE_FAULT = 1, 2, 3, 4  # CUpti_ActivityUnifiedMemoryCounterKind
SCOPE_PROCESS_SINGLE_DEVICE = 1
_HEAD = struct.Struct("<IIQQQQ")  # kind, counterKind, value, start, end, address
BUFFER_BYTES = 8 << 20


class Record(NamedTuple):
    counter: int  # HTOD, DTOH, CPU_PAGE_FAULT, GPU_PAGE_FAULT
    value: int  # bytes for transfers; fault groups (GPU) or a PC (CPU) for faults
    start: int  # ns, CUPTI's clock
    address: int  # the range's virtual base address


def parse_head(raw: bytes) -> Record | None:
    """A unified-memory record's head (64 bytes or more); None for another kind."""
    kind, counter, value, start, _end, address = _HEAD.unpack_from(raw)
    return Record(counter, value, start, address) if kind == KIND_UNIFIED_MEMORY_COUNTER else None


def _library() -> ctypes.CDLL:
    names = ["libcupti.so", "libcupti.so.13", "libcupti.so.12"]
    for root in sys.path:  # PyTorch's wheels: site-packages/nvidia/**/lib/libcupti.so*
        names += sorted(
            glob.glob(os.path.join(root, "nvidia", "**", "libcupti.so*"), recursive=True)
        )
    errors = []
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError as exc:
            errors.append(str(exc))
    raise OSError("no libcupti found: " + "; ".join(errors[-3:]))


_REQUESTED = ctypes.CFUNCTYPE(
    None,
    ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_size_t),
    ctypes.POINTER(ctypes.c_size_t),
)
_COMPLETED = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t
)


class _Config(ctypes.Structure):
    _fields_ = [
        ("scope", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
        ("deviceId", ctypes.c_uint32),
        ("enable", ctypes.c_uint32),
    ]


class UmCounters:
    unavailable: str | None = None
    calls: ClassVar[list[tuple[str, int]]] = []  # (call, its result) in the last start()

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        self._buffers: dict[int, ctypes.Array] = {}
        self._lock = threading.Lock()
        self.records: list[Record] = []
        self._on_requested = _REQUESTED(self._requested)  # kept alive: CUPTI calls them
        self._on_completed = _COMPLETED(self._completed)

    @classmethod
    def start(cls, device: int = 0) -> UmCounters | None:
        """Configure and enable the counters (before other CUDA calls); None where impossible."""
        cls.calls = []
        try:
            counters = cls(_library())
            counters._enable(device)
        except (OSError, RuntimeError, AttributeError) as exc:
            cls.unavailable = str(exc)
            return None
        return counters

    def _try(self, name: str, *args: object, lib: ctypes.CDLL | None = None) -> int:
        status = getattr(lib or self._lib, name)(*args)
        self.calls.append((name, status))
        return status

    def _call(self, name: str, *args: object) -> None:
        status = self._try(name, *args)
        if status != 0:
            raise RuntimeError(f"{name} failed with CUptiResult {status}")

    def _enable(self, device: int) -> None:
        """Register, initialise the driver, configure, enable; where enabling is refused, the
        transfer counters alone, then with the device's primary context current, then
        cuptiActivityEnableAndDump (documented to enable like cuptiActivityEnable here)."""
        self._call("cuptiActivityRegisterCallbacks", self._on_requested, self._on_completed)
        cuda = ctypes.CDLL("libcuda.so.1")
        self._try("cuInit", 0, lib=cuda)  # a CUresult: 0, or why the driver refused
        kinds = [HTOD, DTOH, CPU_PAGE_FAULT, GPU_PAGE_FAULT]
        if self._configure(kinds, device) != 0:
            self._configure(kinds[:2], device)  # fault counters unsupported here
        if self._try("cuptiActivityEnable", KIND_UNIFIED_MEMORY_COUNTER) == 0:
            return
        self._configure(kinds[:2], device)
        if self._try("cuptiActivityEnable", KIND_UNIFIED_MEMORY_COUNTER) == 0:
            return
        handle, context = ctypes.c_int(), ctypes.c_void_p()  # kept: torch uses the same one
        self._try("cuDeviceGet", ctypes.byref(handle), device, lib=cuda)
        self._try("cuDevicePrimaryCtxRetain", ctypes.byref(context), handle, lib=cuda)
        self._try("cuCtxSetCurrent", context, lib=cuda)
        self._configure(kinds[:2], device)
        if self._try("cuptiActivityEnable", KIND_UNIFIED_MEMORY_COUNTER) == 0:
            return
        if self._try("cuptiActivityEnableAndDump", KIND_UNIFIED_MEMORY_COUNTER) == 0:
            return
        raise RuntimeError(
            "cuptiActivityEnable refused: "
            + ", ".join(f"{name} -> {result}" for name, result in self.calls)
        )

    def _configure(self, kinds: list[int], device: int) -> int:
        configs = (_Config * len(kinds))(
            *[_Config(SCOPE_PROCESS_SINGLE_DEVICE, k, device, 1) for k in kinds]
        )
        return self._try("cuptiActivityConfigureUnifiedMemoryCounter", configs, len(kinds))

    def _requested(self, buffer, size, max_records) -> None:
        raw = ctypes.create_string_buffer(BUFFER_BYTES + 8)
        address = ctypes.addressof(raw)
        aligned = address + (-address) % 8
        with self._lock:
            self._buffers[aligned] = raw
        buffer[0] = aligned
        size[0] = BUFFER_BYTES
        max_records[0] = 0

    def _completed(self, context, stream, buffer, size, valid) -> None:
        record = ctypes.c_void_p()
        get_next = self._lib.cuptiActivityGetNextRecord
        found = []
        while get_next(ctypes.c_void_p(buffer), ctypes.c_size_t(valid), ctypes.byref(record)) == 0:
            head = parse_head(ctypes.string_at(record.value, _HEAD.size))
            if head is not None:
                found.append(head)
        with self._lock:
            self.records.extend(found)
            self._buffers.pop(buffer, None)

    def timestamp(self) -> int:
        value = ctypes.c_uint64()
        self._call("cuptiGetTimestamp", ctypes.byref(value))
        return value.value

    def flush(self) -> None:
        self._call("cuptiActivityFlushAll", 1)  # 1: CUPTI_ACTIVITY_FLAG_FLUSH_FORCED

    def stop(self) -> None:
        """Stop collecting and take the last records (before the process's CUDA teardown)."""
        self.flush()
        self._lib.cuptiActivityDisable(KIND_UNIFIED_MEMORY_COUNTER)

    def between(self, t0: int, t1: int) -> list[Record]:
        """Records that started in [t0, t1] (flushes first)."""
        self.flush()
        with self._lock:
            return [r for r in self.records if t0 <= r.start <= t1]


def moved(records: list[Record], ranges: list[tuple[int, int]]) -> dict[str, int]:
    """Bytes migrated each way into or out of `ranges` ((start, bytes) each), and faults there."""

    def inside(address: int) -> bool:
        return any(start <= address < start + size for start, size in ranges)

    mine = [r for r in records if inside(r.address)]
    return {
        "htod_bytes": sum(r.value for r in mine if r.counter == HTOD),
        "dtoh_bytes": sum(r.value for r in mine if r.counter == DTOH),
        "gpu_fault_groups": sum(r.value for r in mine if r.counter == GPU_PAGE_FAULT),
        "cpu_faults": sum(1 for r in mine if r.counter == CPU_PAGE_FAULT),
    }
