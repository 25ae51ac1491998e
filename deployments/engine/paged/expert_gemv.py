"""Routed experts at decode sizes: one matrix-vector product per (token, expert) pair, in Triton.

At a few tokens a step, `torch._grouped_mm` runs its tiles of 64-128 rows over one or two real
rows per expert and reads the picked experts' weights well below the card's bandwidth (Llama 4
Scout's decode step at batch 1 took 1.8x its read floor, Qwen3-30B-A3B's 5.6x, on an H200).
Here each program reads BLOCK_N rows of its pair's expert matrix once, streaming along K (the
weights' contiguous axis) and accumulating in float32, so a pair costs exactly its expert's
bytes. Pairs that share an expert read it once each: worth it only while pairs are few against
the experts (`applies`), which is the decode regime; larger batches keep the grouped product.

The expert id is read on the device (no host sync: capturable in a CUDA graph), and nothing
about the pair count specializes the kernel (it is the grid only), so one tuning and compile
per weight shape, at warm-up (warmup.py), serves every batch size.
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs never take this path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

# (output rows a program computes, weight columns it loads per iteration, warps). A pair's
# product is one matrix-vector pass: enough programs and bytes in flight decide its speed, so
# Triton times these once per weight shape (at warm-up) and keeps the fastest. A 16 x 256
# tile alone ran at 2.1 TB/s on an H200 (cuBLAS's GEMVs of the shared expert: 3.6-4.1).
CONFIGS = [
    (2, 1024, 4),
    (4, 512, 4),
    (4, 1024, 4),
    (4, 1024, 8),
    (8, 512, 4),
    (8, 1024, 8),
    (16, 256, 4),
    (16, 512, 8),
]


def applies(x: torch.Tensor, pairs: int, experts: int) -> bool:
    """Whether the pair products run for `pairs` (token, expert) pairs of `experts`: on a GPU
    with Triton, while pairs are at most half the experts (so few pairs share an expert: Scout's
    16 experts top-1 up to batch 8, Qwen3-30B-A3B's 128 top-8 up to batch 8)."""
    return triton is not None and x.is_cuda and 2 * pairs <= experts


if triton is not None:

    @triton.autotune(
        configs=[triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w) for n, k, w in CONFIGS],
        key=["N", "K"],
    )
    @triton.jit
    def _pair_gemv_kernel(
        x_ptr,  # [P, K] the pairs' input rows
        w_ptr,  # [E, N, K] stacked expert matrices, K contiguous
        ids_ptr,  # [P] each pair's expert
        out_ptr,  # [P, N]
        N,
        K,
        stride_x,
        stride_we,
        stride_wn,
        stride_out,
        ROWS_PER_X,  # pairs per input row: pair p reads row p // ROWS_PER_X
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        block, pair = tl.program_id(0), tl.program_id(1)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
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
    x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor, per_row: int = 1
) -> torch.Tensor:
    """Each pair p times its own expert's weight [E, N, K] transposed: out[p] =
    weight[expert_ids[p]] @ x[p // per_row], [P, N] in x's dtype (float32 accumulation), for
    rows x [P / per_row, K] (`per_row`: a token's k pairs read its one row). Off the GPU
    (tests of the callers' pair order) the PyTorch reference computes it."""
    if triton is None or not x.is_cuda:
        return pair_linear_ref(x.repeat_interleave(per_row, dim=0), weight, expert_ids)
    pairs, k = expert_ids.numel(), x.shape[1]
    n = weight.shape[1]
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(pairs, n, dtype=x.dtype, device=x.device)

    def grid(meta: dict) -> tuple[int, int]:
        return (triton.cdiv(n, meta["BLOCK_N"]), pairs)

    _pair_gemv_kernel[grid](
        x,
        weight,
        expert_ids.reshape(-1),
        out,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        per_row,
    )
    return out


def pair_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor
) -> torch.Tensor:
    """`pair_linear` in PyTorch (float32 products, rounded once): the tests' reference."""
    w = weight[expert_ids.reshape(-1)].float()
    return torch.bmm(w, x.float().unsqueeze(-1)).squeeze(-1).to(x.dtype)
