"""Bytes between a KV tier and host pieces, through a small ring of (pinned) staging chunks.

A user's cache leaves and enters a replica as host byte pieces (Ray's object store holds
them: pageable memory). A host-device copy out of pageable memory runs at a tenth of the
pinned rate (5.6 against 55 GB/s measured on an H200's PCIe), and pinning a whole user's
buffer when it moves costs more than the copy (2.7 s for 4 GiB, the first time). So every copy
passes through `SLOTS` chunks of pinned memory allocated once, when the engine starts:

- out (`read`): the device copies chunks i+1, i+2 into their slots while the host hands chunk
  i on (`sink`: into the object store, one object a chunk);
- in (`write`): the host copies chunk i+1 out of its pieces into a slot (several threads:
  torch's copies release the GIL) while the device copies chunk i in;

device copies run on a stream of the ring's own, which first waits for the compute stream's
work so far; a slot is refilled only after the event of its last copy fired, and `write`
returns only once every byte is in place. On CPU (or for a host tier) the same path runs
with plain copies.

A tier buffer is read as flat bytes; `runs` are (byte offset, byte length) ranges of it, in
the order their bytes stream.
"""

from __future__ import annotations

import bisect
import itertools
import os
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

SLOTS = 3  # one filling, one copying, one spare so a late event rarely stalls the other side
# Chunks handed on at once (out): two object-store puts, each a multi-threaded memcpy, use more
# of the host's memory bandwidth than one; the third slot takes the next device copy meanwhile.
SINKS = 2
COPY_THREADS = max(1, min(8, os.cpu_count() or 1))  # a host memcpy thread moves ~8-10 GB/s
MIN_PART = 4 << 20  # host copies split across threads into parts of at least this many bytes
Run = tuple[int, int]  # (byte offset, byte length)


@dataclass
class StageTimes:
    """Where one transfer's time went, in seconds. The phases run at once where they can:
    `overlap_s` is their sum less the wall time (the time the pipelining saved)."""

    wall_s: float = 0.0
    device_s: float = 0.0  # the device's copy time (CUDA events; 0 on CPU)
    host_s: float = 0.0  # host copies between pieces (or a host tier) and slots
    sink_s: float = 0.0  # handing chunks on (out: the object store's put)
    wait_s: float = 0.0  # blocked on a slot's device copy
    chunks: int = 0

    @property
    def overlap_s(self) -> float:
        return max(0.0, self.device_s + self.host_s + self.sink_s - self.wall_s)

    def as_dict(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}{k}": float(v)
            for k, v in {**asdict(self), "overlap_s": self.overlap_s}.items()
        }


class Streamed(NamedTuple):
    """What `read` made: the sink's result for each chunk, each chunk's bytes, the times."""

    pieces: list[Any]
    sizes: list[int]
    times: StageTimes


class _Spans:
    """Items of `lengths` bytes laid end to end: which parts of them a byte range covers."""

    def __init__(self, lengths: list[int]) -> None:
        self.starts = list(itertools.accumulate(lengths, initial=0))
        self.total = self.starts[-1]

    def parts(self, start: int, stop: int) -> list[tuple[int, int, int]]:
        """(item, offset inside it, length) for bytes [start, stop), in order."""
        out, i = [], bisect.bisect_right(self.starts, start) - 1
        while start < stop:
            end = min(stop, self.starts[i + 1])
            if end > start:
                out.append((i, start - self.starts[i], end - start))
            start, i = end, i + 1
        return out


def slice_runs(runs: list[Run], start: int, stop: int) -> list[Run]:
    """The part of `runs` (laid end to end) that holds stream bytes [start, stop), as runs."""
    at = [r[0] for r in runs]
    return [(at[r] + off, n) for r, off, n in _Spans([n for _, n in runs]).parts(start, stop)]


