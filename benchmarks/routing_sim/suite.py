"""The runs behind one results file: a load sweep, more seeds at the headline load, churn.

Every policy runs on exactly the same replicas and requests (same scenario, same seed), so
their figures sit side by side. `targets` checks the issue's claims against the figures.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.routing_sim.metrics import DEFINITIONS
from benchmarks.routing_sim.policies import POLICIES
from benchmarks.routing_sim.simulate import Scenario, simulate
from benchmarks.routing_sim.workload import (
    KV_BYTES_PER_TOKEN,
    WEIGHTS_BYTES,
    Conversation,
    GiB,
    NodeType,
    WorkloadShape,
    demand_bytes,
)

NOT_MODELLED = [
    "compute: requests never queue or get rejected, so no router's fallback or backoff runs; "
    "request times are the same under every policy (a miss costs a full prefill in reality)",
    "Serve's queue-length probe for power-of-two is re-implemented (running requests now)",
    "users never send two requests at once; every user sends a user id (no anonymous traffic)",
    "a replica leaving loses its caches at once; one joining reports stats from the next period",
]


@dataclass(frozen=True)
class SuiteConfig:
    """Sizes of one results file's runs."""

    replicas: int
    users: int
    loads: tuple[float, ...]
    headline_load: float
    seeds: tuple[int, ...]  # the first runs the sweep and churn; all run the headline load
    leave_at: float = 0.4  # share of the arrival window when a replica leaves (churn run)
    join_at: float = 0.7  # ... and when one joins

    def scenario(self, load: float, seed: int) -> Scenario:
        return Scenario(
            replicas=self.replicas, shape=WorkloadShape(users=self.users), load=load, seed=seed
        )


FULL = SuiteConfig(
    replicas=64, users=10_000, loads=(0.5, 0.9, 1.0, 1.1, 1.25), headline_load=1.0, seeds=(0, 1, 2)
)
QUICK = SuiteConfig(replicas=8, users=1_250, loads=(1.0,), headline_load=1.0, seeds=(0,))


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def describe(
    types: list[NodeType], conversations: list[Conversation], scale: float, shape: WorkloadShape
) -> dict[str, Any]:
    """The headline scenario's replicas and workload, in numbers."""
    finals = [c.final_tokens for c in conversations]
    budget = sum(t.kv_budget_bytes for t in types)
    nodes = {}
    for t in types:
        row = nodes.setdefault(
            t.name,
            {
                "replicas": 0,
                "limit_gib": round(t.limit_bytes / GiB, 1),
                "kv_budget_gib": round(t.kv_budget_bytes / GiB, 1),
                "slack_beyond_budget_gib": round(
                    (t.limit_bytes - WEIGHTS_BYTES - t.kv_budget_bytes) / GiB, 1
                ),
                "note": t.note,
            },
        )
        row["replicas"] += 1
    return {
        "node_types": nodes,
        "total_kv_budget_gib": round(budget / GiB, 1),
        "shape": asdict(shape),
        "token_scale": round(scale, 4),
        "conversations": len(conversations),
        "requests": sum(len(c.turns) for c in conversations),
        "mean_turns": round(sum(len(c.turns) for c in conversations) / len(conversations), 2),
        "final_context_tokens": {
            "p50": _percentile(finals, 0.5),
            "p99": _percentile(finals, 0.99),
            "mean": round(sum(finals) / len(finals)),
            "max": max(finals),
        },
        "demand_gib": round(sum(finals) * KV_BYTES_PER_TOKEN / GiB, 1),
    }


async def _all_policies(scenario: Scenario) -> dict[str, dict[str, Any]]:
    built = scenario.make()
    return {name: await simulate(scenario, name, built) for name in POLICIES}


def _strip(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("timeline", "moves")}


