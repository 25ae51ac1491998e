"""One user's kept KV cache as plain data, to move it to another replica.

An export is a *copy*: the user stays in the sender's engine until the move commits
(`Engine.forget_user` with the export's `generation`), so a request racing the move is served
from an intact cache on one side or the other, never from a half-copied one. The receiver
adopts an export only into free memory (`Engine.import_user`: it never drops anyone to make
room) and only when its `layout` names the same cache layout as its own. A move between
replicas is pipelined: the receiver reserves the pages from the export's header
(`CacheHeader`, `Engine.begin_import`), then takes the bytes in position-addressed chunks
while the sender is still copying the later ones (`Engine.import_chunks`), and registers the
user only at `Engine.finish_import`, once every byte is in place.

`buffers` hold the keys and values as raw bytes, laid end to end in the engine's own order
(the paged engine's pages, a page holding every layer's keys and values; the generic engine's
caches, one buffer for all layers when they share a shape), in pieces of any size: uint8
arrays, or what the sender's `sink` made of each (Ray's object store refs: the sender puts
piece i while it copies piece i+1; the receiving replica resolves them to arrays before it
hands them to its engine). `sizes` are the pieces' bytes. Numpy arrays travel through Ray's object
store without pickling their bytes and are read there in place by a receiver on the same node.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch only where bytes are made: the engine package's interface (and the
    import torch  # ingress, which imports it) must load without torch


# What an export does with each piece it copies (a uint8 array valid only during the call):
# keep a copy (`copy_piece`), or put it in Ray's object store (the replica's moves).
Sink = Callable[[np.ndarray], Any]


class LayoutMismatch(ValueError):
    """An export made by an engine whose cache layout differs from the receiver's."""


@dataclass
class CacheHeader:
    """What a receiver needs to set pages aside for a user's cache before its bytes arrive
    (`Engine.begin_import`): everything of an export but its bytes. The bytes then arrive in
    chunks addressed by position: chunk i is bytes [i * chunk_bytes, ...) of the cache."""

    key: str  # the user key (identity.user_key)
    tenant: str  # the API key's id the user belongs to (kv_shares)
    token_ids: list[int]  # every token the conversation has seen
    kv_len: int  # positions [0, kv_len) have keys and values in the bytes
    layout: str  # engine kind, model, dtype and unit shape: must equal the receiver's
    generation: int = 0  # the sender's count of the user's requests when copied
    nbytes: int = 0  # the cache's bytes in all
    chunk_bytes: int = 0  # bytes of each chunk but the last (the sender's staging chunk)

    def check(self, layout: str) -> None:
        """Raise LayoutMismatch unless this cache fits a receiver of `layout`."""
        if self.layout != layout:
            raise LayoutMismatch(
                f"a cache of layout {self.layout!r} cannot be imported into {layout!r}"
            )
        if not 0 < self.kv_len <= len(self.token_ids):
            raise ValueError(f"an export of {self.kv_len} KV tokens for {len(self.token_ids)}")

    def same_user(self, other: CacheHeader | None) -> bool:
        """Whether `other` describes this very cache (no request ran on the user between;
        the tokens too: a user dropped and back again counts its generations afresh)."""
        if other is None:
            return False
        mine = (self.key, self.generation, self.kv_len, self.nbytes, self.layout)
        theirs = (other.key, other.generation, other.kv_len, other.nbytes, other.layout)
        return mine == theirs and other.token_ids == self.token_ids

    def header(self) -> CacheHeader:
        """This cache's header alone (no bytes), as a begin_import takes it."""
        return CacheHeader(
            self.key,
            self.tenant,
            list(self.token_ids),
            self.kv_len,
            self.layout,
            self.generation,
            self.nbytes,
            self.chunk_bytes,
        )


@dataclass
class UserCacheExport(CacheHeader):
    """A copy of one idle user's kept cache: its header and its bytes (module docstring)."""

    buffers: list[Any] = field(default_factory=list)  # uint8 pieces, or the sink's refs
    sizes: list[int] = field(default_factory=list)  # each piece's bytes
    # Seconds the sender spent copying out (device to host on a GPU, and handing the pieces
    # to its sink), for the move's metrics.
    copy_s: float = 0.0
    # Seconds by phase: the sender's copy out (`out_` keys: staging_ring.StageTimes) and,
    # once imported, the receiver's copy in (`in_` keys), for benchmarks.
    phases: dict[str, float] = field(default_factory=dict)

    def hold(self, pieces: list[Any], sizes: list[int]) -> None:
        """Keep the copied `pieces` (of `sizes` bytes; `nbytes` becomes their sum)."""
        if len(pieces) != len(sizes):
            raise ValueError(f"{len(pieces)} pieces with {len(sizes)} sizes")
        self.buffers, self.sizes = list(pieces), [int(n) for n in sizes]
        self.nbytes = sum(self.sizes)

    def arrays(self) -> list[np.ndarray]:
        """The pieces as uint8 arrays of their stated sizes (ValueError otherwise)."""
        for i, (piece, size) in enumerate(zip(self.buffers, self.sizes, strict=True)):
            if not isinstance(piece, np.ndarray) or piece.dtype != np.uint8 or piece.nbytes != size:
                raise ValueError(f"piece {i} of this export is not {size} bytes of uint8")
        return list(self.buffers)


def add_phases(total: dict[str, float], more: dict[str, float]) -> dict[str, float]:
    """`total` with each of `more`'s seconds (or counts) added, key by key (in place)."""
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v
    return total


@dataclass(frozen=True)
class MovableUser:
    """An idle user an engine could export now: its key and the bytes its cache holds."""

    key: str
    nbytes: int
    on_device: bool = True  # in the device tier (else the host tier)


def copy_piece(piece: np.ndarray) -> np.ndarray:
    """The default sink of an export: a copy of the piece (valid only during the call)."""
    return piece.copy()


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's bytes as a flat uint8 array (no copy when it is contiguous)."""
    import torch

    return tensor.contiguous().view(torch.uint8).reshape(-1).numpy()


def from_bytes(data: np.ndarray, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """`as_bytes`'s inverse, without a copy: a (possibly read-only) array from Ray's object
    store viewed as a tensor of `dtype` and `shape`; only ever read."""
    import torch

    want = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if data.nbytes != want:
        raise ValueError(f"a buffer of {data.nbytes} bytes for {shape} of {dtype} ({want})")
    with warnings.catch_warnings():  # read-only memory is fine: it is copied from, not written
        warnings.simplefilter("ignore")
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(dtype).view(shape)
