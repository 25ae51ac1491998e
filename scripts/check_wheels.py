"""Resolve the image's dependencies for another platform without installing them.

`make check-aarch64` runs this for a GH200 / GB200 node (manylinux aarch64, CPython 3.11): the
dependencies of pyproject.toml and of its `gpu` extra, with torch pinned as the Makefile pins it,
through pip's resolver in dry-run mode, wheels only (a GH200 node should not compile anything),
for glibc 2.35 (Ubuntu 22.04) and the manylinux tags it accepts.
It prints each resolved package and exits non-zero, with pip's reason, when any has no wheel.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GLIBC_MINOR = 35  # Ubuntu 22.04's glibc 2.35: the oldest OS NVIDIA supports on GH200 nodes


def platforms(arch: str) -> list[str]:
    """The manylinux tags a node of `arch` with glibc 2.GLIBC_MINOR installs, newest first."""
    return [f"manylinux_2_{minor}_{arch}" for minor in range(GLIBC_MINOR, 16, -1)] + [
        f"manylinux2014_{arch}"
    ]


def requirements(extra: str, torch_version: str) -> list[str]:
    """pyproject's dependencies plus `extra`'s, torch pinned to `torch_version`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"]) + list(project["optional-dependencies"][extra])
    return [
        f"torch=={torch_version}"
        if d.replace(" ", "").startswith("torch") and d.replace(" ", "")[5:6] in "<>=!~"
        else d
        for d in deps
    ]


def resolve(reqs: list[str], arch: str, python: str) -> dict:
    """pip's installation report for `reqs` on `arch`, or SystemExit with pip's output."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--quiet",
            "--ignore-installed",
            "--target",
            str(Path(tmp) / "t"),
            "--only-binary=:all:",
            "--python-version",
            python,
            "--implementation",
            "cp",
            "--report",
            str(report),
        ]
        for platform in platforms(arch):
            cmd += ["--platform", platform]
        done = subprocess.run(cmd + reqs, capture_output=True, text=True)
        if done.returncode != 0:
            errors = [line for line in done.stderr.splitlines() if "ERROR" in line]
            raise SystemExit(
                f"no {arch} wheels for the whole set:\n  "
                + "\n  ".join(errors or done.stderr.splitlines()[-5:])
            )
        return json.loads(report.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["aarch64", "x86_64"], default="aarch64")
    parser.add_argument("--python", default="3.11")
    parser.add_argument("--extra", default="gpu")
    parser.add_argument("--torch", default="2.13.0", help="the torch the Makefile pins")
    args = parser.parse_args()
    report = resolve(requirements(args.extra, args.torch), args.arch, args.python)
    names = sorted(
        f"{item['metadata']['name']}=={item['metadata']['version']}" for item in report["install"]
    )
    print(
        f"{len(names)} wheels resolve for manylinux {args.arch}, CPython {args.python} "
        f"(pyproject + [{args.extra}], torch {args.torch}):"
    )
    for name in names:
        print(f"  {name}")


if __name__ == "__main__":
    main()
