"""Routed experts at decode sizes: one matrix-vector product per (token, expert) pair, in Triton.

At a few tokens a step, `torch._grouped_mm` runs its tiles of 64-128 rows over one or two real
rows per expert and reads the picked experts' weights well below the card's bandwidth (Llama 4
Scout's decode step at batch 1 took 1.8x its read floor, Qwen3-30B-A3B's 5.6x, on an H200).
Here each program reads BLOCK_N rows of its pair's expert matrix once, streaming along K (the
weights' contiguous axis) and accumulating in float32, so a pair costs exactly its expert's
bytes. Pairs that share an expert read it once each: worth it only while pairs are few against
the experts (`applies`), which is the decode regime; larger batches keep the grouped product.

The expert id is read on the device (no host sync: capturable in a CUDA graph), and nothing
about the pair count specializes the kernel (it is the grid only), so one compile per weight
shape, at warm-up (warmup.py), serves every batch size.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs never take this path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

# The tile: output rows a program computes, weight columns it loads per iteration, warps, and
# software-pipeline stages. Measured on an H200 over 48 tiles, replayed in a CUDA graph a
# different expert per call (benchmarks/pair_gemv_bench.py, results/pair-gemv-NVIDIA-H200.json):
# this one was the fastest on all four decode shapes (Scout's gate_up 4.14 TB/s, its down 3.82,
# against cuBLAS's 4.08 and 3.19 for one expert's product; Qwen3-30B-A3B's 3.58 and 2.74). Two
# rows a program keeps many programs in flight. Triton's autotuner (each tile timed alone, L2
# flushed) picked 2 x 1024 with 4 warps: within 1% on Scout's shapes, 8% slower on Qwen's down;
# a fixed tile also spares the warm-up its tuning.
TILE = {"BLOCK_N": 2, "BLOCK_K": 512, "num_warps": 2, "num_stages": 2}


def applies(x: torch.Tensor, pairs: int, experts: int) -> bool:
    """Whether the pair products run for `pairs` (token, expert) pairs of `experts`: on a GPU
    with Triton, while pairs are at most half the experts (so few pairs share an expert: Scout's
    16 experts top-1 up to batch 8, Qwen3-30B-A3B's 128 top-8 up to batch 8)."""
    return triton is not None and x.is_cuda and 2 * pairs <= experts


if triton is not None:

    @triton.jit(do_not_specialize=["FIRST_DENSE"])
    def _pair_gemv_kernel(
        x_ptr,  # [P / ROWS_PER_X, K] the expert pairs' input rows
        w_ptr,  # [E, N, K] stacked expert matrices, K contiguous
        ids_ptr,  # [P] each expert pair's expert
        xd_ptr,  # [D, K] the dense rows' inputs (pairs FIRST_DENSE on)
        wd_ptr,  # [N, K] the dense matrix they all multiply (e.g. a shared expert's)
        out_ptr,  # [P + D, N]
        N,
        K,
        stride_x,
        stride_we,
        stride_wn,  # the row stride of both matrices
        stride_xd,
        stride_out,
        ROWS_PER_X,  # expert pairs per input row: pair p reads row p // ROWS_PER_X
        FIRST_DENSE,  # P: pairs from here on are dense rows
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        block, pair = tl.program_id(0), tl.program_id(1)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        row_offsets = rows[:, None].to(tl.int64) * stride_wn
        if pair >= FIRST_DENSE:
            w_rows = wd_ptr + row_offsets
            x_row = xd_ptr + (pair - FIRST_DENSE).to(tl.int64) * stride_xd
        else:
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            w_rows = w_ptr + expert * stride_we + row_offsets
            x_row = x_ptr + (pair // ROWS_PER_X).to(tl.int64) * stride_x
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            w = tl.load(w_rows + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K))
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        dst = out_ptr + pair.to(tl.int64) * stride_out + rows
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=rows < N)


def pair_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_ids: torch.Tensor,
    per_row: int = 1,
    dense: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Each pair p times its own expert's weight [E, N, K] transposed: out[p] =
    weight[expert_ids[p]] @ x[p // per_row], [P, N] in x's dtype (float32 accumulation), for
    rows x [P / per_row, K] (`per_row`: a token's k pairs read its one row). `dense` = (xd
    [D, K], wd [N, K]) appends D rows xd @ wd.T in the same launch (a shared expert beside the
    routed ones: one pass over both matrices' rows, [P + D, N]). Off the GPU (tests of the
    callers' pair order) the PyTorch reference computes it."""
    if triton is None or not x.is_cuda:
        out = pair_linear_ref(x.repeat_interleave(per_row, dim=0), weight, expert_ids)
        if dense is None:
            return out
        xd, wd = dense
        zeros = torch.zeros(len(xd), dtype=torch.long)  # every dense row: "expert" 0 of one
        return torch.cat([out, pair_linear_ref(xd, wd.unsqueeze(0), zeros)])
    pairs, n = expert_ids.numel(), weight.shape[1]
    x, weight = x.contiguous(), weight.contiguous()
    xd, wd = (x, weight[0]) if dense is None else (dense[0].contiguous(), dense[1].contiguous())
    if wd.shape != weight.shape[1:]:
        raise ValueError(f"dense matrix {tuple(wd.shape)} against experts' {weight.shape[1:]}")
    extra = 0 if dense is None else xd.shape[0]
    out = torch.empty(pairs + extra, n, dtype=x.dtype, device=x.device)
    launch(x, weight, expert_ids.reshape(-1), out, per_row, (xd, wd))
    return out


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    ids: torch.Tensor,
    out: torch.Tensor,
    per_row: int,
    dense: tuple[torch.Tensor, torch.Tensor],
    tile: dict[str, int] = TILE,
) -> None:
    """The kernel over `ids`' pairs then `dense`'s rows into `out` [P + D, N] (contiguous
    operands, checked by `pair_linear`); `tile` other than TILE for pair_gemv_bench only."""
    (xd, wd), pairs, n = dense, ids.numel(), weight.shape[1]
    _pair_gemv_kernel[(triton.cdiv(n, tile["BLOCK_N"]), out.shape[0])](
        x,
        weight,
        ids,
        xd,
        wd,
        out,
        n,
        x.shape[1],
        x.stride(0),
        weight.stride(0),
        weight.stride(1),
        xd.stride(0),
        out.stride(0),
        per_row,
        pairs,
        **tile,
    )


def pair_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor
) -> torch.Tensor:
    """`pair_linear` in PyTorch (float32 products, rounded once): the tests' reference."""
    w = weight[expert_ids.reshape(-1)].float()
    return torch.bmm(w, x.float().unsqueeze(-1)).squeeze(-1).to(x.dtype)
