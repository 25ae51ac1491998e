"""Tensor parallelism's facts: the rank group, what each rank's spec is, which slice it holds.

A replica of `size` ranks splits every layer Megatron-style: attention heads and KV heads,
and the MLP's intermediate width (every routed expert's too), are cut into `size` contiguous
blocks, rank r holding block r (`block`). q/k/v and gate/up are column-parallel (a rank's
rows are its heads' or its width's), o and down row-parallel (its columns), so each layer's
attention and MLP end in one all-reduce (sum) of [tokens, hidden]. Embeddings, norms, the
LM head and MoE routers are replicated, so every rank computes the same logits and draws the
same tokens. A rank is `DecoderModel` over its `shard_spec` (its heads, its width).

`TensorParallel` is the group as the engine sees it: its rank and size, `all_reduce`, and
`send`/`recv` of one Python object from rank 0 (a step: runner.StepMessage). At size 1
(`SINGLE`) all_reduce is the identity and nothing is sent: TP=1 runs as it did before.
How ranks are started (processes here, Ray actors later) is not this module's concern.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from deployments.model_spec import ModelSpec


@dataclass(frozen=True)
class TensorParallel:
    """One replica's rank group. `group`: a torch.distributed process group (None at size
    1); `root`: the global rank of the group's rank 0, the one that schedules and sends."""

    rank: int
    size: int
    group: Any = None
    root: int = 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks, in place; the identity at size 1 (no collective)."""
        if self.size > 1:
            torch.distributed.all_reduce(t, group=self.group)
        return t

    def send(self, message: object) -> None:
        """Rank 0: hand `message` to every other rank (nothing at size 1)."""
        if self.size > 1:
            torch.distributed.broadcast_object_list([message], src=self.root, group=self.group)

    def recv(self) -> Any:
        """Another rank: the next message rank 0 sent."""
        box: list[Any] = [None]
        torch.distributed.broadcast_object_list(box, src=self.root, group=self.group)
        return box[0]


SINGLE = TensorParallel(0, 1)


def init_gloo(rank: int, size: int, init_method: str, timeout_s: float = 600) -> TensorParallel:
    """Join a gloo group of `size` ranks (CPU) as `rank`; the whole world is the group."""
    torch.distributed.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=size,
        timeout=timedelta(seconds=timeout_s),
    )  # fmt: skip
    return TensorParallel(rank, size, torch.distributed.group.WORLD)


def block(full: int, size: int, rank: int) -> slice:
    """The one answer to "which slice does rank r hold": block r of `size` equal blocks of
    `full` (heads, rows of heads, or intermediate width)."""
    if full % size:
        raise ValueError(f"{full} does not split into {size} equal parts")
    n = full // size
    return slice(rank * n, (rank + 1) * n)


def check_splits(spec: ModelSpec, size: int) -> None:
    """Raise unless heads, KV heads and every MLP width divide by `size`."""
    widths = {
        "attention heads": spec.num_heads,
        "KV heads": spec.num_kv_heads,
        "intermediate size": spec.intermediate_size,
    }
    if spec.moe is not None:
        widths["expert intermediate size"] = spec.moe.intermediate_size
        widths["shared expert intermediate size"] = spec.moe.shared_intermediate_size
    bad = ", ".join(f"{name} {n}" for name, n in widths.items() if n % size)
    if bad:
        raise ValueError(f"tensor parallel size {size} does not divide the model's {bad}")


def shard_spec(spec: ModelSpec, size: int) -> ModelSpec:
    """One rank's view of the model: its heads, KV heads and MLP widths (1/size of each);
    hidden size, vocabulary, layers and head_dim unchanged. `spec` itself at size 1."""
    if size == 1:
        return spec
    check_splits(spec, size)
    moe = spec.moe
    if moe is not None:
        moe = dataclasses.replace(
            moe,
            intermediate_size=moe.intermediate_size // size,
            shared_intermediate_size=moe.shared_intermediate_size // size,
        )
    return dataclasses.replace(
        spec,
        num_heads=spec.num_heads // size,
        num_kv_heads=spec.num_kv_heads // size,
        intermediate_size=spec.intermediate_size // size,
        moe=moe,
    )
