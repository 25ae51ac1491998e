"""The batched sampler as one Triton kernel: one program per row, thresholds instead of a sort.

It computes what `sampler.sample_reference` defines (the semantics are in sampler.py). Each
program reads its row of logits a few times (it stays in L2 between passes; sample_passes.py),
all in raw logit units, where every filter is a threshold (p = exp((x - max) / T) grows with x):

1. scan: the max and its first index (greedy rows stop here), the finite tokens' count and
   minimum, and S = sum exp((x - max) / T).
2. top_k (a count) and then top_p (a share of the mass left) are each the largest threshold c
   whose tokens at or above it still reach the goal. A bracket [lo, hi) around it shrinks by
   passes that count (or sum) the tokens at or above LANES candidate thresholds at once. As
   soon as the bracket surely holds at most CAP tokens, they (or, if those fit, all tokens at
   or above its lower end) are compacted in draw order (id % BLOCK, then id) into a per-row
   scratch, where bisection on the floats' bit patterns finds the threshold exactly. min_p is
   a closed form.
3. the draw inverts the kept tokens' CDF, in draw order, at one Philox uniform per row
   (tl.rand(seed, 0)): on the scratch when it holds every kept token, else by one more pass
   that sums each tile slot's mass, a scan to the slot holding the hit, and a walk down that
   slot. One uniform per row rather than Gumbel noise per token: Philox costs ~100 integer
   operations a number, more than all the passes together.

Only when more than CAP tokens stay within the bracket after FULL_PASSES row passes (a mass of
near-equal logits at the threshold) does the kernel stop short of exactness: it then keeps the
whole bracket, i.e. also tokens less than W / (7 * 9**(FULL_PASSES - 1)) below the threshold
(~1e-7 W; W: the first bracket's width, at most T * ln(n / (1 - top_p)) for top_p and the
finite logits' range for top_k). Mass sums are float32, so a token whose preceding mass is
within float32 rounding (~1e-6 relative) of top_p can fall either way, and min_p's closed-form
threshold is within a few ulps of p >= min_p * p_max.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deployments.engine.paged.sample_passes import (
    NEG,
    POS,
    compact,
    count_row,
    count_scratch,
    draw_row,
    draw_scratch,
    scan_max,
    scan_stats,
)
from deployments.engine.paged.sampler import DRAW_BLOCK

LOG2E = tl.constexpr(1.4426950408889634)
BLOCK = DRAW_BLOCK  # tokens per tile of a pass (a Llama 3 row is 63 tiles)
LANES = 8  # candidate thresholds per pass
CAP = 16384  # scratch tokens per row
FULL_PASSES = 8  # row passes per threshold before the bracket is kept as it is
WIDE = 1024.0  # brackets wider than this (raw logits) split on bit patterns, not linearly
NUM_WARPS = 16


@triton.jit
def _key(x):
    """float32 -> int32 in the floats' order (bit-pattern bisection works on these)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _unkey(key):
    bits = tl.where(key < 0, key ^ 0x7FFFFFFF, key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _lanes(lo, hi, base, first, on_bits, LANES: tl.constexpr, WIDE: tl.constexpr):
    """Candidate thresholds inside (lo, hi); the first pass has lo itself (to learn its
    count or mass) and then [base, hi) from base on. Linear in value unless the bracket is
    very wide or very narrow (or on_bits): then evenly spaced bit patterns, which always make
    progress and end exactly (at adjacent floats)."""
    j = tl.arange(0, LANES)
    num = tl.where(first, tl.maximum(j - 1, 0), j + 1)
    den = tl.where(first, LANES - 1, LANES + 1)
    start = tl.where(first, base, lo)
    w = num.to(tl.float32) / den.to(tl.float32)
    linear = start * (1.0 - w) + hi * w
    k_start = _key(start).to(tl.int64)
    k_hi = _key(hi).to(tl.int64)
    k_lanes = k_start + (k_hi - k_start) * num.to(tl.int64) // den.to(tl.int64)
    by_bits = on_bits | ((hi - start) > WIDE) | ((k_hi - k_start) < 4096)
    lanes = tl.where(by_bits, _unkey(k_lanes.to(tl.int32)), linear)
    return tl.where(first & (j == 0), lo, lanes)


@triton.jit
def _move(lanes, take, q, value, q_value, UP: tl.constexpr):
    """The bracket end `value` moved to the largest (UP) or smallest lane in `take` if that
    is further in; with its count or mass."""
    if UP:
        best = tl.max(tl.where(take, lanes, NEG), 0)
        moved = best > value
    else:
        best = tl.min(tl.where(take, lanes, POS), 0)
        moved = best < value
    q_best = tl.max(tl.where(take & (lanes == best), q, -1.0), 0)
    return tl.where(moved, best, value), tl.where(moved, q_best, q_value)


@triton.jit
def _fits(lo, q_lo, q_hi, top, s, MASS: tl.constexpr, CAP: tl.constexpr):
    """Whether the bracket surely holds at most CAP tokens (then compaction is worth a try;
    it also takes everything at or above lo if that fits): counts are known; a mass M in
    [lo, hi) is at most M / p(lo) tokens."""
    if MASS:
        return q_lo - q_hi <= CAP * 0.99 * tl.exp2((lo - top) * s)
    else:
        return q_lo - q_hi <= CAP


@triton.jit
def _search(
    src,
    scr,
    top,
    s,
    goal,
    lo,
    base,
    MASS: tl.constexpr,
    BLOCK: tl.constexpr,
    LANES: tl.constexpr,
    CAP: tl.constexpr,
    FULL_PASSES: tl.constexpr,
    WIDE: tl.constexpr,
):
    """The largest c >= lo whose tokens at or above it reach the goal: `goal` tokens, or
    (MASS) the share `goal` of the mass at or above lo. `base` (>= lo) is known to reach it;
    the first pass spreads its lanes from there. `scr`: (ScrV, ScrI, s_lo, s_hi, n_s), the
    scratch, which holds the row's tokens in [s_lo, s_hi), n_s of them; `src`: _row_source's.
    Returns c, the count (mass) at or above it, and the scratch's s_lo, s_hi and n_s.

    Invariant: lo reaches the goal, hi does not; q_lo, q_hi: count (mass) at or above each."""
    ScrV, ScrI, s_lo, s_hi, n_s = scr
    hi = _unkey(_key(top) + 1)  # just above the max, where there is nothing
    zero = tl.sum(tl.zeros([2], tl.float32), 0)
    q_lo, q_hi, target = zero, zero, zero
    full = n_s * 0  # row passes made
    done = n_s * 0
    retry = n_s * 0  # 1: a compaction overflowed; refine before trying again
    j = tl.arange(0, LANES)
    for it in range(FULL_PASSES + 12):  # 12: bit bisection ends within 11 scratch passes
        if done == 0:
            covered = (s_lo <= lo) & (hi <= s_hi)
            worth = (it > 0) & (not covered) & (retry == 0)
            if worth & _fits(lo, q_lo, q_hi, top, s, MASS, CAP):
                n_s, s_hi = compact(*src, ScrV, ScrI, lo, hi, BLOCK, CAP)
                s_lo = lo
                if n_s > CAP:  # the bound was loose or rounding beat it
                    s_lo, s_hi, n_s, retry = POS, NEG, n_s * 0, retry + 1
                covered = (s_lo <= lo) & (hi <= s_hi)
            if covered | (full < FULL_PASSES):
                lanes = _lanes(lo, hi, base, it == 0, covered, LANES, WIDE)
                if covered:  # the scratch's tokens in [lane, hi), plus those at or above hi
                    q = count_scratch(ScrV, n_s, lanes, hi, top, s, MASS, BLOCK, LANES) + q_hi
                else:
                    q = count_row(*src, lanes, top, s, MASS, BLOCK, LANES)
                    full += 1
                    retry = retry * 0
                if it == 0:  # lane 0 is lo itself
                    q_lo = tl.sum(tl.where(j == 0, q, 0.0), 0)
                    target = goal * q_lo if MASS else goal
                lo, q_lo, hi, q_hi, done = _narrow(lanes, q, target, lo, q_lo, hi, q_hi)
            else:
                done = done + 1  # row passes spent: keep the whole bracket
    return lo, q_lo, s_lo, s_hi, n_s


@triton.jit
def _narrow(lanes, q, target, lo, q_lo, hi, q_hi):
    """The bracket [lo, hi) moved in to the lanes whose count (mass) q reaches the target
    and those that do not; with each end's q, and 1 once its ends are adjacent floats."""
    reach = q >= target
    lo, q_lo = _move(lanes, reach, q, lo, q_lo, True)
    hi, q_hi = _move(lanes, ~reach, q, hi, q_hi, False)
    done = (_key(hi) - _key(lo) <= 1).to(tl.int32)
    return lo, q_lo, hi, q_hi, done


@triton.jit
def _filter_draw(
    src,
    ScrV,
    ScrI,
    row,
    temp,
    s,
    top,
    n_fin,
    low,
    total,
    TopP,
    TopK,
    MinP,
    Seed,
    BLOCK: tl.constexpr,
    LANES: tl.constexpr,
    CAP: tl.constexpr,
    FULL_PASSES: tl.constexpr,
    WIDE: tl.constexpr,
    TILES: tl.constexpr,
):
    """A sampled row: the top_k, min_p and top_p thresholds (in that order), then the draw.
    The kept set is always {x >= f}. n_f: an upper bound on its size; m_f: its mass when
    `known` (else unknown). The draw sums the kept mass itself."""
    top_k = tl.load(TopK + row)
    top_p = tl.load(TopP + row)
    min_p = tl.load(MinP + row)
    f, n_f, m_f, known = low, n_fin.to(tl.float32), total, n_fin * 0 + 1
    s_lo, s_hi, n_s = POS, NEG, n_fin * 0  # the scratch holds the row's tokens in [s_lo, s_hi)
    if (top_k > 0) & (top_k < n_fin):
        goal = top_k.to(tl.float32)
        scr = (ScrV, ScrI, s_lo, s_hi, n_s)
        f, n_f, s_lo, s_hi, n_s = _search(
            src, scr, top, s, goal, low, low, False, BLOCK, LANES, CAP, FULL_PASSES, WIDE
        )
        known = known * 0
    if min_p > 0:
        floor = top + temp * tl.log(min_p)  # p >= min_p * p_max, as a logit
        if floor > f:
            f = floor
            known = known * 0
    if top_p < 1:
        # Tokens below b = top + T * log((1 - top_p) * M / n_f) hold less than (1 - top_p) of
        # the mass: at most n_f of them, each under exp((b - top) / T) = (1 - top_p) * M / n_f,
        # M <= the mass (M >= 1). The search spreads its lanes from base = max(f, b).
        mass_floor = tl.where(known != 0, m_f, 1.0)
        base = tl.maximum(f, top + temp * tl.log((1.0 - top_p) * mass_floor / n_f))
        scr = (ScrV, ScrI, s_lo, s_hi, n_s)
        f, m_f, s_lo, s_hi, n_s = _search(
            src, scr, top, s, top_p, f, base, True, BLOCK, LANES, CAP, FULL_PASSES, WIDE
        )
    u = tl.max(tl.rand(tl.load(Seed + row), tl.zeros([2], tl.int32)), 0)  # Philox, offset 0
    if (s_lo <= f) & (s_hi == POS):
        tok = draw_scratch(ScrV, ScrI, n_s, f, top, s, u, BLOCK)
    else:
        tok = draw_row(*src, f, top, s, u, BLOCK, TILES)
    return tok


@triton.jit
def _sample_row(
    src,
    ScrV,
    ScrI,
    row,
    temp,
    s,
    TopP,
    TopK,
    MinP,
    Seed,
    BLOCK: tl.constexpr,
    LANES: tl.constexpr,
    CAP: tl.constexpr,
    FULL_PASSES: tl.constexpr,
    WIDE: tl.constexpr,
    TILES: tl.constexpr,
):
    """A sampled row; one whose tokens are all -inf (or banned) gives argmax's answer."""
    top, tok, n_fin, low, total = scan_stats(*src, s, BLOCK)
    if top > NEG:
        tok = _filter_draw(
            src,
            ScrV,
            ScrI,
            row,
            temp,
            s,
            top,
            n_fin,
            low,
            total,
            TopP,
            TopK,
            MinP,
            Seed,
            BLOCK,
            LANES,
            CAP,
            FULL_PASSES,
            WIDE,
            TILES,
        )
    return tok


@triton.jit
def _row_source(L, stride, row, V, Ban, Eos, n_eos):
    """What the passes read a row through, as one tuple (sample_passes.py takes it spread
    out, `*src`): (row_ptr, V, Eos, n_eos, ban, eos_lo, eos_hi): the row's logits, the
    vocabulary size, the end-of-sequence ids, whether this row bans them, and their
    smallest and largest id (V and -1 when there are none)."""
    row_ptr = L + row.to(tl.int64) * stride
    ban = tl.load(Ban + row) != 0
    eos_lo = V
    eos_hi = V * 0 - 1
    for j in range(n_eos):
        e = tl.load(Eos + j)
        eos_lo = tl.minimum(eos_lo, e)
        eos_hi = tl.maximum(eos_hi, e)
    return row_ptr, V, Eos, n_eos, ban, eos_lo, eos_hi


@triton.jit(
    do_not_specialize=["n_eos"],
    do_not_specialize_on_alignment=["Temp", "TopP", "TopK", "MinP", "Seed", "Ban", "Eos"],
)
def _sample_kernel(
    L,
    stride,
    V,
    Temp,
    TopP,
    TopK,
    MinP,
    Seed,
    Ban,
    Eos,
    n_eos,
    Out,
    ScrV,
    ScrI,
    MIN_T: tl.constexpr,
    BLOCK: tl.constexpr,
    LANES: tl.constexpr,
    CAP: tl.constexpr,
    FULL_PASSES: tl.constexpr,
    WIDE: tl.constexpr,
    TILES: tl.constexpr,
):
    row = tl.program_id(0)
    src = _row_source(L, stride, row, V, Ban, Eos, n_eos)
    scratch = row.to(tl.int64) * CAP
    temp = tl.load(Temp + row)
    if temp >= MIN_T:  # NaN: greedy
        s = tl.maximum(LOG2E / temp, 1e-30)  # exp((x - top) / T) = exp2((x - top) * s);
        # never 0 (T = inf), where -inf * s would be NaN
        tok = _sample_row(
            src,
            ScrV + scratch,
            ScrI + scratch,
            row,
            temp,
            s,
            TopP,
            TopK,
            MinP,
            Seed,
            BLOCK,
            LANES,
            CAP,
            FULL_PASSES,
            WIDE,
            TILES,
        )
    else:
        _, tok = scan_max(*src, BLOCK)
    tl.store(Out + row, tok.to(tl.int64))


def triton_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    top_k: torch.Tensor,
    min_p: torch.Tensor,
    seed: torch.Tensor,
    ban_eos: torch.Tensor,
    eos_ids: torch.Tensor,
    min_temperature: float,
    *,
    block: int = BLOCK,
    cap: int = CAP,
    full_passes: int = FULL_PASSES,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """One launch, one program per row; arguments as `sampler.sample` takes them (dtypes
    already right). block/cap/full_passes/num_warps exist for tests of the rarer paths."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    scratch_v = torch.empty(rows, cap, dtype=torch.float32, device=logits.device)
    scratch_i = torch.empty(rows, cap, dtype=torch.int32, device=logits.device)
    eos = eos_ids if eos_ids.numel() else scratch_i  # never read when n_eos is 0
    _sample_kernel[(rows,)](
        logits,
        logits.stride(0),
        vocab,
        temperature,
        top_p,
        top_k,
        min_p,
        seed,
        ban_eos,
        eos,
        eos_ids.numel(),
        out,
        scratch_v,
        scratch_i,
        MIN_T=min_temperature,
        BLOCK=block,
        LANES=LANES,
        CAP=cap,
        FULL_PASSES=full_passes,
        WIDE=WIDE,
        TILES=triton.next_power_of_2(triton.cdiv(vocab, block)),
        num_warps=num_warps,
    )
    return out
