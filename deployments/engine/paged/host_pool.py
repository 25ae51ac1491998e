"""Host-tier KV storage: pages of the device pool's layout in host memory.

On a discrete GPU the pages are pinned host memory, so page copies run as asynchronous DMA at
the link's bandwidth. On Grace (`managed=True`) they are allocated like the device pool, from
the replica's managed memory resource, alone in whole 2 MiB blocks, and the engine advises them
to live in LPDDR. The pool is allocated uninitialised: a page is only read after a copy down has
filled it.
"""

from __future__ import annotations

import math

import torch

from deployments.engine.paged.kv_pool import KVPool
from deployments.memory_advice import isolated_empty


class HostKVPool:
    def __init__(
        self, like: KVPool, num_pages: int, managed: bool = False, isolate: bool = True
    ) -> None:
        """`isolate` (managed only): alone in whole 2 MiB blocks, so its advice is its own."""
        if num_pages <= 0:
            raise ValueError("the host KV tier needs at least one page")
        self.num_pages = num_pages
        shape, dtype = (num_pages, *like.buffer.shape[1:]), like.buffer.dtype
        if managed:  # allocated in the caller's allocation scope (the managed resource)
            device = like.buffer.device
            self.buffer = (
                isolated_empty(math.prod(shape), dtype, device).view(shape)
                if isolate
                else torch.empty(shape, dtype=dtype, device=device)
            )
        else:
            self.buffer = torch.empty(shape, dtype=dtype, pin_memory=like.buffer.is_cuda)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
