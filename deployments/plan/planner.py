"""Where a model's weights and its users' KV caches go on a node, and the decode-step floor.

Placement (an ideal the planner assumes; managed memory itself places pages by first touch
and migration):

1. Tiers, fastest first: HBM less the headroom (CUDA context, activations), then the host
   budget (LPDDR5X over NVLink-C2C) on a coherent node only. Their sum is the replica's memory
   limit from `deployments.capacity`, less the headroom on a coherent node.
2. Weights fill the tiers in the order decoding reads them: every-step weights, then routed
   experts, then idle ones (input embedding table, vision encoder). Whatever is left over
   does not fit: on a discrete GPU nothing spills to host memory.
3. Users' KV caches take the room left, HBM first. Users that fit = that room // one user's KV.
   The replica's KV budget is `layout.kv_budget_bytes` of that room, as the engines size it.

Decode-step floor = sum over tiers of (bytes the step reads from the tier / the tier's
bandwidth). The GPU reads host memory over the link, so a host tier's bandwidth is the lower
of the link's per-direction figure and the memory's own. A step of n users reads the
every-step weights once, the expected share of routed experts their n tokens pick, and all n
users' KV caches.
"""

from __future__ import annotations

from dataclasses import dataclass

from deployments.capacity import DEFAULT_HEADROOM_BYTES, NodeMemory
from deployments.layout import kv_budget_bytes
from deployments.plan.models import ModelFootprint
from deployments.plan.nodes import NodeSpec

TIERS = ("hbm", "host")
GROUPS = ("read", "experts", "idle")  # weight groups, in placement order


@dataclass(frozen=True)
class StepFloor:
    """The decode-step floor for `users` users at the plan's context."""

    users: int
    fits: bool
    kv_bytes: dict[str, int]  # the users' KV caches, by tier
    read_bytes: dict[str, int]  # what one step reads, by tier
    seconds: dict[str, float]  # read_bytes / the tier's bandwidth
    expert_share: float  # share of routed-expert bytes one step reads (0 for dense)

    @property
    def step_seconds(self) -> float:
        return sum(self.seconds.values())


@dataclass(frozen=True)
class Plan:
    model: ModelFootprint
    node: NodeSpec
    memory: NodeMemory
    dtype_bytes: int
    context_tokens: int
    weights: dict[str, dict[str, int]]  # group -> tier -> bytes
    unplaced_weight_bytes: int  # weights beyond every tier: the model does not fit
    kv_bytes_per_user: int
    kv_room: dict[str, int]  # tier -> room left for KV after the weights
    kv_budget_bytes: int  # the replica's KV budget (explicit, else its default share)
    one_user: StepFloor
    n_users: StepFloor
    dtype: str = "bfloat16"

    @property
    def weight_bytes(self) -> int:
        return self.model.num_parameters * self.dtype_bytes

    def weights_in(self, tier: str) -> int:
        return sum(self.weights[group][tier] for group in GROUPS)

    @property
    def weights_beyond_hbm_bytes(self) -> int:
        """Weights HBM cannot hold even without headroom (the published "beyond HBM")."""
        return max(0, self.weight_bytes - self.node.hbm_bytes)

    @property
    def weights_fit(self) -> bool:
        return self.unplaced_weight_bytes == 0

    @property
    def users_fit(self) -> int:
        """Users at the context whose KV caches fit in the room the weights leave."""
        if not self.weights_fit or self.kv_bytes_per_user <= 0:
            return 0
        return sum(self.kv_room.values()) // self.kv_bytes_per_user

    @property
    def users_fit_in_kv_budget(self) -> int:
        if not self.weights_fit or self.kv_bytes_per_user <= 0:
            return 0
        return min(self.kv_budget_bytes, sum(self.kv_room.values())) // self.kv_bytes_per_user


def _fill(amount: int, room: dict[str, int]) -> tuple[dict[str, int], int]:
    """Put `amount` bytes into the tiers in order, taking from `room`; return (placed, left)."""
    placed = {}
    for tier in TIERS:
        placed[tier] = min(amount, room[tier])
        room[tier] -= placed[tier]
        amount -= placed[tier]
    return placed, amount


def _bandwidths(node: NodeSpec) -> dict[str, float]:
    return {"hbm": node.hbm_bandwidth, "host": node.host_read_bandwidth}


def _floor(
    model: ModelFootprint,
    node: NodeSpec,
    weights: dict[str, dict[str, int]],
    kv_room: dict[str, int],
    kv_per_user: int,
    users: int,
    fits: bool,
) -> StepFloor:
    share = model.expert_share(users)
    kv, _ = _fill(users * kv_per_user, dict(kv_room))
    read = {t: weights["read"][t] + round(weights["experts"][t] * share) + kv[t] for t in TIERS}
    bandwidth = _bandwidths(node)
    seconds = {t: read[t] / bandwidth[t] if read[t] else 0.0 for t in TIERS}
    return StepFloor(users, fits, kv, read, seconds, share)


def plan(
    model: ModelFootprint,
    node: NodeSpec,
    context_tokens: int,
    *,
    dtype: str = "bfloat16",
    dtype_bytes: int = 2,
    users: int | None = None,
    host_budget: int | None = None,
    headroom: int = DEFAULT_HEADROOM_BYTES,
    kv_budget: int | None = None,
    kv_budget_fraction: float = 0.8,
) -> Plan:
    """Plan `model` on one replica of `node` at `context_tokens` of context per user.

    `kv_budget` defaults to `kv_budget_fraction` of the room left after the weights, as the
    replica's engine sizes it; `users` to as many as fit in memory and in that budget (at
    least one).
    """
    if context_tokens <= 0:
        raise ValueError(f"context must be positive, not {context_tokens}")
    if context_tokens > model.max_context:
        raise ValueError(
            f"context {context_tokens} exceeds {model.name}'s maximum of {model.max_context} tokens"
        )
    memory = node.memory(host_budget, headroom)
    room = {"hbm": memory.device_room_bytes, "host": memory.host_room_bytes}
    sizes = {"read": model.read_params, "experts": model.expert_params, "idle": model.idle_params}
    weights, unplaced = {}, 0
    for group in GROUPS:
        weights[group], left = _fill(sizes[group] * dtype_bytes, room)
        unplaced += left
    kv_room = room if unplaced == 0 else dict.fromkeys(TIERS, 0)
    kv_per_user = model.kv_bytes(context_tokens, dtype_bytes)
    budget = kv_budget_bytes(kv_budget, kv_budget_fraction, sum(kv_room.values()))  # as the engines
    fit = sum(kv_room.values()) // kv_per_user if unplaced == 0 else 0
    kept = min(fit, budget // kv_per_user)  # what the replica keeps before evicting
    n = users if users is not None else max(1, kept)
    if n <= 0:
        raise ValueError(f"users must be positive, not {n}")
    one = _floor(model, node, weights, kv_room, kv_per_user, 1, fit >= 1)
    many = _floor(model, node, weights, kv_room, kv_per_user, n, fit >= n)
    return Plan(
        model,
        node,
        memory,
        dtype_bytes,
        context_tokens,
        weights,
        unplaced,
        kv_per_user,
        kv_room,
        budget,
        one,
        many,
        dtype,
    )
