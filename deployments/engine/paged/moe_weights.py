"""The routed-expert tensors of an MoE layer: their shapes and the checkpoint names that fill them.

Experts are stacked per layer in the layout the grouped matrix product reads (moe.py):
`experts_gate_up` [E, 2 I, H] (each expert's gate rows, then its up rows) and `experts_down`
[E, H, I], both first in the layer's block so they start 16-byte aligned; then the router
[E, H] and, for Llama 4, the shared expert's fused gate/up [2 Is, H] and down [H, Is].

Checkpoints name experts two ways, both read: one tensor per expert (published Qwen3-MoE and
Mixtral checkpoints, and what transformers 5.x's `save_pretrained` writes:
`mlp.experts.{e}.gate_proj.weight`, Mixtral's `block_sparse_moe.experts.{e}.w1/w3/w2.weight`)
or already stacked (transformers 5.x's live modules: `mlp.experts.gate_up_proj`
[E, 2I, H], `mlp.experts.down_proj` [E, H, I]). Completeness is checked per expert. Llama 4
stores its experts stacked and transposed (`feed_forward.experts.gate_up_proj` [E, H, 2I],
`down_proj` [E, I, H]): they are copied into transposed views of ours, with its router and
shared expert (`feed_forward.router`, `feed_forward.shared_expert.*`). Llama 4's names arrive
here as weights.canonical_name spells them, `feed_forward.` as `mlp.`.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from deployments.model_spec import ModelSpec, MoESpec

if TYPE_CHECKING:
    import torch

    from deployments.engine.paged.weights import LayerWeights

MIXTRAL_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
PER_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


def moe_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The MoE tensors of one layer; the stacked experts first (alignment)."""
    moe = spec.moe
    assert moe is not None
    h, e, i = spec.hidden_size, moe.num_experts, moe.intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "experts_gate_up": (e, 2 * i, h),
        "experts_down": (e, h, i),
        "router": (e, h),
    }
    if moe.shared_intermediate_size:
        shapes["shared_gate_up"] = (2 * moe.shared_intermediate_size, h)
        shapes["shared_down"] = (h, moe.shared_intermediate_size)
    return shapes


def canonical(rest: str) -> str:
    """A layer-relative checkpoint name in Qwen3-MoE's spelling (Mixtral's renamed)."""
    if rest.startswith("block_sparse_moe."):
        rest = "mlp." + rest[len("block_sparse_moe.") :]
        if m := re.fullmatch(r"mlp\.experts\.(\d+)\.(w[123])\.weight", rest):
            rest = f"mlp.experts.{m.group(1)}.{MIXTRAL_NAMES[m.group(2)]}.weight"
    return rest


def llama4_target(layer: LayerWeights, moe: MoESpec, rest: str) -> torch.Tensor | None:
    """Where a Llama 4 MoE layer's checkpoint tensor goes (transposed views for its experts)."""
    s = moe.shared_intermediate_size
    views = {
        "mlp.router.weight": lambda: layer.router,
        "mlp.experts.gate_up_proj": lambda: layer.experts_gate_up.transpose(1, 2),
        "mlp.experts.down_proj": lambda: layer.experts_down.transpose(1, 2),
        "mlp.shared_expert.gate_proj.weight": lambda: layer.shared_gate_up[:s],
        "mlp.shared_expert.up_proj.weight": lambda: layer.shared_gate_up[s:],
        "mlp.shared_expert.down_proj.weight": lambda: layer.shared_down,
    }
    view = views.get(rest)
    return view() if view is not None else None


def moe_target(layer: LayerWeights, moe: MoESpec, rest: str) -> torch.Tensor | None:
    """The tensor (or slice) a checkpoint tensor of an MoE layer fills; None if not one."""
    if moe.gating == "sigmoid_top1":
        return llama4_target(layer, moe, rest)
    i = moe.intermediate_size
    rest = canonical(rest)
    if m := PER_EXPERT.fullmatch(rest):
        e, part = int(m.group(1)), m.group(2)
        if part == "down_proj":
            return layer.experts_down[e]
        return layer.experts_gate_up[e, :i] if part == "gate_proj" else layer.experts_gate_up[e, i:]
    return {
        "mlp.experts.gate_up_proj": layer.experts_gate_up,
        "mlp.experts.down_proj": layer.experts_down,
        "mlp.gate.weight": layer.router,
    }.get(rest)


def moe_covers(moe: MoESpec, rest: str) -> list[str]:
    """The per-expert names (as `moe_names` lists them) one checkpoint tensor provides."""
    if moe.gating == "sigmoid_top1":
        return [rest]
    rest = canonical(rest)
    experts = range(moe.num_experts)
    if rest == "mlp.experts.gate_up_proj":
        return [f"mlp.experts.{e}.{p}.weight" for e in experts for p in ("gate_proj", "up_proj")]
    if rest == "mlp.experts.down_proj":
        return [f"mlp.experts.{e}.down_proj.weight" for e in experts]
    return [rest]


def moe_names(moe: MoESpec) -> list[str]:
    """Every layer-relative name an MoE layer's MLP needs (per expert, Qwen3-MoE spelling;
    Llama 4's own, stacked)."""
    if moe.gating == "sigmoid_top1":
        shared = [f"mlp.shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")]
        experts = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
        return ["mlp.router.weight", *experts, *shared]
    names = ["mlp.gate.weight"]
    for e in range(moe.num_experts):
        names += [f"mlp.experts.{e}.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    return names
