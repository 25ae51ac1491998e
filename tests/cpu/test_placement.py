"""Router choices with fake replicas: stickiness, most free memory, agreement, fallbacks."""

from deployments.identity import user_key
from deployments.placement import (
    PlacementLedger,
    PlacementPolicy,
    ReplicaView,
    decide,
    rank_for_new_user,
    rendezvous_score,
)

GB = 10**9
POLICY = PlacementPolicy(tolerance_fraction=0.01, sticky_max_wait_s=30)


def view(
    rid, free_gb, resident=(), capacity_gb=500, kv_bytes=0, per_token=320 * 1024, arrived=None
):
    return ReplicaView.from_stats(
        rid,
        {
            "free_unified_memory_bytes": int(free_gb * GB),
            "capacity_bytes": capacity_gb * GB,
            "resident_users": list(resident),
            "kv_cache_bytes": kv_bytes,
            "kv_bytes_per_token": per_token,
            "arrived_users": arrived or {},
        },
    )


def choose(user, views, ledger=None, now=0.0, waited=0.0, policy=POLICY):
    return decide(user, views, ledger or PlacementLedger(), policy, now, waited)


def test_new_user_goes_to_the_replica_with_most_free_memory():
    views = [view("a", 100), view("b", 300), view("c", 200)]
    decision = choose("u1", views)
    assert decision.reason == "new"
    assert decision.ranks == [["b"], ["c"], ["a"]]  # singleton ranks: Serve keeps our order


def test_returning_user_goes_home_even_when_home_has_least_free_memory():
    views = [view("a", 10, resident=["u1"]), view("b", 300), view("c", 200)]
    decision = choose("u1", views)
    assert decision.reason == "home" and decision.ranks == [["a"]]


def test_returning_user_falls_back_only_after_waiting_too_long_for_home():
    views = [view("a", 10, resident=["u1"]), view("b", 300), view("c", 200)]
    decision = choose("u1", views, waited=31.0)
    assert decision.ranks == [["a"], ["b"], ["c"]]


def test_dead_home_means_the_user_is_placed_anew():
    # Replica "a" held u1 but died: it is no longer a candidate.
    decision = choose("u1", [view("b", 100), view("c", 200)])
    assert decision.reason == "new" and decision.ranks[0] == ["c"]


def test_near_ties_break_by_rendezvous_hash_the_same_everywhere():
    views = [view("a", 300), view("b", 300.5), view("c", 299)]  # within 1% of 500 GB
    winners = {}
    for i in range(200):
        user = user_key(f"user{i}")
        ranks = choose(user, views).ranks
        expected = max("abc", key=lambda r: rendezvous_score(user, r))
        assert ranks[0] == [expected]
        winners[expected] = winners.get(expected, 0) + 1
    assert set(winners) == {"a", "b", "c"}  # new users spread over tied replicas


def test_while_a_move_settles_the_user_goes_where_its_cache_went():
    # Sender and receiver both report the user until the sender commits (cache_moves.py):
    # whatever the rendezvous hash says, the copy that moved in is the user's home.
    for i in range(50):
        user = user_key(f"mover{i}")
        for sender, receiver in (("a", "b"), ("b", "a")):
            views = [
                view(sender, 100, resident=[user]),
                view(receiver, 100, resident=[user], arrived={user: 1000.0}),
            ]
            assert choose(user, views).ranks == [[receiver]]
            assert choose(user, list(reversed(views))).ranks == [[receiver]]


def test_a_user_moved_back_goes_to_the_copy_that_arrived_last():
    user = user_key("ping-pong")
    views = [
        view("a", 100, resident=[user], arrived={user: 2000.0}),
        view("b", 100, resident=[user], arrived={user: 1000.0}),
    ]
    assert choose(user, views).ranks == [["a"]]


def test_two_routers_with_the_same_stats_agree():
    views = [view("a", 250), view("b", 251), view("c", 120)]
    for i in range(100):
        user = user_key(f"person{i}")
        assert (
            choose(user, views, PlacementLedger()).ranks
            == choose(user, list(reversed(views)), PlacementLedger()).ranks
        )


def test_a_router_counts_its_own_placements_until_stats_show_them():
    views = [view("a", 100, capacity_gb=200), view("b", 99, capacity_gb=200)]
    ledger = PlacementLedger(ttl_s=30)
    first = choose("u1", views, ledger, now=0).ranks[0][0]
    assert first == "a"
    ledger.record("u1", "a", 5 * GB, now=0)  # as on_request_routed does
    # Stats have not caught up: "a" looks 5 GB fuller to this router, so u2 goes to "b".
    assert choose("u2", views, ledger, now=0.5).ranks[0] == ["b"]
    # And u1, back before the stats show it, is still sent to "a".
    assert choose("u1", views, ledger, now=0.6).ranks == [["a"]]
    # Once "a" reports u1 resident, the placement is confirmed and forgotten.
    views = [view("a", 95, resident=["u1"], capacity_gb=200), view("b", 99, capacity_gb=200)]
    choose("u3", views, ledger, now=1.0)
    assert len(ledger) == 0


