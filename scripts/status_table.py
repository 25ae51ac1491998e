"""The README's "Status: what ran where" table, built from what the runs recorded.

    python scripts/status_table.py           # print the table
    python scripts/status_table.py --write   # replace the table in README.md

Sources: the "Last runs" table of tests/gpu/README.md (one row a GPU test: card, result,
commit, date) and every benchmarks/results/*.json (its `card`, `git_commit` and `date`). Each
feature below names its CPU test files, its GPU test rows and its benchmark results; a card
whose name has GH200 or GB200 counts as Grace hardware. tests/cpu/test_status_table.py fails
when README.md's table differs from what this builds.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- status-table:begin -->", "<!-- status-table:end -->"
RUNS_BEGIN, RUNS_END = "<!-- gpu-runs:begin -->", "<!-- gpu-runs:end -->"
GRACE_CARDS = re.compile(r"GH200|GB200")


class Feature(NamedTuple):
    name: str
    cpu_tests: tuple[str, ...]  # files under tests/cpu
    gpu_tests: tuple[str, ...]  # "test" cells of tests/gpu/README.md's table
    results: tuple[str, ...]  # benchmarks/results/<name>-<card>.json stems, before the card


FEATURES = (
    Feature(
        "Platform detection (Grace / discrete / CPU)",
        ("test_platform.py",),
        ("test_platform_gpu",),
        (),
    ),
    Feature(
        "RMM managed memory, oversubscription guard", ("test_memory.py",), ("test_rmm_memory",), ()
    ),
    Feature(
        "Paged engine: Triton kernels, CUDA graphs, run-ahead",
        ("test_paged_engine.py", "test_triton_interpreter.py"),
        ("test_generation_gpu", "test_paged_gpu"),
        ("engine", "engine-refactor-check", "host-step", "profile-decode", "profile-returning"),
    ),
    Feature(
        "Sampler and sampling rules",
        ("test_sampler.py", "test_sampling_rules.py"),
        ("test_sampler_gpu", "test_sampling_rules_gpu"),
        ("sampler",),
    ),
    Feature(
        "Host KV tier and streamed weights (pinned copies)",
        ("test_kv_tiers.py", "test_weight_streaming.py"),
        ("test_tiers_gpu (host tier, streamed weights)",),
        ("tiers",),
    ),
    Feature(
        "Grace tiers: advice on managed memory, migrations",
        ("test_grace_tiers.py", "test_memory_advice.py", "test_migration_bench.py"),
        ("test_tiers_gpu (Grace advice, Grace faked)",),
        ("residency", "advice-diagnosis"),
    ),
    Feature(
        "Serve app, OpenAI API, router, serving path",
        ("test_service.py", "test_router.py", "test_streaming_batches.py"),
        ("test_serve_gpu", "test_serving_path_gpu"),
        (
            "serve",
            "serve-4ingress",
            "serve-merged",
            "serve-paths",
            "serve-refactor-check",
            "serve-ttft-check",
            "serve-first-token",
            "serve-hops",
        ),
    ),
    Feature(
        "Cache moves between replicas (pressure, shutdown, drain)",
        (
            "test_cache_moves.py",
            "test_pipelined_moves.py",
            "test_cache_moves_serve.py",
            "test_cache_move_bench.py",
        ),
        ("test_cache_moves_gpu", "test_cache_transfer_gpu"),
        ("migration", "migration-ring", "migration-serial"),
    ),
    Feature(
        "Mixture of experts and Llama 4 in the paged engine",
        (
            "test_moe.py",
            "test_paged_moe.py",
            "test_paged_llama4.py",
            "test_paged_llama4_kv.py",
            "test_chunk_kv.py",
            "test_moe_serve.py",
        ),
        ("test_moe_gpu", "test_llama4_gpu"),
        ("moe", "moe-qwen3-30b-a3b", "pair-gemv"),
    ),
    Feature("Routing simulation (CPU by design)", ("test_routing_sim.py",), (), ()),
)


class Run(NamedTuple):
    what: str  # a GPU test row or a benchmark result
    card: str
    result: str
    commit: str
    date: str  # ISO, sortable


def gpu_runs(readme: Path) -> dict[str, Run]:
    """tests/gpu/README.md's table, by test."""
    text = readme.read_text()
    body = text[text.index(RUNS_BEGIN) + len(RUNS_BEGIN) : text.index(RUNS_END)]
    runs = {}
    for line in body.strip().splitlines()[2:]:
        test, card, result, commit, date = (c.strip() for c in line.strip("|").split("|"))
        runs[test] = Run(test, card, result, commit, date)
    return runs


def result_runs(results: Path) -> dict[str, list[Run]]:
    """benchmarks/results/*.json with a card and a commit, by stem without the card."""
    runs: dict[str, list[Run]] = {}
    for path in sorted(results.glob("*.json")):
        data = json.loads(path.read_text())
        card, commit = data.get("card"), data.get("git_commit")
        if not card or not commit or not path.stem.endswith(card):
            continue
        stem = path.stem[: -len(card) - 1]
        runs.setdefault(stem, []).append(
            Run(f"{stem} results", card, "measured", commit[:7], (data.get("date") or "")[:10])
        )
    return runs


def _cell(runs: list[Run]) -> str:
    if not runs:
        return "not yet"
    return "; ".join(f"{r.what} {r.result} at `{r.commit}`" for r in runs)


def row(
    feature: Feature, tests: dict[str, Run], results: dict[str, list[Run]], cpu_dir: Path
) -> str:
    missing = [t for t in feature.cpu_tests if not (cpu_dir / t).exists()]
    if missing:
        raise FileNotFoundError(f"{feature.name}: no tests/cpu/{', '.join(missing)}")
    cpu = "yes (" + ", ".join(t.removesuffix(".py") for t in feature.cpu_tests) + ")"
    runs = [tests[t] for t in feature.gpu_tests if t in tests]
    runs += [r for stem in feature.results for r in results.get(stem, [])]
    grace = [r for r in runs if GRACE_CARDS.search(r.card)]
    h200 = [r for r in runs if "H200" in r.card]
    if not feature.gpu_tests and not feature.results:
        return f"| {feature.name} | {cpu} | n/a (CPU only) | n/a | none |"
    gpu = [r for r in runs if r.card != "cpu"]
    last = max(gpu, key=lambda r: r.date) if gpu else None
    last_cell = f"`{last.commit}` ({last.date}, {last.card})" if last else "none"
    return (
        f"| {feature.name} | {cpu} | {_cell(h200)} | {_cell(grace) if grace else 'none yet'}"
        f" | {last_cell} |"
    )


def build(root: Path = ROOT) -> str:
    """The table, in markdown."""
    tests = gpu_runs(root / "tests" / "gpu" / "README.md")
    results = result_runs(root / "benchmarks" / "results")
    lines = [
        "| feature | CPU tests | NVIDIA H200 (x86, PCIe) | Grace hardware | last GPU run |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [row(f, tests, results, root / "tests" / "cpu") for f in FEATURES]
    return "\n".join(lines)


def readme_table(readme: Path) -> str:
    text = readme.read_text()
    return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip()


def write(readme: Path, table: str) -> None:
    text = readme.read_text()
    head, tail = text[: text.index(BEGIN) + len(BEGIN)], text[text.index(END) :]
    readme.write_text(f"{head}\n{table}\n{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    opts = parser.parse_args()
    table = build()
    if opts.write:
        write(ROOT / "README.md", table)
        print("README.md's status table updated")
    else:
        sys.stdout.write(table + "\n")


if __name__ == "__main__":
    main()
