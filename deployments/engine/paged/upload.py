"""A step's host-side values to the device in one pinned copy per dtype, each piece aligned.

Several small arrays travel packed in one buffer (one copy instead of many). Each piece starts
on a 16-byte boundary: Triton specializes a kernel on whether each pointer argument is 16-byte
aligned, so a piece whose offset depended on the step's sizes would compile a second variant of
every kernel reading it, the first time a request met the other alignment (~1 s, on the request
path).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ALIGN_BYTES = 16


def pack(pieces: Sequence[np.ndarray], dtype: np.dtype) -> tuple[np.ndarray, list[slice]]:
    """One array holding `pieces` (cast to `dtype`), each at an aligned offset; their slices."""
    per = max(1, ALIGN_BYTES // np.dtype(dtype).itemsize)  # elements per alignment unit
    slices, at = [], 0
    for piece in pieces:
        slices.append(slice(at, at + len(piece)))
        at += -(-len(piece) // per) * per
    out = np.zeros(max(at, per), dtype=dtype)
    for piece, where in zip(pieces, slices, strict=True):
        out[where] = piece
    return out, slices


def to_device(host: np.ndarray, device: torch.device) -> torch.Tensor:
    """`host` on `device`: an asynchronous copy from pinned memory on a GPU (PyTorch's caching
    host allocator keeps the pinned block until the copy is done), the array itself on CPU."""
    tensor = torch.from_numpy(host)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def upload(
    pieces: Sequence[np.ndarray], dtype: np.dtype, device: torch.device
) -> list[torch.Tensor]:
    """`pieces` on `device` through one packed copy, as aligned views of it."""
    host, slices = pack(pieces, dtype)
    packed = to_device(host, device)
    return [packed[where] for where in slices]