def targets(
    by_policy: dict[str, dict[str, Any]],
    churn: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """The issue's claims for our router, each with its figure and whether it holds."""
    ours, ch = by_policy["ours"], by_policy["consistent_hash"]
    rows = [
        ("served_from_kept_cache >= 0.99", ours["served_from_kept_cache"], 0.99, ">="),
        ("evictions <= 0.5 x consistent_hash's", ours["evictions"], 0.5 * ch["evictions"], "<="),
        ("free_kv_share_spread p95 <= 0.10", ours["free_kv_share_spread"]["p95"], 0.10, "<="),
        ("replica leaving: moved_needless == 0", churn["ours"]["leave"]["moved_needless"], 0, "<="),
        ("replica joining: moved_needless == 0", churn["ours"]["join"]["moved_needless"], 0, "<="),
    ]
    out = []
    for claim, value, bound, op in rows:
        met = value is None or (value >= bound if op == ">=" else value <= bound)
        out.append({"claim": claim, "value": value, "bound": bound, "met": met})
    return out


def git_commit() -> dict[str, Any]:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--",
                "deployments",
                "benchmarks/routing_sim",
                "benchmarks/routing.py",
            ],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(dirty)}


async def run_suite(config: SuiteConfig, mode: str) -> dict[str, Any]:
    """Run every simulation of `config`; returns the results document (JSON-ready)."""
    started = time.perf_counter()
    seed0 = config.seeds[0]
    sweep, headline = [], {}
    for load in config.loads:
        scenario = config.scenario(load, seed0)
        types, conversations, _ = scenario.make()
        excess = demand_bytes(conversations) - sum(t.kv_budget_bytes for t in types)
        by_policy = await _all_policies(scenario)
        sweep.append(
            {
                "load": load,
                "evicted_gib_lower_bound": round(max(0, excess) / GiB, 1),
                "by_policy": {p: _strip(r) for p, r in by_policy.items()},
            }
        )
        if load == config.headline_load:
            headline = by_policy
    base = config.scenario(config.headline_load, seed0)
    window = base.shape.arrival_window_s
    churn_scenario = replace(
        base, leave_at_s=config.leave_at * window, join_at_s=config.join_at * window
    )
    churn = {p: r["moves"] for p, r in (await _all_policies(churn_scenario)).items()}
    seeds = [{"seed": seed0, "targets": targets(headline, churn)[:3]}]  # by_policy: headline
    for seed in config.seeds[1:]:
        by_policy = await _all_policies(config.scenario(config.headline_load, seed))
        seeds.append(
            {
                "seed": seed,
                "by_policy": {p: _strip(r) for p, r in by_policy.items()},
                "targets": targets(by_policy, churn)[:3],
            }
        )
    return {
        "benchmark": "routing",
        "command": "python -m benchmarks.routing" + (" --quick" if mode == "quick" else ""),
        "mode": mode,
        "git": git_commit(),
        "model": {
            "name": "Llama 3.1 70B bf16",
            "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
            "weights_bytes": WEIGHTS_BYTES,
        },
        "scenario": {
            "replicas": config.replicas,
            "seed": seed0,
            "stats_period_s": base.stats_period_s,
            "router_processes": base.routers,
            "ours_settings": {
                "free_memory_tolerance_fraction": 0.01,
                "placement_ttl_s": 30.0,
                "sticky_max_wait_s": 30.0,
            },
            **describe(*base.make(), base.shape),
        },
        "policies": {name: cls.driven for name, cls in POLICIES.items()},
        "not_modelled": NOT_MODELLED,
        "definitions": DEFINITIONS,
        "headline": {
            "load": config.headline_load,
            "seed": seed0,
            "by_policy": {p: _strip(r) for p, r in headline.items()},
            "targets": targets(headline, churn),
        },
        "churn": {
            "load": config.headline_load,
            "leave_at_s": churn_scenario.leave_at_s,
            "join_at_s": churn_scenario.join_at_s,
            "by_policy": churn,
        },
        "sweep": sweep,
        "seeds": seeds,
        "timeline": {p: r["timeline"] for p, r in headline.items()},
        "elapsed_s": round(time.perf_counter() - started, 1),
    }
