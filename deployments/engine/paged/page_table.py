"""The device page table: one row of page ids per sequence, kept between steps.

Each sequence a step runs holds a row (a slot) of a persistent int32 table on the device; the
host remembers how many of the sequence's pages that row already holds and sends only the new
ones, so a step's host work grows with its new pages, not with every user's total. A step's
table is a device gather of its rows ([rows, width] int32, zeros past each sequence's pages,
as attention and the CUDA graphs read it).

Rows are a cache: a row stays valid while its sequence keeps the same page list, which only
grows (the scheduler gives a sequence a new list whenever it takes pages away: preemption,
finishing, admission). A sequence whose list changed, or whose row was reclaimed, is written
again from its first page. Rows not used for longest are reclaimed first; the table doubles
its rows when one step needs more than it has.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch


class PageTable:
    def __init__(self, width: int, device: torch.device, rows: int = 16) -> None:
        """`width`: the most pages one sequence can hold."""
        self.width = width
        self.device = device
        self.table = torch.zeros(rows, width, dtype=torch.int32, device=device)
        self._free = list(range(rows - 1, -1, -1))
        # slot -> (the page list its row mirrors, pages written, its first column); least
        # recently used first
        self._rows: OrderedDict[int, tuple[list[int], int, int]] = OrderedDict()
        self._slot_of: dict[int, int] = {}  # id(page list) -> slot

    def plan(
        self, page_lists: list[list[int]], offsets: list[int] | None = None
    ) -> tuple[list[int], list[int], np.ndarray]:
        """Each list's slot for this step, the slots to clear first, and the new entries to
        write as a flat (slot, column, page) int32 array; the caller uploads the entries.
        `offsets`: the column each list's first page goes to (a chunked lane's first block;
        the columns before it stay 0, the scratch page, never read)."""
        slots, cleared, writes = [], [], []
        in_step: set[int] = set()
        for i, pages in enumerate(page_lists):
            at = offsets[i] if offsets else 0
            if at + len(pages) > self.width:
                raise ValueError(f"{at + len(pages)} pages exceed the page table's {self.width}")
            slot = self._slot_of.get(id(pages))
            held = self._rows.get(slot) if slot is not None else None
            if held is None or held[0] is not pages or held[1] > len(pages) or held[2] != at:
                slot = self._take(in_step, len(page_lists))
                cleared.append(slot)
                written = 0
            else:
                written = held[1]
            for col in range(written, len(pages)):
                writes += (slot, at + col, pages[col])
            self._rows[slot] = (pages, len(pages), at)
            self._rows.move_to_end(slot)
            self._slot_of[id(pages)] = slot
            slots.append(slot)
            in_step.add(slot)
        return slots, cleared, np.asarray(writes, dtype=np.int32)

    def _take(self, in_step: set[int], need: int) -> int:
        """A free slot, else the least recently used one this step does not use."""
        if not self._free and len(self._rows) < need:
            self._grow()
        if self._free:
            return self._free.pop()
        slot = next(s for s in self._rows if s not in in_step)
        pages, *_ = self._rows.pop(slot)
        if self._slot_of.get(id(pages)) == slot:
            del self._slot_of[id(pages)]
        return slot

    def _grow(self) -> None:
        rows = self.table.shape[0]
        bigger = torch.zeros(2 * rows, self.width, dtype=torch.int32, device=self.device)
        bigger[:rows].copy_(self.table)
        self.table = bigger
        self._free += list(range(2 * rows - 1, rows - 1, -1))

    def fit(self, rows: int) -> None:
        """At least `rows` rows (another rank's table grew to them: tensor parallelism)."""
        while self.table.shape[0] < rows:
            self._grow()

    def apply(self, cleared: torch.Tensor, writes: torch.Tensor) -> None:
        """On the device: zero the `cleared` rows, then write the (slot, column, page) triples."""
        if cleared.numel():
            self.table.index_fill_(0, cleared, 0)
        if writes.numel():
            entries = writes.view(-1, 3).long()
            self.table[entries[:, 0], entries[:, 1]] = entries[:, 2].int()

    def rows(self, slots: torch.Tensor, width: int) -> torch.Tensor:
        """The step's table: its sequences' rows, `width` pages wide ([len(slots), width])."""
        return self.table[:, :width].index_select(0, slots)