def test_unconfirmed_placements_expire():
    ledger = PlacementLedger(ttl_s=10)
    ledger.record("u1", "a", GB, now=0)
    assert ledger.home("u1", now=5) == "a" and ledger.pending_bytes("a", now=5) == GB
    assert ledger.home("u1", now=11) is None and ledger.pending_bytes("a", now=11) == 0


def test_replicas_without_stats_yet_rank_after_known_ones():
    views = [ReplicaView.from_stats("new", {}), view("a", 10)]
    assert choose("u1", views).ranks == [["a"], ["new"]]
    only_new = [ReplicaView.from_stats("x", None), ReplicaView.from_stats("y", None)]
    assert sorted(r[0] for r in choose("u1", only_new).ranks) == ["x", "y"]


def test_full_replicas_still_rank_last_rather_than_vanish():
    views = [view("a", -1), view("b", 0.5)]
    assert rank_for_new_user("u", views, PlacementLedger(), POLICY, 0) == ["b", "a"]


def test_anonymous_requests_form_one_rank_for_shortest_queue():
    views = [view("a", 1), view("b", 2)]
    decision = choose(None, views)
    assert decision.reason == "anonymous" and decision.ranks == [["a", "b"]]


def test_no_replicas_no_ranks():
    assert choose("u", []).ranks == []


def test_new_user_estimate_comes_from_resident_users():
    v = view("a", 10, resident=["x", "y"], kv_bytes=4 * GB)
    assert v.new_user_bytes == 2 * GB
    assert view("b", 10).new_user_bytes == 256 * 320 * 1024


def test_room_is_capped_by_the_kv_budget_left():
    # "a" has more free unified memory, but its KV budget is nearly spent: beyond it the engine
    # drops idle users however much memory is free, so the new user belongs on "b".
    a = ReplicaView.from_stats(
        "a",
        {
            "free_unified_memory_bytes": 100 * GB,
            "capacity_bytes": 500 * GB,
            "kv_cache_bytes": 195 * GB,
            "kv_budget_bytes": 200 * GB,
            "resident_users": ["x"],
        },
    )
    b = ReplicaView.from_stats(
        "b",
        {
            "free_unified_memory_bytes": 30 * GB,
            "capacity_bytes": 200 * GB,
            "kv_cache_bytes": 10 * GB,
            "kv_budget_bytes": 100 * GB,
            "resident_users": ["y"],
        },
    )
    assert a.free_bytes == 5 * GB and b.free_bytes == 30 * GB
    assert choose("u1", [a, b]).ranks == [["b"], ["a"]]


def budgeted(rid, room_gb, budget_gb=100):
    return ReplicaView.from_stats(
        rid,
        {
            "free_unified_memory_bytes": 300 * GB,
            "capacity_bytes": 500 * GB,
            "kv_cache_bytes": int((budget_gb - room_gb) * GB),
            "kv_budget_bytes": budget_gb * GB,
            "resident_users": ["x"],
        },
    )


def test_replicas_fill_in_proportion_to_their_kv_budgets():
    # The small replica has less room in bytes but a larger share of its budget free.
    views = [budgeted("big", 100, budget_gb=200), budgeted("small", 40, budget_gb=50)]
    assert choose("u1", views).ranks == [["small"], ["big"]]
    views = [budgeted("big", 100, budget_gb=200), budgeted("small", 20, budget_gb=50)]
    assert choose("u1", views).ranks == [["big"], ["small"]]


def test_tie_band_is_a_share_of_the_kv_budget():
    # 1% of the budget: 2% less of it free is not a tie (1% of capacity, 5 GB, would be).
    views = [budgeted("a", 50), budgeted("b", 48)]
    assert all(choose(f"u{i}", views).ranks[0] == ["a"] for i in range(50))
    views = [budgeted("a", 50), budgeted("b", 49.5)]
    assert {choose(f"u{i}", views).ranks[0][0] for i in range(50)} == {"a", "b"}


def test_a_long_prompt_goes_where_it_takes_the_smallest_share():
    views = [budgeted("big", 100, budget_gb=200), budgeted("small", 30, budget_gb=50)]
    assert choose("u1", views).ranks[0] == ["small"]  # 60% free against 50%
    long_prompt = decide("u1", views, PlacementLedger(), POLICY, 0.0, request_bytes=20 * GB)
    assert long_prompt.ranks == [["big"], ["small"]]  # 40% left against 20%
