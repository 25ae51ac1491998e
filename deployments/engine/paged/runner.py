"""Turns a scheduled batch into tensors, runs the model (eagerly or as a CUDA graph), samples.

A step is launched without waiting for it: its sampled tokens stay on the device (and start
their copy to pinned host memory), so the engine can schedule and launch the next step while
this one runs. A decode row whose token is still in flight (`Sequence.in_flight`: not yet in
its `token_ids`) reads it from the previous step's sampled tokens on the device. Each
sequence's pages live in a persistent device page table (page_table.py) that a step only adds
its new pages to. Host-side inputs travel packed: one copy of
int64 values and one of int32 values a step, each piece aligned (upload.py); steps whose rows
use logit rules (penalties, logit_bias, a grammar: logits_rules.py) upload those in one more
pair. Logprobs, when a row asks, are computed from the raw logits on the device and copied to
pinned host memory with the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from deployments.engine.interface import TokenLogprob
from deployments.engine.paged.attention import AttentionMetadata
from deployments.engine.paged.cuda_graphs import DecodeGraphs, PrefillGraphs
from deployments.engine.paged.logits_rules import (
    DeviceRules,
    HostRules,
    TokenCounts,
    build_rules,
    draw,
    host_entries,
    needs_rules,
    raw_logprobs,
)
from deployments.engine.paged.model import DecoderModel
from deployments.engine.paged.page_table import PageTable
from deployments.engine.paged.sampler import SamplingPlan, build_plan, draw_seed
from deployments.engine.paged.scheduler import Batch
from deployments.engine.paged.sequence import Sequence, Status
from deployments.engine.paged.upload import upload


@dataclass
class Launched:
    """A step on its way: its batch, and its sampled tokens once the device has them."""

    batch: Batch
    rows: list[int]  # batch rows that sample, in the order of `tokens`
    tokens: torch.Tensor | None  # [len(rows)] int64 on the device
    host: torch.Tensor | None = None  # the same, copied into (pinned) host memory
    event: torch.cuda.Event | None = None  # fires when `host` holds them
    row_of: dict[int, int] = field(default_factory=dict)  # id(seq) -> index in `tokens`
    # (chosen [R], top values [R, k], top ids [R, k]) in (pinned) host memory, and each
    # sampling row's k (None: no logprobs); only when some row asks.
    logprobs_host: tuple[torch.Tensor, ...] | None = None
    logprobs_wanted: list[int | None] = field(default_factory=list)

    def result(self) -> list[int | None]:
        """Each batch row's sampled token (None where it samples nothing); waits for the step."""
        if self.event is not None:
            self.event.synchronize()
        drawn = self.host.tolist() if self.host is not None else []
        out: list[int | None] = [None] * len(self.batch)
        for i, token in zip(self.rows, drawn, strict=True):
            out[i] = token
        return out

    def logprobs(self) -> list[TokenLogprob | None]:
        """Each batch row's logprob entry (None where it asks none); call after `result`."""
        out: list[TokenLogprob | None] = [None] * len(self.batch)
        if self.logprobs_host is not None:
            chosen, values, ids = (t.tolist() for t in self.logprobs_host)
            for i, entry in zip(
                self.rows, host_entries(chosen, values, ids, self.logprobs_wanted), strict=True
            ):
                out[i] = entry
        return out


class StepInputs(NamedTuple):
    """A step's device inputs: tokens, attention metadata, the batch rows that sample, the
    logits rows they read, and their sampling plan (None when no row samples)."""

    tokens: torch.Tensor
    meta: AttentionMetadata
    rows: list[int]
    logits_index: torch.Tensor
    plan: tuple[torch.Tensor, ...] | None
    rules: DeviceRules | None = None  # logit rules of the sampling rows, when any has some


