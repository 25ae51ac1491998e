"""The persistent page table gives every step the table a rebuild from the page lists would."""

from __future__ import annotations

import random

import numpy as np
import torch

from deployments.engine.paged.page_table import PageTable


def step_table(table: PageTable, lists: list[list[int]]) -> torch.Tensor:
    slots, cleared, writes = table.plan(lists)
    table.apply(torch.tensor(cleared, dtype=torch.long), torch.from_numpy(writes))
    width = max(len(p) for p in lists)
    return table.rows(torch.tensor(slots, dtype=torch.long), width)


def rebuilt(lists: list[list[int]]) -> torch.Tensor:
    width = max(len(p) for p in lists)
    out = np.zeros((len(lists), width), dtype=np.int32)
    for i, pages in enumerate(lists):
        out[i, : len(pages)] = pages
    return torch.from_numpy(out)


def test_rows_match_a_rebuild_as_lists_grow_are_replaced_and_outnumber_the_rows():
    rng = random.Random(0)
    table = PageTable(width=64, device=torch.device("cpu"), rows=2)
    seqs = [[rng.randrange(1, 500)] for _ in range(12)]
    for _ in range(300):
        i = rng.randrange(len(seqs))
        if rng.random() < 0.1:
            seqs[i] = []  # preempted or finished: a new list
        if len(seqs[i]) < 64:
            seqs[i] += [rng.randrange(1, 500) for _ in range(rng.randrange(0, 3))]
        batch = [s for s in rng.sample(seqs, rng.randrange(1, len(seqs) + 1)) if s]
        if batch:
            assert torch.equal(step_table(table, batch), rebuilt(batch))


def test_a_step_writes_only_new_pages():
    table = PageTable(width=16, device=torch.device("cpu"))
    pages = [3, 4, 5]
    step_table(table, [pages])
    pages += [9]
    _, cleared, writes = table.plan([pages])
    assert cleared == [] and writes.tolist() == [table._slot_of[id(pages)], 3, 9]
