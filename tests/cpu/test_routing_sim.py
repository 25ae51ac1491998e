"""The routing simulation's quick run, and the claims about our router that it could refute."""

import asyncio
import json
from types import SimpleNamespace as NS

import pytest
from ray.serve.request_router import PendingRequest

from benchmarks import routing
from benchmarks.routing_sim.cluster import Cluster
from benchmarks.routing_sim.policies import OursPolicy
from benchmarks.routing_sim.simulate import Scenario, simulate
from benchmarks.routing_sim.workload import (
    KV_BYTES_PER_TOKEN,
    NODE_TYPES,
    NodeType,
    WorkloadShape,
    demand_bytes,
)
from deployments.admission import RequestShape
from deployments.identity import user_key
from deployments.router import UnifiedMemoryRouter


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("routing") / "routing.json"
    doc = routing.main(["--quick", "--out", str(out)])
    assert json.loads(out.read_text())["headline"] == doc["headline"]
    return doc


def test_ours_serves_returning_users_from_their_kept_cache(quick):
    ours = quick["headline"]["by_policy"]["ours"]
    assert ours["returning_requests"] > 5000
    assert ours["served_from_kept_cache"] >= 0.99
    assert quick["headline"]["by_policy"]["power_of_two"]["served_from_kept_cache"] < 0.9


def test_ours_evicts_at_most_half_as_often_as_consistent_hashing(quick):
    by_policy = quick["headline"]["by_policy"]
    assert by_policy["consistent_hash"]["evictions"] > 0  # the load is one where it matters
    assert by_policy["ours"]["evictions"] <= 0.5 * by_policy["consistent_hash"]["evictions"]
    admitted = {p: r["users_admitted_before_first_eviction"] for p, r in by_policy.items()}
    assert admitted["ours"] > admitted["consistent_hash"] > 0


def test_a_join_moves_no_user_and_a_leave_only_the_users_it_held(quick):
    moves = quick["churn"]["by_policy"]
    ours = moves["ours"]
    assert ours["join"]["tracked"] > 0 and ours["join"]["moved_needless"] == 0
    assert ours["leave"]["moved_needless"] == 0 and ours["leave"]["moved_must"] > 0
    # The counter does see needless moves: consistent hashing remaps users to a new replica.
    assert moves["consistent_hash"]["join"]["moved_needless"] > 0


def test_every_policy_sees_the_same_requests_and_every_metric_is_defined(quick):
    rows = quick["headline"]["by_policy"].values()
    assert len({(r["requests"], r["returning_requests"]) for r in rows}) == 1
    assert "re-implemented" in quick["policies"]["power_of_two"]
    for key in (
        "served_from_kept_cache",
        "users_admitted_before_first_eviction",
        "evictions",
        "free_kv_share_spread",
    ):
        assert key in quick["definitions"]


def test_the_load_is_what_the_scenario_asks_for():
    scenario = Scenario(replicas=4, shape=WorkloadShape(users=300), load=1.1, seed=3)
    types, conversations, _ = scenario.make()
    budget = sum(t.kv_budget_bytes for t in types)
    assert abs(demand_bytes(conversations) / budget - 1.1) < 0.01
    assert {t.name for t in types} == {t.name for t in NODE_TYPES}  # unequal replicas


def test_runs_are_deterministic():
    scenario = Scenario(replicas=4, shape=WorkloadShape(users=200), load=1.2, seed=5)
    for policy in ("ours", "power_of_two"):
        one, two = (asyncio.run(simulate(scenario, policy)) for _ in range(2))
        assert one == two


def test_lru_drops_idle_users_least_recently_used_first_never_a_running_one():
    node = NodeType("tiny", limit_bytes=1 << 40, kv_budget_bytes=100 * KV_BYTES_PER_TOKEN, note="")
    cluster = Cluster()
    cluster.add("r", node)
    cluster.serve("r", "old", 40, now=0, end=1)
    cluster.serve("r", "busy", 40, now=2, end=100)  # still running at t=10
    cluster.serve("r", "mid", 10, now=3, end=4)
    served = cluster.serve("r", "new", 40, now=10, end=11)
    assert [user for user, _ in served.evicted] == ["old"]
    served = cluster.serve("r", "new", 80, now=12, end=13)  # grows: "busy" is still running
    assert [user for user, _ in served.evicted] == ["mid"] and served.overflow
    cluster.check_integrity()


def test_the_simulated_policy_chooses_as_the_real_router_does():
    cluster = Cluster()
    for i, node in enumerate(NODE_TYPES):
        cluster.add(f"r{i}", node)
    for n in range(40):  # some users resident, unevenly
        cluster.serve(f"r{n % 3}", user_key(f"old{n}"), 20_000 + 500 * n, now=n, end=n + 1)
    fakes = [
        NS(replica_id=NS(unique_id=rid), routing_stats=r.stats())
        for rid, r in cluster.replicas.items()
    ]
    router = UnifiedMemoryRouter(
        deployment_id=NS(name="LLMReplica", app_name="llm"), handle_source=NS(value="UNKNOWN")
    )
    router.initialize_state()

    async def real(user_id):
        request = PendingRequest(
            args=[], kwargs={"shape": RequestShape(user_key(user_id), 0, 0)}, metadata=None
        )
        return (await router.choose_replicas(fakes, request))[0][0].replica_id.unique_id

    for user_id in [f"new{n}" for n in range(30)] + ["old3", "old7"]:
        policy = OursPolicy(routers=1, seed=0)
        policy.sync(cluster, stats_refreshed=True)
        simulated = asyncio.run(policy.choose(user_key(user_id), cluster, 100.0, 0))
        assert simulated == asyncio.run(real(user_id)), user_id
