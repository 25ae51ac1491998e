"""The passes of the Triton sampler (triton_sampler.py) over one row or its scratch.

Every pass works on tiles of [1, BLOCK] tokens in float32 raw logits (-inf past the row's end
and, for rows that ban them, at end-of-sequence ids) and loads the next tile before working on
the one two tiles ahead while it works on the current one, so a program keeps enough reads in
flight to stream its row from L2. Per-token work accumulates elementwise, per tile slot (the
token's id % BLOCK), and is reduced once at the end of a pass.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG = tl.constexpr(float("-inf"))
POS = tl.constexpr(float("inf"))
BIG = tl.constexpr(2147483647)


@triton.jit
def load_tile(row_ptr, start, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK: tl.constexpr, step=1):
    """Tokens [start, start + BLOCK) of the row as a [1, BLOCK] float32 tile. `step`: 1, but
    a runtime 1 hides the ids' contiguity, so the tile gets the layout of a scatter (compact)."""
    cols = start + tl.arange(0, BLOCK)[None, :] * step
    x = tl.load(row_ptr + cols, mask=cols < V, other=NEG).to(tl.float32)
    if ban & (eos_hi >= start) & (eos_lo < start + BLOCK):  # only tiles that hold an EOS id
        for j in range(n_eos):
            x = tl.where(cols == tl.load(Eos + j), NEG, x)
    return x


