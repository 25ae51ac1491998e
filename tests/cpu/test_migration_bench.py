"""The migration benchmark's pieces that need no GPU: record parsing, attribution by address,
the steady decode window, and its skip without a GPU."""

from __future__ import annotations

import struct
import subprocess
import sys

from benchmarks import migration_bench
from benchmarks.um_counters import DTOH, GPU_PAGE_FAULT, HTOD, Record, moved, parse_head
from tests.cpu.test_weight_streaming import checkpoint, make  # noqa: F401


def test_a_unified_memory_record_head_is_read_and_other_kinds_skipped():
    raw = struct.pack("<IIQQQQ", 25, DTOH, 2 << 20, 10, 20, 0x7000) + bytes(40)
    assert parse_head(raw) == Record(DTOH, 2 << 20, 10, 0x7000)
    assert parse_head(struct.pack("<IIQQQQ", 3, 0, 0, 0, 0, 0)) is None


def test_bytes_moved_count_only_records_inside_the_ranges():
    records = [
        Record(HTOD, 4096, 1, 0x1000),
        Record(DTOH, 8192, 2, 0x1800),
        Record(HTOD, 1 << 20, 3, 0x9000),
        Record(GPU_PAGE_FAULT, 2, 4, 0x1000),
    ]
    assert moved(records, [(0x1000, 0x1000)]) == {
        "htod_bytes": 4096,
        "dtoh_bytes": 8192,
        "gpu_fault_groups": 2,
        "cpu_faults": 0,
    }


def test_the_steady_window_spans_the_decode_steps_of_a_batch(checkpoint, monkeypatch):  # noqa: F811
    monkeypatch.setattr(migration_bench, "BATCH", 2)
    monkeypatch.setattr(migration_bench, "STEPS", 10)
    monkeypatch.setattr(migration_bench, "PROMPT", 8)
    engine = make(checkpoint, None)
    engine.eos_token_ids = frozenset()
    spans = migration_bench.ranges(engine)
    assert len(spans["device"]) == 7 and spans["host"] == []
    tracks, unavailable = migration_bench.pagemap_tracks(spans)
    assert unavailable is None
    window = migration_bench.steady_window(engine, None, tracks)
    assert window["tokens"] == [30, 30] and window["steps"] >= 10
    assert window["decode_steps"] >= 9 and window["step_ms_p50"] > 0
    assert migration_bench.per_step(None, window, {})["counters"] is None
    # on the CPU the weights and the pool stay in RAM: sampled as the window opens and after
    # each step, all resident, none moved
    device = migration_bench.pagemap_per_step(tracks, window)["device_advised"]
    weights = sum(size for _, size in spans["device"][:-1])  # the last is the KV pool
    assert window["steps"] + 1 >= device["samples"] >= 2
    assert device["resident_bytes_min"] >= weights
    assert device["moved_bytes"] == 0 and device["bytes_moved_per_step"] == 0


def test_without_cupti_the_headline_takes_the_page_table_and_says_so():
    row = {
        "device_advised_bytes_moved_per_step": None,
        "pagemap": {
            "device_advised": {"bytes_moved_per_step": 0.0, "resident_bytes_max": 0},
            "host_advised": {"bytes_moved_per_step": 40.96},
        },
        "advice_wrong_after_window": [],
        "control": {"counters": None, "pagemap": {"sees_migrations": True}},
    }
    top = migration_bench.headline(row, None)
    assert top["bytes_moved_source"] == "pagemap"
    assert top["steady_device_advised_bytes_moved_per_step"] == 0.0
    assert top["steady_host_advised_bytes_moved_per_step"] == 40.96
    assert top["counters_see_migrations"] is True and top["cupti_sees_migrations"] is None
    assert top["advice_kept"] is True
    row["control"]["pagemap"]["sees_migrations"] = False  # zeros that mean nothing say so
    assert migration_bench.headline(row, None)["counters_see_migrations"] is False
    del row["pagemap"]
    assert migration_bench.headline(row, None)["bytes_moved_source"] is None


def test_without_a_gpu_the_benchmark_says_so_and_writes_nothing():
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.migration_bench"],
        text=True,
        capture_output=True,
        timeout=120,
    )
    assert out.returncode == 0 and "skipped" in out.stdout
