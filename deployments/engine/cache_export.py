"""One user's kept KV cache as plain data, to move it to another replica.

An export is a *copy*: the user stays in the sender's engine until the move commits
(`Engine.forget_user` with the export's `generation`), so a request racing the move is served
from an intact cache on one side or the other, never from a half-copied one. The receiver
adopts an export only into free memory (`Engine.import_user`: it never drops anyone to make
room) and only when its `layout` names the same cache layout as its own.

`buffers` hold the keys and values as raw bytes (uint8 arrays: numpy has no bfloat16), a
handful at most: the paged engine's pages are one contiguous buffer (a page holds every
layer's keys and values), the generic engine's caches one buffer for all layers when they
share a shape. Numpy arrays travel through Ray's object store without pickling their bytes and
are read there in place by a receiver on the same node.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch only where bytes are made: the engine package's interface (and the
    import torch  # ingress, which imports it) must load without torch


class LayoutMismatch(ValueError):
    """An export made by an engine whose cache layout differs from the receiver's."""


@dataclass
class UserCacheExport:
    """A copy of one idle user's kept cache (see module docstring)."""

    key: str  # the user key (identity.user_key)
    tenant: str  # the API key's id the user belongs to (kv_shares)
    token_ids: list[int]  # every token the conversation has seen
    kv_len: int  # positions [0, kv_len) have keys and values in `buffers`
    layout: str  # engine kind, model, dtype and unit shape: must equal the receiver's
    buffers: list[np.ndarray] = field(default_factory=list)  # uint8, the engine's own order
    generation: int = 0  # the sender's count of the user's requests when copied
    # Seconds the sender spent copying out (device to host, on a GPU), for the move's metrics,
    # and of those, allocating the host buffer it copied into (pinned memory on a GPU).
    copy_s: float = 0.0
    stage_s: float = 0.0

    @property
    def nbytes(self) -> int:
        return sum(int(b.nbytes) for b in self.buffers)

    def check(self, layout: str) -> None:
        """Raise LayoutMismatch unless this export fits a receiver of `layout`."""
        if self.layout != layout:
            raise LayoutMismatch(
                f"a cache of layout {self.layout!r} cannot be imported into {layout!r}"
            )
        if not 0 < self.kv_len <= len(self.token_ids):
            raise ValueError(f"an export of {self.kv_len} KV tokens for {len(self.token_ids)}")


@dataclass(frozen=True)
class MovableUser:
    """An idle user an engine could export now: its key and the bytes its cache holds."""

    key: str
    nbytes: int
    on_device: bool = True  # in the device tier (else the host tier)


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
