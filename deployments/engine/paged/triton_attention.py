"""Triton kernels for decode attention over paged KV (flash-decoding with split-K).

One program handles one (sequence, kv head, split): the `G` query heads that share that kv head
attend to a contiguous range of the sequence's tokens, gathering keys and values page by page
with an online softmax in float32. A second kernel merges the splits by log-sum-exp. Splitting
the context keeps the GPU busy at small batch sizes; at large batches one split suffices.
Sequences with no context (padding rows in a CUDA graph) produce zeros. In a chunked-attention
layer (`chunk` > 0) a query's keys start at its own chunk's first position (`chunk_start`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_N = 64  # tokens per iteration


@triton.jit
def load_kv(kv, t, valid, d, PAGE: tl.constexpr):
    """Keys and values [len(t), D] of tokens `t` of one sequence and kv head; tokens not
    `valid` read as zeros. `kv`: (K, V, Pages, kvh, stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh): the paged caches, the sequence's page-table row
    `Pages`, the kv head, and the caches' strides."""
    K, V, Pages, kvh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh = kv
    # int64: page * stride passes 2**31 elements in pools over 4 GiB.
    page = tl.load(Pages + t // PAGE, mask=valid, other=0).to(tl.int64)
    slot = t % PAGE
    k = tl.load(
        K + page[:, None] * stride_kp + slot[:, None] * stride_kt + kvh * stride_kh + d[None, :],
        mask=valid[:, None],
        other=0.0,
    )
    v = tl.load(
        V + page[:, None] * stride_vp + slot[:, None] * stride_vt + kvh * stride_vh + d[None, :],
        mask=valid[:, None],
        other=0.0,
    )
    return k, v


@triton.jit
def attend(q, k, v, seen, m, denom, acc, scale):
    """One online-softmax step: rows of `q` over keys `k` and values `v` where `seen`.
    Returns the running max, denominator and (unnormalised) output."""
    scores = tl.where(seen, tl.dot(q, tl.trans(k)) * scale, float("-inf"))
    m_new = tl.maximum(m, tl.max(scores, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that have seen nothing yet
    alpha = tl.exp(m - m_safe)
    p = tl.exp(scores - m_safe[:, None])
    return m_new, denom * alpha + tl.sum(p, 1), acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)


@triton.jit
def finish(m, denom, acc):
    """The normalised output and its log-sum-exp (-inf for rows that saw no key)."""
    has = denom > 0
    out = acc / tl.where(has, denom, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, denom, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def chunk_start(pos, chunk):
    """The first key position a query at `pos` (>= 0) sees when attention keeps to chunks of
    `chunk` tokens (0: no chunks, position 0): attention.reference_attention's mask."""
    size = tl.maximum(chunk, 1)
    return tl.where(chunk > 0, pos // size * size, 0)


@triton.jit
def split_range(n, split, BLOCK: tl.constexpr, SPLITS: tl.constexpr):
    """Keys [lo, hi) of `split` when n keys are cut into SPLITS runs of whole BLOCKs."""
    per_split = tl.cdiv(tl.cdiv(n, BLOCK), SPLITS) * BLOCK
    lo = split * per_split
    return lo, tl.minimum(n, lo + per_split)


@triton.jit
def attend_keys(
    q,
    qpos,
    qlo,
    kv,
    d,
    lo,
    hi,
    end,
    scale,
    PAGE: tl.constexpr,
    BLOCK: tl.constexpr,
    CAUSAL: tl.constexpr,
):
    """Rows of `q` [R, D] over the keys in [lo, hi) before `end` (`kv`: load_kv's) with an
    online softmax from nothing seen; CAUSAL: row r only from qlo[r] up to its position
    qpos[r]. Returns finish's output [R, D] (float32) and log-sum-exp [R]."""
    m = tl.full([q.shape[0]], float("-inf"), tl.float32)
    denom = tl.zeros([q.shape[0]], tl.float32)
    acc = tl.zeros([q.shape[0], q.shape[1]], tl.float32)
    for n0 in range(lo, hi, BLOCK):
        t = n0 + tl.arange(0, BLOCK)
        valid = t < end
        k, v = load_kv(kv, t, valid, d, PAGE)
        if CAUSAL:
            seen = valid[None, :] & (t[None, :] <= qpos[:, None]) & (t[None, :] >= qlo[:, None])
        else:
            seen = valid[None, :]
        m, denom, acc = attend(q, k, v, seen, m, denom, acc, scale)
    out, lse = finish(m, denom, acc)
    return out, lse


# The page table's width varies step by step, and the chunk size by layer: no specialization on
# their values (see upload.py).
@triton.jit(do_not_specialize=["stride_pt", "chunk"])
def _split_kernel(
    Q,
    K,
    V,
    PageTable,
    CtxLens,
    MidO,
    MidLse,
    stride_qs,
    stride_qh,
    stride_kp,
    stride_kt,
    stride_kh,
    stride_vp,
    stride_vt,
    stride_vh,
    stride_pt,
    stride_ms,
    stride_mh,
    stride_mk,
    scale,
    chunk,
    PAGE: tl.constexpr,
    D: tl.constexpr,
    G: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK: tl.constexpr,
    SPLITS: tl.constexpr,
):
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(CtxLens + s)
    first = chunk_start(tl.maximum(ctx - 1, 0), chunk)  # the one query is at ctx - 1
    start, end = split_range(ctx - first, split, BLOCK, SPLITS)
    start, end = start + first, end + first
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    heads = kvh * G + g
    q = tl.load(
        Q + s * stride_qs + heads[:, None] * stride_qh + d[None, :], mask=g[:, None] < G, other=0.0
    )
    pages = PageTable + s * stride_pt  # the sequence's page-table row
    kv = (K, V, pages, kvh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh)
    out, lse = attend_keys(q, end, first, kv, d, start, end, end, scale, PAGE, BLOCK, False)
    base = s * stride_ms + heads * stride_mh + split * stride_mk
    tl.store(MidO + base[:, None] + d[None, :], out, mask=g[:, None] < G)
    tl.store(MidLse + base // D, lse, mask=g < G)


@triton.jit
def merge_splits(
    MidO,
    MidLse,
    Out,
    row,
    h,
    stride_mr,
    stride_mh,
    stride_mk,
    stride_or,
    stride_oh,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    """Combine one (row, head)'s SPLITS partial results [SPLITS, D] by their log-sum-exp."""
    d = tl.arange(0, D)
    k = tl.arange(0, SPLITS)
    base = row * stride_mr + h * stride_mh
    lse = tl.load(MidLse + (base + k * stride_mk) // D)
    top = tl.max(lse, 0)
    safe_top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.where(lse == float("-inf"), 0.0, tl.exp(lse - safe_top))
    o = tl.load(MidO + base + k[:, None] * stride_mk + d[None, :])
    total = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(Out + row * stride_or + h * stride_oh + d, out.to(Out.dtype.element_ty))


@triton.jit
def _merge_kernel(
    MidO,
    MidLse,
    Out,
    stride_ms,
    stride_mh,
    stride_mk,
    stride_os,
    stride_oh,
    D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    merge_splits(
        MidO,
        MidLse,
        Out,
        tl.program_id(0),
        tl.program_id(1),
        stride_ms,
        stride_mh,
        stride_mk,
        stride_os,
        stride_oh,
        D,
        SPLITS,
    )


def choose_splits(num_seqs: int, kv_heads: int, max_context: int) -> int:
    """Enough programs to cover the GPU at small batches; a power of two, at most 32."""
    sms = (
        torch.cuda.get_device_properties(0).multi_processor_count
        if torch.cuda.is_available()
        else 128
    )
    want = max(1, (2 * sms) // max(1, num_seqs * kv_heads))
    cap = max(1, -(-max_context // BLOCK_N))
    splits = 1
    while splits * 2 <= min(want, cap, 32):
        splits *= 2
    return splits


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    splits: int | None = None,
    chunk: int = 0,
) -> torch.Tensor:
    """q [S, H, D] (one token per sequence) over paged k/v [pages, page, kv_heads, D];
    `chunk`: keys only from the query's own attention chunk on (0: all)."""
    num_seqs, heads, dim = q.shape
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    if splits is None:
        splits = choose_splits(num_seqs, kv_heads, page_table.shape[1] * page_size)
    mid_o = torch.empty(num_seqs, heads, splits, dim, dtype=torch.float32, device=q.device)
    mid_lse = torch.empty(num_seqs, heads, splits, dtype=torch.float32, device=q.device)
    out = torch.empty_like(q)
    _split_kernel[(num_seqs, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        page_table,
        context_lens,
        mid_o,
        mid_lse,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        page_table.stride(0),
        *mid_o.stride()[:3],
        scale,
        chunk,
        PAGE=page_size,
        D=dim,
        G=group,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK=BLOCK_N,
        SPLITS=splits,
    )
    _merge_kernel[(num_seqs, heads)](
        mid_o,
        mid_lse,
        out,
        *mid_o.stride()[:3],
        out.stride(0),
        out.stride(1),
        D=dim,
        SPLITS=splits,
    )
    return out
