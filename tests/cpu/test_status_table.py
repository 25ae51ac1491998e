"""README.md's status table is what scripts/status_table.py builds from the recorded runs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load():
    spec = importlib.util.spec_from_file_location(
        "status_table", ROOT / "scripts" / "status_table.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_table_matches_the_gpu_runs_and_the_results():
    table = load()
    assert table.readme_table(ROOT / "README.md") == table.build(), (
        "README.md's status table is stale: run `python scripts/status_table.py --write`"
    )


def test_every_gpu_run_row_is_used_and_grace_hardware_reads_none_yet():
    table = load()
    rows = table.gpu_runs(ROOT / "tests" / "gpu" / "README.md")
    named = {t for f in table.FEATURES for t in f.gpu_tests}
    assert set(rows) == named, "a tests/gpu/README.md row no feature names, or the reverse"
    built = table.build()
    assert "none yet" in built and "| Grace tiers" in built


def test_a_result_on_a_grace_card_shows_in_its_column(tmp_path):
    table = load()
    (tmp_path / "tests" / "gpu").mkdir(parents=True)
    (tmp_path / "tests" / "cpu").mkdir(parents=True)
    for f in table.FEATURES:
        for t in f.cpu_tests:
            (tmp_path / "tests" / "cpu" / t).write_text("")
    readme = (ROOT / "tests" / "gpu" / "README.md").read_text()
    (tmp_path / "tests" / "gpu" / "README.md").write_text(readme)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    (results / "residency-NVIDIA-GH200-480GB.json").write_text(
        '{"card": "NVIDIA-GH200-480GB", "git_commit": "abcdef0123", "date": "2027-01-01"}'
    )
    line = next(ln for ln in table.build(tmp_path).splitlines() if ln.startswith("| Grace"))
    assert "residency results measured at `abcdef0`" in line.split(" | ")[3]
    assert "`abcdef0` (2027-01-01, NVIDIA-GH200-480GB)" in line
