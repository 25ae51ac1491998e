"""What every GPU benchmark shares: the card's name, its measured bandwidth, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def card_name() -> str:
    """The card as nvidia-smi names it, spaces as dashes ("cpu" without a GPU)."""
    if not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(0).replace(" ", "-")


def git_commit() -> str:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_it(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of `fn()` (device work finished before the clock stops)."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        nbytes = min(nbytes, 256 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    seconds = time_it(lambda: dst.copy_(src), repeat=10, warmup=2)
    return 2 * nbytes / seconds


def host_to_device_bandwidth(nbytes: int = 1 << 30) -> float:
    """Pinned host-to-device copy bandwidth in bytes/s."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / time_it(lambda: dst.copy_(src, non_blocking=True), repeat=10, warmup=2)


def write_result(bench: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    """benchmarks/results/<bench>-<card>.json with the commit, card and environment."""
    card = card_name()
    record = {
        "bench": bench,
        "card": card,
        "git_commit": git_commit(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        **payload,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{bench}-{card}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
