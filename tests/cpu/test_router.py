"""The real UnifiedMemoryRouter class, driven with fake replicas outside Serve."""

import asyncio
import time
from types import SimpleNamespace as NS

from ray.serve.request_router import PendingRequest

from deployments.admission import RequestShape
from deployments.identity import user_key
from deployments.router import UnifiedMemoryRouter

GB = 10**9


def make_router(**kwargs):
    router = UnifiedMemoryRouter(
        deployment_id=NS(name="LLMReplica", app_name="llm"), handle_source=NS(value="UNKNOWN")
    )
    router.initialize_state(**kwargs)
    return router


def replica(rid, free_gb, resident=()):
    return NS(
        replica_id=NS(unique_id=rid),
        routing_stats={
            "free_unified_memory_bytes": int(free_gb * GB),
            "capacity_bytes": 500 * GB,
            "resident_users": [user_key(u) for u in resident],
            "kv_bytes_per_token": 1024,
        },
    )


def choose(router, replicas, user_id):
    async def route():
        request = PendingRequest(
            args=[],
            kwargs={"request": {}, "shape": RequestShape(user_key(user_id), 8, 8)},
            metadata=None,
        )
        return await router.choose_replicas(replicas, request), request

    ranks, request = asyncio.run(route())
    return [[r.replica_id.unique_id for r in rank] for rank in ranks], request


def test_returning_user_is_pinned_to_its_home_and_routing_backs_off():
    replicas = [replica("a", 10, resident=["alice"]), replica("b", 300)]
    ranks, request = choose(make_router(), replicas, "alice")
    assert ranks == [["a"]]
    assert request.routing_context.should_backoff  # a busy home means wait, never spin


def test_new_user_goes_to_most_free_memory():
    ranks, request = choose(make_router(), [replica("a", 10), replica("b", 300)], "bob")
    assert ranks == [["b"], ["a"]] and request.routing_context.should_backoff


def test_two_router_instances_agree_on_new_users():
    replicas = [replica("a", 200), replica("b", 200.2), replica("c", 199.9)]
    one, two = make_router(), make_router()
    for i in range(50):
        assert choose(one, replicas, f"user{i}")[0] == choose(two, replicas, f"user{i}")[0]


def test_kwargs_from_the_serve_config_reach_the_policy():
    router = make_router(free_memory_tolerance_fraction=0.5, sticky_max_wait_s=0)
    replicas = [replica("a", 10, resident=["alice"]), replica("b", 300)]
    ranks, _ = choose(router, replicas, "alice")
    assert ranks == [["a"], ["b"]]  # sticky wait 0: fall back at once


def test_the_request_footprint_is_the_ingress_shape_at_the_replicas_bytes_per_token():
    async def figures(kwargs):
        request = PendingRequest(args=[], kwargs=kwargs, metadata=None)
        return (
            UnifiedMemoryRouter._request_bytes(request, [replica("a", 1)]),
            UnifiedMemoryRouter._user(request),
        )

    assert asyncio.run(figures({"shape": RequestShape("k", 300, 100)})) == (400 * 1024, "k")
    assert asyncio.run(figures({})) == (0, None)  # model info, stats: no shape, no user


def test_a_long_first_prompt_goes_to_the_replica_it_fills_least():
    def budgeted(rid, room_gb, budget_gb):
        return NS(
            replica_id=NS(unique_id=rid),
            routing_stats={
                "free_unified_memory_bytes": 300 * GB,
                "capacity_bytes": 500 * GB,
                "kv_cache_bytes": (budget_gb - room_gb) * GB,
                "kv_budget_bytes": budget_gb * GB,
                "resident_users": [],
                "kv_bytes_per_token": 10**6,
            },
        )

    replicas = [budgeted("big", 100, 200), budgeted("small", 30, 50)]
    assert choose(make_router(), replicas, "bob")[0][0] == ["small"]

    async def route(tokens):
        request = PendingRequest(
            args=[], kwargs={"shape": RequestShape(user_key("carol"), tokens, 0)}, metadata=None
        )
        return await make_router().choose_replicas(replicas, request)

    ranks = asyncio.run(route(20_000))  # 20k tokens x 1 MB: 20 GB of KV
    assert [r.replica_id.unique_id for r in ranks[0]] == ["big"]


def test_a_new_users_footprint_counts_what_it_will_generate():
    router = make_router(free_memory_tolerance_fraction=0.001)
    mib = 1 << 20
    replicas = [
        NS(
            replica_id=NS(unique_id=rid),
            routing_stats={  # equal, 64 MiB each
                "free_unified_memory_bytes": 60 * mib,
                "capacity_bytes": 64 * mib,
                "kv_budget_bytes": 16 * mib,
                "kv_cache_bytes": 0,
                "resident_users": [],
                "kv_bytes_per_token": 2048,
            },
        )
        for rid in ("a", "b", "c", "d")
    ]

    async def place(user):
        request = PendingRequest(
            args=[], kwargs={"shape": RequestShape(user_key(user), 3, 4000)}, metadata=None
        )
        ranks = await router.choose_replicas(replicas, request)
        first = ranks[0][0]
        router._ledger.record(
            user_key(user),
            first.replica_id.unique_id,
            router._request_bytes(request, replicas),
            time.time(),
        )
        return first.replica_id.unique_id

    placed = [asyncio.run(place(f"u{i}")) for i in range(4)]
    # 4,000 tokens of KV to come (8 MiB) break the tie before stats arrive: one user each.
    assert sorted(placed) == ["a", "b", "c", "d"]


def test_replica_views_follow_each_new_stats_report():
    router = make_router()
    a, b = replica("a", 300), replica("b", 10)
    assert choose(router, [a, b], "dave")[0][0] == ["a"]
    first = router._view("a", a.routing_stats)
    assert router._view("a", a.routing_stats) is first  # same report: built once
    # The next report (a new object, as Serve delivers it) says a filled up and holds dave.
    a.routing_stats = {**replica("a", 5, resident=["dave"]).routing_stats}
    assert router._view("a", a.routing_stats) is not first
    assert choose(router, [a, b], "dave")[0] == [["a"]]  # now dave's home
    assert choose(router, [a, b], "erin")[0][0] == ["b"]


def test_a_call_naming_its_replica_goes_there_alone_or_waits():
    """Cache moves and admin drains name their replica (`target_replica_id`): every router
    process sends it there, whatever the user or the memory; while it is gone, nowhere."""
    replicas = [replica("a", 10, resident=["alice"]), replica("b", 300)]

    async def route(target):
        request = PendingRequest(
            args=[],
            kwargs={"shape": RequestShape(user_key("alice"), 8, 8), "target_replica_id": target},
            metadata=None,
        )
        ranks = await make_router().choose_replicas(replicas, request)
        return [[r.replica_id.unique_id for r in rank] for rank in ranks], request

    ranks, request = asyncio.run(route("b"))
    assert ranks == [["b"]] and request.routing_context.should_backoff
    assert asyncio.run(route("gone"))[0] == []
