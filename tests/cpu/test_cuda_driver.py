"""A GPU replica refuses to start on a driver older than its PyTorch and RMM builds need,
saying which versions it found and what to install (real driver: tests/gpu)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from deployments.cuda_driver import (
    Need,
    driver_problem,
    format_cuda,
    installed_needs,
    require_cuda_driver,
)
from deployments.platform import DriverProbe

TORCH_CU13 = Need("PyTorch 2.13.0 (built for CUDA 13.0)", 13)
RMM_CU13 = Need("rmm-cu13 26.10.0", 13)
RMM_CU12 = Need("rmm-cu12 26.10.0", 12)


class FakeLibcuda:
    """The two libcuda entry points `DriverProbe.driver_version` calls (no GPU here)."""

    def __init__(self, version: int) -> None:
        self.version = version

    def cuInit(self, flags: int) -> int:
        return 0

    def cuDriverGetVersion(self, out: ctypes._CArgObject) -> int:  # type: ignore[name-defined]
        out._obj.value = self.version
        return 0


def test_the_driver_version_is_read_through_the_driver_api():
    probe = DriverProbe(FakeLibcuda(12040))  # type: ignore[arg-type]
    assert probe.driver_version() == 12040
    assert format_cuda(12040) == "12.4" and format_cuda(13000) == "13.0"


@pytest.mark.parametrize("driver", [13000, 13020, 14000])
def test_a_cuda_13_driver_runs_the_cuda_13_builds(driver):
    assert driver_problem(driver, [TORCH_CU13, RMM_CU13]) is None


def test_a_cuda_12_driver_is_refused_naming_both_versions_and_the_fix():
    problem = driver_problem(12080, [TORCH_CU13, RMM_CU13])
    assert problem is not None
    assert "supports CUDA 12.8" in problem and "need(s) CUDA 13" in problem
    assert "PyTorch 2.13.0 (built for CUDA 13.0)" in problem and "rmm-cu13" in problem
    assert "R580" in problem


def test_cuda_12_builds_run_on_a_cuda_12_driver():
    assert (
        driver_problem(12040, [Need("PyTorch 2.11.0 (built for CUDA 12.8)", 12), RMM_CU12]) is None
    )


def test_no_queryable_driver_is_refused_when_cuda_builds_are_installed():
    problem = driver_problem(None, [RMM_CU13])
    assert problem is not None and problem.startswith("no CUDA driver could be queried")


def test_a_cpu_install_needs_no_driver():
    assert driver_problem(None, []) is None


def test_require_raises_with_the_message():
    probe = DriverProbe(FakeLibcuda(12020))  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match=r"supports CUDA 12\.2.*R580"):
        require_cuda_driver(probe, [TORCH_CU13])
    require_cuda_driver(DriverProbe(FakeLibcuda(13000)), [TORCH_CU13])  # type: ignore[arg-type]


def test_installed_needs_reads_this_process_builds():
    needs = installed_needs()
    torch_needs = [n for n in needs if n.what.startswith("PyTorch")]
    if torch.version.cuda is None:  # the CPU build: no CUDA needed for PyTorch
        assert torch_needs == []
    else:
        assert torch_needs[0].cuda_major == int(torch.version.cuda.split(".")[0])
    assert all(n.what.startswith(("PyTorch", "rmm-cu")) for n in needs)
