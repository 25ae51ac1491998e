"""Steps replayed as CUDA graphs: decode steps by batch size, one sequence's prefill chunk by
token count.

A decode-only step runs the same kernels every time, so it is captured once per batch-size
bucket into a graph with static input buffers and replayed: launch overhead disappears, which
is what keeps batch-1 decode near the memory-bandwidth floor. Rows beyond the real batch are
padding: they write their KV to the pool's reserved scratch page and have no context.

A short prefill chunk of one sequence (a returning user's new turn: 40-90 tokens after a long
kept history) is host-bound when run eagerly: ~190 Triton launches and ~130 matrix products
through Python cost ~15 ms against ~5 ms of GPU work. Such a chunk is captured once per
token-count bucket too: tokens beyond the chunk are padding (scratch page, position 0), the
prefill kernel's blocks cover the whole bucket and mask rows past the chunk's length, which,
like the context length, the graph reads from the device; the key-split count is fixed per
bucket at what the longest context would choose (splits past the context do no work). The
logits row is the chunk's last token, whether or not the step samples.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from deployments.engine.paged.attention import AttentionMetadata, with_prefill_plan
from deployments.engine.paged.model import DecoderModel

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)
PREFILL_BUCKETS = (16, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # multiples of BLOCK_M


def _capture(
    model: DecoderModel,
    sizes: list[int],
    pool: tuple,
    inputs: Callable[[int], tuple[torch.Tensor, AttentionMetadata, torch.Tensor]],
) -> tuple[dict[int, torch.cuda.CUDAGraph], dict[int, torch.Tensor]]:
    """One graph per size, largest first (later captures reuse its memory), each warmed up
    twice first (Triton compiles, cuBLAS picks kernels); their logits outputs."""
    graphs, outputs = {}, {}
    for size in sorted(sizes, reverse=True):
        tokens, meta, index = inputs(size)
        for _ in range(2):
            model.forward(tokens, meta, index)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs[size] = model.forward(tokens, meta, index)
        graphs[size] = graph
    torch.cuda.synchronize()
    return graphs, outputs


def _zeros(device: torch.device, *shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype, device=device)


class DecodeGraphs:
    def __init__(self, model: DecoderModel, max_batch: int, max_pages: int) -> None:
        device = model.w.embed.device
        self.model = model
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        big = self.buckets[-1]
        self.tokens, self.positions = _zeros(device, big), _zeros(device, big)
        self.write_pages, self.write_offsets = _zeros(device, big), _zeros(device, big)
        self.page_table = _zeros(device, big, max_pages, dtype=torch.int32)
        self.context_lens = _zeros(device, big, dtype=torch.int32)
        self.lanes = _lane_buffers(model, device, big, big, max_pages)
        # Every tensor a graph reads must outlive it: a freed one's memory gets reused.
        self.rows = torch.arange(big, device=device)
        self.pool = torch.cuda.graph_pool_handle()  # the prefill graphs share it
        self.graphs, self.outputs = _capture(
            model,
            self.buckets,
            self.pool,
            lambda size: (self.tokens[:size], self._meta(size), self.rows[:size]),
        )
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:size],
            write_pages=self.write_pages[:size],
            write_offsets=self.write_offsets[:size],
            page_table=self.page_table[:size],
            context_lens=self.context_lens[:size],
            query_lens=[1] * size,
            context_lens_host=[],
            decode_only=True,
            lane_tables=tuple((t[:size], w[:size]) for t, w in self.lanes),
        )

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def run(self, meta: AttentionMetadata, tokens: torch.Tensor) -> torch.Tensor:
        """Replay the smallest graph that fits; logits for the real rows only."""
        n = tokens.shape[0]
        size = next(b for b in self.buckets if b >= n)
        _fill(
            [self.tokens, self.positions, self.write_pages, self.write_offsets, self.context_lens],
            [tokens, meta.positions, meta.write_pages, meta.write_offsets, meta.context_lens],
            n,
            size,
        )
        width = meta.page_table.shape[1]
        self.page_table[:n, :width].copy_(meta.page_table)
        _fill_lanes(self.lanes, meta, n, size, width)
        self.graphs[size].replay()
        return self.outputs[size][:n]


def _lane_buffers(
    model: DecoderModel, device: torch.device, rows: int, tokens: int, max_pages: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Static (page table, write pages) buffers of each chunked lane (kv_pool.py)."""
    return [
        (_zeros(device, rows, max_pages, dtype=torch.int32), _zeros(device, tokens))
        for _ in range(model.pool.lanes.chunk_lanes)
    ]


