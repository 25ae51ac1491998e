"""Host-tier KV storage: pages of the device pool's layout in host memory (pinned with CUDA).

Pinned memory lets page copies run as asynchronous DMA at the link's bandwidth. The pool is
allocated uninitialised: a page is only read after a copy down has filled it.
"""

from __future__ import annotations

import torch

from deployments.engine.paged.kv_pool import KVPool


class HostKVPool:
    def __init__(self, like: KVPool, num_pages: int) -> None:
        if num_pages <= 0:
            raise ValueError("the host KV tier needs at least one page")
        self.num_pages = num_pages
        self.buffer = torch.empty(
            (num_pages, *like.buffer.shape[1:]), dtype=like.buffer.dtype,
            pin_memory=like.buffer.is_cuda,
        )

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()
