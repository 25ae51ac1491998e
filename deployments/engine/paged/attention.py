"""Paged attention: where each step's tokens read keys and values from.

`AttentionMetadata` describes one step's flattened batch (sequences of varying query lengths,
each reading its own pages). `paged_attention` dispatches: decode rows (one query token) go to
the Triton split-K kernel on a GPU; prefill chunks, and everything on CPU, use the reference
path: gather the sequence's pages and run PyTorch's scaled-dot-product attention with a causal
mask aligned to the end of the context (a chunk sees every earlier token of its sequence).

Chunked-attention layers (Llama 4, `chunk` > 0): a query at position p sees only keys of its
own attention chunk, positions [p // chunk * chunk, p]. Both Triton kernels take `chunk` and
start each query's keys there, as the reference's mask does.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from deployments.engine.paged.upload import upload


@dataclass
class AttentionMetadata:
    positions: torch.Tensor  # [T] position of each token in its sequence
    write_pages: torch.Tensor  # [T] page each token's KV is written to
    write_offsets: torch.Tensor  # [T] slot within that page
    page_table: torch.Tensor  # [S, max_pages] int32, each sequence's pages in order
    context_lens: torch.Tensor  # [S] int32, KV length after this step's tokens
    query_lens: list[int]  # host copies of the per-sequence figures
    context_lens_host: list[int]
    decode_only: bool
    # Per-step work every layer shares (row selections, prefill blocks), built by the first.
    plans: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)
    # Chunked lanes 1.. (kv_pool.py): each one's (page table, write pages); the fields above
    # are lane 0's. A chunked lane's row holds page 0 before the sequence's current chunk.
    lane_tables: tuple[tuple[torch.Tensor, torch.Tensor], ...] = ()

    def lane(self, lane: int) -> AttentionMetadata:
        """This step as lane `lane`'s layers read it (their page table and write pages)."""
        if lane == 0:
            return self
        key = ("lane", lane)
        if key not in self.plans:
            table, writes = self.lane_tables[lane - 1]
            self.plans[key] = replace(self, page_table=table, write_pages=writes, lane_tables=())
        return self.plans[key]

    @property
    def query_starts(self) -> list[int]:
        starts = [0]
        for n in self.query_lens:
            starts.append(starts[-1] + n)
        return starts


def reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    pages: torch.Tensor,
    context_len: int,
    scale: float,
    chunk: int = 0,
) -> torch.Tensor:
    """One sequence: q [n, H, D] against its first `context_len` cached tokens -> [n, H, D];
    with `chunk`, each query sees only its own attention chunk's keys."""
    n, heads, dim = q.shape
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    first = context_len - n  # absolute position of the first query token
    # Keys from the first query's chunk start on, from whole pages (earlier ones unread:
    # a chunked lane's pages before the current chunk are released).
    lo = first // chunk * chunk // page_size * page_size if chunk else 0
    used = pages[lo // page_size : -(-context_len // page_size)].long()
    k = k_cache[used].reshape(-1, kv_heads, dim)[: context_len - lo]
    v = v_cache[used].reshape(-1, kv_heads, dim)[: context_len - lo]
    if kv_heads != heads:
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    if first == 0 and (not chunk or context_len <= chunk):
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=scale
        )
    else:
        key_pos = torch.arange(lo, context_len, device=q.device)
        query_pos = torch.arange(first, context_len, device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]
        if chunk:
            mask &= key_pos[None, :] >= (query_pos // chunk * chunk)[:, None]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask, scale=scale
        )
    return out.transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    use_triton: bool,
    triton_prefill: bool = False,
    chunk: int = 0,
) -> torch.Tensor:
    """All sequences of a step: q [T, H, D] -> [T, H, D].

    `use_triton`: decode rows go to the Triton decode kernel; `triton_prefill`: prefill
    chunks go to the Triton paged prefill kernel instead of the gather + SDPA reference.
    `chunk`: the layer's attention chunk (0: full attention).
    """
    if use_triton and meta.decode_only:
        from deployments.engine.paged.triton_attention import decode_attention

        return decode_attention(
            q, k_cache, v_cache, meta.page_table, meta.context_lens, scale, chunk=chunk
        )
    out = torch.empty_like(q)
    key = _plan_key(use_triton, triton_prefill)
    plan = meta.plans.get(key)
    if plan is None:
        plan = meta.plans[key] = _mixed_plan(
            meta, q.device, k_cache.shape[2], use_triton, triton_prefill
        )
    decode, prefill_rows, prefill = plan
    if decode is not None:
        from deployments.engine.paged.triton_attention import decode_attention

        rows, seqs = decode
        out[rows] = decode_attention(
            q[rows],
            k_cache,
            v_cache,
            meta.page_table[seqs],
            meta.context_lens[seqs],
            scale,
            chunk=chunk,
        )
    if triton_prefill and prefill_rows:
        from deployments.engine.paged.triton_prefill import run_prefill

        if prefill is not None:
            run_prefill(
                q, k_cache, v_cache, meta.page_table, meta.context_lens, prefill, scale, out, chunk
            )
        return out
    _reference_rows(q, k_cache, v_cache, meta, prefill_rows, scale, chunk, out)
    return out


def _reference_rows(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    seqs: list[int],
    scale: float,
    chunk: int,
    out: torch.Tensor,
) -> None:
    """The reference path for sequences `seqs` of the step, into their rows of `out`."""
    starts = meta.query_starts
    for i in seqs:
        lo, n = starts[i], meta.query_lens[i]
        out[lo : lo + n] = reference_attention(
            q[lo : lo + n], k_cache, v_cache, meta.page_table[i], meta.context_lens_host[i],
            scale, chunk,
        )  # fmt: skip


def _plan_key(use_triton: bool, triton_prefill: bool) -> tuple:
    return ("mixed", use_triton, triton_prefill)


def with_prefill_plan(meta: AttentionMetadata, plan: Any) -> AttentionMetadata:
    """`meta` (one sequence's prefill chunk) with a Triton prefill plan made elsewhere: a CUDA
    graph's, over its static buffers, instead of one planned from the host figures."""
    meta.plans[_plan_key(True, True)] = (None, [0], plan)
    return meta


def _mixed_plan(
    meta: AttentionMetadata,
    device: torch.device,
    kv_heads: int,
    use_triton: bool,
    triton_prefill: bool,
) -> tuple[Any, list[int], Any]:
    """A mixed step's row selections, copied to the device once for all layers: (decode rows
    and their sequences, or None), the prefill sequences, and the prefill kernel's plan."""
    starts = meta.query_starts
    decode_rows = [i for i, n in enumerate(meta.query_lens) if n == 1] if use_triton else []
    decode = None
    if decode_rows:
        decode = tuple(
            upload(
                [np.asarray([starts[i] for i in decode_rows]), np.asarray(decode_rows)],
                np.int64,
                torch.device(device),
            )
        )
    prefill_rows = [i for i, n in enumerate(meta.query_lens) if n > 1 or not use_triton]
    prefill = None
    if triton_prefill and prefill_rows:
        from deployments.engine.paged.triton_prefill import plan_prefill

        prefill = plan_prefill(
            starts, meta.query_lens, prefill_rows, kv_heads, device, meta.context_lens_host
        )
    return decode, prefill_rows, prefill
