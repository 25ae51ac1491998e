"""KV storage: fixed-size pages of keys and values, one allocation for the whole replica.

Layout ``[num_pages, 2 (k, v), layers_per_page, page_size, num_kv_heads, head_dim]``: a page
holds one lane of layers (`ModelSpec.kv_lanes`: every layer for most models; for Llama 4 the
full-attention layers, or a slice of the chunked ones) as one contiguous block, so moving a
user's cache (to host memory, back) is one copy per page. Layer ``l``'s keys are the strided
view ``buffer[:, 0, slot_of[l]]`` of shape ``[num_pages, page_size, num_kv_heads, head_dim]``,
read through its lane's page table. The pool stores; it does not decide who owns a page (that
is `CacheManager`'s job).
"""

from __future__ import annotations

import math

import torch

from deployments.memory_advice import isolated_empty
from deployments.model_spec import ModelSpec


class KVPool:
    def __init__(
        self,
        spec: ModelSpec,
        num_pages: int,
        page_size: int,
        dtype: torch.dtype,
        device: str | torch.device,
        isolate: bool = False,
    ) -> None:
        """`isolate`: the pool sits alone in whole 2 MiB blocks (for advice on managed memory)."""
        if num_pages <= 0:
            raise ValueError("the KV pool needs at least one page")
        self.spec = spec
        self.num_pages = num_pages
        self.page_size = page_size
        self.lanes = spec.kv_lanes()
        per_page = self.lanes.layers_per_page
        shape = (num_pages, 2, per_page, page_size, spec.num_kv_heads, spec.head_dim)
        if isolate:
            self.buffer = isolated_empty(math.prod(shape), dtype, device).view(shape).zero_()
        else:
            self.buffer = torch.zeros(shape, dtype=dtype, device=device)

    @staticmethod
    def page_bytes(spec: ModelSpec, page_size: int, dtype: torch.dtype) -> int:
        """Bytes of one page (its lane's layers, keys and values)."""
        return (
            2
            * spec.kv_lanes().layers_per_page
            * page_size
            * spec.kv_size
            * torch.empty((), dtype=dtype).element_size()
        )

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def keys(self, layer: int) -> torch.Tensor:
        return self.buffer[:, 0, self.lanes.slot_of[layer]]

    def values(self, layer: int) -> torch.Tensor:
        return self.buffer[:, 1, self.lanes.slot_of[layer]]
