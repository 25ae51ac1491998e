"""A plan as a JSON document (`to_dict`) and as a short human-readable table (`render`)."""

from __future__ import annotations

from typing import Any

from deployments.plan.nodes import NodeSpec
from deployments.plan.planner import GROUPS, TIERS, Plan, StepFloor

SCHEMA = "grace-serve/plan/v1"
GiB, KiB = 2**30, 2**10


def _floor_dict(floor: StepFloor) -> dict[str, Any]:
    step = floor.step_seconds if floor.fits else None
    return {
        "users": floor.users,
        "fits": floor.fits,
        "kv_bytes": floor.kv_bytes,
        "read_bytes": floor.read_bytes,
        "seconds": floor.seconds,
        "expert_share_read": floor.expert_share,
        "step_seconds": step,
        "tokens_per_s_per_user": 1 / step if step else None,
        "tokens_per_s": floor.users / step if step else None,
    }


def _model_dict(plan: Plan) -> dict[str, Any]:
    """The model: sizes, context, KV per token and (MoE) the experts."""
    m = plan.model
    moe = None
    if m.num_experts:
        moe = {
            "routed_experts": m.num_experts,
            "experts_per_token": m.experts_per_token,
            "expert_bytes": m.expert_params * plan.dtype_bytes,
            "counting": "all experts resident; a step of n tokens reads the expected share "
            "1 - (1 - k/E)^n of the routed-expert bytes (uniform, independent routing)",
        }
    return {
        "name": m.name,
        "source": m.source,
        "dtype": plan.dtype,
        "parameters": m.num_parameters,
        "active_parameters": m.active_parameters,
        "bytes_per_parameter": plan.dtype_bytes,
        "weight_bytes": plan.weight_bytes,
        "max_context_tokens": m.max_context,
        "moe": moe,
        "kv": {
            "bytes_per_token_per_layer": m.kv_bytes_per_token_layer(plan.dtype_bytes),
            "full_attention_layers": m.full_kv_layers,
            "windowed_layers": m.window_kv_layers,
            "window_tokens": m.kv_window_tokens,
        },
    }


def _node_dict(n: NodeSpec) -> dict[str, Any]:
    """The node: memories, bandwidths and the host link."""
    return {
        "name": n.name,
        "description": n.description,
        "coherent": n.coherent,
        "replicas_per_node": n.replicas_per_node,
        "hbm_bytes": n.hbm_bytes,
        "hbm_bandwidth": float(n.hbm_bandwidth),
        "host_bytes": n.host_bytes,
        "host_bandwidth": float(n.host_bandwidth),
        "link": n.link,
        "link_bandwidth": float(n.link_bandwidth),
        "host_read_bandwidth": float(n.host_read_bandwidth),
    }


def to_dict(plan: Plan) -> dict[str, Any]:
    """The machine-readable plan. Units: bytes; bandwidths in bytes per second (one direction
    for links); seconds. Tiers are `hbm` and `host`; weight groups `read`, `experts`, `idle`
    (see `deployments.plan.models`). A floor that does not fit has null step figures."""
    mem = plan.memory
    return {
        "schema": SCHEMA,
        "model": _model_dict(plan),
        "node": _node_dict(plan.node),
        "memory": {
            "limit_bytes": mem.limit_bytes,
            "headroom_bytes": mem.headroom_bytes,
            "host_budget_bytes": mem.host_room_bytes,
            "room_bytes": {"hbm": mem.device_room_bytes, "host": mem.host_room_bytes},
        },
        "weights": {
            "bytes": plan.weight_bytes,
            "fits": plan.weights_fit,
            "beyond_hbm_bytes": plan.weights_beyond_hbm_bytes,
            "unplaced_bytes": plan.unplaced_weight_bytes,
            "by_tier": {t: plan.weights_in(t) for t in TIERS},
            "by_group": plan.weights,
        },
        "kv": {
            "context_tokens": plan.context_tokens,
            "bytes_per_user": plan.kv_bytes_per_user,
            "room_bytes": plan.kv_room,
            "users_fit": plan.users_fit,
            "budget_bytes": plan.kv_budget_bytes,
            "users_fit_in_budget": plan.users_fit_in_kv_budget,
        },
        "decode_floor": {
            "one_user": _floor_dict(plan.one_user),
            "users": _floor_dict(plan.n_users),
        },
        "fits": plan.weights_fit and plan.n_users.fits,
    }


def _gb(b: float) -> str:
    return f"{b / 1e9:.1f} GB"


def _rate(bps: float) -> str:
    return f"{bps / 1e12:.2f} TB/s" if bps >= 1e12 else f"{bps / 1e9:.0f} GB/s"


def _row(label: str, cells: list[str], note: str = "") -> str:
    return f"{label:<21}" + "".join(f"{c:>16}" for c in cells) + (f"   {note}" if note else "")


