"""Print the pip options that install PyTorch's CPU build: PyTorch's own CPU wheel index when it
answers, else nothing (pip's configured index: PyPI, whose x86_64 torch is the CUDA 13 build of
several GB). Used by the Makefile where no GPU is found; standard library only, since it runs
before anything is installed.

    python scripts/torch_index.py [INDEX_URL] [--timeout SECONDS]
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def reachable(index_url: str, timeout_s: float) -> bool:
    """Whether the index answers its torch page within the timeout."""
    try:
        with urllib.request.urlopen(index_url.rstrip("/") + "/torch/", timeout=timeout_s) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def pip_options(index_url: str, timeout_s: float) -> list[str]:
    """`--index-url INDEX` when it is reachable, else [] (fall back to pip's own index)."""
    return ["--index-url", index_url] if reachable(index_url, timeout_s) else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("index_url", nargs="?", default=CPU_INDEX)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    options = pip_options(args.index_url, args.timeout)
    if not options:
        print(
            f"{args.index_url} is not reachable: installing torch from pip's configured "
            "index (PyPI's torch for Linux is the CUDA 13 build, several GB)",
            file=sys.stderr,
        )
    print(" ".join(options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
