"""The NVIDIA driver a GPU replica needs, checked before anything touches CUDA.

PyPI's torch 2.13 wheels (x86_64 and aarch64) are built for CUDA 13.0 and `rmm-cu13` for CUDA
13; both need a driver that supports CUDA 13, i.e. the R580 branch or newer. An older driver
fails late and obscurely (``CUDA driver version is insufficient``, or RMM's own error) after
the replica has read its config; `require_cuda_driver` fails first, saying which versions
were found and what to install. The driver's version comes from ``cuDriverGetVersion``
through the platform module's ctypes probe; what is required, from the CUDA version PyTorch
was built with (`torch.version.cuda`, a constant: no CUDA call) and the installed
`rmm-cu<major>` distribution.
"""

from __future__ import annotations

from importlib import metadata
from typing import NamedTuple

from deployments.platform import DriverProbe

# The oldest driver branch that supports each CUDA major version (Linux).
DRIVER_BRANCH = {12: "R525", 13: "R580"}


class Need(NamedTuple):
    """One installed package's CUDA requirement."""

    what: str  # "PyTorch 2.13.0 (built for CUDA 13.0)", "rmm-cu13 26.10.0"
    cuda_major: int


def installed_needs() -> list[Need]:
    """The CUDA major versions this process's PyTorch and RMM builds require."""
    needs = []
    import torch

    if torch.version.cuda:  # None for a CPU build
        major = int(torch.version.cuda.split(".")[0])
        needs.append(
            Need(f"PyTorch {torch.__version__} (built for CUDA {torch.version.cuda})", major)
        )
    for major in sorted(DRIVER_BRANCH):
        try:
            version = metadata.version(f"rmm-cu{major}")
        except metadata.PackageNotFoundError:
            continue
        needs.append(Need(f"rmm-cu{major} {version}", major))
    return needs


def format_cuda(version: int) -> str:
    """13000 -> "13.0", 12040 -> "12.4" (the encoding of cuDriverGetVersion)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_problem(driver_version: int | None, needs: list[Need]) -> str | None:
    """Why this driver cannot run these builds, or None when it can."""
    if not needs:
        return None
    required = max(need.cuda_major for need in needs)
    if driver_version is not None and driver_version // 1000 >= required:
        return None
    found = (
        "no CUDA driver could be queried"
        if driver_version is None
        else f"the NVIDIA driver supports CUDA {format_cuda(driver_version)}"
    )
    wanting = "; ".join(n.what for n in needs if n.cuda_major == required)
    branch = DRIVER_BRANCH.get(required, f"a CUDA {required} driver")
    return (
        f"{found}, but {wanting} need(s) CUDA {required}: install an NVIDIA driver of the "
        f"{branch} branch or newer (nvidia-smi shows the CUDA version it supports), or "
        "install builds for the driver you have (a CUDA 12 PyTorch and the gpu-cu12 extra)"
    )


def require_cuda_driver(probe: DriverProbe | None = None, needs: list[Need] | None = None) -> None:
    """Raise RuntimeError naming the versions when the driver is too old for this install.

    `probe` defaults to the real driver, `needs` to what this process has installed."""
    probe = probe or DriverProbe.load()
    needs = installed_needs() if needs is None else needs
    problem = driver_problem(probe.driver_version() if probe else None, needs)
    if problem:
        raise RuntimeError(problem)
