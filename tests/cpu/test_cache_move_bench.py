"""benchmarks/cache_move_bench.py's quick mode on the shared Ray: two replicas of a tiny model
on CPU, a user moved from one to the other by phase, its next turn served from the cache."""

from __future__ import annotations

import pytest

from benchmarks import cache_move_bench as bench
from deployments.engine.paged.staging_ring import SINKS


@pytest.fixture(scope="module")
def handle(serve_url):
    from ray import serve

    yield bench.deploy(True, serve_url)
    serve.delete(bench.APP)


def test_a_moved_user_is_served_by_its_receiver_from_its_cache(handle, serve_url):
    rows = bench.measure(handle, serve_url, quick=True, pinned=None)
    assert [r["history_tokens"] for r in rows] == [256, 1024]
    for row in rows:
        # tiny-llama-shaped QUICK config in float32: 2 layers x 2 KV heads x 32 x 2 x 4 bytes
        assert row["bytes"] >= row["history_tokens"] * 2 * 2 * 2 * 32 * 4
        assert row["next_turn_cached_tokens"] >= row["history_tokens"]
        # Pipelined: B's copies run inside the move, partly while A still exports.
        assert row["move_s"] >= row["export_s"] + row["begin_s"] and row["import_s"] > 0
        assert row["move_s"] >= row["import_s"]
        assert row["chunk_calls"] == row["chunks"] == -(-row["bytes"] // (256 << 10))
        assert 0 <= row["pipeline_overlap_s"] <= row["import_s"]
        # On CPU the copies are host copies: no device time, every chunk put and copied in.
        assert row["d2h_s"] == 0 and row["h2d_s"] == 0 and row["chunks"] >= 1
        assert row["put_s"] > 0 and row["host_copy_s"] > 0 and row["get_s"] >= 0
        # Several chunks now: their puts run SINKS at a time, so their sum may pass the wall.
        assert row["export_s"] * SINKS >= row["put_s"]
    top = bench.headline(rows, None)
    assert top["history_tokens"] == 1024 and set(top["time_split_s"]) == {
        "move",
        "begin",
        "export",
        "device_to_host",
        "object_store_put",
        "export_overlap",
        "call_overhead",
        "object_store_get",
        "import",
        "host_staging_copy",
        "host_to_device",
        "import_overlap",
        "pipeline_overlap",
    }


def test_only_the_rows_asked_for_are_measured(handle, serve_url):
    rows = bench.measure(
        handle, serve_url, quick=True, pinned=None, histories=(300,), attempts=2, seed=1
    )
    assert [(r["history_tokens"], r["attempt"]) for r in rows] == [(300, 0), (300, 1)]


def test_the_paper_figure_moves_a_70b_user_faster_than_it_recomputes():
    paper = bench.on_paper()
    assert paper["kv_bytes"] == 131072 * 320 * 1024  # 40 GiB, as DESIGN.md says
    assert 10 < paper["recompute_s"] < 200  # "tens of seconds"
    fastest = max(paper["by_network"], key=lambda r: r["network_gb_per_s"])
    assert fastest["recompute_over_move_serial"] > 1
