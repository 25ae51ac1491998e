"""Routing at scale: our router against Ray Serve's power-of-two and consistent-hash routers.

Simulates K replicas of unequal memory (64 in the full run) and 10,000 users holding
multi-turn conversations, and routes every request through each policy's real choice code
(see benchmarks/routing_sim/policies.py for what is driven and what is re-implemented).
Deterministic (seeded); no GPU, no Ray cluster. Usage::

    python -m benchmarks.routing                 # full run (about a minute on 2 cores)
    python -m benchmarks.routing --quick         # 8 replicas, 1,250 users (seconds)
    python -m benchmarks.routing --out PATH.json # the figure goes next to it, as PATH.png

The figure needs matplotlib (``pip install matplotlib``); without it only the JSON is written.
Metrics and results: benchmarks/README.md, section "Routing at scale".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from benchmarks.routing_sim.plot import plot
from benchmarks.routing_sim.suite import FULL, QUICK, run_suite

RESULTS = Path(__file__).resolve().parent / "results"
COLUMNS = (
    ("served_from_kept_cache", "kept-cache hits"),
    ("users_admitted_before_first_eviction", "admitted<1st evict"),
    ("evictions", "evictions"),
    ("evictions_of_live_users", "live evicted"),
)


def summary_lines(doc: dict[str, Any]) -> list[str]:
    """A plain-text table of the headline figures and the targets."""
    head = doc["headline"]
    lines = [
        f"load {head['load']}, {doc['scenario']['replicas']} replicas, "
        f"{doc['scenario']['conversations']} users, seed {head['seed']}"
    ]
    lines.append(
        f"{'policy':<16}"
        + "".join(f"{title:>20}" for _, title in COLUMNS)
        + f"{'free-KV spread p95':>20}"
    )
    for policy, row in head["by_policy"].items():
        cells = "".join(f"{row[key]!s:>20}" for key, _ in COLUMNS)
        lines.append(f"{policy:<16}{cells}{row['free_kv_share_spread']['p95']!s:>20}")
    for policy, moves in doc["churn"]["by_policy"].items():
        lines.append(
            f"{policy:<16} leave: {moves['leave']['moved_must']} must, "
            f"{moves['leave']['moved_needless']} needless; join: "
            f"{moves['join']['moved_needless']} needless"
        )
    for target in head["targets"]:
        lines.append(
            f"{'met ' if target['met'] else 'MISSED'} {target['claim']}: "
            f"{target['value']} (bound {target['bound']})"
        )
    return lines


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the simulation, write the JSON (and the PNG when matplotlib is there)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 replicas, 1,250 users")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results JSON (default: benchmarks/results/routing.json, "
        "or routing-quick.json with --quick)",
    )
    args = parser.parse_args(argv)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    mode = "quick" if args.quick else "full"
    out = args.out or RESULTS / ("routing-quick.json" if args.quick else "routing.json")
    doc = asyncio.run(run_suite(QUICK if args.quick else FULL, mode))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    png = out.with_suffix(".png")
    wrote_png = plot(doc, png)
    print("\n".join(summary_lines(doc)))
    print(f"wrote {out}" + (f" and {png}" if wrote_png else " (no matplotlib: no figure)"))
    return doc


if __name__ == "__main__":
    main()
