"""On a real GPU, detection reads the driver's attributes (H100/H200 on x86: not coherent)."""

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu


def test_detects_this_gpu_without_touching_torch_cuda():
    # A fresh interpreter: other tests in this process may already have initialised CUDA.
    info = run_isolated("""
        import json
        import torch
        from deployments.platform import detect_platform

        info = detect_platform()
        print("RESULT " + json.dumps({
            "kind": info.kind, "total": info.device_total_bytes, "name": info.device_name,
            "pageable": info.pageable_memory_access,
            "concurrent": info.concurrent_managed_access,
            "torch_cuda_initialized": torch.cuda.is_initialized()}))
    """)
    assert info["kind"] in ("discrete", "grace")
    assert info["total"] > 10 * 2**30 and info["name"]
    if "GH200" not in info["name"] and "GB200" not in info["name"]:
        assert info["kind"] == "discrete" and not info["pageable"]
    assert info["concurrent"]
    assert not info["torch_cuda_initialized"]  # detection must leave PyTorch's allocator alone


def test_this_machines_driver_runs_its_torch_and_rmm():
    """The replica's driver check reads the real driver and accepts this working install."""
    from deployments.cuda_driver import installed_needs, require_cuda_driver
    from deployments.platform import DriverProbe

    probe = DriverProbe.load()
    assert probe is not None and probe.driver_version() >= 12000
    assert installed_needs()  # a GPU machine has a CUDA build of PyTorch or RMM
    require_cuda_driver(probe)
