"""Triton kernel for prefill-chunk attention over paged KV (flash attention, causal at the end).

A chunk of `n` query tokens of a sequence whose KV now holds `ctx` tokens sits at positions
`ctx - n .. ctx - 1`; query position p sees keys 0..p. One program handles one block of
`BLOCK_M` query tokens of one sequence for one kv head, with that kv head's `G` query heads
packed into the tile's rows (row r: token r // G_PAD, head r % G_PAD), so grouped-query
attention reads each key once per block. Keys and values are gathered page by page; the online
softmax runs in float32. Every prefill chunk of a step goes in one launch, through a host-built
table of (sequence, first token of the block).

A short chunk after a long kept history (a returning user's new turn) makes few programs, each
walking the whole history: then the keys are split into `SPLITS` ranges, one program each, and
a second kernel merges the partial results by log-sum-exp (flash-decoding, for prefill).

In a chunked-attention layer (`chunk` > 0) query position p sees keys from p's chunk start
(`chunk_start`) on; a block's keys start at its first token's chunk start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from deployments.engine.paged.triton_attention import (
    attend_keys,
    chunk_start,
    merge_splits,
    split_range,
)
from deployments.engine.paged.upload import upload

BLOCK_M = 16  # query tokens per program
BLOCK_N = 64  # keys per iteration


# The page table's width varies step by step, and the chunk size by layer: no specialization on
# their values (see upload.py).
@triton.jit(do_not_specialize=["stride_pt", "chunk"])
def _prefill_kernel(
    Q,
    K,
    V,
    Out,
    PageTable,
    CtxLens,
    QueryStart,
    QueryLen,
    BlockSeq,
    BlockStart,
    stride_qt,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pt,
    scale,
    MidO,
    MidLse,
    stride_mt,
    stride_mh,
    stride_mk,
    chunk,
    PAGE: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    G_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr,
):
    block = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    s = tl.load(BlockSeq + block)
    m0 = tl.load(BlockStart + block)
    ctx = tl.load(CtxLens + s)
    n = tl.load(QueryLen + s)
    q0 = tl.load(QueryStart + s)
    tok, rows, head, row_ok = _block_rows(m0, n, q0, kvh, G, G_PAD, BLOCK_M)
    d = tl.arange(0, D)
    q = tl.load(_at(Q, rows, head, d, stride_qt, stride_qh), mask=row_ok[:, None], other=0.0)
    qpos = ctx - n + tok  # absolute position of each row's token
    pages = PageTable + s * stride_pt  # the sequence's page-table row
    kv = (K, V, pages, kvh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh)
    end = tl.minimum(ctx, ctx - n + m0 + BLOCK_M)  # the block's last token sees this far
    end = tl.where(m0 < n, end, 0)  # a block wholly past the chunk (graph padding): no keys
    lo, hi = _key_range(ctx - n + m0, end, chunk, split, BLOCK_N, SPLITS)
    out, lse = attend_keys(
        q, qpos, chunk_start(qpos, chunk), kv, d, lo, hi, end, scale, PAGE, BLOCK_N, True
    )
    mid = (MidO, MidLse, stride_mt, stride_mh, stride_mk)
    _store_block(out, lse, rows, head, d, row_ok, split, Out, stride_ot, stride_oh, mid, D, SPLITS)


@triton.jit
def _key_range(pos, end, chunk, split, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr):
    """Keys [lo, hi) of `split` for a block whose first query is at `pos` and whose last
    sees keys before `end`: from the first query's chunk start on (chunked layers)."""
    first = tl.minimum(chunk_start(pos, chunk), end)
    lo, hi = split_range(end - first, split, BLOCK_N, SPLITS)
    return lo + first, hi + first