def _floor_rows(plan: Plan, floor: StepFloor) -> list[str]:
    who = f"{floor.users} user" + ("s" if floor.users != 1 else "")
    kv = [floor.kv_bytes[t] for t in TIERS]
    rows = [_row(f"KV, {who}", [_gb(b) for b in [*kv, sum(kv)]])]
    if not floor.fits:
        return [*rows, _row(f"step, {who}", ["-", "-", "-"], "does not fit")]
    step = floor.step_seconds
    reads = [floor.read_bytes[t] for t in TIERS]
    rows.append(_row(f"step reads, {who}", [_gb(b) for b in [*reads, sum(reads)]]))
    note = f"{1 / step:.1f} tokens/s a user" + (
        f", {floor.users / step:.0f} in all" if floor.users > 1 else ""
    )
    ms = [f"{floor.seconds[t] * 1e3:.1f} ms" for t in TIERS]
    return [*rows, _row(f"step floor, {who}", [*ms, f"{step * 1e3:.1f} ms"], note)]


def render(plan: Plan) -> str:
    """A short table: tiers as columns, what sits in them and what a decode step reads."""
    return "\n".join([*_table(plan), "", *_notes(plan)])


def _table(plan: Plan) -> list[str]:
    """The title, then a row per figure with a column per tier and one for the total."""
    m, n, mem = plan.model, plan.node, plan.memory
    host = "host (LPDDR5X)" if n.coherent else "host (none)"
    lines = [
        f"{m.name} on {n.name}, {plan.context_tokens:,} tokens of context per user, "
        f"{plan.dtype} weights and KV",
        f"{n.description}; "
        + (
            "coherent: weights and KV may spill to host memory"
            if n.coherent
            else "not coherent: nothing spills to host memory"
        ),
        "",
        _row("", ["HBM", host, "total"]),
        _row(
            "read bandwidth",
            [_rate(n.hbm_bandwidth), _rate(n.host_read_bandwidth) if n.coherent else "-"],
            f"host: min({n.link} {_rate(n.link_bandwidth)}, LPDDR5X {_rate(n.host_bandwidth)})"
            if n.coherent
            else "",
        ),
        _row(
            "room (weights + KV)",
            [_gb(mem.device_room_bytes), _gb(mem.host_room_bytes), _gb(mem.room_bytes)],
            f"HBM less {mem.headroom_bytes / GiB:.1f} GiB headroom",
        ),
        _row(
            "weights",
            [_gb(plan.weights_in(t)) for t in TIERS] + [_gb(plan.weight_bytes)],
            "" if plan.weights_fit else f"{_gb(plan.unplaced_weight_bytes)} do not fit",
        ),
        _row(
            "room left for KV",
            [_gb(plan.kv_room[t]) for t in TIERS] + [_gb(sum(plan.kv_room.values()))],
        ),
        *_floor_rows(plan, plan.one_user),
    ]
    if plan.n_users.users != 1:
        lines += _floor_rows(plan, plan.n_users)
    return lines


def _notes(plan: Plan) -> list[str]:
    """The lines under the table: weights, the memory limit, KV per user, users that fit,
    (MoE) the experts' share read, and the weights by group."""
    m, n, mem = plan.model, plan.node, plan.memory
    kv_token = m.full_kv_layers * m.kv_bytes_per_token_layer(plan.dtype_bytes)
    lines = [
        f"weights: {_gb(plan.weight_bytes)} ({m.num_parameters / 1e9:.2f} B parameters), "
        f"{_gb(plan.weights_beyond_hbm_bytes)} beyond the {_gb(n.hbm_bytes)} of HBM "
        + (
            f"({_gb(plan.weights_in('host'))} in host memory with the headroom)"
            if n.coherent
            else f"(not coherent: {_gb(plan.unplaced_weight_bytes)} do not fit)"
            if not plan.weights_fit
            else "(not coherent: all in HBM)"
        ),
        f"memory limit: {_gb(mem.limit_bytes)} = "
        + (
            f"HBM + {_gb(mem.host_budget_bytes)} host budget (as the replica's RMM limit)"
            if n.coherent
            else "HBM less headroom (as the replica's RMM limit; no spill)"
        ),
        f"KV per user: {_gb(plan.kv_bytes_per_user)} = {plan.kv_bytes_per_user / GiB:.1f} GiB "
        f"({kv_token / KiB:.0f} KiB/token in {m.full_kv_layers} full-attention layers"
        + (
            f", {m.window_kv_layers} layers keep {m.kv_window_tokens:,} tokens"
            if m.window_kv_layers
            else ""
        )
        + ")",
        f"users that fit: {plan.users_fit}; the replica's KV budget of "
        f"{_gb(plan.kv_budget_bytes)} holds {plan.users_fit_in_kv_budget}",
    ]
    if m.num_experts:
        lines.append(
            f"MoE: all {m.num_experts} routed experts resident "
            f"({_gb(m.expert_params * plan.dtype_bytes)}); a step reads the share its tokens "
            f"pick, 1-(1-{m.experts_per_token}/{m.num_experts})^tokens: "
            f"{plan.one_user.expert_share:.3f} for 1"
            + (
                f", {plan.n_users.expert_share:.3f} for {plan.n_users.users}"
                if plan.n_users.users != 1
                else ""
            )
        )
    lines.append(
        "weights by group, HBM / host: "
        + "; ".join(
            f"{g} {_gb(plan.weights[g]['hbm'])} / {_gb(plan.weights[g]['host'])}"
            for g in GROUPS
            if sum(plan.weights[g].values())
        )
    )
    return lines
