"""One replica per node on a 3-node Ray cluster started in this process.

Each worker node advertises the custom resource `grace_node` (standing for a GH200 node), as
the KubeRay manifests do. Runs in its own pytest process (`-m multinode`): it starts its own
cluster rather than sharing the suite's Ray instance.
"""

from __future__ import annotations

import time

import httpx
import pytest

from tests.cpu.conftest import SERVICE_ARGS, free_port, wait_healthy

pytestmark = pytest.mark.multinode

PERIOD_S = SERVICE_ARGS["router"]["stats_period_s"]
ARGS = {
    **SERVICE_ARGS,  # the single-node service test's app, spread over grace-like nodes:
    "engine": {**SERVICE_ARGS["engine"], "default_max_tokens": 8},
    "replica": {
        "num_replicas": 3,
        "num_cpus": 0,
        "resources": {"grace_node": 1},
        "max_replicas_per_node": 1,
    },
    "ingress": {"num_replicas": 2, "num_cpus": 0},  # two routers, sharing only replica stats
}


@pytest.fixture(scope="module")
def cluster_url():
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from deployments.app import build_app

    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False}
    )
    for _ in range(3):
        cluster.add_node(num_cpus=1, resources={"grace_node": 1})
    ray.init(address=cluster.address, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    serve.run(build_app(ARGS), name="llm", route_prefix="/")
    wait_healthy(url)
    yield url, cluster
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def test_each_grace_node_runs_exactly_one_replica(cluster_url):
    import ray

    url, _ = cluster_url
    rows = httpx.get(f"{url}/admin/replicas", timeout=30).json()
    assert len(rows) == 3
    grace_nodes = {
        n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("grace_node")
    }
    assert {r["node_id"] for r in rows} == grace_nodes  # one each, none on the head


def test_users_stick_across_two_ingress_routers_given_think_time(cluster_url):
    """Each ingress process has its own router; replica stats are what they share."""
    url, _ = cluster_url
    homes: dict[str, set[str]] = {}
    history: dict[str, list[dict]] = {f"node-user-{i}": [] for i in range(9)}
    for turn in range(3):
        time.sleep(4 * PERIOD_S)  # a user's think time exceeds one stats period
        for user, messages in history.items():
            if turn == 0:
                time.sleep(2 * PERIOD_S)  # new users arrive apart: routers see fresh stats
            messages.append({"role": "user", "content": f"turn {turn}"})
            response = httpx.post(
                f"{url}/v1/chat/completions",
                headers={"X-User-Id": user},
                timeout=60,
                json={"model": "tiny-llama", "messages": messages, "max_tokens": 4},
            )
            assert response.status_code == 200, response.text
            body = response.json()
            messages.append(
                {"role": "assistant", "content": body["choices"][0]["message"]["content"]}
            )
            homes.setdefault(user, set()).add(response.headers["x-replica-id"])
            if turn:
                assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert all(len(h) == 1 for h in homes.values()), homes
    assert len({next(iter(h)) for h in homes.values()}) == 3
