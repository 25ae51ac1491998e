"""The host KV tier: idle users move down instead of being dropped, and come back intact."""

from __future__ import annotations

import asyncio
import gc
import random
import weakref

import pytest
import torch

from deployments.capacity import replica_memory
from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams
from deployments.engine.paged.cache_manager import CacheManager
from deployments.engine.paged.engine import PagedEngine
from deployments.engine.paged.scheduler import Room, Scheduler
from deployments.engine.paged.sequence import Sequence
from deployments.engine.paged.tier_mover import contiguous_runs
from deployments.memory import setup_memory
from deployments.platform import detect_platform

PAGE_BYTES = 16 * 2048  # tiny-llama: 16-token pages of 2 KiB per token


def keep(cache: CacheManager, key: str, tokens: int) -> None:
    """Give `key` an idle cache of `tokens` tokens in device pages."""
    cache.checkout(key, [])
    cache.checkin(key, list(range(tokens + 1)), tokens, cache.allocate(cache.pages_for(tokens)))


class TestPolicy:
    def test_offload_moves_the_least_recent_idle_user_down(self):
        cache = CacheManager(num_pages=8, page_size=4, host_pages=8)
        keep(cache, "old", 8)
        keep(cache, "new", 8)
        move = cache.start_offload()
        assert move.key == "old" and move.down and len(move.src) == 2
        assert cache.draining_pages() == 2 and cache.free_pages == 4  # not free until copied
        cache.check_integrity()
        cache.complete(move)
        assert cache.free_pages == 6 and cache.host_used_pages() == 2
        assert cache.users() == ["old", "new"]  # still resident, one tier down
        cache.check_integrity()

    def test_a_full_host_tier_drops_its_least_recent_users(self):
        cache = CacheManager(num_pages=8, page_size=4, host_pages=2)
        for key in ("a", "b", "c"):
            keep(cache, key, 8)
        cache.complete(cache.start_offload())  # a goes down
        move = cache.start_offload()  # b needs a's host pages: a is dropped
        assert move.key == "b" and "a" not in cache.users() and cache.evicted_users == 1
        cache.complete(move)
        cache.check_integrity()

    def test_a_cache_bigger_than_the_host_tier_is_not_moved(self):
        cache = CacheManager(num_pages=8, page_size=4, host_pages=1)
        keep(cache, "big", 8)
        assert cache.start_offload() is None

    def test_a_returning_user_comes_back_up_trimmed_to_its_prefix(self):
        cache = CacheManager(num_pages=8, page_size=4, host_pages=8)
        keep(cache, "u", 10)  # tokens 0..10 seen, 10 with KV: 3 pages
        cache.complete(cache.start_offload())
        assert cache.restore_cost("u", [*range(6), 99]) == 2
        reuse = cache.checkout("u", [*range(6), 99])
        assert reuse.tokens == 6 and reuse.restore is not None and not reuse.restore.down
        assert reuse.pages == reuse.restore.dst and len(reuse.pages) == 2
        assert cache.host_used_pages() == 2  # the copy still reads them
        cache.complete(reuse.restore)
        assert cache.host_used_pages() == 0
        cache.check_integrity([reuse.pages])

    def test_ownership_holds_under_random_moves(self):
        rng = random.Random(1)
        cache = CacheManager(num_pages=40, page_size=4, reserved=1, host_pages=24)
        running: dict[str, list[int]] = {}
        for _ in range(3000):
            key = f"u{rng.randrange(10)}"
            roll = rng.random()
            if roll < 0.2 and cache.moves:
                cache.complete(rng.choice(cache.moves))
            elif roll < 0.35:
                cache.start_offload()
            elif key in running:
                pages = running.pop(key)
                kv = rng.randrange(len(pages) * 4 + 1) if pages else 0
                cache.checkin(key, list(range(kv + 1)), kv, pages)
            else:
                prompt = list(range(rng.randrange(1, 30)))
                need = cache.restore_cost(key, prompt)
                while not cache.can_allocate(need) and cache.evict_lru_idle():
                    pass
                if not cache.can_allocate(need):
                    continue
                reuse = cache.checkout(key, prompt)
                if not reuse.private:
                    running[key] = reuse.pages
            cache.check_integrity(running.values())


def test_contiguous_pages_copy_as_one_run():
    assert contiguous_runs([4, 5, 6, 9], [0, 1, 2, 3]) == [(4, 0, 3), (9, 3, 1)]


class SlowMover:
    """A mover whose copies finish only when the test says so."""

    def __init__(self):
        self.pending = []

    def launch(self, move):
        move.handle = "in flight"
        self.pending.append(move)

    def done(self, move):
        return move.handle is None

    def wait(self, move):
        move.handle = None

    def finish_all(self):
        for move in self.pending:
            move.handle = None
        self.pending.clear()