@triton.jit
def scan_max(row_ptr, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK: tl.constexpr):
    """The row's max and the first index holding it (torch.argmax's answer)."""
    best = tl.full([1, BLOCK], NEG, tl.float32)
    where = tl.zeros([1, BLOCK], tl.int32)
    a = load_tile(row_ptr, 0, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    b = load_tile(row_ptr, BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    for start in range(0, V, BLOCK):
        x, a = a, b
        b = load_tile(row_ptr, start + 2 * BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
        where = tl.where(x > best, start + tl.arange(0, BLOCK)[None, :], where)  # first wins
        best = tl.maximum(best, x)
    top = tl.max(best)
    return top, tl.min(tl.where(best == top, where, BIG))


@triton.jit
def scan_stats(row_ptr, V, Eos, n_eos, ban, eos_lo, eos_hi, s, BLOCK: tl.constexpr):
    """scan_max, plus the finite tokens' count and minimum and S = sum exp2((x - max) * s).
    Each slot keeps its own running max and sum, rescaled with one exp2 per token."""
    best = tl.full([1, BLOCK], NEG, tl.float32)
    where = tl.zeros([1, BLOCK], tl.int32)
    acc = tl.zeros([1, BLOCK], tl.float32)  # sum of exp2((x - best) * s) in this slot
    count = tl.zeros([1, BLOCK], tl.int32)
    low = tl.full([1, BLOCK], POS, tl.float32)
    a = load_tile(row_ptr, 0, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    b = load_tile(row_ptr, BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    for start in range(0, V, BLOCK):
        x, a = a, b
        b = load_tile(row_ptr, start + 2 * BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
        finite = x > NEG
        up = x > best
        d = tl.exp2(-tl.abs(x - best) * s)  # the smaller term relative to the larger
        acc = tl.where(finite, tl.where(up, acc * d + 1.0, acc + d), acc)
        where = tl.where(up, start + tl.arange(0, BLOCK)[None, :], where)
        best = tl.maximum(best, x)
        count += finite.to(tl.int32)
        low = tl.minimum(low, tl.where(finite, x, POS))
    top = tl.max(best)
    arg = tl.min(tl.where(best == top, where, BIG))
    total = tl.sum(tl.where(best > NEG, acc * tl.exp2((best - top) * s), 0.0))
    return top, arg, tl.sum(count), tl.min(low), total


@triton.jit
def _accumulate(x, lanes, top, s, acc, MASS: tl.constexpr):
    """Add each token of x [1, BLOCK] at or above each lane ([LANES, 1]) to that lane's mass
    (MASS) or count. x was loaded 2-D, so broadcasting it over the lanes moves no data."""
    ge = x >= lanes
    if MASS:  # 0/1 times the mass: two instructions per lane and token
        return tl.fma(tl.where(ge, 1.0, 0.0), tl.exp2((x - top) * s), acc)
    else:
        return acc + tl.where(ge, 1.0, 0.0)


@triton.jit
def count_row(
    row_ptr,
    V,
    Eos,
    n_eos,
    ban,
    eos_lo,
    eos_hi,
    lanes,
    top,
    s,
    MASS: tl.constexpr,
    BLOCK: tl.constexpr,
    LANES: tl.constexpr,
):
    """For each lane, the mass (MASS) or the count (as float32: exact, as a slot adds at most
    V / BLOCK ones) of the row's tokens at or above it."""
    acc = tl.zeros([LANES, BLOCK], tl.float32)
    lanes = lanes[:, None]
    a = load_tile(row_ptr, 0, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    b = load_tile(row_ptr, BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    for start in range(0, V, BLOCK):
        x, a = a, b
        b = load_tile(row_ptr, start + 2 * BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
        acc = _accumulate(x, lanes, top, s, acc, MASS)
    return tl.sum(acc, 1)


@triton.jit
def count_scratch(
    ScrV, n_s, lanes, hi, top, s, MASS: tl.constexpr, BLOCK: tl.constexpr, LANES: tl.constexpr
):
    """For each lane, the mass (count) of the scratch's tokens in [lane, hi) (read from L2:
    this program wrote them)."""
    acc = tl.zeros([LANES, BLOCK], tl.float32)
    lanes = lanes[:, None]
    for start in range(0, n_s, BLOCK):
        offs = start + tl.arange(0, BLOCK)[None, :]
        x = tl.load(ScrV + offs, mask=offs < n_s, other=NEG, cache_modifier=".cg")
        acc = _accumulate(tl.where(x < hi, x, NEG), lanes, top, s, acc, MASS)
    return tl.sum(acc, 1)


@triton.jit
def compact(
    row_ptr,
    V,
    Eos,
    n_eos,
    ban,
    eos_lo,
    eos_hi,
    ScrV,
    ScrI,
    lo,
    hi,
    BLOCK: tl.constexpr,
    CAP: tl.constexpr,
):
    """Copy to the scratch, value and id in draw order (by id % BLOCK, then id), the row's
    tokens at or above lo if there are at most CAP, else those in [lo, hi) if they fit.
    Returns how many tokens that range holds and its upper end (+inf: all at or above lo);
    more than CAP: nothing was stored. Two passes (count per slot, store) around one scan:
    a scan per tile would cost more than both."""
    one = (n_eos >= 0).to(tl.int32)  # 1 unknown to the compiler (load_tile): no conversions
    tl.debug_barrier()  # every thread has finished reading the scratch's previous contents
    in_bracket = tl.zeros([1, BLOCK], tl.int32)
    above = tl.zeros([1, BLOCK], tl.int32)
    a = load_tile(row_ptr, 0, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    b = load_tile(row_ptr, BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    for start in range(0, V, BLOCK):
        x, a = a, b
        b = load_tile(row_ptr, start + 2 * BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
        at_lo = x >= lo
        above += at_lo.to(tl.int32)
        in_bracket += (at_lo & (x < hi)).to(tl.int32)
    everything = tl.sum(above) <= CAP
    top = tl.where(everything, POS, hi)
    per_slot = tl.where(everything, above, in_bracket)
    n = tl.sum(per_slot)
    if n <= CAP:
        pos = tl.cumsum(per_slot, 1) - per_slot  # where each slot's run starts
        a = load_tile(row_ptr, 0, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK, one)
        b = load_tile(row_ptr, BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK, one)
        for start in range(0, V, BLOCK):
            x, a = a, b
            b = load_tile(
                row_ptr, start + 2 * BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK, one
            )
            keep = (x >= lo) & (x < top)
            tl.store(ScrV + pos, x, mask=keep)
            tl.store(ScrI + pos, start + tl.arange(0, BLOCK)[None, :] * one, mask=keep)
            pos += keep.to(tl.int32)
    tl.debug_barrier()  # the stores are visible to every thread of this program
    return n, top


@triton.jit
def _pick(p, ids, carry, target):
    """The id at the first position (in p's order) where carry + the running mass passes
    target; the last one with mass when rounding leaves the sum at or below it."""
    at_ = tl.arange(0, p.shape[1])[None, :]
    cum = carry + tl.cumsum(p, 1)
    at = tl.min(tl.where((cum > target) & (p > 0), at_, BIG))
    at = tl.where(at < BIG, at, tl.max(tl.where(p > 0, at_, -1)))
    return tl.sum(tl.where(at_ == at, ids, 0))


@triton.jit
def draw_row(
    row_ptr,
    V,
    Eos,
    n_eos,
    ban,
    eos_lo,
    eos_hi,
    t,
    top,
    s,
    u,
    BLOCK: tl.constexpr,
    TILES: tl.constexpr,
):
    """Inverse CDF at u over the row's tokens at or above t, in draw order (by id % BLOCK,
    then id): one pass sums each slot's mass, a scan finds the slot where the mass passes
    u * total, and that slot's TILES (>= V / BLOCK) tokens are walked."""
    acc = tl.zeros([1, BLOCK], tl.float32)
    a = load_tile(row_ptr, 0, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    b = load_tile(row_ptr, BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
    for start in range(0, V, BLOCK):
        x, a = a, b
        b = load_tile(row_ptr, start + 2 * BLOCK, V, Eos, n_eos, ban, eos_lo, eos_hi, BLOCK)
        acc += tl.where(x >= t, tl.exp2((x - top) * s), 0.0)
    target = u * tl.sum(acc)
    slots = tl.arange(0, BLOCK)[None, :]
    cum = tl.cumsum(acc, 1)
    slot = tl.min(tl.where((cum > target) & (acc > 0), slots, BIG))
    slot = tl.where(slot < BIG, slot, tl.max(tl.where(acc > 0, slots, -1)))
    carry = tl.sum(tl.where(slots == slot, cum - acc, 0.0))
    cols = slot + tl.arange(0, TILES)[None, :] * BLOCK
    x = tl.load(row_ptr + cols, mask=cols < V, other=NEG).to(tl.float32)
    if ban:
        for j in range(n_eos):
            x = tl.where(cols == tl.load(Eos + j), NEG, x)
    p = tl.where(x >= t, tl.exp2((x - top) * s), 0.0)
    return _pick(p, cols, carry, target)


@triton.jit
def draw_scratch(ScrV, ScrI, n_s, t, top, s, u, BLOCK: tl.constexpr):
    """draw_row over the scratch, when it holds every kept token (in draw order already):
    one pass for the total, then tile by tile to the one holding the hit."""
    acc = tl.zeros([1, BLOCK], tl.float32)
    last = tl.full([1, BLOCK], -1, tl.int32)  # the last position with mass (for rounding)
    for start in range(0, n_s, BLOCK):
        offs = start + tl.arange(0, BLOCK)[None, :]
        x = tl.load(ScrV + offs, mask=offs < n_s, other=NEG, cache_modifier=".cg")
        acc += tl.where(x >= t, tl.exp2((x - top) * s), 0.0)
        last = tl.where(x >= t, offs, last)
    target = u * tl.sum(acc)
    carry = target * 0
    tok = n_s * 0 - 1
    start = n_s * 0
    while (start < n_s) & (tok < 0):
        offs = start + tl.arange(0, BLOCK)[None, :]
        x = tl.load(ScrV + offs, mask=offs < n_s, other=NEG, cache_modifier=".cg")
        p = tl.where(x >= t, tl.exp2((x - top) * s), 0.0)
        part = tl.sum(p)
        if carry + part > target:
            ids = tl.load(ScrI + offs, mask=offs < n_s, other=0, cache_modifier=".cg")
            tok = _pick(p, ids, carry, target)
        carry += part
        start += BLOCK
    if tok < 0:
        tok = tl.load(ScrI + tl.max(last), cache_modifier=".cg")
    return tok