def sampling_plan(seqs: list[Sequence]) -> SamplingPlan:
    """The draws of these sequences' next tokens, from plain host values: each keyed by the
    sequence's seed and the token's index (reproducible however batches form), EOS banned
    while min_tokens is not reached."""
    drawn = [s.num_generated + s.in_flight for s in seqs]  # tokens drawn before this one
    return build_plan(
        [s.sampling for s in seqs],
        [draw_seed(s.sample_seed, n) for s, n in zip(seqs, drawn, strict=True)],
        [n < s.sampling.min_tokens for s, n in zip(seqs, drawn, strict=True)],
    )


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        page_size: int,
        graphs: DecodeGraphs | None,
        eos_token_ids: frozenset[int],
        prefill_graphs: PrefillGraphs | None = None,
    ) -> None:
        self.model = model
        self.page_size = page_size
        self.device = model.w.embed.device
        self.graphs = graphs
        self.prefill_graphs = prefill_graphs
        self.steps_by_path = {"decode_graph": 0, "prefill_graph": 0, "eager": 0}  # for stats
        self.vocab = model.spec.vocab_size
        max_len = model.cos.shape[0]  # rope positions: the longest sequence the model runs
        self.table = PageTable(-(-max_len // page_size), self.device)
        self.counts: TokenCounts | None = None  # made when a request first needs penalties
        self._counted: list[Sequence] = []  # sequences holding a TokenCounts slot
        self.set_eos(eos_token_ids)

    def set_eos(self, eos_token_ids: frozenset[int]) -> None:
        """The end-of-sequence ids a draw may be banned from (min_tokens)."""
        self.eos_ids = torch.tensor(sorted(eos_token_ids), dtype=torch.int32, device=self.device)

    def _rules(self, seqs: list[Sequence]) -> HostRules | None:
        """The sampling rows' logit rules (None when no row has any): TokenCounts slots for
        penalized sequences (a fresh one resets its counts and marks its prompt), and the
        grammar masks, which need each sequence's last token on the host (the engine does not
        run ahead while a grammar runs)."""
        if self._counted:  # finished sequences give their slots back
            for seq in [s for s in self._counted if s.status is Status.FINISHED]:
                self.counts.release(seq.counts_slot)  # type: ignore[union-attr]
                seq.counts_slot = 0
                self._counted.remove(seq)
        if not any(needs_rules(s.sampling) for s in seqs):
            return None
        fresh = []
        for seq in seqs:
            if seq.sampling.penalized and not seq.counts_slot:
                if self.counts is None:
                    self.counts = TokenCounts(self.vocab, self.device)
                seq.counts_slot = self.counts.assign()
                self._counted.append(seq)
                fresh.append((seq.counts_slot, seq.token_ids[: seq.prompt_len]))
        masks = [(r, s.grammar.mask_words()) for r, s in enumerate(seqs) if s.grammar]
        return build_rules(
            [s.sampling for s in seqs], [s.counts_slot for s in seqs], fresh, self.vocab, masks
        )

    def _prepare(self, batch: Batch, feed: Launched | None = None) -> StepInputs:
        """A step's device inputs, in one int64 and one int32 upload."""
        page, lanes = self.page_size, self.model.pool.lanes.chunk_lanes
        lists, offsets, width = _page_lists(batch, lanes)
        host = _host_rows(batch, page, feed)
        contexts = [start + n for start, n in zip(batch.starts, batch.num_tokens, strict=True)]
        slots, cleared, writes = self.table.plan(lists, offsets)
        sampling_seqs = [batch.seqs[i] for i in host.sampling_rows]
        plan = sampling_plan(sampling_seqs) if host.sampling_rows else None
        rules = self._rules(sampling_seqs) if host.sampling_rows else None
        longs = upload(
            [
                np.asarray(host.tokens),
                host.positions,
                host.write_pages,
                host.positions % page,
                np.asarray(host.logits_index),
                np.asarray(host.fed),
                plan.seed if plan else np.zeros(0),
                np.asarray(slots),
                np.asarray(cleared),
                *(_lane_write_pages(batch, page, j) for j in range(lanes)),
            ],
            np.int64,
            self.device,
        )
        tok, positions_d, pages_d, offsets_d, logits_d, fed_d, seed_d, slots_d, cleared_d = longs[
            :9
        ]
        writes_d, contexts_d, words_d = upload(
            [writes, np.asarray(contexts), plan.words() if plan else np.zeros(0)],
            np.int32,
            self.device,
        )
        self.table.apply(cleared_d, writes_d)
        if host.feeds:
            assert feed.tokens is not None
            tok = torch.where(fed_d >= 0, feed.tokens[fed_d.clamp(min=0)], tok)
        tables, rows = self.table.rows(slots_d, width), len(batch)
        lane_tables = tuple(
            (tables[(j + 1) * rows : (j + 2) * rows], w) for j, w in enumerate(longs[9:])
        )
        meta = AttentionMetadata(
            positions=positions_d,
            write_pages=pages_d,
            write_offsets=offsets_d,
            page_table=tables[:rows],
            context_lens=contexts_d,
            query_lens=list(batch.num_tokens),
            context_lens_host=contexts,
            decode_only=batch.decode_only,
            lane_tables=lane_tables,
        )
        device_plan = SamplingPlan.device_views(words_d, seed_d) if plan else None
        device_rules = rules.to_device(self.device) if rules is not None else None
        return StepInputs(tok, meta, host.sampling_rows, logits_d, device_plan, device_rules)

    def launch(self, batch: Batch, feed: Launched | None = None) -> Launched:
        """Enqueue one step; `feed` is the step still in flight whose tokens it may read."""
        tokens, meta, rows, logits_index, plan, rules = self._prepare(batch, feed)
        logits = self._forward(tokens, meta, logits_index)
        step = Launched(batch, rows, None)
        if plan is None:
            return step
        step.tokens = self._draw(logits, plan, rules)  # on the device, no host wait
        step.row_of = {id(batch.seqs[i]): j for j, i in enumerate(rows)}
        wanted = [batch.seqs[i].sampling.logprobs for i in rows]
        lp = None
        if any(k is not None for k in wanted):
            lp = raw_logprobs(logits, step.tokens, max(k or 0 for k in wanted))
            step.logprobs_wanted = wanted
        if step.tokens.is_cuda:
            step.host = _to_pinned(step.tokens)
            if lp is not None:
                step.logprobs_host = tuple(_to_pinned(t) for t in lp)
            step.event = torch.cuda.Event()
            step.event.record()
        else:
            step.host = step.tokens
            step.logprobs_host = lp
        return step

    def _forward(
        self, tokens: torch.Tensor, meta: AttentionMetadata, logits_index: torch.Tensor
    ) -> torch.Tensor:
        """The step's logits: a decode or prefill CUDA graph's where one fits, else eager."""
        if meta.decode_only and self.graphs is not None and self.graphs.fits(len(tokens)):
            path, logits = "decode_graph", self.graphs.run(meta, tokens)
        elif self.prefill_graphs is not None and self.prefill_graphs.fits(meta.query_lens):
            path, logits = "prefill_graph", self.prefill_graphs.run(meta, tokens)  # last row
        else:
            path, logits = "eager", self.model.forward(tokens, meta, logits_index)
        self.steps_by_path[path] += 1
        return logits

    def _draw(
        self, logits: torch.Tensor, plan: tuple[torch.Tensor, ...], rules: DeviceRules | None
    ) -> torch.Tensor:
        return draw(logits, plan, rules, self.counts, self.eos_ids)


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    """An asynchronous copy of a device tensor into pinned host memory."""
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class _HostRows(NamedTuple):
    """A step's per-token host inputs, gathered sequence by sequence (ModelRunner._prepare)."""

    tokens: list[int]  # 0 where a token comes from the step in flight
    positions: np.ndarray  # int64
    write_pages: np.ndarray  # int64, the page each token's KV goes to
    fed: list[int]  # the row of the step in flight each token reads, -1 for none
    sampling_rows: list[int]  # batch rows that sample
    logits_index: list[int]  # the token row each of them samples from
    feeds: bool  # some token comes from the step in flight


def _host_rows(batch: Batch, page: int, feed: Launched | None) -> _HostRows:
    """The batch's tokens, positions and KV write pages, row by row; a token the step in
    flight (`feed`) samples is read from its tokens on the device."""
    tokens, positions, write_pages, fed, sampling_rows, logits_index = [], [], [], [], [], []
    count, feeds = 0, False
    for i, (seq, start, n) in enumerate(
        zip(batch.seqs, batch.starts, batch.num_tokens, strict=True)
    ):
        pos = np.arange(start, start + n, dtype=np.int64)
        positions.append(pos)
        first = start // page
        write_pages.append(
            np.asarray(seq.pages[first : -(-(start + n) // page)], dtype=np.int64)[
                pos // page - first
            ]
        )
        chunk = seq.token_ids[start : start + n]
        if len(chunk) < n:  # sampled by the step in flight: read on the device
            feeds = True
            fed.append(_fed_row(seq, n, feed))
            chunk = [0]
        else:
            fed += [-1] * n
        tokens += chunk
        count += n
        if batch.sampling[i]:
            sampling_rows.append(i)
            logits_index.append(count - 1)
    return _HostRows(
        tokens,
        np.concatenate(positions),
        np.concatenate(write_pages),
        fed,
        sampling_rows,
        logits_index,
        feeds,
    )


def _page_lists(batch: Batch, lanes: int) -> tuple[list[list[int]], list[int] | None, int]:
    """The page-table rows a step reads: every sequence's lane-0 pages, then lane by lane its
    chunked lanes' pages, each from the column of its first block (None: all from 0); and
    the widest row's columns."""
    lists = [seq.pages for seq in batch.seqs]
    if not lanes:
        return lists, None, max(len(pages) for pages in lists)
    offsets = [0] * len(lists)
    for j in range(lanes):
        lists += [seq.chunk_pages[j] for seq in batch.seqs]
        offsets += [seq.chunk_base for seq in batch.seqs]
    return lists, offsets, max(at + len(p) for p, at in zip(lists, offsets, strict=True))


def _lane_write_pages(batch: Batch, page: int, lane: int) -> np.ndarray:
    """The page each token's KV goes to in chunked lane `lane` (int64)."""
    out = []
    for seq, start, n in zip(batch.seqs, batch.starts, batch.num_tokens, strict=True):
        pos = np.arange(start, start + n, dtype=np.int64)
        first = start // page
        held = seq.chunk_pages[lane][
            first - seq.chunk_base : -(-(start + n) // page) - seq.chunk_base
        ]
        out.append(np.asarray(held, dtype=np.int64)[pos // page - first])
    return np.concatenate(out)


def _fed_row(seq: Sequence, n: int, feed: Launched | None) -> int:
    """The row of `feed`'s tokens that holds `seq`'s token in flight."""
    if n != 1 or feed is None or id(seq) not in feed.row_of:
        raise RuntimeError(
            f"sequence {seq.request_id}: a token in flight is needed by a step that cannot read it"
        )
    return feed.row_of[id(seq)]
