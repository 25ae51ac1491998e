"""Copies KV pages between the device pool and the host pool for the cache manager's moves.

On a GPU the copies run on a stream of their own, in order (a page a move frees may be the
next move's destination), as asynchronous DMA that overlaps the model's compute; a move is done
when its event has fired. Runs of consecutive pages on both sides become one copy. On CPU the
copies are immediate. The cache manager decides what moves; this only moves it.
"""

from __future__ import annotations

import torch

from deployments.engine.paged.cache_manager import Move
from deployments.engine.paged.host_pool import HostKVPool
from deployments.engine.paged.kv_pool import KVPool


def contiguous_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """(src start, dst start, length) runs where both sides continue consecutively."""
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            start_s, start_d, n = runs[-1]
            runs[-1] = (start_s, start_d, n + 1)
        else:
            runs.append((s, d, 1))
    return runs


class CopyMover:
    def __init__(self, device: KVPool, host: HostKVPool) -> None:
        self.device = device
        self.host = host
        self._stream = torch.cuda.Stream() if device.buffer.is_cuda else None
        self.bytes_moved = 0

    def launch(self, move: Move) -> None:
        """Start copying `move.src` to `move.dst`; sets `move.handle` (None: already done)."""
        src, dst = (
            (self.device.buffer, self.host.buffer)
            if move.down
            else (self.host.buffer, self.device.buffer)
        )
        runs = contiguous_runs(move.src, move.dst)
        self.bytes_moved += len(move.src) * src[0].numel() * src.element_size()
        if self._stream is None:
            for s, d, n in runs:
                dst[d : d + n].copy_(src[s : s + n])
            move.handle = None
            return
        # Pages the model wrote are final once the compute stream's work so far is done.
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for s, d, n in runs:
                dst[d : d + n].copy_(src[s : s + n], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        move.handle = event

    @staticmethod
    def done(move: Move) -> bool:
        return move.handle is None or bool(move.handle.query())

    @staticmethod
    def wait(move: Move) -> None:
        if move.handle is not None:
            move.handle.synchronize()
