"""Test and benchmark helpers for the paged engine: kept off the production `PagedEngine`.

- `logits_for(engine, plan)`: run one hand-built step and return each sequence's logits
  (comparisons against a reference model); `reserve(engine, seq, tokens)`: its pages, as the
  scheduler gives them;
- `step_log(engine)`: every step's (sequences, tokens, decode_only, seconds) from the first
  call on; an empty tuple for an engine that keeps none (the generic engine).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import Any

import torch

from deployments.engine.paged.scheduler import Batch
from deployments.engine.paged.sequence import Sequence
from deployments.engine.paged.step_times import StepRecord


def logits_for(engine: Any, plan: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
    """Run one hand-built step and return each sequence's logits for its new tokens.

    Each (sequence, n) feeds its next n tokens; pages are allocated as needed. Call only
    while no request runs on `engine` (a PagedEngine).
    """
    batch = Batch()
    for seq, n in plan:
        reserve(engine, seq, seq.num_computed + n)
        batch.add(seq, n)
    tokens, meta, *_ = engine.runner._prepare(batch)
    every = torch.arange(tokens.shape[0], device=tokens.device)
    logits = engine.runner.model.forward(tokens, meta, every)
    out, start = [], 0
    for seq, n in plan:
        out.append(logits[start : start + n])
        start += n
        seq.num_computed += n
    return out


def reserve(engine: Any, seq: Sequence, tokens: int) -> None:
    """Give `seq` pages for its first `tokens` tokens as the scheduler does: its chunked lanes'
    pages behind its window freed first (chunk_window.py), then the new ones."""
    window = engine.cache.window
    engine.cache.free(window.release(seq))
    window.grow(seq, tokens, engine.cache.allocate(window.need(seq, tokens)))


def step_log(engine: Any) -> Seq[StepRecord]:
    """The engine's step log, kept from the first call on (the same object every call)."""
    steps = getattr(engine, "_steps", None)
    return steps.keep_log() if steps is not None else ()