def flat_bytes(buffer: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's storage as one flat uint8 tensor (a view)."""
    return buffer.reshape(-1).view(torch.uint8)


def _timed(sink: Callable[[np.ndarray], Any], view: np.ndarray) -> tuple[Any, float]:
    began = time.perf_counter()
    return sink(view), time.perf_counter() - began


def _tensor(piece: np.ndarray) -> torch.Tensor:
    """A (possibly read-only) uint8 array as a tensor, only ever read."""
    with warnings.catch_warnings():  # read-only object-store memory: copied from, not written
        warnings.simplefilter("ignore")
        return torch.frombuffer(piece, dtype=torch.uint8)


class StagingRing:
    def __init__(
        self, device: torch.device, slot_bytes: int, slots: int = SLOTS, threads: int = COPY_THREADS
    ) -> None:
        """`slots` chunks of `slot_bytes`, pinned when `device` is a GPU (allocated now)."""
        cuda = torch.device(device).type == "cuda"
        self.slot_bytes, self.threads = slot_bytes, threads
        self.slots = [
            torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=cuda) for _ in range(slots)
        ]
        self.stream = torch.cuda.Stream(device=device) if cuda else None
        self._copies = ThreadPoolExecutor(threads, "kv-staging") if threads > 1 else None
        self._sinks = ThreadPoolExecutor(SINKS, "kv-sink")
        self._lock = threading.Lock()  # one transfer at a time: the slots are shared

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * len(self.slots)

    def close(self) -> None:
        self._sinks.shutdown(wait=False)
        if self._copies is not None:
            self._copies.shutdown(wait=False)

    # ---- out: tier -> host pieces ------------------------------------------------------------

    def read(
        self,
        src: torch.Tensor,
        runs: list[Run],
        sink: Callable[[np.ndarray], Any],
        on_piece: Callable[[int, Any], None] | None = None,
    ) -> Streamed:
        """Stream `runs` of `src` (flat bytes) out in chunks of at most `slot_bytes`: `sink`
        gets each chunk, as a uint8 array valid only during the call, from up to `SINKS`
        threads at once; its results come back in the chunks' order, and go to
        `on_piece(chunk index, result)` in that order, from this thread, as they come."""
        times, start = StageTimes(), time.perf_counter()
        spans = _Spans([n for _, n in runs])
        chunks = [
            (a, min(a + self.slot_bytes, spans.total))
            for a in range(0, spans.total, self.slot_bytes)
        ]
        slots, pieces = len(self.slots), []
        pending: dict[int, Any] = {}  # chunk -> its copy's events
        sinking: dict[int, Future] = {}  # chunk -> its sink's (result, seconds)
        with self._lock:
            self._after_compute(src)
            try:
                for j in range(min(slots, len(chunks))):
                    pending[j] = self._fetch(src, runs, spans, chunks[j], j, times)
                for i, (a, b) in enumerate(chunks):
                    self._wait(pending.pop(i), times)
                    view = self.slots[i % slots][: b - a].numpy()
                    sinking[i] = self._sinks.submit(_timed, sink, view)
                    while len(sinking) >= min(SINKS, slots) or (sinking and i == len(chunks) - 1):
                        done = min(sinking)  # the oldest: its slot takes chunk done + slots
                        piece, seconds = sinking.pop(done).result()
                        pieces.append(piece)
                        times.sink_s += seconds
                        if on_piece is not None:
                            on_piece(done, piece)
                        if done + slots < len(chunks):
                            j = done + slots
                            pending[j] = self._fetch(src, runs, spans, chunks[j], j, times)
            finally:  # nothing may still touch a slot once the next transfer has the ring
                for future in sinking.values():
                    future.exception()
                for handle in pending.values():
                    self._wait(handle, times)
        times.chunks, times.wall_s = len(chunks), time.perf_counter() - start
        return Streamed(pieces, [b - a for a, b in chunks], times)

    def _fetch(
        self,
        src: torch.Tensor,
        runs: list[Run],
        spans: _Spans,
        chunk: Run,
        i: int,
        times: StageTimes,
    ) -> Any:
        """Start copying stream bytes `chunk` of `src` into slot i % SLOTS; its events."""
        slot, (a, b) = self.slots[i % len(self.slots)], chunk
        pairs, pos = [], 0
        for r, off, n in spans.parts(a, b):
            pairs.append((slot[pos : pos + n], src[runs[r][0] + off : runs[r][0] + off + n]))
            pos += n
        return self._copy(pairs, src.is_cuda, times)

    # ---- in: host pieces -> tier -------------------------------------------------------------

    def write(self, pieces: list[np.ndarray], dst: torch.Tensor, runs: list[Run]) -> StageTimes:
        """Copy the bytes of `pieces`, laid end to end, into `runs` of `dst` (flat bytes),
        chunk by chunk through the slots; returns once every byte is in place."""
        times, start = StageTimes(), time.perf_counter()
        have, want = _Spans([p.nbytes for p in pieces]), _Spans([n for _, n in runs])
        if have.total != want.total:
            raise ValueError(f"{have.total} bytes arrived for {want.total} bytes of pages")
        views = [_tensor(p) if p.nbytes else None for p in pieces]
        pending: list[Any] = [None] * len(self.slots)  # each slot's last copy in
        with self._lock:
            self._after_compute(dst)
            try:
                for i, a in enumerate(range(0, have.total, self.slot_bytes)):
                    b, k = min(a + self.slot_bytes, have.total), i % len(self.slots)
                    self._wait(pending[k], times)  # the slot's last copy in is done
                    pending[k] = None
                    slot, pos, fill = self.slots[k], 0, []
                    for p, off, n in have.parts(a, b):
                        fill.append((slot[pos : pos + n], views[p][off : off + n]))
                        pos += n
                    self._host_copy(fill, times)
                    out, pos = [], 0
                    for r, off, n in want.parts(a, b):
                        at = runs[r][0] + off
                        out.append((dst[at : at + n], slot[pos : pos + n]))
                        pos += n
                    pending[k] = self._copy(out, dst.is_cuda, times)
                    times.chunks += 1
            finally:  # every copy in done (or failed) before the ring is let go
                for handle in pending:
                    self._wait(handle, times)
        times.wall_s = time.perf_counter() - start
        return times

    # ---- copies ------------------------------------------------------------------------------

    def _after_compute(self, tier: torch.Tensor) -> None:
        """Device copies start after the compute stream's work so far (the last step's
        writes; a freed page's last reader)."""
        if self.stream is not None and tier.is_cuda:
            self.stream.wait_stream(torch.cuda.current_stream(tier.device))

    def _copy(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], on_device: bool, times: StageTimes
    ) -> Any:
        """(dst, src) copies: on the ring's stream when a side is on the device (its start
        and end events), else on host threads now (None)."""
        if not on_device or self.stream is None:
            self._host_copy(pairs, times)
            return None
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            begin.record(self.stream)
            for dst, src in pairs:
                dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        return begin, end

    def _wait(self, handle: Any, times: StageTimes) -> None:
        if handle is None:
            return
        began = time.perf_counter()
        handle[1].synchronize()
        times.wait_s += time.perf_counter() - began
        times.device_s += handle[0].elapsed_time(handle[1]) / 1e3

    def _host_copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], times: StageTimes) -> None:
        """(dst, src) host copies, split across the copy threads."""
        began = time.perf_counter()
        total = sum(d.numel() for d, _ in pairs)
        step = max(MIN_PART, -(-total // self.threads))
        parts = [
            (d[i : i + step], s[i : i + step]) for d, s in pairs for i in range(0, d.numel(), step)
        ]
        if self._copies is None or len(parts) < 2:
            for d, s in parts:
                d.copy_(s)
        else:
            list(self._copies.map(lambda part: part[0].copy_(part[1]), parts))
        times.host_s += time.perf_counter() - began
