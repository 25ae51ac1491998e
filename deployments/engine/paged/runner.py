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

A step is planned on the host into one message (`plan` -> step_message.StepMessage) and then
executed (`execute`); under tensor parallelism rank 0 sends each message to the other ranks,
which execute it alike (rank_loop.py), so every rank draws the same tokens.
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
from deployments.engine.paged.step_message import STOP, StepMessage
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
    """A step's device inputs: tokens, attention metadata, the logits rows its sampling
    rows read, and their sampling plan (None when no row samples)."""

    tokens: torch.Tensor
    meta: AttentionMetadata
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
        """The runner of one rank; under tensor parallelism (`model.tp`) rank 0's `launch`
        plans and sends each step, the others `execute` what it sent (rank_loop.py)."""
        self.model = model
        self.tp = model.tp
        self._closed = False  # the other ranks were sent STOP
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
        """The end-of-sequence ids a draw may be banned from (min_tokens); the next step's
        message carries them to the other ranks."""
        self._eos, self._eos_changed = tuple(sorted(eos_token_ids)), True
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

    def plan(self, batch: Batch, feed: Launched | None = None) -> StepMessage:
        """The step as a message (step_message.py), planned on the host from its batch: its
        rows' tokens, positions and pages, the page-table entries it adds, its draws and
        logit rules. `feed`: the step in flight whose tokens it may read."""
        page, lanes = self.page_size, self.model.pool.lanes.chunk_lanes
        lists, offsets, width = _page_lists(batch, lanes)
        host = _host_rows(batch, page, feed)
        slots, cleared, writes = self.table.plan(lists, offsets)
        sampling_seqs = [batch.seqs[i] for i in host.sampling_rows]
        draws = sampling_plan(sampling_seqs) if host.sampling_rows else None
        rules = self._rules(sampling_seqs) if host.sampling_rows else None
        eos, self._eos_changed = (self._eos if self._eos_changed else None), False
        return StepMessage(
            tokens=np.asarray(host.tokens, dtype=np.int64),
            positions=host.positions,
            write_pages=host.write_pages,
            lane_write_pages=tuple(_lane_write_pages(batch, page, j) for j in range(lanes)),
            fed=np.asarray(host.fed, dtype=np.int64),
            feeds=host.feeds,
            logits_index=np.asarray(host.logits_index, dtype=np.int64),
            query_lens=tuple(batch.num_tokens),
            context_lens=tuple(a + n for a, n in zip(batch.starts, batch.num_tokens, strict=True)),
            decode_only=batch.decode_only,
            slots=np.asarray(slots, dtype=np.int64),
            cleared=np.asarray(cleared, dtype=np.int64),
            writes=writes,
            table_rows=self.table.table.shape[0],
            width=width,
            seed=draws.seed if draws else None,
            words=draws.words() if draws else None,
            rules=rules,
            count_slots=self.counts.counts.shape[0] if self.counts is not None else 0,
            eos_ids=eos,
        )

    def _inputs(self, step: StepMessage, feed_tokens: torch.Tensor | None) -> StepInputs:
        """A step's device inputs, in one int64 and one int32 upload; `feed_tokens`: the
        tokens of the step executed before it, which its fed rows read."""
        self._fit(step)
        longs = upload(
            [
                step.tokens,
                step.positions,
                step.write_pages,
                step.positions % self.page_size,
                step.logits_index,
                step.fed,
                step.seed if step.seed is not None else np.zeros(0),
                step.slots,
                step.cleared,
                *step.lane_write_pages,
            ],
            np.int64,
            self.device,
        )
        tok, positions_d, pages_d, offsets_d, logits_d, fed_d, seed_d, slots_d, cleared_d = longs[
            :9
        ]
        writes_d, contexts_d, words_d = upload(
            [
                step.writes,
                np.asarray(step.context_lens),
                step.words if step.words is not None else np.zeros(0),
            ],
            np.int32,
            self.device,
        )
        self.table.apply(cleared_d, writes_d)
        if step.feeds:
            assert feed_tokens is not None
            tok = torch.where(fed_d >= 0, feed_tokens[fed_d.clamp(min=0)], tok)
        tables, rows = self.table.rows(slots_d, step.width), len(step.query_lens)
        lane_tables = tuple(
            (tables[(j + 1) * rows : (j + 2) * rows], w) for j, w in enumerate(longs[9:])
        )
        meta = AttentionMetadata(
            positions=positions_d,
            write_pages=pages_d,
            write_offsets=offsets_d,
            page_table=tables[:rows],
            context_lens=contexts_d,
            query_lens=list(step.query_lens),
            context_lens_host=list(step.context_lens),
            decode_only=step.decode_only,
            lane_tables=lane_tables,
        )
        plan = SamplingPlan.device_views(words_d, seed_d) if step.samples else None
        rules = step.rules.to_device(self.device) if step.rules is not None else None
        return StepInputs(tok, meta, logits_d, plan, rules)

    def _fit(self, step: StepMessage) -> None:
        """This rank's device state as the planning rank's bookkeeping says: page-table rows,
        TokenCounts slots, end-of-sequence ids (no-ops on the planning rank)."""
        self.table.fit(step.table_rows)
        if step.count_slots and self.counts is None:
            self.counts = TokenCounts(self.vocab, self.device, step.count_slots)
        elif step.count_slots:
            self.counts.fit(step.count_slots)  # type: ignore[union-attr]
        if step.eos_ids is not None:
            self.set_eos(frozenset(step.eos_ids))

    def execute(
        self, step: StepMessage, feed_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run a planned step on this rank: its logits rows [R, vocab] and, when it samples,
        the drawn tokens [R] int64 on the device (no host wait)."""
        tokens, meta, logits_index, plan, rules = self._inputs(step, feed_tokens)
        logits = self._forward(tokens, meta, logits_index)
        return logits, (self._draw(logits, plan, rules) if plan is not None else None)

    def run(
        self, step: StepMessage, feed_tokens: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rank 0: send the step to the other ranks (rank_loop.py), then `execute` it."""
        self.tp.send(step)
        return self.execute(step, feed_tokens)

    def close(self) -> None:
        """Rank 0: end the other ranks' loops (nothing at TP=1); once."""
        if not self._closed:
            self._closed = True
            self.tp.send(STOP)

    def launch(self, batch: Batch, feed: Launched | None = None) -> Launched:
        """Enqueue one step; `feed` is the step still in flight whose tokens it may read."""
        logits, tokens = self.run(self.plan(batch, feed), feed.tokens if feed else None)
        rows = [i for i, sampling in enumerate(batch.sampling) if sampling]
        launched = Launched(batch, rows, tokens)
        if tokens is None:
            return launched
        launched.row_of = {id(batch.seqs[i]): j for j, i in enumerate(rows)}
        wanted = [batch.seqs[i].sampling.logprobs for i in rows]
        lp = None
        if any(k is not None for k in wanted):
            lp = raw_logprobs(logits, tokens, max(k or 0 for k in wanted))
            launched.logprobs_wanted = wanted
        if tokens.is_cuda:
            launched.host = _to_pinned(tokens)
            if lp is not None:
                launched.logprobs_host = tuple(_to_pinned(t) for t in lp)
            launched.event = torch.cuda.Event()
            launched.event.record()
        else:
            launched.host = tokens
            launched.logprobs_host = lp
        return launched

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
