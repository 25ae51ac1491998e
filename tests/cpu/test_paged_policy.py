"""KV page policy and scheduling: ownership, reuse, eviction before preemption, occupancy."""

from __future__ import annotations

import asyncio
import random

import pytest

from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams
from deployments.engine.paged.cache_manager import CacheManager
from deployments.engine.paged.engine import PagedEngine
from deployments.engine.paged.scheduler import Scheduler
from deployments.engine.paged.sequence import Sequence, Status
from deployments.memory import setup_memory
from deployments.platform import detect_platform


def seq(ids, user=None, max_tokens=4):
    return Sequence("r", user, list(ids), SamplingParams(max_tokens))


class TestCacheManager:
    def test_a_users_kept_pages_are_trimmed_to_what_the_prompt_reuses(self):
        cache = CacheManager(num_pages=10, page_size=4, reserved=1)
        pages = cache.allocate(3)
        cache.checkout("u", [])
        cache.checkin("u", list(range(11)), kv_len=10, pages=pages)  # 10 tokens: 3 pages
        reuse = cache.checkout("u", [0, 1, 2, 3, 4, 99, 98])  # shares 5 tokens
        assert reuse.tokens == 5 and reuse.pages == pages[:2] and not reuse.private
        assert cache.free_pages == 10 - 1 - 2
        cache.check_integrity([reuse.pages])

    def test_the_last_prompt_token_is_always_recomputed(self):
        cache = CacheManager(num_pages=10, page_size=4)
        cache.checkout("u", [])
        cache.checkin("u", [1, 2, 3, 4, 5], kv_len=4, pages=cache.allocate(1))
        assert cache.checkout("u", [1, 2, 3, 4]).tokens == 3  # logits need one fed token

    def test_a_busy_user_gets_a_private_cache(self):
        cache = CacheManager(num_pages=4, page_size=4)
        assert not cache.checkout("u", [1, 2]).private
        assert cache.checkout("u", [1, 2]).private

    def test_only_idle_users_are_evicted_least_recent_first(self):
        cache = CacheManager(num_pages=9, page_size=4)
        for key in "abc":
            cache.checkout(key, [])
            cache.checkin(key, [1] * 8, 8, cache.allocate(2))
        cache.checkout("a", [9])  # a is busy now
        assert cache.evict_lru_idle() == "b"
        assert cache.evict_lru_idle() == "c"
        assert cache.evict_lru_idle() is None  # only the busy user is left
        assert "a" in cache.users()

    def test_pages_are_never_shared_under_random_operations(self):
        rng = random.Random(0)
        cache = CacheManager(num_pages=64, page_size=4, reserved=1)
        running: dict[str, list[int]] = {}
        for _ in range(2000):
            key = f"u{rng.randrange(12)}"
            if key in running and rng.random() < 0.5:
                pages = running.pop(key)
                kv_len = rng.randrange(len(pages) * 4 + 1) if pages else 0
                cache.checkin(key, list(range(kv_len + 1)), kv_len, pages)
            elif key not in running:
                reuse = cache.checkout(key, list(range(rng.randrange(1, 40))))
                if reuse.private:
                    continue
                grow = rng.randrange(4)
                while not cache.can_allocate(grow) and cache.evict_lru_idle():
                    pass
                extra = cache.allocate(grow) if cache.can_allocate(grow) else []
                running[key] = reuse.pages + extra
            cache.check_integrity(running.values())


class TestScheduler:
    def test_long_prompts_prefill_in_chunks_while_others_decode(self):
        sched = Scheduler(CacheManager(100, 4), max_num_seqs=8, max_batched_tokens=16)
        decoding = seq([1, 2, 3])
        sched.add(decoding)
        batch = sched.schedule()
        decoding.num_computed += 3
        decoding.token_ids.append(7)  # sampled
        long = seq(list(range(40)))
        sched.add(long)
        batch = sched.schedule()
        assert batch.seqs == [decoding, long] and batch.num_tokens == [1, 15]
        assert batch.samples(0) and not batch.samples(1)

    def test_idle_users_are_evicted_before_anyone_is_preempted(self):
        cache = CacheManager(num_pages=6, page_size=4)
        cache.checkout("idle", [])
        cache.checkin("idle", [1] * 8, 8, cache.allocate(2))
        sched = Scheduler(cache, max_num_seqs=8, max_batched_tokens=64)
        running = seq(list(range(8)))
        sched.add(running)
        sched.schedule()  # takes 2 pages; 2 left free
        newcomer = seq(list(range(14)))
        sched.add(newcomer)
        batch = sched.schedule()
        assert newcomer in batch.seqs and "idle" not in cache.users()
        assert sched.preemptions == 0
        sched.check_integrity()

    def test_when_pages_run_out_the_newest_running_sequence_is_preempted_and_requeued(self):
        sched = Scheduler(CacheManager(num_pages=4, page_size=4), 8, 64)
        old, new = seq(list(range(7))), seq(list(range(8)))
        sched.add(old)
        sched.add(new)
        sched.schedule()  # 2 pages each: the pool is full
        for s in (old, new):
            s.num_computed = len(s.token_ids)
            s.token_ids.append(1)
        old.num_computed = 8  # old's next token needs a third page
        old.token_ids.append(2)
        batch = sched.schedule()
        assert batch.seqs == [old] and new.status is Status.WAITING
        assert sched.waiting[0] is new and new.num_computed == 0 and sched.preemptions == 1
        sched.check_integrity()


def test_the_pool_admits_users_until_95_percent_of_pages_hold_tokens():
    args = AppArgs.model_validate(
        {
            "memory": {"cpu_memory_budget_bytes": "64MiB"},
            "kv_cache": {"budget_bytes": 200 * 16 * 2048},  # 200 pages of 16 tokens
            "engine": {
                "page_size": 16,
                "engine_class": "deployments.engine.paged.engine:PagedEngine",
            },
        }
    )
    engine = PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))
    rng = random.Random(3)

    async def fill():
        i = 0
        while engine.cache.evicted_users == 0:
            before = engine.cache.usable_pages - engine.cache.free_pages
            prompt = [rng.randrange(3, 380) for _ in range(rng.randrange(40, 200))]
            req = GenerationRequest(f"r{i}", f"user{i}", prompt, SamplingParams(8, 0.0))
            async for _ in engine.generate(req):
                pass
            i += 1
        return before

    held_before_first_eviction = asyncio.run(fill())
    assert held_before_first_eviction / engine.cache.usable_pages >= 0.95
    engine.check_integrity()
    asyncio.run(engine.shutdown())


@pytest.mark.parametrize("max_tokens", [1, 5])
def test_requests_too_big_for_the_pool_are_refused_not_stuck(max_tokens):
    from deployments.engine import CapacityError

    args = AppArgs.model_validate(
        {
            "memory": {"cpu_memory_budget_bytes": "64MiB"},
            "kv_cache": {"budget_bytes": 4 * 16 * 2048},  # 4 pages: 64 tokens
            "engine": {"engine_class": "deployments.engine.paged.engine:PagedEngine"},
        }
    )
    engine = PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))

    async def run():
        req = GenerationRequest("r", "u", list(range(3, 80)), SamplingParams(max_tokens))
        async for _ in engine.generate(req):
            pass

    with pytest.raises(CapacityError, match="KV pages"):
        asyncio.run(run())
    asyncio.run(engine.shutdown())
