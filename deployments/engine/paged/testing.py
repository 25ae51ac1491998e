"""Test and benchmark helpers for the paged engine: kept off the production `PagedEngine`.

- `logits_for(engine, plan)`: run one hand-built step and return each sequence's logits
  (comparisons against a reference model); `step_inputs(engine, batch)`: a step's device
  inputs, not run; `reserve(engine, seq, tokens)`: its pages, as the scheduler gives them;
- `step_log(engine)`: every step's (sequences, tokens, decode_only, seconds) from the first
  call on; an empty tuple for an engine that keeps none (the generic engine);
- `serve_test_ranks` / `tp_groups` / `open_session`: a gloo world of CPU processes whose
  rank 0 (the test) opens tensor-parallel sessions of 2 or 4 ranks one after another.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence as Seq
from typing import Any

import numpy as np
import torch

from deployments.config import AppArgs
from deployments.engine.paged.rank_loop import serve_rank
from deployments.engine.paged.scheduler import Batch
from deployments.engine.paged.sequence import Sequence
from deployments.engine.paged.step_times import StepRecord
from deployments.engine.paged.tensor_parallel import TensorParallel

TP_SIZES = (2, 4)  # the sessions a test world serves


def logits_for(engine: Any, plan: list[tuple[Sequence, int]]) -> list[torch.Tensor]:
    """Run one hand-built step and return each sequence's logits for its new tokens.

    Each (sequence, n) feeds its next n tokens; pages are allocated as needed. Call only
    while no request runs on `engine` (a PagedEngine).
    """
    batch = Batch()
    for seq, n in plan:
        reserve(engine, seq, seq.num_computed + n)
        batch.add(seq, n)
    step = engine.runner.plan(batch)
    every = np.arange(len(step.tokens), dtype=np.int64)  # every row's logits, no draw
    step = dataclasses.replace(step, logits_index=every, seed=None, words=None, rules=None)
    logits, _ = engine.runner.run(step)  # every tensor-parallel rank runs it too
    out, start = [], 0
    for seq, n in plan:
        out.append(logits[start : start + n])
        start += n
        seq.num_computed += n
    return out


def step_inputs(engine: Any, batch: Batch) -> Any:
    """A hand-built batch's device inputs (runner.StepInputs: tokens, meta, logits index,
    plan, rules), planned and uploaded as a step would be, not run (TP=1 engines only)."""
    return engine.runner._inputs(engine.runner.plan(batch), None)


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


def tp_groups(world: int) -> dict[int, Any]:
    """The process groups of the first 2 and 4 ranks (every rank of the world calls this)."""
    import torch.distributed as dist

    return {size: dist.new_group(list(range(size))) for size in TP_SIZES if size <= world}


def open_session(size: int, groups: dict[int, Any]) -> TensorParallel:
    """Rank 0: start a session of `size` ranks (0: end the world); its group as rank 0."""
    import torch.distributed as dist

    dist.broadcast_object_list([size], src=0)
    return TensorParallel(0, size, groups.get(size))


def serve_test_ranks(rank: int, world: int, init_method: str) -> None:
    """A spawned CPU process, rank `rank` of a gloo world: serves each session rank 0 opens
    that includes it (rank_loop.serve_rank), until a session of size 0."""
    import torch.distributed as dist

    from deployments.memory import setup_memory
    from deployments.platform import detect_platform

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    groups = tp_groups(world)

    def memory_for(args: AppArgs) -> Any:
        return setup_memory(args.memory, detect_platform(use_gpu=False))

    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        if not box[0]:
            break
        if rank < box[0]:
            serve_rank(TensorParallel(rank, box[0], groups[box[0]]), memory_for)
    dist.destroy_process_group()
