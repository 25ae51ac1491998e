"""CPU residency from /proc/self/pagemap, on real anonymous memory: pages this process touched
are present, pages it gave back are not, and a change between samples is counted."""

from __future__ import annotations

import ctypes
import mmap

import pytest

from benchmarks.pagemap import PAGE, Track, moved_between, pages, residency, resident_bytes

N = 64  # pages


@pytest.fixture
def region():
    """An anonymous mapping of N untouched pages (base pages: no transparent huge pages) and
    its address."""
    m = mmap.mmap(-1, N * PAGE)
    if hasattr(mmap, "MADV_NOHUGEPAGE"):
        m.madvise(mmap.MADV_NOHUGEPAGE)
    view = (ctypes.c_char * (N * PAGE)).from_buffer(m)
    yield m, ctypes.addressof(view)
    del view
    m.close()


def touch(m: mmap.mmap, page_numbers) -> None:
    for i in page_numbers:
        m[i * PAGE] = 1


def test_an_untouched_mapping_has_no_page_in_ram(region):
    _, start = region
    assert resident_bytes(start, N * PAGE) == 0


def test_the_touched_half_of_a_mapping_is_exactly_what_is_resident(region):
    m, start = region
    touch(m, range(0, N, 2))
    present = residency(start, N * PAGE)
    assert present.tolist() == [i % 2 == 0 for i in range(N)]
    assert resident_bytes(start, N * PAGE) == N // 2 * PAGE


def test_pages_given_back_count_as_moved_between_two_samples(region):
    m, start = region
    touch(m, range(N))
    before = residency(start, N * PAGE)
    m.madvise(mmap.MADV_DONTNEED, 8 * PAGE, 5 * PAGE)  # pages 8-12 leave RAM
    after = residency(start, N * PAGE)
    assert moved_between(before, after) == 5 * PAGE
    assert resident_bytes(start, N * PAGE) == (N - 5) * PAGE
    touch(m, [9])  # one comes back
    assert moved_between(after, residency(start, N * PAGE)) == PAGE
    assert moved_between(before, before) == 0


def test_an_unaligned_range_covers_the_whole_pages_it_touches(region):
    m, start = region
    touch(m, [3, 4, 5])
    assert pages(start + 3 * PAGE + 100, PAGE) == ((start // PAGE) + 3, 2)
    assert resident_bytes(start + 3 * PAGE + 100, PAGE) == 2 * PAGE  # pages 3 and 4
    straddle = start + 3 * PAGE - 1  # 2 bytes: the last of page 2 (untouched), first of 3
    assert pages(straddle, 2)[1] == 2 and resident_bytes(straddle, 2) == PAGE
    assert resident_bytes(start + 5 * PAGE + 1, 10) == PAGE
    assert resident_bytes(start + 6 * PAGE + 1, 10) == 0
    assert residency(start + 1, 0).size == 0


def test_samples_of_different_ranges_are_refused(region):
    _, start = region
    with pytest.raises(ValueError):
        moved_between(residency(start, PAGE), residency(start, 2 * PAGE))


def test_a_track_sums_the_changes_between_consecutive_samples_over_its_ranges(region):
    m, start = region
    track = Track([(start, 16 * PAGE), (start + 32 * PAGE, 16 * PAGE)])
    assert track.sample() == 0  # the first sample is the baseline
    touch(m, [0, 1, 33, 20])  # page 20 is outside both ranges
    assert track.sample() == 3 * PAGE
    m.madvise(mmap.MADV_DONTNEED, 0, PAGE)
    assert track.sample() == PAGE
    assert track.summary(steps=2) == {
        "samples": 3,
        "moved_bytes": 4 * PAGE,
        "bytes_moved_per_step": 2 * PAGE,
        "resident_bytes_first": 0,
        "resident_bytes_last": 2 * PAGE,
        "resident_bytes_min": 0,
        "resident_bytes_max": 3 * PAGE,
    }
