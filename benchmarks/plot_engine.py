"""Plot an engine benchmark result: decode tokens/s against batch size, per implementation.

    python -m benchmarks.plot_engine benchmarks/results/engine-NVIDIA-H200.json

Needs matplotlib (`pip install matplotlib`); writes the PNG beside the JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot(path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(path.read_text())
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4.5))

    def greedy(r: dict) -> bool:  # rows before sampled ones were added have no "sampling"
        return r.get("sampling", "greedy") == "greedy"

    for impl, label, style, keep in [
        ("ours", "grace-serve paged engine", "o-", greedy),
        ("ours", "ours, temperature 1.0 / top_p 0.95", "^", lambda r: not greedy(r)),
        ("hf_generate", "HF generate", "s--", greedy),
    ]:
        points = sorted(
            (r["batch"], r["decode_tokens_per_s"])
            for r in rows
            if r["impl"] == impl and r["workload"] == "decode" and keep(r)
        )
        if points:
            ax.plot(*zip(*points, strict=True), style, label=label)
    floor = sorted(
        (r["batch"], r["batch"] / (r["floor_ms"] / 1e3))
        for r in rows
        if r["impl"] == "ours" and r["workload"] == "decode" and greedy(r)
    )
    if floor:
        ax.plot(*zip(*floor, strict=True), ":", color="gray", label="bandwidth floor")
    for impl, label, marker in [
        ("ours", "ours, 256 mixed requests", "*"),
        ("hf_generate_batch", "HF generate_batch, 256 mixed", "x"),
    ]:
        mixed = [
            r
            for r in rows
            if r["impl"] == impl and r["workload"] == "mixed_256" and "tokens_per_s" in r
        ]
        if mixed:
            note = "" if mixed[0].get("complete", True) else " (partial)"
            ax.plot([256], [mixed[0]["tokens_per_s"]], marker, markersize=12, label=label + note)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size (concurrent sequences)")
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{result['model']}\n{result['card']}, commit {result['git_commit'][:8]}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    out = path.with_suffix(".png")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1])))
