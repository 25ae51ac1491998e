"""The figure of a results document: the load sweep, free memory over time, churn moves.

Needs matplotlib (``pip install matplotlib``); `plot` returns False without writing when it is
not importable, so the simulation itself never depends on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# Ours last, so its line is drawn on top where it meets another.
COLORS = {"power_of_two": "tab:orange", "consistent_hash": "tab:blue", "ours": "tab:green"}


def _sweep_panel(
    ax: Any,
    doc: dict[str, Any],
    metric: str,
    title: str,
    log: bool = False,
    sub: str | None = None,
    style: str = "o-",
    label: bool = True,
) -> None:
    for policy, color in COLORS.items():
        points = []
        for row in doc["sweep"]:
            value = row["by_policy"][policy][metric]
            value = value[sub] if sub and value is not None else value
            if value is not None:
                points.append((row["load"], value))
        if points:
            ax.plot(
                [x for x, _ in points],
                [y for _, y in points],
                style,
                color=color,
                label=policy if label else None,
            )
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("load (final KV of all conversations / KV budgets)", fontsize=8)
    if log:
        ax.set_yscale("symlog", linthresh=10)
    ax.grid(alpha=0.3)


def plot(doc: dict[str, Any], path: Path) -> bool:
    """Write the figure for `doc` to `path`; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    _sweep_panel(
        axes[0][0],
        doc,
        "served_from_kept_cache",
        "returning requests served from their kept cache\n(consistent_hash hidden under ours)",
    )
    _sweep_panel(axes[0][1], doc, "evictions", "evictions (caches dropped)", log=True)
    _sweep_panel(
        axes[0][2],
        doc,
        "users_admitted_before_first_eviction",
        "users admitted before the first eviction",
    )
    _sweep_panel(
        axes[1][0],
        doc,
        "free_kv_share_spread_while_evicting",
        "",
        sub="p95",
        style="x:",
        label=False,
    )
    _sweep_panel(
        axes[1][0],
        doc,
        "free_kv_share_spread",
        "spread of free KV share across replicas, p95\n(solid: whole run; dotted: once evicting)",
        sub="p95",
    )
    axes[1][0].axhline(0.10, color="grey", ls="--", lw=1)
    axes[0][0].legend(fontsize=8)

    ax = axes[1][1]
    for policy, color in COLORS.items():
        series = doc["timeline"][policy]
        t = [p["t"] / 60 for p in series]
        ax.fill_between(
            t, [p["min"] for p in series], [p["max"] for p in series], color=color, alpha=0.2
        )
        ax.plot(t, [p["mean"] for p in series], color=color, label=policy)
    ax.set_title(
        f"free KV share per replica at load {doc['headline']['load']}: min-max band, mean line",
        fontsize=10,
    )
    ax.set_xlabel("minutes", fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1][2]
    labels, width = ["leave: needless", "leave: must", "join: needless"], 0.27
    for i, (policy, color) in enumerate(COLORS.items()):
        moves = doc["churn"]["by_policy"][policy]
        values = [
            moves["leave"]["moved_needless"],
            moves["leave"]["moved_must"],
            moves["join"]["moved_needless"],
        ]
        ax.bar([x + (i - 1) * width for x in range(3)], values, width, color=color, label=policy)
    ax.set_xticks(range(3), labels, fontsize=8)
    ax.set_yscale("symlog", linthresh=10)
    ax.set_title("users moved by a replica leaving / joining", fontsize=10)
    ax.grid(alpha=0.3, axis="y")

    scenario = doc["scenario"]
    fig.suptitle(
        f"Routing simulation: {scenario['replicas']} replicas of "
        f"{len(scenario['node_types'])} node types, {scenario['conversations']} users, "
        f"{doc['model']['name']} ({doc['mode']} run)",
        fontsize=12,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
