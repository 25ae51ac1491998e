"""A user's kept cache copied out of one engine and into another (engine/cache_export.py):
the next turn on the receiver gives the tokens of an engine it never left, from its cache."""

from __future__ import annotations

import asyncio
import pickle
import random

import pytest

from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams
from deployments.engine.cache_export import LayoutMismatch
from deployments.engine.hf_engine import HFEngine
from deployments.engine.paged.engine import PagedEngine
from deployments.memory import setup_memory
from deployments.platform import detect_platform

PAGE_BYTES = 16 * 2048  # tiny-llama: 16-token pages of 2 KiB per token
PAGED = "deployments.engine.paged.engine:PagedEngine"
HF = "deployments.engine.hf_engine:HFEngine"


def build(engine_class: str, device_pages: int = 64, host_pages: int = 0):
    args = AppArgs.model_validate(
        {
            "memory": {"cpu_memory_budget_bytes": "64MiB"},
            "kv_cache": {
                "budget_bytes": device_pages * PAGE_BYTES,
                "host_tier_bytes": host_pages * PAGE_BYTES,
            },
            "engine": {"engine_class": engine_class, "cpu_threads": 1},
        }
    )
    cls = PagedEngine if engine_class == PAGED else HFEngine
    return cls(args, setup_memory(args.memory, detect_platform(use_gpu=False)))


async def turn(engine, user: str, prompt: list[int], n: int = 8):
    request = GenerationRequest("r", user, prompt, SamplingParams(n, temperature=0.0))
    tokens, last = [], None
    async for out in engine.generate(request):
        tokens += out.token_ids
        last = out
    return tokens, last.cached_tokens


def conversation(seed: int, length: int = 90) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 380) for _ in range(length)]


def move(sender, receiver, key: str) -> int:
    """Export, send (pickled, as Ray would), import, commit; the bytes moved."""
    export = sender.export_user(key)
    assert export is not None and key in sender.stats().resident_users  # a copy: still here
    arrived = pickle.loads(pickle.dumps(export))
    generation = receiver.import_user(arrived)
    assert generation is not None
    assert sender.forget_user(key, export.generation)
    assert key not in sender.stats().resident_users
    assert key in receiver.stats().resident_users
    return export.nbytes


@pytest.fixture(scope="module", params=[PAGED, HF], ids=["paged", "hf"])
def engines(request):
    made = [build(request.param) for _ in range(3)]
    yield made
    for engine in made:
        asyncio.run(engine.shutdown())


def test_a_moved_users_next_turn_equals_the_never_moved_engines(engines):
    sender, receiver, reference = engines
    prompt = conversation(0)
    first = asyncio.run(turn(sender, "u", prompt))[0]
    assert asyncio.run(turn(reference, "u", prompt))[0] == first
    nbytes = move(sender, receiver, "u")
    assert nbytes >= len(prompt) * sender.stats().kv_bytes_per_token
    follow = prompt + first + [7, 8, 9]
    tokens, cached = asyncio.run(turn(receiver, "u", follow))
    expected, expected_cached = asyncio.run(turn(reference, "u", follow))
    assert tokens == expected
    assert cached == expected_cached >= len(prompt) + len(first) - 1
    # The sender recomputes it (it holds nothing now), and still gives the same tokens.
    again, cached_there = asyncio.run(turn(sender, "u", follow))
    assert again == expected and cached_there == 0


def test_a_request_during_the_move_keeps_the_senders_cache(engines):
    sender, receiver, _ = engines
    prompt = conversation(1)
    asyncio.run(turn(sender, "racer", prompt))
    export = sender.export_user("racer")
    asyncio.run(turn(sender, "racer", [*prompt, 5]))  # served here while the copy travels
    generation = receiver.import_user(export)
    assert generation is not None
    assert not sender.forget_user("racer", export.generation)  # the copy is stale: kept
    assert "racer" in sender.stats().resident_users
    assert receiver.forget_user("racer", generation)  # the receiver withdraws its copy
    assert "racer" not in receiver.stats().resident_users


def test_an_import_of_a_user_already_there_or_of_another_layout_is_refused(engines):
    sender, receiver, _ = engines
    prompt = conversation(2)
    asyncio.run(turn(sender, "twice", prompt))
    asyncio.run(turn(receiver, "twice", prompt))
    export = sender.export_user("twice")
    assert receiver.import_user(export) is None
    export.layout = "paged:another-model"
    with pytest.raises(LayoutMismatch):
        receiver.import_user(export)
    assert sender.export_user("nobody") is None


def test_an_import_never_drops_anyone_to_make_room():
    sender, full = build(PAGED), build(PAGED, device_pages=8)
    asyncio.run(turn(sender, "big", conversation(3, 100)))  # 7 pages
    asyncio.run(turn(full, "resident", conversation(4, 60)))  # 4 of the 8
    assert full.import_user(sender.export_user("big")) is None
    assert full.stats().resident_users == ["resident"] and full.stats().evicted_users == 0
    full.check_integrity()
    for engine in (sender, full):
        asyncio.run(engine.shutdown())


def test_a_host_tier_user_moves_into_the_receivers_host_tier():
    sender, receiver, reference = build(PAGED, 8, 64), build(PAGED, 8, 64), build(PAGED, 200)
    prompts = [conversation(10 + i, 100) for i in range(4)]  # 7 pages each: the device holds 1
    for i, prompt in enumerate(prompts):
        asyncio.run(turn(sender, f"h{i}", prompt))
        asyncio.run(turn(reference, f"h{i}", prompt))
    asyncio.run(turn(receiver, "local", conversation(20, 100)))  # fills the receiver's device
    assert sender.cache.offloaded_users > 0
    on_host = next(u for u in sender.movable_users() if not u.on_device)
    move(sender, receiver, on_host.key)
    assert receiver.cache._users[on_host.key].host_pages  # no device room: the host tier took it
    sender.check_integrity()
    receiver.check_integrity()
    i = int(on_host.key[1:])
    follow = prompts[i] + [11, 12]
    tokens, cached = asyncio.run(turn(receiver, on_host.key, follow))
    expected, expected_cached = asyncio.run(turn(reference, on_host.key, follow))
    assert tokens == expected and cached == expected_cached >= len(prompts[i]) - 1
    for engine in (sender, receiver, reference):
        asyncio.run(engine.shutdown())


async def accept(mover, export):
    """A whole export through the receiver's calls (begin, its pieces, finish), in process."""
    ticket = await mover.begin_import(export.header())
    assert ticket is not None
    await mover.import_chunks(ticket, 0, list(export.buffers))
    return await mover.finish_import(ticket)


def test_the_receiver_reports_when_a_user_arrived_until_it_is_withdrawn(engines):
    from deployments.cache_moves import CacheMover
    from deployments.config import CacheMovesConfig

    sender, receiver, _ = engines
    mover = CacheMover(receiver, "receiver", CacheMovesConfig(), handle=None, report=dict)
    asyncio.run(turn(sender, "arriving", conversation(4)))
    generation = asyncio.run(accept(mover, sender.export_user("arriving")))
    assert generation is not None
    # Routers prefer this copy over the sender's while both report the user (placement.py).
    arrived = mover.arrivals(receiver.stats().resident_users)
    assert set(arrived) == {"arriving"} and arrived["arriving"] > 0
    assert asyncio.run(mover.withdraw("arriving", generation))
    assert mover.arrivals(receiver.stats().resident_users) == {}
