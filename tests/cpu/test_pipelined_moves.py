"""A pipelined cache move between two paged engines in one process (move_send.py,
move_receive.py): the receiver's calls are the CacheMover's own methods, so chunk calls can be
delayed, reordered, lost or raced by a request at will."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from deployments.cache_moves import CacheMover
from deployments.config import CacheMovesConfig
from deployments.engine.cache_export import copy_piece
from deployments.move_send import PipelinedSend
from tests.cpu.test_cache_moves import conversation, turn
from tests.cpu.test_cache_transfer import build, user_bytes

TIMEOUT_S = 0.5  # the receiver's: an import left open this long is cancelled


@pytest.fixture(scope="module")
def engines():
    made = build(64, 64), build(64, 64), build(200)
    yield made
    for engine in made:
        asyncio.run(engine.shutdown())


def receiving(engine) -> CacheMover:
    cfg = CacheMovesConfig(call_timeout_s=TIMEOUT_S)
    return CacheMover(engine, "receiver", cfg, handle=None, report=dict)


def free(engine) -> int:
    return engine.cache.free_pages + engine.cache.host_free_pages


def calls_into(mover: CacheMover, delay=None, log=None):
    """The receiver's methods as a sender calls them; `delay(method, kwargs)`: seconds to
    wait first (or an exception to raise); `log`: chunk calls' `first`, as they land."""

    async def call(method: str, **kwargs):
        wait = delay(method, kwargs) if delay else 0
        if isinstance(wait, Exception):
            raise wait
        await asyncio.sleep(wait)
        answer = await getattr(mover, method)(**kwargs)
        if log is not None and method == "import_chunks":
            log.append(kwargs["first"])
        return answer

    return call


def slow_put(piece: np.ndarray) -> np.ndarray:
    time.sleep(0.03)  # an object-store put of a big chunk
    return piece.copy()


def test_chunk_calls_out_of_order_give_identical_pages_and_the_same_next_turn(engines):
    sender, receiver, reference = engines
    prompt = conversation(100, 230)  # 15 pages: chunks 4, 4, 4, 3
    first = asyncio.run(turn(sender, "ooo", prompt))[0]
    asyncio.run(turn(reference, "ooo", prompt))
    mover, landed = receiving(receiver), []

    def later_chunks_first(method, kwargs):
        return 0.05 * (4 - kwargs["first"]) if method == "import_chunks" else 0

    call = calls_into(mover, later_chunks_first, landed)
    sent = asyncio.run(PipelinedSend(sender, call, copy_piece, 10, group=1).send("ooo"))
    assert sent.outcome == "sent" and sent.generation is not None
    assert landed == [3, 2, 1, 0] and sent.times.chunk_calls == 4
    assert np.array_equal(user_bytes(receiver, "ooo"), user_bytes(sender, "ooo"))
    assert sender.forget_user("ooo", sent.export.generation)
    follow = prompt + first + [6, 7]
    tokens, cached = asyncio.run(turn(receiver, "ooo", follow))
    assert (tokens, cached) == asyncio.run(turn(reference, "ooo", follow))
    assert cached >= len(prompt)
    assert mover.counts.users_in == 1 and mover.counts.last_import_phases["in_chunks"] == 4
    receiver.check_integrity()
    sender.check_integrity()


def test_the_receiver_copies_while_the_sender_still_exports(engines):
    sender, receiver, _ = engines
    asyncio.run(turn(sender, "overlap", conversation(101, 230)))  # four chunks
    call = calls_into(receiving(receiver))
    sent = asyncio.run(PipelinedSend(sender, call, slow_put, 10, group=1).send("overlap"))
    assert sent.outcome == "sent"
    # Chunk 0's copy in ran while chunks 1-3 were still being put, 30 ms each.
    assert sent.times.pipeline_overlap_s > 0.0
    assert sent.times.move_s >= sent.times.begin_s + sent.times.export_s
    assert sender.forget_user("overlap", sent.export.generation)


def test_a_sender_that_dies_after_begin_import_leaves_no_pages_reserved(engines):
    sender, receiver, _ = engines
    asyncio.run(turn(sender, "dies", conversation(102, 150)))
    header, before = sender.export_header("dies"), free(receiver)
    mover = receiving(receiver)

    async def begin_then_vanish():
        ticket = await mover.begin_import(header)
        piece = sender.export_user("dies").arrays()[0]
        await mover.import_chunks(ticket, 0, [piece])  # one chunk, then silence
        assert free(receiver) == before - 10 and mover.receiver.arriving == 1
        await asyncio.sleep(TIMEOUT_S + 0.3)
        return ticket, piece

    async def late(ticket, piece):
        await mover.import_chunks(ticket, 1, [piece])

    ticket, piece = asyncio.run(begin_then_vanish())
    assert free(receiver) == before and mover.receiver.arriving == 0
    assert mover.counts.expired_imports == 1 and not receiver.cache.imports
    with pytest.raises(KeyError):
        asyncio.run(late(ticket, piece))
    assert "dies" not in receiver.stats().resident_users
    receiver.check_integrity()


def test_a_failed_chunk_call_cancels_the_import_and_the_user_stays(engines):
    sender, receiver, _ = engines
    asyncio.run(turn(sender, "lost", conversation(103, 230)))
    before = free(receiver)

    def second_chunk_fails(method, kwargs):
        if method == "import_chunks" and kwargs["first"] == 1:
            return RuntimeError("the receiver's replica died")
        return 0

    call = calls_into(receiving(receiver), second_chunk_fails)
    sent = asyncio.run(PipelinedSend(sender, call, copy_piece, 10, group=1).send("lost"))
    assert sent.outcome == "failed"
    assert free(receiver) == before and not receiver.cache.imports
    assert "lost" in sender.stats().resident_users
    assert "lost" not in receiver.stats().resident_users
    receiver.check_integrity()


def test_a_request_racing_the_move_is_served_from_a_whole_cache(engines):
    sender, receiver, reference = engines
    prompt = conversation(104, 230)
    first = asyncio.run(turn(sender, "racer", prompt))[0]
    asyncio.run(turn(reference, "racer", prompt))
    follow = prompt + first + [8]
    expected = asyncio.run(turn(reference, "racer", follow))
    served = {}
    mover = receiving(receiver)
    before = free(receiver)

    async def call(method, **kwargs):
        if method == "import_chunks" and kwargs["first"] == 0:
            # Mid-move: the sender serves the user from its whole cache; the receiver, which
            # holds only part of the bytes, does not know the user yet and recomputes.
            served["sender"] = await turn(sender, "racer", follow)
            served["receiver"] = await turn(receiver, "racer", follow)
        return await getattr(mover, method)(**kwargs)

    sent = asyncio.run(PipelinedSend(sender, call, copy_piece, 10, group=1).send("racer"))
    assert sent.outcome in ("busy", "raced")  # the user changed: the import is cancelled
    assert served["sender"] == expected and expected[1] >= len(prompt)
    assert served["receiver"] == (expected[0], 0)
    assert not receiver.cache.imports and mover.counts.users_in == 0
    # The receiver's own turn kept its own (whole) cache; the sender kept its newer one.
    assert free(receiver) < before and "racer" in sender.stats().resident_users
    receiver.check_integrity()
    sender.check_integrity()