@triton.jit
def _block_rows(m0, n, q0, kvh, G: tl.constexpr, G_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
    """The tile's rows for the block of query tokens from m0 on (row r: token r // G_PAD,
    head r % G_PAD of the kv head's group): each row's token within the chunk, its row of
    Q and Out, its head, and whether it is a real (token, head) of the chunk of n tokens."""
    r = tl.arange(0, BLOCK_M * G_PAD)
    tok = m0 + r // G_PAD  # query token index within the chunk
    g = r % G_PAD
    return tok, q0 + tok, kvh * G + g, (tok < n) & (g < G)


@triton.jit
def _at(P, rows, head, d, stride_t, stride_h):
    """Addresses [R, D] in the [T, H, D] tensor P of each tile row's token row and head."""
    return P + rows[:, None].to(tl.int64) * stride_t + head[:, None] * stride_h + d[None, :]


@triton.jit
def _store_block(
    out,
    lse,
    rows,
    head,
    d,
    row_ok,
    split,
    Out,
    stride_ot,
    stride_oh,
    mid,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """The block's output into Out; with key splits, this split's partial output and its
    log-sum-exp (`mid`: MidO, MidLse and their strides), merged by _merge_kernel."""
    if SPLITS == 1:
        tl.store(
            _at(Out, rows, head, d, stride_ot, stride_oh),
            out.to(Out.dtype.element_ty),
            mask=row_ok[:, None],
        )
    else:  # a partial result
        MidO, MidLse, stride_mt, stride_mh, stride_mk = mid
        base = rows.to(tl.int64) * stride_mt + head * stride_mh + split * stride_mk
        tl.store(MidO + base[:, None] + d[None, :], out, mask=row_ok[:, None])
        tl.store(MidLse + base // D, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    MidO,
    MidLse,
    Out,
    Rows,
    stride_mt,
    stride_mh,
    stride_mk,
    stride_ot,
    stride_oh,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    row = tl.load(Rows + tl.program_id(0)).to(tl.int64)  # a prefill token's row
    merge_splits(
        MidO,
        MidLse,
        Out,
        row,
        tl.program_id(1),
        stride_mt,
        stride_mh,
        stride_mk,
        stride_ot,
        stride_oh,
        D,
        SPLITS,
    )


def choose_splits(programs: int, max_context: int) -> int:
    """Key splits so that at least ~2 programs per SM run; a power of two, at most 16, and
    each split at least 4 key blocks long."""
    sms = (
        torch.cuda.get_device_properties(0).multi_processor_count
        if torch.cuda.is_available()
        else 128
    )
    want = max(1, (2 * sms) // max(1, programs))
    cap = max(1, max_context // (4 * BLOCK_N))
    splits = 1
    while splits * 2 <= min(want, cap, 16):
        splits *= 2
    return splits


@dataclass
class PrefillPlan:
    """A step's prefill blocks, on the device: the same for every layer, so built once."""

    num_blocks: int
    splits: int
    query_starts: torch.Tensor  # [S] int32, first row of each sequence's chunk
    query_lens: torch.Tensor  # [S] int32
    block_seq: torch.Tensor  # [num_blocks] int32, the sequence of each block
    block_start: torch.Tensor  # [num_blocks] int32, its first token within the chunk
    rows: torch.Tensor  # [R] int32, every prefill token's row (for the merge)


def plan_prefill(
    query_starts: list[int],
    query_lens: list[int],
    seqs: list[int],
    kv_heads: int,
    device: torch.device,
    context_lens_host: list[int] | None = None,
    splits: int | None = None,
) -> PrefillPlan | None:
    """Blocks of `BLOCK_M` query tokens for sequences `seqs`, copied up in one transfer; None
    if there is nothing to compute. `splits` (default: chosen from the number of programs and
    `context_lens_host`) splits each block's keys into that many ranges, merged afterwards."""
    block_seq, block_start = [], []
    for s in seqs:
        for m0 in range(0, query_lens[s], BLOCK_M):
            block_seq.append(s)
            block_start.append(m0)
    if not block_seq:
        return None
    if splits is None:
        longest = max((context_lens_host[s] for s in seqs), default=0) if context_lens_host else 0
        splits = choose_splits(len(block_seq) * kv_heads, longest)
    rows = [t for s in seqs for t in range(query_starts[s], query_starts[s] + query_lens[s])]
    n = len(query_lens)
    qs, ql, bs, bst, rw = upload(
        [np.asarray(p) for p in (query_starts[:n], query_lens, block_seq, block_start, rows)],
        np.int32,
        torch.device(device),
    )
    return PrefillPlan(len(block_seq), splits, qs, ql, bs, bst, rw)


def fixed_plan(
    tokens: int, query_lens: torch.Tensor, kv_heads: int, max_context: int, device: torch.device
) -> PrefillPlan:
    """The plan of a CUDA graph's prefill chunk: one sequence, blocks over all `tokens` (a
    multiple of BLOCK_M; rows past the chunk's length, read from `query_lens` [1] on the
    device, are masked), and the key splits the longest context would choose."""
    blocks = tokens // BLOCK_M
    splits = choose_splits(blocks * kv_heads, max_context)

    def ints(values: torch.Tensor) -> torch.Tensor:
        return values.to(device=device, dtype=torch.int32)

    return PrefillPlan(
        blocks,
        splits,
        ints(torch.zeros(1)),
        query_lens,
        ints(torch.zeros(blocks)),
        ints(torch.arange(0, tokens, BLOCK_M)),
        ints(torch.arange(tokens)),
    )


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    query_starts: list[int],
    query_lens: list[int],
    seqs: list[int],
    scale: float,
    out: torch.Tensor,
    context_lens_host: list[int] | None = None,
    splits: int | None = None,
    chunk: int = 0,
) -> None:
    """Attention for the chunks of sequences `seqs` (rows of q [T, H, D]) into `out`;
    `chunk`: each query sees only its own attention chunk's keys (0: all earlier ones)."""
    plan = plan_prefill(
        query_starts, query_lens, seqs, k_cache.shape[2], q.device, context_lens_host, splits
    )
    if plan is not None:
        run_prefill(q, k_cache, v_cache, page_table, context_lens, plan, scale, out, chunk)


def run_prefill(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    plan: PrefillPlan,
    scale: float,
    out: torch.Tensor,
    chunk: int = 0,
) -> None:
    """One layer's prefill attention for the blocks of `plan` into `out` (`chunk`: the
    layer's attention chunk, 0 for full attention)."""
    heads, dim = q.shape[1], q.shape[2]
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    splits = plan.splits
    mid_o, mid_lse, strides = _partials(q, splits, out)
    _prefill_kernel[(plan.num_blocks, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        out,
        page_table,
        context_lens,
        plan.query_starts,
        plan.query_lens,
        plan.block_seq,
        plan.block_start,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        page_table.stride(0),
        scale,
        mid_o,
        mid_lse,
        *strides,
        chunk,
        PAGE=page_size,
        D=dim,
        G=group,
        G_PAD=triton.next_power_of_2(group),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        SPLITS=splits,
    )
    if splits > 1:
        _merge(mid_o, mid_lse, out, plan.rows, strides, splits)


def _partials(
    q: torch.Tensor, splits: int, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """The key splits' partial outputs [T, H, splits, D] and log-sum-exps [T, H, splits]
    (float32), and the outputs' first three strides; with one split, `out` (never read) and
    zeros."""
    if splits <= 1:  # unused: the kernel writes `out` directly
        return out, out, (0, 0, 0)
    tokens, heads, dim = q.shape[0], q.shape[1], q.shape[2]
    mid_o = torch.empty(tokens, heads, splits, dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(tokens, heads, splits, dtype=torch.float32, device=q.device)
    return mid_o, mid_lse, (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2))


def _merge(
    mid_o: torch.Tensor,
    mid_lse: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    strides: tuple[int, int, int],
    splits: int,
) -> None:
    """Every prefill row's key splits (`_partials`) merged into `out`, one program per
    (row, head)."""
    heads, dim = mid_o.shape[1], mid_o.shape[3]  # [T, H, splits, D]
    _merge_kernel[(rows.shape[0], heads)](
        mid_o,
        mid_lse,
        out,
        rows,
        *strides,
        out.stride(0),
        out.stride(1),
        D=dim,
        SPLITS=splits,
    )