def test_steps_wait_for_moves_in_flight_instead_of_preempting():
    cache = CacheManager(num_pages=4, page_size=4, host_pages=8)
    keep(cache, "idle", 8)  # 2 pages
    mover = SlowMover()
    sched = Scheduler(cache, max_num_seqs=8, max_batched_tokens=64, mover=mover)
    seq = Sequence("r", None, list(range(12)), SamplingParams(4))
    sched.add(seq)
    assert len(sched.schedule()) == 0  # needs 3 pages; "idle" is moving down
    assert cache.draining_pages() == 2 and sched.preemptions == 0
    assert sched._make_room(3, seq, set(), False) is Room.WAIT
    mover.finish_all()
    batch = sched.schedule()
    assert batch.seqs == [seq] and cache.evicted_users == 0
    sched.check_integrity()


def engine(device_pages: int, host_pages: int) -> PagedEngine:
    args = AppArgs.model_validate(
        {
            "memory": {"cpu_memory_budget_bytes": "64MiB"},
            "kv_cache": {
                "budget_bytes": device_pages * PAGE_BYTES,
                "host_tier_bytes": host_pages * PAGE_BYTES,
            },
            "engine": {"engine_class": "deployments.engine.paged.engine:PagedEngine"},
        }
    )
    return PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))


async def turn(eng: PagedEngine, user: str, prompt: list[int], n: int = 6):
    req = GenerationRequest("r", user, prompt, SamplingParams(n, temperature=0.0))
    tokens, last = [], None
    async for out in eng.generate(req):
        tokens += out.token_ids
        last = out
    return tokens, last


def conversations(seed: int, users: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randrange(60, 120))] for _ in range(users)]


def users_held(eng: PagedEngine, prompts: list[list[int]]) -> int:
    """New users served one after another until the first is dropped."""
    for i, prompt in enumerate(prompts):
        asyncio.run(turn(eng, f"user{i}", prompt))
        if eng.cache.evicted_users:
            return i
    return len(prompts)


def test_the_host_tier_holds_users_in_proportion_to_its_size():
    prompts = conversations(0, 200)
    without = users_held(engine(40, 0), prompts)
    tiered = engine(40, 120)
    with_tier = users_held(tiered, prompts)
    assert with_tier >= without * (40 + 120) / 40 * 0.9, (without, with_tier)
    assert tiered.cache.offloaded_users > 0
    tiered.check_integrity()
    stats = tiered.stats()
    assert stats.extra["kv_bytes_by_tier"]["host"] > 0


def test_a_returning_user_from_the_host_tier_gets_its_cache_and_the_same_tokens():
    prompts = conversations(1, 12)
    tiered, flat = engine(30, 200), engine(400, 0)  # flat: everything stays on the device
    firsts = {}
    for i, prompt in enumerate(prompts):
        firsts[i] = asyncio.run(turn(tiered, f"u{i}", prompt))[0]
        asyncio.run(turn(flat, f"u{i}", prompt))
    assert tiered.cache.offloaded_users > 0 and tiered.cache.evicted_users == 0
    follow = prompts[0] + firsts[0] + [7, 8, 9]  # user 0 was moved down long ago
    tokens, out = asyncio.run(turn(tiered, "u0", follow))
    reference, ref_out = asyncio.run(turn(flat, "u0", follow))
    assert tiered.cache.restored_users >= 1
    assert out.cached_tokens == ref_out.cached_tokens >= len(prompts[0])
    assert tokens == reference
    tiered.check_integrity()


def test_free_unified_memory_counts_the_host_tier():
    args = AppArgs.model_validate(
        {
            "memory": {"cpu_memory_budget_bytes": "64MiB"},
            "kv_cache": {"budget_bytes": 40 * PAGE_BYTES, "host_tier_bytes": 120 * PAGE_BYTES},
            "engine": {"engine_class": "deployments.engine.paged.engine:PagedEngine"},
        }
    )
    memory = setup_memory(args.memory, detect_platform(use_gpu=False))
    before = memory.snapshot()
    eng = PagedEngine(args, memory)
    snap = replica_memory(memory.reading(), eng.stats()).snapshot
    assert snap.capacity_bytes == before.capacity_bytes + 120 * PAGE_BYTES
    assert eng.stats().kv_budget_bytes == (40 + 120) * PAGE_BYTES
    for i, prompt in enumerate(conversations(3, 30)):  # fill the device, spill to the host
        asyncio.run(turn(eng, f"f{i}", prompt))
    assert eng.cache.host_used_pages() > 0
    after = replica_memory(memory.reading(), eng.stats()).snapshot
    held = eng.cache.usable_pages - eng.cache.free_pages + eng.cache.host_used_pages()
    assert snap.free_unified_memory_bytes - after.free_unified_memory_bytes == held * PAGE_BYTES

    # Shut down, the engine stops counting and nothing keeps it (and its memory) alive.
    asyncio.run(eng.shutdown())
    gone = weakref.ref(eng)
    del eng
    gc.collect()
    assert gone() is None
    assert memory.snapshot() == before


@pytest.mark.parametrize("host_pages", [0, 64])
def test_engines_with_and_without_a_tier_keep_pages_consistent(host_pages):
    eng = engine(24, host_pages)

    async def burst():
        prompts = conversations(2, 10)
        await asyncio.gather(*[turn(eng, f"b{i}", p, 12) for i, p in enumerate(prompts)])

    asyncio.run(burst())
    eng.check_integrity()
    assert torch.is_tensor(eng.pool.buffer)
