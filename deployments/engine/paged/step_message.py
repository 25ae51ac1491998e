"""One step as a message: everything a rank's runner needs to execute it, in plain host values.

The scheduler's rank plans a step from its batch (`ModelRunner.plan`: sequences, pages, the
page-table and TokenCounts bookkeeping) into a `StepMessage`; every rank, that one included,
executes the same message (`ModelRunner.execute`: upload, forward, draw). With tensor
parallelism (tensor_parallel.py) rank 0 sends each message to the other ranks
(rank_loop.py); nothing else crosses between ranks outside the model's all-reduces. The
message names no sequence: a rank without the scheduler needs none.

Units: token rows are the step's flattened tokens (T), sequence rows its sequences (S),
sampling rows the sequences that draw a token (R). Page ids and page-table slots are the
scheduler's, identical on every rank (each rank's pages hold its own KV heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deployments.engine.paged.logits_rules import HostRules


@dataclass(frozen=True)
class StepMessage:
    tokens: np.ndarray  # int64 [T]; 0 where a token comes from the step in flight
    positions: np.ndarray  # int64 [T]
    write_pages: np.ndarray  # int64 [T]: the lane-0 page each token's KV goes to
    lane_write_pages: tuple[np.ndarray, ...]  # int64 [T] each: chunked lanes' pages
    fed: np.ndarray  # int64 [T]: the row of the step in flight's tokens it reads, -1: none
    feeds: bool  # some token comes from the step in flight (the previous step executed)
    logits_index: np.ndarray  # int64 [R]: the token row each logits row is read from
    query_lens: tuple[int, ...]  # [S] tokens of each sequence this step
    context_lens: tuple[int, ...]  # [S] its KV length after the step
    decode_only: bool
    # The page table (page_table.py): each page list's slot (S per lane), the slots
    # cleared first, the (slot, column, page) int32 entries written; `table_rows`: rows the
    # table must have; `width`: the widest row's columns.
    slots: np.ndarray
    cleared: np.ndarray
    writes: np.ndarray
    table_rows: int
    width: int
    # The draw: None when no row samples (the step only writes KV, or reads logits).
    seed: np.ndarray | None = None  # int64 [R] (sampler.SamplingPlan)
    words: np.ndarray | None = None  # int32 (sampler.SamplingPlan.words)
    rules: HostRules | None = None  # logit rules of the sampling rows, when any has some
    count_slots: int = 0  # rows TokenCounts must have (0: none made yet)
    eos_ids: tuple[int, ...] | None = None  # new end-of-sequence ids since the last step

    @property
    def samples(self) -> bool:
        return self.seed is not None


STOP = None  # the message that ends a rank's loop (rank_loop.py)
