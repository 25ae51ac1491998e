"""The ranks of a tensor-parallel replica other than rank 0: how they are built and their loop.

Rank 0 is the `PagedEngine` (scheduler, cache manager, streams); it sends every other rank
one `RankBuild` at start-up, then one `StepMessage` per step (step_message.py), then `STOP`
at shutdown. A rank builds its weights (its parts of the checkpoint), a KV pool of the same
pages for its KV heads, and a runner, then executes every step it is sent, in order: a step
that reads tokens still in flight reads those of the step executed just before it (rank 0
only ever feeds from its most recent step), and since every rank draws the same tokens from
the same logits, those are rank 0's tokens too.

Nothing here knows how ranks were started: `serve_rank` needs only a joined
`TensorParallel` group and a way to set up the rank's memory (processes in the CPU tests,
testing.serve_test_ranks; Ray actors later).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from deployments.config import AppArgs
from deployments.engine.paged.build import build_runner, load_weights, torch_dtype
from deployments.engine.paged.kv_pool import KVPool
from deployments.engine.paged.runner import ModelRunner
from deployments.engine.paged.step_message import STOP
from deployments.engine.paged.tensor_parallel import TensorParallel, shard_spec
from deployments.layout import Layout
from deployments.memory import MemoryAccountant
from deployments.model_spec import ModelSpec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankBuild:
    """What rank 0 decided that every rank builds from (sent once, before any step)."""

    args: AppArgs
    layout: Layout  # rank 0's plan: pages, page size, context, dtype, device
    spec: ModelSpec  # the whole model's; each rank takes its shard_spec
    path: str  # the checkpoint directory
    eos_ids: frozenset[int]


def refuse_unsupported(layout: Layout, tp: TensorParallel) -> None:
    """Raise for what tensor parallelism does not do yet: GPUs (NCCL, CUDA graphs), a host
    KV tier, streamed or advised weights (rank 0 alone would move its pages or layers)."""
    if tp.size == 1:
        return
    reasons = []
    if not layout.device.startswith("cpu"):
        reasons.append("GPUs (NCCL and CUDA graphs are not built yet)")
    if layout.host_pages:
        reasons.append("a host KV tier")
    if layout.streamed_layers or layout.cold_layers or layout.advise:
        reasons.append("weights beyond the device budget or placed by advice")
    if reasons:
        raise ValueError(f"tensor parallelism does not support {', '.join(reasons)} yet")


def build_rank(build: RankBuild, tp: TensorParallel, memory: MemoryAccountant) -> ModelRunner:
    """This rank's runner: its parts of the weights and a pool of the layout's pages for its
    KV heads."""
    spec, layout = shard_spec(build.spec, tp.size), build.layout
    weights = load_weights(layout, spec, build.args, memory, None, build.path, tp)
    with memory.allocation_scope():
        pool = KVPool(spec, layout.num_pages, layout.page_size, torch_dtype(layout), layout.device)
    return build_runner(layout, spec, build.args, memory, weights, pool, build.eos_ids, tp=tp)


def serve_steps(runner: ModelRunner) -> int:
    """Execute every step rank 0 sends, until STOP; the number of steps run."""
    tp, last, steps = runner.tp, None, 0
    while (step := tp.recv()) is not STOP:
        _, last = runner.execute(step, last)  # the next step's fed rows read these
        steps += 1
    return steps


def serve_rank(tp: TensorParallel, memory_for: Callable[[AppArgs], MemoryAccountant]) -> int:
    """A whole rank's life: receive the build, set up its memory (`memory_for` the app's
    args), build, serve steps until STOP; the number of steps run."""
    build: RankBuild = tp.recv()
    runner = build_rank(build, tp, memory_for(build.args))
    logger.info("tensor-parallel rank %d of %d ready", tp.rank, tp.size)
    return serve_steps(runner)
