"""Platform detection from CUDA device attributes (faked here; real on the GPU machine)."""

from dataclasses import dataclass, field

from deployments.platform import (
    ATTR_CONCURRENT_MANAGED_ACCESS,
    ATTR_PAGEABLE_MEMORY_ACCESS,
    ATTR_PAGEABLE_USES_HOST_PAGE_TABLES,
    detect_platform,
    host_memory,
)

GB = 10**9


@dataclass
class FakeProbe:
    attrs: dict = field(default_factory=dict)
    devices: int = 1
    device_name: str = "NVIDIA GH200 480GB"
    total: int = 96 * GB

    def device_count(self):
        return self.devices

    def attribute(self, attr, device):
        return self.attrs.get(attr, 0)

    def name(self, device):
        return self.device_name

    def total_memory(self, device):
        return self.total


def grace_attrs():
    return {
        ATTR_PAGEABLE_MEMORY_ACCESS: 1,
        ATTR_PAGEABLE_USES_HOST_PAGE_TABLES: 1,
        ATTR_CONCURRENT_MANAGED_ACCESS: 1,
    }


def test_grace_needs_both_pageable_access_and_host_page_tables():
    info = detect_platform(FakeProbe(grace_attrs()))
    assert info.kind == "grace"
    assert info.device_total_bytes == 96 * GB
    assert "coherent" in info.describe()


def test_pageable_access_without_host_page_tables_is_discrete():
    # HMM on x86 can report pageable access through software faults; that is not Grace.
    attrs = {ATTR_PAGEABLE_MEMORY_ACCESS: 1, ATTR_CONCURRENT_MANAGED_ACCESS: 1}
    assert detect_platform(FakeProbe(attrs)).kind == "discrete"


def test_h100_on_pcie_is_discrete():
    probe = FakeProbe({ATTR_CONCURRENT_MANAGED_ACCESS: 1}, device_name="NVIDIA H100 80GB HBM3")
    info = detect_platform(probe)
    assert info.kind == "discrete"
    assert info.concurrent_managed_access and not info.pageable_memory_access
    assert "not coherent" in info.describe()


def test_no_device_or_gpu_disabled_is_cpu():
    assert detect_platform(FakeProbe(devices=0)).kind == "cpu"
    assert detect_platform(FakeProbe(grace_attrs()), use_gpu=False).kind == "cpu"


def test_this_machine_without_a_driver_is_cpu():
    # The CPU test machine has no libcuda; detection must not fail there.
    info = detect_platform()
    assert info.kind in ("cpu", "discrete", "grace")
    assert info.host_total_bytes > 0


def test_host_memory_reads_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       491520000 kB\nMemAvailable:   400000000 kB\n")
    assert host_memory(str(meminfo)) == (491520000 * 1024, 400000000 * 1024)
