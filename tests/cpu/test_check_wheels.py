"""`make check-aarch64` asks pip for what pyproject declares, as a GH200 node would install it."""

from __future__ import annotations

import tomllib
from pathlib import Path

from scripts.check_wheels import platforms, requirements

ROOT = Path(__file__).resolve().parents[2]


def test_the_check_asks_for_every_dependency_and_the_gpu_extra_with_torch_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = requirements("gpu", "2.13.0")
    assert "torch==2.13.0" in reqs and not any(r.startswith("torch>") for r in reqs)
    untouched = [d for d in project["dependencies"] if not d.startswith("torch")]
    assert set(untouched) | set(project["optional-dependencies"]["gpu"]) <= set(reqs)
    assert len(reqs) == len(project["dependencies"]) + len(project["optional-dependencies"]["gpu"])


def test_the_check_accepts_every_manylinux_tag_of_a_glibc_2_35_node():
    tags = platforms("aarch64")
    for wheel_tag in (
        "manylinux_2_27_aarch64",
        "manylinux_2_31_aarch64",
        "manylinux2014_aarch64",
        "manylinux_2_17_aarch64",
        "manylinux_2_35_aarch64",
    ):
        assert wheel_tag in tags
    assert "manylinux_2_36_aarch64" not in tags and not any("x86_64" in t for t in tags)


def test_the_makefile_runs_the_check_with_its_own_torch_and_python():
    makefile = (ROOT / "Makefile").read_text()
    assert "check-aarch64:" in makefile
    assert "--torch $(TORCH_VERSION)" in makefile and "--python $(MIN_PYTHON)" in makefile
