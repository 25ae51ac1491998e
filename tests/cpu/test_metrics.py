"""The Prometheus metrics appear on the node's metrics endpoint under load (real Serve)."""

from __future__ import annotations

import threading
import time

import httpx

from deployments.metrics import ReplicaMetrics

MODEL = "tiny-llama"
EXPECTED = [
    "ray_grace_serve_time_to_first_token_seconds_bucket",
    "ray_grace_serve_time_per_output_token_seconds_bucket",
    "ray_grace_serve_prompt_tokens_total",
    "ray_grace_serve_completion_tokens_total",
    "ray_grace_serve_cached_prompt_tokens_total",
    "ray_grace_serve_kv_cache_bytes{",
    "ray_grace_serve_free_unified_memory_bytes",
    "ray_grace_serve_resident_users",
    "ray_grace_serve_running_requests",
    "ray_grace_serve_evicted_users_so_far",
    "ray_grace_serve_preempted_requests_so_far",
    "ray_grace_serve_rejected_requests_total{",
]


def metrics_text() -> str:
    import ray

    texts = []
    for node in ray.nodes():
        if node["Alive"] and node.get("MetricsExportPort"):
            url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
            texts.append(httpx.get(url, timeout=10).text)
    return "\n".join(texts)


def test_metrics_appear_on_the_metrics_endpoint_under_load(llm_url):
    def user_turns(i):
        messages = [{"role": "user", "content": f"metrics user {i}"}]
        for _ in range(2):  # the second turn hits the cache
            body = {"model": MODEL, "messages": messages, "max_tokens": 6, "stream": i % 2 == 0}
            response = httpx.post(
                f"{llm_url}/v1/chat/completions",
                json=body,
                timeout=60,
                headers={"X-User-Id": f"metrics-{i}"},
            )
            assert response.status_code == 200
            messages = [
                *messages,
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": "more"},
            ]

    threads = [threading.Thread(target=user_turns, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    httpx.post(
        f"{llm_url}/v1/chat/completions", json={"model": "nope", "messages": []}, timeout=30
    )  # a rejection
    for t in threads:
        t.join(60)

    deadline = time.monotonic() + 30
    missing = EXPECTED
    while missing and time.monotonic() < deadline:
        text = metrics_text()
        missing = [name for name in EXPECTED if name not in text]
        time.sleep(1)
    assert not missing, missing
    assert 'reason="invalid_request_error"' in text
    assert 'tier="device"' in text  # the paged engine's pool (host memory on a CPU replica)
    cached = [
        line
        for line in text.splitlines()
        if line.startswith("ray_grace_serve_cached_prompt_tokens_total")
    ]
    assert any(float(line.rsplit(" ", 1)[1]) > 0 for line in cached), cached


def test_counters_follow_engine_totals_without_double_counting():
    metrics = ReplicaMetrics()
    seen = []
    metrics.evicted.inc = lambda value=1.0, tags=None: seen.append(value)
    for total in (0, 3, 3, 5):
        metrics.update({"evicted_users": total}, {"host": 0})
    assert seen == [3, 2]


def test_cache_move_counters_follow_the_reported_totals_by_direction():
    metrics = ReplicaMetrics()
    seen = []
    users = metrics._moves["cache_moved_users"]
    users.inc = lambda value=1.0, tags=None: seen.append((value, tags))
    for out, into in ((0, 0), (2, 1), (2, 1), (3, 0)):  # an import withdrawn: never negative
        metrics.update({"cache_moves": {"users_out": out, "users_in": into}}, {"host": 0})
    assert seen == [(2, {"direction": "out"}), (1, {"direction": "in"}), (1, {"direction": "out"})]


def test_the_grafana_dashboard_only_queries_metrics_we_export():
    import json
    import pathlib
    import re

    from ray.util.metrics import Metric

    from deployments.metrics import IngressMetrics

    exported = set()
    for obj in (IngressMetrics(), ReplicaMetrics()):
        for value in vars(obj).values():
            metrics = value.values() if isinstance(value, dict) else [value]
            exported |= {"ray_" + m.info["name"] for m in metrics if isinstance(m, Metric)}
    root = pathlib.Path(__file__).resolve().parents[2]
    dashboard = json.loads((root / "cluster" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    names = {name for e in exprs for name in re.findall(r"ray_grace_serve_[a-z_]+", e)}
    # Prometheus adds _bucket to histograms and _total to counters (a gauge may end in _total).
    used = {name if name in exported else re.sub(r"_(bucket|total)$", "", name) for name in names}
    assert used and used <= exported, used - exported
    assert {
        "ray_grace_serve_time_to_first_token_seconds",
        "ray_grace_serve_kv_cache_bytes",
        "ray_grace_serve_rejected_requests",
    } <= used
