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
shape serves every batch size (warmup.py).
"""

from __future__ import annotations

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs never take this path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on CPU-only machines
    triton = None

BLOCK_N = 16  # output rows a program computes (320 programs a pair for a 5120-wide output)
BLOCK_K = 256  # weight columns a program loads per iteration (16 x 256 bf16: 8 KiB)
NUM_WARPS = 4


def applies(x: torch.Tensor, pairs: int, experts: int) -> bool:
    """Whether the pair products run for `pairs` (token, expert) pairs of `experts`: on a GPU
    with Triton, while pairs are at most half the experts (so few pairs share an expert: Scout's
    16 experts top-1 up to batch 8, Qwen3-30B-A3B's 128 top-8 up to batch 8)."""
    return triton is not None and x.is_cuda and 2 * pairs <= experts


if triton is not None:

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
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        block, pair = tl.program_id(0), tl.program_id(1)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        rows = block * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rows = w_ptr + expert * stride_we + rows[:, None].to(tl.int64) * stride_wn
        x_row = x_ptr + pair.to(tl.int64) * stride_x
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            w = tl.load(w_rows + cols[None, :], mask=(rows[:, None] < N) & (cols[None, :] < K))
            acc += w.to(tl.float32) * x[None, :]
        out = tl.sum(acc, axis=1)
        dst = out_ptr + pair.to(tl.int64) * stride_out + rows
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=rows < N)


def pair_linear(x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """Rows x [P, K] in any order, each times its own expert's weight [E, N, K] transposed:
    out[p] = weight[expert_ids[p]] @ x[p], [P, N] in x's dtype (float32 accumulation). Off
    the GPU (tests of the callers' pair order) the PyTorch reference computes it."""
    if triton is None or not x.is_cuda:
        return pair_linear_ref(x, weight, expert_ids)
    pairs, k = x.shape
    n = weight.shape[1]
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty(pairs, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(n, BLOCK_N), pairs)
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
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        num_warps=NUM_WARPS,
    )
    return out


def pair_linear_ref(
    x: torch.Tensor, weight: torch.Tensor, expert_ids: torch.Tensor
) -> torch.Tensor:
    """`pair_linear` in PyTorch (float32 products, rounded once): the tests' reference."""
    w = weight[expert_ids.reshape(-1)].float()
    return torch.bmm(w, x.float().unsqueeze(-1)).squeeze(-1).to(x.dtype)
