"""Routed-expert MLPs: each architecture's gating, and the experts computed as grouped work.

`route` picks each token's experts and weights exactly as Hugging Face's gate modules do
(Qwen3-MoE's `Qwen3MoeTopKRouter`, Mixtral's `MixtralTopKRouter`, Llama 4's `Llama4Router`).
`experts_forward` then, at decode sizes (a few pairs against many experts), runs one
matrix-vector product per (token, expert) pair (expert_gemv.py: each pair reads exactly its
expert's bytes); otherwise it sorts the (token, expert) pairs by expert on the device, counts them
per expert with a binary search over the sorted ids (no host sync: no `.item()`, `nonzero` or
`.tolist()`, so a decode step stays capturable in a CUDA graph) and runs two grouped matrix
products over the stacked expert weights (`torch._grouped_mm`: each expert's rows against that
expert's matrix; an expert no token picked is not read), SiLU-gated between them; the rows go
back to their tokens and each token's k rows are summed (as transformers' own `grouped_mm`
experts do: a sum over [T, k, H], deterministic, no atomics).

Where `_grouped_mm` cannot run (CUDA in a dtype other than bfloat16, or a torch without it)
a gather-bmm fallback computes the same thing without a loop: each pair's expert matrix is
gathered ([pairs, N, K], memory-hungry: a fallback, not a fast path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deployments.engine.paged import expert_gemv
from deployments.engine.paged.fused import silu_mul
from deployments.engine.paged.weights import LayerWeights
from deployments.model_spec import MoESpec


def route(router_logits: torch.Tensor, moe: MoESpec) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, k], expert ids [T, k]), rounded as HF rounds.

    softmax_topk: softmax in float32, the top k, renormalised if `norm_topk_prob`; kept in
    float32 for Mixtral, rounded to the logits' dtype for Qwen3-MoE. sigmoid_top1 (Llama 4):
    the top k logits, each through a sigmoid in float32, rounded to the logits' dtype.
    """
    k = moe.experts_per_token
    if moe.gating == "sigmoid_top1":
        top, ids = torch.topk(router_logits, k, dim=-1)
        return torch.sigmoid(top.float()).to(router_logits.dtype), ids
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    top, ids = torch.topk(probs, k, dim=-1)
    if moe.norm_topk_prob:
        top = top / top.sum(dim=-1, keepdim=True)
    return (top if moe.weights_float32 else top.to(router_logits.dtype)), ids


def grouped_mm_available(x: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs for `x`'s device and dtype without a host sync."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if x.device.type == "cuda":
        return x.dtype == torch.bfloat16
    return x.device.type == "cpu" and hasattr(F, "grouped_mm")  # CPU kernels: torch >= 2.10


def grouped_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    offsets: torch.Tensor,
    expert_ids: torch.Tensor,
    use_grouped_mm: bool,
) -> torch.Tensor:
    """Rows x [S, K] sorted by expert, times their expert's weight [E, N, K] transposed.

    `offsets` [E] int32: cumulative rows per expert (rows offsets[e-1]:offsets[e] are expert
    e's); `expert_ids` [S]: the sorted ids themselves (the fallback gathers by them).
    """
    if use_grouped_mm:
        return torch._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    return torch.bmm(x.unsqueeze(1), weight[expert_ids].transpose(-2, -1)).squeeze(1)


METHODS = ("pairs", "grouped", "gather")  # expert_gemv; torch._grouped_mm; gather-bmm


def choose_method(x: torch.Tensor, pairs: int, experts: int) -> str:
    """How `experts_forward` computes `pairs` (token, expert) pairs of `experts` for rows
    like `x`: per-pair products at decode sizes, else grouped, else the fallback."""
    if expert_gemv.applies(x, pairs, experts):
        return "pairs"
    return "grouped" if grouped_mm_available(x) else "gather"


