"""Plot a serving benchmark result: output tok/s and TTFT against concurrency, HTTP vs in-process.

    python -m benchmarks.plot_serve benchmarks/results/serve-NVIDIA-H200.json

Needs matplotlib; writes the PNG beside the JSON (serve-<card>.png).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

SERIES = [
    ("http", "sampled", "o-", "HTTP, temperature 1.0 / top_p 0.95"),
    ("in_process", "sampled", "o--", "in-process, temperature 1.0 / top_p 0.95"),
    ("http", "greedy", "s-", "HTTP, greedy"),
    ("in_process", "greedy", "s--", "in-process, greedy"),
]


def points(
    rows: list[dict[str, Any]], side: str, sampling: str, key: Any
) -> list[tuple[int, float]]:
    """(concurrency, value) of the measured fixed-concurrency rows of one series."""
    out = []
    for r in rows:
        if (
            r["side"] == side
            and r["sampling"] == sampling
            and r["workload"] == "fixed"
            and not r["warmup"]
            and not r.get("skipped")
            and r.get("requests")
        ):
            value = key(r)
            if value is not None:
                out.append((r["concurrency"], value))
    return sorted(out)


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    rows, plan = result["rows"], result["plan"]
    fig, (tps, ttft) = plt.subplots(1, 2, figsize=(11, 4.5))
    for side, sampling, style, label in SERIES:
        for ax, key in (
            (tps, lambda r: r["output_tokens_per_s"]),
            (ttft, lambda r: r["ttft_ms"]["p50"]),
        ):
            pts = points(rows, side, sampling, key)
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=label)
    for ax, ylabel in ((tps, "output tokens / s over the run"), (ttft, "TTFT p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(
            f"concurrent streaming clients ({plan['prompt_tokens']}-token "
            f"prompts, {plan['output_tokens']} tokens each)"
        )
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    tps.legend(fontsize=8)
    fig.suptitle(
        f"{result['model']}\n{result['card']}, commit {result['git_commit'][:8]}", fontsize=9
    )
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1])))
