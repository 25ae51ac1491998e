"""Advice on whole 2 MiB blocks, read back after each call and at named phases (no GPU here:
the driver is a fake that keeps a preferred and a last-prefetch location per 4 KiB page)."""

from __future__ import annotations

import pytest
import torch

from deployments import memory_advice
from deployments.advice_check import AdviceCheck
from deployments.memory_advice import (
    ADVICE_PAGE,
    CU_DEVICE_CPU,
    CU_DEVICE_INVALID,
    DriverAdvisor,
    advised_span,
    isolated_empty,
)

PAGE = 4096


class FakeDriver:
    """cuMemAdvise_v2 / cuMemPrefetchAsync_v2 / cuMemRangeGetAttribute over a page table."""

    def __init__(self) -> None:
        self.preferred: dict[int, int] = {}
        self.prefetched: dict[int, int] = {}
        # Plain functions: the advisor sets `argtypes` on them as on a CDLL's.
        self.cuMemAdvise_v2 = lambda *args: self._advise(*args)
        self.cuMemPrefetchAsync_v2 = lambda *args: self._prefetch(*args)
        self.cuMemRangeGetAttribute = lambda *args: self._get(*args)
        self.calls: list[tuple[str, int, int]] = []

    @staticmethod
    def _pages(ptr: int, size: int) -> range:
        return range(ptr // PAGE, -(-(ptr + size) // PAGE))

    @staticmethod
    def _where(location) -> int:
        return CU_DEVICE_CPU if location.type == 2 else location.id

    def _advise(self, ptr, size, advice, location):
        self.calls.append(("advise", ptr, size))
        if advice == 3:
            for page in self._pages(ptr, size):
                self.preferred[page] = self._where(location)
        return 0

    def _prefetch(self, ptr, size, location, flags, stream):
        self.calls.append(("prefetch", ptr, size))
        for page in self._pages(ptr, size):
            self.prefetched[page] = self._where(location)
        return 0

    def _get(self, out, nbytes, attribute, ptr, size):
        if attribute == 3:  # accessed by: not modelled
            return 0
        table = self.preferred if attribute == 2 else self.prefetched
        values = {table.get(page, CU_DEVICE_INVALID) for page in self._pages(ptr, size)}
        out._obj.value = values.pop() if len(values) == 1 else CU_DEVICE_INVALID
        return 0


class Stream:
    cuda_stream = 0


@pytest.fixture
def driver(monkeypatch):
    monkeypatch.setattr(memory_advice, "_bind_context", lambda: None)
    return FakeDriver()


def test_an_isolated_tensor_starts_a_block_and_its_storage_owns_its_blocks():
    t = isolated_empty(3 * 2**20 // 2 + 7, torch.bfloat16, "cpu")
    assert t.data_ptr() % ADVICE_PAGE == 0 and t.numel() == 3 * 2**20 // 2 + 7
    start, size, isolated = advised_span(t)
    assert isolated and start == t.data_ptr() and size == 2 * ADVICE_PAGE
    assert isolated_empty(10, torch.float32, "cpu").view(2, 5).shape == (2, 5)


def test_a_packed_tensor_is_advised_exactly_not_beyond_its_storage():
    raw = torch.empty(3 * ADVICE_PAGE, dtype=torch.uint8)
    inner = raw[100 : 100 + ADVICE_PAGE].clone()  # its own storage, not block aligned
    ptr, size, isolated = advised_span(inner)
    assert not isolated and (ptr, size) == (inner.data_ptr(), ADVICE_PAGE)


def test_the_advisor_advises_and_prefetches_whole_blocks_and_reads_advice_back(driver):
    advisor = DriverAdvisor(lib=driver)
    t = isolated_empty(ADVICE_PAGE // 4 + 1, torch.float32, "cpu")  # 1 block and 4 bytes
    advisor.prefer(t, "host")
    advisor.prefetch(t, "host", stream=Stream())
    assert ("advise", t.data_ptr(), 2 * ADVICE_PAGE) in driver.calls
    assert ("prefetch", t.data_ptr(), 2 * ADVICE_PAGE) in driver.calls
    assert advisor.preferred_location(t) == CU_DEVICE_CPU and not advisor.mismatches
    assert advisor.last_prefetch_location(t) == CU_DEVICE_CPU


def test_advice_that_does_not_read_back_is_reported_at_once(driver):
    advisor = DriverAdvisor(lib=driver)
    advisor._advise = lambda *args: 0  # the driver accepts advice and keeps none
    advisor.prefer(isolated_empty(1024, torch.float32, "cpu"), "device")
    assert len(advisor.mismatches) == 1 and "reads back -2" in advisor.mismatches[0]


def test_the_check_names_the_first_phase_a_range_went_wrong_and_maps_it(driver):
    advisor = DriverAdvisor(lib=driver)
    check = AdviceCheck(advisor)
    blocks = [isolated_empty(ADVICE_PAGE, torch.uint8, "cpu") for _ in range(2)]
    for i, b in enumerate(blocks):
        advisor.prefer(b, "host")
        check.place(f"layer {i}", b, "host")
    assert check.check("advised") == []
    for i, b in enumerate(blocks):
        advisor.prefetch(b, "host", stream=Stream())
        check.prefetched(f"layer {i}")
    assert check.check("prefetched") == []
    # Something re-places the second half of layer 1 (from a block boundary on).
    start = blocks[1].data_ptr() + ADVICE_PAGE // 2
    for page in driver._pages(start, ADVICE_PAGE // 2):
        driver.preferred.pop(page)
        driver.prefetched[page] = 0
    wrong = check.check("later")
    assert [w["name"] for w in wrong] == ["layer 1"]
    assert wrong[0]["runs"] == [
        {
            "offset": 0,
            "bytes": ADVICE_PAGE // 2,
            "preferred": CU_DEVICE_CPU,
            "prefetched": CU_DEVICE_CPU,
            "block_offset": 0,
        },
        {
            "offset": ADVICE_PAGE // 2,
            "bytes": ADVICE_PAGE // 2,
            "preferred": CU_DEVICE_INVALID,
            "prefetched": 0,
            "block_offset": ADVICE_PAGE // 2,
        },
    ]
    check.check("even later")
    report = check.report()
    assert report["first_loss"] == {"layer 1": "later"}
    assert [h["phase"] for h in report["history"]] == [
        "advised",
        "prefetched",
        "later",
        "even later",
    ]
    assert all(r["isolated"] and r["block_offset"] == 0 for r in report["ranges"])
