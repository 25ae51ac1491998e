"""Where the driver says each advised range lives, read back at named moments.

The engine places managed ranges by advice (memory_advice.py) and then keeps building: it
loads weights, allocates more ranges from the same resource, compiles and captures kernels.
`AdviceCheck` remembers every placed range and, at each moment the engine names (a phase),
reads back its preferred location and last prefetch location through the driver. A range that
reads wrong is mapped in sub-ranges (runs of equal readings, with their offsets in the 2 MiB
blocks), and the first phase at which each range went wrong is kept: that phase says what
moved the advice (the range's own advice call, a copy into it, a later allocation, a kernel).

Reading a whole range back costs two driver calls; the sub-range map only runs on a mismatch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Protocol

from deployments.memory_advice import (
    _RANGE_LAST_PREFETCH_LOCATION,
    _RANGE_PREFERRED_LOCATION,
    ADVICE_PAGE,
    Where,
    advised_span,
)


class RangeReader(Protocol):
    """What DriverAdvisor offers to read advice back."""

    def read(self, ptr: int, size: int, attribute: int) -> int: ...

    def expected(self, where: Where) -> int: ...


@dataclass
class Placement:
    """One advised range: its advised span (whole blocks when isolated) and the tensor in it."""

    name: str
    where: Where
    start: int  # the advised span's address
    size: int  # bytes advised
    isolated: bool  # the span is whole 2 MiB blocks that no other allocation shares
    tensor_offset: int  # where the tensor starts inside the span (bytes)
    tensor_bytes: int
    prefetched: bool = False  # a prefetch to `where` was issued

    @property
    def block_offset(self) -> int:
        """The span's offset inside its first 2 MiB block (0 when isolated)."""
        return self.start % ADVICE_PAGE


class AdviceCheck:
    """Reads every placed range back at named phases; keeps what went wrong and when."""

    def __init__(
        self, reader: RangeReader, chunk_bytes: int = 64 << 10, max_chunks: int = 256
    ) -> None:
        self.reader = reader
        self.chunk_bytes = chunk_bytes
        self.max_chunks = max_chunks
        self.placements: dict[str, Placement] = {}
        self.history: list[dict[str, Any]] = []  # one entry a phase: its mismatches
        self.first_loss: dict[str, str] = {}  # range name -> first phase it read wrong

    def place(self, name: str, tensor: Any, where: Where) -> None:
        """Remember that `tensor` (named `name`) was advised to live at `where`."""
        start, size, isolated = advised_span(tensor)
        self.placements[name] = Placement(
            name,
            where,
            start,
            size,
            isolated,
            tensor.data_ptr() - start,
            tensor.numel() * tensor.element_size(),
        )

    def prefetched(self, name: str) -> None:
        self.placements[name].prefetched = True

    def _reads(self, start: int, size: int) -> tuple[int, int]:
        return (
            self.reader.read(start, size, _RANGE_PREFERRED_LOCATION),
            self.reader.read(start, size, _RANGE_LAST_PREFETCH_LOCATION),
        )

    def _wrong(self, p: Placement, preferred: int, prefetched: int) -> bool:
        want = self.reader.expected(p.where)
        return preferred != want or (p.prefetched and prefetched != want)

    def runs(self, p: Placement) -> list[dict[str, int]]:
        """The span in sub-ranges, merged into runs of equal (preferred, last prefetch)."""
        chunk = max(self.chunk_bytes, -(-p.size // self.max_chunks))
        chunk = -(-chunk // 4096) * 4096  # whole CPU pages
        runs: list[dict[str, int]] = []
        for offset in range(0, p.size, chunk):
            n = min(chunk, p.size - offset)
            preferred, prefetched = self._reads(p.start + offset, n)
            last = runs[-1] if runs else None
            if last and (last["preferred"], last["prefetched"]) == (preferred, prefetched):
                last["bytes"] += n
                continue
            runs.append(
                {
                    "offset": offset,
                    "bytes": n,
                    "preferred": preferred,
                    "prefetched": prefetched,
                    "block_offset": (p.start + offset) % ADVICE_PAGE,
                }
            )
        return runs

    def check(self, phase: str) -> list[dict[str, Any]]:
        """Read every range back now (after the device's queued work); return the ranges that
        read wrong, each with its sub-range map."""
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()  # prefetches are asynchronous
        wrong = []
        for p in self.placements.values():
            preferred, prefetched = self._reads(p.start, p.size)
            if not self._wrong(p, preferred, prefetched):
                continue
            self.first_loss.setdefault(p.name, phase)
            wrong.append(
                {
                    "name": p.name,
                    "where": p.where,
                    "preferred": preferred,
                    "prefetched": prefetched,
                    "runs": self.runs(p),
                }
            )
        self.history.append({"phase": phase, "wrong": wrong})
        return wrong

    def report(self) -> dict[str, Any]:
        """JSON-able: each range's layout, every phase's mismatches, each range's first loss."""
        return {
            "ranges": [
                {**asdict(p), "block_offset": p.block_offset} for p in self.placements.values()
            ],
            "history": self.history,
            "first_loss": self.first_loss,
            "expected": {
                "device": self.reader.expected("device"),
                "host": self.reader.expected("host"),
            },
        }