def experts_forward(
    h: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    scale_input: bool,
    fast: bool = False,
    method: str | None = None,
) -> torch.Tensor:
    """The routed experts' output [T, H] for tokens h [T, H].

    gate_up [E, 2I, H], down [E, H, I]: the stacked experts; weights, expert_ids [T, k] from
    `route`. With `scale_input` (Llama 4) each pair's input is scaled by its weight before the
    expert, else its output after it. `method`: one of METHODS (default `choose_method`); the
    pairs stay in (token, choice) order for "pairs", else are sorted by expert first.
    """
    tokens, k = expert_ids.shape
    method = method or choose_method(h, tokens * k, gate_up.shape[0])
    if method == "pairs":
        return _pairs_forward(h, gate_up, down, weights, expert_ids, scale_input, fast)
    ids, order = torch.sort(expert_ids.reshape(-1), stable=True)
    x, w = h[order // k], weights.reshape(-1)[order].unsqueeze(-1)
    experts = torch.arange(gate_up.shape[0], device=h.device)
    offsets = torch.searchsorted(ids, experts, right=True, out_int32=True)
    grouped = method == "grouped"
    if scale_input:
        x = x * w
    act = silu_mul(grouped_linear(x, gate_up, offsets, ids, grouped), fast)
    out = grouped_linear(act, down, offsets, ids, grouped)
    if not scale_input:
        out = out * w  # Mixtral's float32 weights make this (and the sum) float32, as in HF
    rows = torch.empty_like(out).index_copy_(0, order, out)  # back to (token, choice) order
    return _sum_choices(rows, k, h.dtype)


def _pairs_forward(
    h: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    scale_input: bool,
    fast: bool,
    shared: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """`experts_forward` by per-pair products, the pairs in (token, choice) order: a token's
    row is read by each of its k pairs in place, unless scaled per pair first. `shared`
    (gate_up [2I, H], down [H, I] of a shared expert as wide as the routed ones): its rows
    ride in the same two launches, and the result is routed + shared."""
    k = expert_ids.shape[1]
    ids, w = expert_ids.reshape(-1), weights.reshape(-1, 1)
    if scale_input:
        x, per_row = (h if k == 1 else h.repeat_interleave(k, dim=0)) * w, 1
    else:
        x, per_row = h, k
    pairs = ids.numel()
    dense_in = None if shared is None else (h, shared[0])
    act = silu_mul(expert_gemv.pair_linear(x, gate_up, ids, per_row, dense_in), fast)
    dense_out = None if shared is None else (act[pairs:], shared[1])
    out = expert_gemv.pair_linear(act[:pairs], down, ids, dense=dense_out)
    routed = out[:pairs] if scale_input else out[:pairs] * w
    routed = _sum_choices(routed, k, h.dtype)
    return routed if shared is None else out[pairs:].add_(routed)  # as HF: shared + routed


def _sum_choices(rows: torch.Tensor, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows in (token, choice) order [T * k, H] -> each token's k rows summed, [T, H]."""
    if k > 1:
        rows = rows.view(-1, k, rows.shape[-1]).sum(dim=1)
    return rows.to(dtype)


def moe_mlp(
    h: torch.Tensor, layer: LayerWeights, moe: MoESpec, fast: bool, method: str | None = None
) -> torch.Tensor:
    """An MoE layer's MLP on normed hidden states h [T, H]: router, routed experts, and the
    shared expert where there is one (Llama 4: added to the routed output). With the per-pair
    products (decode sizes; `method` as `experts_forward`'s) and one token, a shared expert as
    wide as the routed ones (Llama 4's always is) rides in their two launches."""
    weights, ids = route(F.linear(h, layer.router), moe)
    scale = moe.gating == "sigmoid_top1"
    gate_up, down = layer.experts_gate_up, layer.experts_down
    method = method or choose_method(h, ids.numel(), gate_up.shape[0])
    shared = layer.shared_gate_up
    # One token only: each dense row reads the whole shared matrix, which cuBLAS reads once
    # for all T tokens (riding at batch 8 took Scout's step from 15.7 to 23.7 ms on an H200).
    rides = h.shape[0] == 1 and shared is not None and shared.shape == gate_up.shape[1:]
    if method == "pairs" and rides:
        pair = (shared, layer.shared_down)
        return _pairs_forward(h, gate_up, down, weights, ids, scale, fast, shared=pair)
    out = experts_forward(h, gate_up, down, weights, ids, scale, fast=fast, method=method)
    if shared is None:
        return out
    shared_out = F.linear(silu_mul(F.linear(h, shared), fast), layer.shared_down)
    return shared_out.add_(out)
