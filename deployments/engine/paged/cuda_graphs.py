"""Decode steps replayed as CUDA graphs, one per bucketed batch size.

A decode-only step runs the same kernels every time, so it is captured once per batch-size
bucket into a graph with static input buffers and replayed: launch overhead disappears, which
is what keeps batch-1 decode near the memory-bandwidth floor. Rows beyond the real batch are
padding: they write their KV to the pool's reserved scratch page and have no context.
"""

from __future__ import annotations

import logging

import torch

from deployments.engine.paged.attention import AttentionMetadata
from deployments.engine.paged.model import DecoderModel

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256, 320, 384, 448, 512)


class DecodeGraphs:
    def __init__(self, model: DecoderModel, max_batch: int, max_pages: int) -> None:
        device = model.w.embed.device
        self.model = model
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        big = self.buckets[-1]

        def zeros(*shape: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.zeros(*shape, dtype=dtype, device=device)

        self.tokens, self.positions = zeros(big), zeros(big)
        self.write_pages, self.write_offsets = zeros(big), zeros(big)
        self.page_table = zeros(big, max_pages, dtype=torch.int32)
        self.context_lens = zeros(big, dtype=torch.int32)
        # Every tensor a graph reads must outlive it: a freed one's memory gets reused.
        self.rows = torch.arange(big, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):  # largest first: later captures reuse its memory
            meta = self._meta(size)
            index = self.rows[:size]
            for _ in range(2):  # warm up (Triton compiles, cuBLAS picks kernels)
                model.forward(self.tokens[:size], meta, index)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = model.forward(self.tokens[:size], meta, index)
            self.graphs[size] = graph
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.buckets)

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            positions=self.positions[:size], write_pages=self.write_pages[:size],
            write_offsets=self.write_offsets[:size], page_table=self.page_table[:size],
            context_lens=self.context_lens[:size], query_lens=[1] * size,
            context_lens_host=[], decode_only=True,
        )

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.buckets[-1]

    def run(self, meta: AttentionMetadata, tokens: torch.Tensor) -> torch.Tensor:
        """Replay the smallest graph that fits; logits for the real rows only."""
        n = tokens.shape[0]
        size = next(b for b in self.buckets if b >= n)
        self.tokens[:n].copy_(tokens)
        self.positions[:n].copy_(meta.positions)
        self.write_pages[:n].copy_(meta.write_pages)
        self.write_offsets[:n].copy_(meta.write_offsets)
        width = meta.page_table.shape[1]
        self.page_table[:n, :width].copy_(meta.page_table)
        self.context_lens[:n].copy_(meta.context_lens)
        if size > n:  # padding rows: scratch page 0, no context
            for buf in (self.tokens, self.positions, self.write_pages, self.write_offsets,
                        self.context_lens):
                buf[n:size].zero_()
        self.graphs[size].replay()
        return self.outputs[size][:n]