def _fill_lanes(
    lanes: list[tuple[torch.Tensor, torch.Tensor]],
    meta: AttentionMetadata,
    n: int,
    size: int,
    width: int,
) -> None:
    """Copy each chunked lane's page-table rows and write pages into its static buffers
    (`n` tokens of a `size` bucket; padding tokens write to scratch page 0)."""
    for (table, writes), (step_table, step_writes) in zip(lanes, meta.lane_tables, strict=True):
        table[: step_table.shape[0], :width].copy_(step_table)
        _fill([writes], [step_writes], n, size)


def _fill(static: list[torch.Tensor], values: list[torch.Tensor], n: int, size: int) -> None:
    """Copy each step value into its static buffer's first `n` entries; zero the padding up to
    `size` (scratch page 0, position 0, no context)."""
    for buf, value in zip(static, values, strict=True):
        buf[:n].copy_(value)
        if size > n:
            buf[n:size].zero_()


class PrefillGraphs:
    """One sequence's prefill chunk of up to `max_tokens` tokens, replayed as a CUDA graph
    (needs the Triton prefill kernel: the reference path plans on the host)."""

    def __init__(self, model: DecoderModel, max_tokens: int, max_pages: int, pool: tuple) -> None:
        from deployments.engine.paged.triton_prefill import BLOCK_M, fixed_plan

        device = model.w.embed.device
        top = -(-max_tokens // BLOCK_M) * BLOCK_M
        self.buckets = [b for b in PREFILL_BUCKETS if b < top] + [top]
        big = self.buckets[-1]
        self.tokens, self.positions = _zeros(device, big), _zeros(device, big)
        self.write_pages, self.write_offsets = _zeros(device, big), _zeros(device, big)
        self.page_table = _zeros(device, 1, max_pages, dtype=torch.int32)
        self.context_lens = _zeros(device, 1, dtype=torch.int32)
        self.lanes = _lane_buffers(model, device, 1, big, max_pages)
        self.query_lens = _zeros(device, 1, dtype=torch.int32)
        self.last = _zeros(device, 1)  # the chunk's last token: the logits row
        self.plans = {
            size: fixed_plan(
                size, self.query_lens, model.pool.keys(0).shape[2], model.cos.shape[0], device
            )
            for size in self.buckets
        }
        self.graphs, self.outputs = _capture(
            model,
            self.buckets,
            pool,
            lambda size: (self.tokens[:size], self._meta(size), self.last),
        )
        logger.info("captured prefill CUDA graphs for chunks of %s tokens", self.buckets)

    def _meta(self, size: int) -> AttentionMetadata:
        meta = AttentionMetadata(
            positions=self.positions[:size],
            write_pages=self.write_pages[:size],
            write_offsets=self.write_offsets[:size],
            page_table=self.page_table,
            context_lens=self.context_lens,
            query_lens=[size],
            context_lens_host=[],
            decode_only=False,
            lane_tables=tuple((t, w[:size]) for t, w in self.lanes),
        )
        return with_prefill_plan(meta, self.plans[size])

    def fits(self, query_lens: list[int]) -> bool:
        return len(query_lens) == 1 and 1 < query_lens[0] <= self.buckets[-1]

    def run(self, meta: AttentionMetadata, tokens: torch.Tensor) -> torch.Tensor:
        """Replay the smallest graph that holds the chunk; logits [1, vocab] of its last token."""
        n = tokens.shape[0]
        size = next(b for b in self.buckets if b >= n)
        _fill(
            [self.tokens, self.positions, self.write_pages, self.write_offsets],
            [tokens, meta.positions, meta.write_pages, meta.write_offsets],
            n,
            size,
        )
        width = meta.page_table.shape[1]
        self.page_table[:, :width].copy_(meta.page_table)
        _fill_lanes(self.lanes, meta, n, size, width)
        self.context_lens.copy_(meta.context_lens)
        self.query_lens.fill_(n)
        self.last.fill_(n - 1)
        self.graphs[size].replay()
        return self.outputs[size]
