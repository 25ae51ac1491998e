"""On a real GPU, detection reads the driver's attributes (H100/H200 on x86: not coherent)."""

import pytest

from deployments.platform import detect_platform

pytestmark = pytest.mark.gpu


def test_detects_this_gpu_without_touching_torch_cuda():
    import torch

    info = detect_platform()
    assert info.kind in ("discrete", "grace")
    assert info.device_total_bytes > 10 * 2**30 and info.device_name
    if "GH200" not in info.device_name and "GB200" not in info.device_name:
        assert info.kind == "discrete" and not info.pageable_memory_access
    assert info.concurrent_managed_access
    assert not torch.cuda.is_initialized()  # detection must leave PyTorch's allocator alone
