"""Which pages of a range the CPU has mapped in RAM, from /proc/self/pagemap: a migration counter
that needs no profiler.

The kernel keeps one 64-bit entry per virtual page of this process in /proc/self/pagemap (at
offset page number x 8): bit 63 set when the page is present in RAM and mapped, bit 62 when it
is swapped out. The file is readable without privileges (unprivileged readers see the frame
numbers zeroed, the flags kept). A range is read in one pread and its flags tested with numpy.

On an x86 discrete GPU the driver (UVM) unmaps a managed page from the CPU when it migrates the
page to the GPU and maps it again when a CPU access faults it back; so for a range advised to
the GPU, CPU-present pages are the bytes resident on the host, and the pages whose present bit
changed between two samples are bytes that moved one way or the other.

What it cannot see:
- a page that leaves and comes back (or comes and leaves) between two samples: each sample is
  a state, not a count of events; sample often (after every step) and the gap is one step;
- a page resident on the host that no CPU access has mapped yet (the driver maps CPU pages on a
  CPU fault): absent here, though in RAM; so "present" is proof of a host copy, "absent" is not
  proof of a device one (for a range the GPU keeps touching, it is in practice);
- the size of the driver's moves: a 2 MiB block the driver migrates, or a transparent huge page
  the kernel maps, is still reported per 4 KiB page (pagemap has an entry per base page), so
  counts are in base pages, never in huge pages;
- swapped pages (bit 62) are not resident and count as absent.

A range that does not start or end on a page boundary is widened to the whole pages it touches.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

PAGE = os.sysconf("SC_PAGE_SIZE")
PRESENT = np.uint64(1 << 63)  # pagemap entry: present in RAM (bit 62, swapped, is not)
PAGEMAP = "/proc/self/pagemap"


def pages(start: int, nbytes: int) -> tuple[int, int]:
    """(first page number, page count) of the whole pages [start, start + nbytes) touches."""
    first = start // PAGE
    end = -(-(start + nbytes) // PAGE) if nbytes > 0 else first
    return first, end - first


def _entries(start: int, nbytes: int) -> np.ndarray:
    first, count = pages(start, nbytes)
    fd = os.open(PAGEMAP, os.O_RDONLY)
    try:
        raw = os.pread(fd, count * 8, first * 8)
        while len(raw) < count * 8:  # pagemap fills a read whole; loop in case it does not
            more = os.pread(fd, count * 8 - len(raw), first * 8 + len(raw))
            if not more:
                raise OSError(f"{PAGEMAP} ended at page {first + len(raw) // 8}")
            raw += more
    finally:
        os.close(fd)
    return np.frombuffer(raw, dtype="<u8")


def residency(start: int, nbytes: int) -> np.ndarray:
    """One bool per whole page of the range: present in RAM and mapped for this process."""
    return (_entries(start, nbytes) & PRESENT) != 0


def resident_bytes(start: int, nbytes: int) -> int:
    """Bytes of the range's whole pages that are present in RAM (a page counts whole)."""
    return int(np.count_nonzero(residency(start, nbytes))) * PAGE


def moved_between(a: np.ndarray, b: np.ndarray) -> int:
    """Bytes of pages whose present bit differs between two samples of the same range."""
    if a.shape != b.shape:
        raise ValueError(f"samples of different ranges: {a.shape} and {b.shape} pages")
    return int(np.count_nonzero(a != b)) * PAGE


@dataclasses.dataclass
class Track:
    """Residency of some ranges ((start, bytes) each) sampled over a window: `sample()` after
    every step; `moved_bytes` sums the pages that changed between consecutive samples."""

    spans: list[tuple[int, int]]
    samples: int = 0
    moved_bytes: int = 0
    resident: list[int] = dataclasses.field(default_factory=list)  # bytes, one per sample
    _last: list[np.ndarray] | None = None

    def sample(self) -> int:
        """Read every range once; returns the bytes moved since the previous sample."""
        now = [residency(start, size) for start, size in self.spans]
        moved = 0 if self._last is None else sum(map(moved_between, self._last, now))
        self._last = now
        self.samples += 1
        self.moved_bytes += moved
        self.resident.append(sum(int(np.count_nonzero(r)) for r in now) * PAGE)
        return moved

    def summary(self, steps: int) -> dict[str, int | float | None]:
        """Resident bytes at the first and last samples, at least and at most, and bytes moved
        in all and per step (over `steps` steps)."""
        return {
            "samples": self.samples,
            "moved_bytes": self.moved_bytes,
            "bytes_moved_per_step": self.moved_bytes / max(1, steps),
            "resident_bytes_first": self.resident[0] if self.resident else None,
            "resident_bytes_last": self.resident[-1] if self.resident else None,
            "resident_bytes_min": min(self.resident, default=None),
            "resident_bytes_max": max(self.resident, default=None),
        }
