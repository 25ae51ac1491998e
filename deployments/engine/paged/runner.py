"""Turns a scheduled batch into tensors, runs the model (eagerly or as a CUDA graph), samples."""

from __future__ import annotations

import numpy as np
import torch

from deployments.engine.paged.attention import AttentionMetadata
from deployments.engine.paged.cuda_graphs import DecodeGraphs
from deployments.engine.paged.model import DecoderModel
from deployments.engine.paged.sampler import sample
from deployments.engine.paged.scheduler import Batch


class ModelRunner:
    def __init__(self, model: DecoderModel, page_size: int, graphs: DecodeGraphs | None) -> None:
        self.model = model
        self.page_size = page_size
        self.device = model.w.embed.device
        self.graphs = graphs

    def _prepare(
        self, batch: Batch
    ) -> tuple[torch.Tensor, AttentionMetadata, list[int], torch.Tensor]:
        """Host-side batch tensors (NumPy, then one copy each to the device)."""
        page = self.page_size
        width = max(len(seq.pages) for seq in batch.seqs)
        table = np.zeros((len(batch), width), dtype=np.int32)
        tokens, positions, contexts, sampling_rows, logits_index = [], [], [], [], []
        write_pages, count = [], 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens, strict=True)):
            start = seq.num_computed
            pages = np.asarray(seq.pages, dtype=np.int64)
            table[i, :len(pages)] = pages
            pos = np.arange(start, start + n, dtype=np.int64)
            positions.append(pos)
            write_pages.append(pages[pos // page])
            tokens += seq.token_ids[start:start + n]
            contexts.append(start + n)
            count += n
            if batch.samples(i):
                sampling_rows.append(i)
                logits_index.append(count - 1)
        pos_all = np.concatenate(positions)

        def dev(values: np.ndarray | list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
            return torch.as_tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        meta = AttentionMetadata(
            positions=dev(pos_all), write_pages=dev(np.concatenate(write_pages)),
            write_offsets=dev(pos_all % page), page_table=dev(table, torch.int32),
            context_lens=dev(contexts, torch.int32), query_lens=list(batch.num_tokens),
            context_lens_host=contexts, decode_only=batch.decode_only,
        )
        return dev(tokens), meta, sampling_rows, dev(logits_index)

    def execute(self, batch: Batch) -> list[int | None]:
        """Run one step; the sampled token of each sequence that samples, else None."""
        tokens, meta, rows, logits_index = self._prepare(batch)
        if meta.decode_only and self.graphs is not None and self.graphs.fits(len(batch)):
            logits = self.graphs.run(meta, tokens)
        else:
            logits = self.model.forward(tokens, meta, logits_index)
        drawn = sample(logits, [batch.seqs[i].sampling for i in rows],
                       [batch.seqs[i].generator for i in rows]) if rows else []
        result: list[int | None] = [None] * len(batch)
        for i, token in zip(rows, drawn, strict=True):
            result[i] = token
        return result
