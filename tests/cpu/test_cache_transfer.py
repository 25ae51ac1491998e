"""The paged engine's chunked export and import (engine/paged/cache_transfer.py) on CPU: a
user's scattered pages leave in chunks of a few pages (a last partial one), arrive as pieces of
any size, and land byte for byte in the receiver's pages, every layer's keys and values; a
user that changes while it is copied is not exported."""

from __future__ import annotations

import asyncio
import pickle
import random

import numpy as np
import pytest
import torch

from deployments.config import AppArgs
from deployments.engine.paged.engine import PagedEngine
from deployments.memory import setup_memory
from deployments.platform import detect_platform
from tests.cpu.test_cache_moves import PAGE_BYTES, PAGED, conversation, turn

CHUNK_PAGES = 4


def build(device_pages: int = 64, host_pages: int = 0) -> PagedEngine:
    args = AppArgs.model_validate(
        {
            "memory": {"cpu_memory_budget_bytes": "64MiB"},
            "kv_cache": {
                "budget_bytes": device_pages * PAGE_BYTES,
                "host_tier_bytes": host_pages * PAGE_BYTES,
            },
            "engine": {"engine_class": PAGED, "cpu_threads": 1},
            "cache_moves": {"chunk_bytes": CHUNK_PAGES * PAGE_BYTES + 100},  # cut to 4 pages
        }
    )
    return PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))


def user_bytes(engine: PagedEngine, key: str) -> np.ndarray:
    """The user's pages' bytes, in order, from whichever tier holds them."""
    user = engine.cache._users[key]
    tier = engine.pool.buffer if user.pages else engine._host_pool.buffer
    pages = user.pages or user.host_pages
    return torch.cat([tier[p].reshape(-1).view(torch.uint8) for p in pages]).numpy()


def resplit(export, rng: random.Random, count: int) -> None:
    """The export's bytes cut again at odd places (the import takes pieces of any size)."""
    data = np.concatenate(export.arrays())
    cuts = sorted(rng.sample(range(1, data.nbytes), count - 1))
    pieces = np.split(data, cuts)
    export.hold(pieces, [p.nbytes for p in pieces])


@pytest.fixture(scope="module")
def pair():
    made = build(64, 64), build(64, 64)
    yield made
    for engine in made:
        asyncio.run(engine.shutdown())


