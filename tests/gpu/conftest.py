"""GPU tests: run on a machine with an NVIDIA GPU (`python -m pytest -m gpu tests/gpu`).

Memory set-up swaps PyTorch's allocator process-wide and must come before any torch.cuda call,
so each check runs in a fresh interpreter (`run_isolated`) that prints one JSON result line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from deployments.platform import DriverProbe

ROOT = Path(__file__).resolve().parents[2]


def pytest_collection_modifyitems(config, items):
    if DriverProbe.load() is None:
        skip = pytest.mark.skip(reason="no NVIDIA GPU/driver on this machine")
        for item in items:
            item.add_marker(skip)


def run_isolated(code: str, timeout: int = 600) -> dict:
    """Run `code` in a new Python process; it must print `RESULT <json>` once."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise AssertionError(
            f"isolated run failed ({proc.returncode}):\n{proc.stdout[-4000:]}"
            f"\n{proc.stderr[-6000:]}"
        )
    return json.loads(lines[-1][len("RESULT ") :])