def test_scattered_pages_move_in_chunks_and_land_byte_for_byte(pair):
    sender, receiver = pair
    assert sender._transfer.ring.slot_bytes == CHUNK_PAGES * PAGE_BYTES
    rng = random.Random(0)
    # Interleaved users scatter each other's pages; 137 tokens: 9 pages, chunks 4 + 4 + 1.
    for i, length in enumerate((137, 50, 201)):
        asyncio.run(turn(sender, f"s{i}", conversation(30 + i, length)))
    asyncio.run(turn(receiver, "there", conversation(40, 77)))  # the receiver's pages differ
    for i in range(3):
        key = f"s{i}"
        export = pickle.loads(pickle.dumps(sender.export_user(key)))
        pages = len(sender.cache._users[key].pages)
        assert export.sizes == [
            min(CHUNK_PAGES, pages - c) * PAGE_BYTES for c in range(0, pages, CHUNK_PAGES)
        ]
        assert np.array_equal(np.concatenate(export.arrays()), user_bytes(sender, key))
        resplit(export, rng, 5)
        assert receiver.import_user(export) is not None
        assert np.array_equal(user_bytes(receiver, key), user_bytes(sender, key))
        assert export.phases["in_chunks"] == -(-export.nbytes // (CHUNK_PAGES * PAGE_BYTES))
    sender.check_integrity()
    receiver.check_integrity()


def test_an_export_whose_user_changes_during_the_copy_is_dropped(pair):
    sender, _ = pair
    prompt = conversation(50, 150)  # 10 pages: three chunks
    asyncio.run(turn(sender, "busy", prompt))
    ran = []

    def sink_that_runs_a_turn(chunk):
        if not ran:  # the user takes a turn after the first chunk left
            ran.append(asyncio.run(turn(sender, "busy", [*prompt, 9])))
        return chunk.copy()

    assert sender.export_user("busy", sink_that_runs_a_turn) is None
    assert ran and sender.export_user("busy") is not None  # idle again: it copies now

    def sink_that_forgets(chunk):
        if "busy" in sender.cache.users():  # dropped after the first chunk left
            assert sender.forget_user("busy", sender.cache._users["busy"].generation)
        return chunk.copy()

    assert sender.export_user("busy", sink_that_forgets) is None
    sender.check_integrity()


def test_pieces_that_do_not_match_their_sizes_are_refused_and_nothing_is_reserved(pair):
    sender, receiver = pair
    asyncio.run(turn(sender, "short", conversation(60, 70)))
    export = sender.export_user("short")
    free = receiver.cache.free_pages
    export.buffers[-1] = export.buffers[-1][:-1]  # a byte lost on the way
    with pytest.raises(ValueError, match=r"not .* bytes of uint8"):
        receiver.import_user(export)
    whole = np.concatenate([*export.buffers, np.zeros(2, np.uint8)])  # a byte too many
    export.hold([whole], [whole.nbytes])
    with pytest.raises(ValueError, match="bytes for"):
        receiver.import_user(export)  # one piece of the stated size, but not the pages' size
    assert receiver.cache.free_pages == free and "short" not in receiver.cache.users()
    receiver.check_integrity()


def test_a_host_tier_user_leaves_and_lands_in_chunks_byte_for_byte():
    sender, receiver = build(8, 64), build(8, 64)
    for i in range(3):  # 7 pages each: the device pool holds one of them
        asyncio.run(turn(sender, f"h{i}", conversation(70 + i, 100)))
    asyncio.run(turn(receiver, "local", conversation(80, 100)))  # fills the receiver's device
    key = next(u.key for u in sender.movable_users() if not u.on_device)
    export = sender.export_user(key)
    assert len(export.sizes) == 2  # 7 pages: 4 + 3
    assert receiver.import_user(export) is not None
    assert receiver.cache._users[key].host_pages
    assert np.array_equal(user_bytes(receiver, key), user_bytes(sender, key))
    for engine in (sender, receiver):
        engine.check_integrity()
        asyncio.run(engine.shutdown())


def test_chunks_arriving_out_of_order_and_twice_land_byte_for_byte_and_answer_alike(pair):
    sender, receiver = pair
    reference = build(64)
    prompt = conversation(90, 201)  # 13 pages: chunks of 4, 4, 4 and 1
    first = asyncio.run(turn(sender, "ooo", prompt))[0]
    assert asyncio.run(turn(reference, "ooo", prompt))[0] == first
    export = sender.export_user("ooo")
    pieces = export.arrays()
    assert len(pieces) == 4 and export.chunk_bytes == CHUNK_PAGES * PAGE_BYTES
    ticket = receiver.begin_import(pickle.loads(pickle.dumps(export.header())))
    assert ticket is not None
    assert receiver.begin_import(export.header()) is None  # arriving already: refused
    for first_chunk, group in ((3, [3]), (1, [1, 2]), (3, [3]), (0, [0])):  # last first, twice
        receiver.import_chunks(ticket, first_chunk, [pieces[i] for i in group])
        assert "ooo" not in receiver.stats().resident_users  # registered only at finish
    assert receiver.finish_import(ticket) is not None
    assert np.array_equal(user_bytes(receiver, "ooo"), user_bytes(sender, "ooo"))
    follow = prompt + first + [4, 5]
    tokens, cached = asyncio.run(turn(receiver, "ooo", follow))
    expected, expected_cached = asyncio.run(turn(reference, "ooo", follow))
    assert tokens == expected and cached == expected_cached >= len(prompt)
    receiver.check_integrity()
    asyncio.run(reference.shutdown())


def test_a_cancelled_or_incomplete_import_frees_its_pages(pair):
    sender, receiver = pair
    asyncio.run(turn(sender, "gone", conversation(91, 150)))  # 10 pages: chunks 4, 4, 2
    export = sender.export_user("gone")

    def free() -> int:
        return receiver.cache.free_pages + receiver.cache.host_free_pages  # either tier

    pieces, before = export.arrays(), free()
    ticket = receiver.begin_import(export.header())
    receiver.import_chunks(ticket, 1, [pieces[1]])
    assert free() == before - 10
    assert receiver.cancel_import(ticket) and not receiver.cancel_import(ticket)
    assert free() == before
    with pytest.raises(KeyError):
        receiver.import_chunks(ticket, 0, [pieces[0]])
    with pytest.raises(KeyError):
        receiver.finish_import(ticket)
    # A finish with a chunk missing adopts nothing and frees the pages too.
    ticket = receiver.begin_import(export.header())
    receiver.import_chunks(ticket, 0, pieces[:2])
    with pytest.raises(ValueError, match="lacks bytes"):
        receiver.finish_import(ticket)
    with pytest.raises(ValueError, match="bytes \\["):  # past the cache's end
        t = receiver.begin_import(export.header())
        try:
            receiver.import_chunks(t, 2, pieces[1:])
        finally:
            receiver.cancel_import(t)
    assert free() == before and "gone" not in receiver.stats().resident_users
    receiver.check_integrity()
