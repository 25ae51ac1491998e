"""The generic engine: per-user KV reuse is exact, concurrent, cancellable and bounded."""

import asyncio

import pytest
import torch

from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams
from deployments.engine.hf_engine import HFEngine
from deployments.memory import setup_memory
from deployments.model_files import resolve_model_dir
from deployments.platform import detect_platform
from deployments.tokenizer import TextTokenizer

TOKENIZER = TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False))


def make_engine(**kv) -> HFEngine:
    args = AppArgs.model_validate(
        {"kv_cache": kv or {"budget_bytes": "8MiB"}, "memory": {"cpu_memory_budget_bytes": "64MiB"}}
    )
    return HFEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))


@pytest.fixture
def engine():
    return make_engine()


def chat(engine, *turns):
    roles = ["user", "assistant"]
    return TOKENIZER.encode_chat(
        [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]
    )


async def run(engine, user, prompt, max_tokens=12, temperature=0.0, seed=None):
    req = GenerationRequest(
        "r", user, prompt, SamplingParams(max_tokens, temperature=temperature, seed=seed)
    )
    outs = [o async for o in engine.generate(req)]
    return [t for o in outs for t in o.token_ids], outs[-1]


def full_logits(engine, ids):
    with torch.inference_mode():
        return engine.model(input_ids=torch.tensor([ids])).logits[0, -1]


def test_reused_cache_gives_the_logits_of_a_full_recompute(engine):
    first = chat(engine, "Tell me about unified memory.")
    asyncio.run(run(engine, "alice", first, max_tokens=10))
    entry = engine.store._users["alice"]
    for second in (
        entry.token_ids + chat(engine, "x", "more please")[1:],  # extends the conversation
        [*first[:-3], 5, 6, 7, 8],  # diverges inside the cache: it must be cropped
    ):
        saved_tokens, saved_kv = list(entry.token_ids), entry.kv_tokens
        cache, reuse = engine._reuse(entry, second)
        assert 0 < reuse < len(second)
        with torch.inference_mode():
            out = engine.model(
                input_ids=torch.tensor([second[reuse:]]),
                use_cache=True,
                **{engine._cache_kwarg: cache},
            )
        torch.testing.assert_close(
            out.logits[0, -1], full_logits(engine, second), rtol=1e-4, atol=1e-4
        )
        # Put the cache back as it was for the next case.
        entry.kv, entry.token_ids, entry.kv_tokens = None, saved_tokens, 0
        asyncio.run(run(engine, "alice", saved_tokens[: saved_kv + 1], max_tokens=1))


def test_second_turn_reuses_the_first_and_matches_hf_generate(engine):
    first = chat(engine, "Hello there")
    tokens1, out1 = asyncio.run(run(engine, "bob", first))
    assert out1.cached_tokens == 0
    next_turn = "<|eot|>\n<|user|>\nand then?<|eot|>\n<|assistant|>\n"
    second = first + tokens1 + engine.tokenizer(next_turn, add_special_tokens=False).input_ids
    tokens2, out2 = asyncio.run(run(engine, "bob", second))
    assert out2.cached_tokens >= len(first)  # the whole first turn came from the cache
    reference = engine.model.generate(
        torch.tensor([second]),
        do_sample=False,
        max_new_tokens=12,
        min_new_tokens=12,
        pad_token_id=0,
    )[0, len(second) :].tolist()
    assert tokens2 == reference[: len(tokens2)]


def test_another_user_with_the_same_text_gets_no_cached_tokens(engine):
    prompt = chat(engine, "same words")
    asyncio.run(run(engine, "u1", prompt))
    _, out = asyncio.run(run(engine, "u2", prompt))
    assert out.cached_tokens == 0


def test_anonymous_requests_keep_nothing(engine):
    asyncio.run(run(engine, None, chat(engine, "who am I")))
    assert engine.stats().resident_users == [] and engine.stats().kv_cache_bytes == 0


def test_cache_holds_exactly_what_the_user_has_seen(engine):
    prompt = chat(engine, "count")
    tokens, _out = asyncio.run(run(engine, "carol", prompt, max_tokens=7))
    entry = engine.store._users["carol"]
    assert entry.token_ids == prompt + tokens
    assert entry.kv_tokens == len(prompt) + len(tokens) - 1  # last token's KV comes next turn
    assert entry.kv.get_seq_length() == entry.kv_tokens
    engine.store.check_integrity()


def test_seeded_sampling_is_reproducible(engine):
    prompt = chat(engine, "random please")
    a, _ = asyncio.run(run(engine, None, prompt, max_tokens=16, temperature=1.0, seed=7))
    b, _ = asyncio.run(run(engine, None, prompt, max_tokens=16, temperature=1.0, seed=7))
    c, _ = asyncio.run(run(engine, None, prompt, max_tokens=16, temperature=1.0, seed=8))
    assert a == b and a != c


def test_each_draw_has_its_own_key_and_eos_waits_for_min_tokens(engine):
    params = SamplingParams(8, temperature=1.0, min_tokens=3, seed=7)
    plans = [engine._plan(params, 7, generated) for generated in range(5)]
    assert [int(p.ban_eos[0]) for p in plans] == [1, 1, 1, 0, 0]
    assert len({int(p.seed[0]) for p in plans}) == 5
    assert int(engine._plan(params, 7, 2).seed[0]) == int(plans[2].seed[0])


def test_many_users_run_concurrently_without_blocking_the_loop(engine):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        t = asyncio.create_task(ticker())
        results = await asyncio.gather(
            *[
                run(engine, f"user{i}", chat(engine, "hi " * (i + 1)), max_tokens=20)
                for i in range(8)
            ]
        )
        t.cancel()
        return results, ticks

    results, ticks = asyncio.run(main())
    assert all(out.finish_reason in ("stop", "length") for _, out in results)
    assert ticks > 10  # the event loop kept running while the model computed
    assert len(engine.stats().resident_users) == 8
    engine.store.check_integrity()


def test_closing_a_stream_early_leaves_a_consistent_cache(engine):
    async def main():
        req = GenerationRequest(
            "r", "dave", chat(engine, "long answer"), SamplingParams(max_tokens=200, temperature=0)
        )
        gen = engine.generate(req)
        got = [await gen.__anext__() for _ in range(5)]
        await gen.aclose()  # client went away
        await asyncio.sleep(0.1)  # let a step still running on the model thread settle
        return got

    asyncio.run(main())
    entry = engine.store._users["dave"]
    assert not entry.running and engine.stats().running_requests == 0
    assert entry.kv.get_seq_length() == entry.kv_tokens <= len(entry.token_ids)
    engine.store.check_integrity()


def test_budget_drops_least_recent_idle_users():
    engine = make_engine(budget_bytes=200 * 2048)  # room for about 200 tokens
    for i in range(6):
        asyncio.run(run(engine, f"u{i}", chat(engine, "a fairly long message " * 2)))
    stats = engine.stats()
    assert stats.kv_cache_bytes <= stats.kv_budget_bytes
    assert stats.evicted_users > 0 and "u5" in stats.resident_users
    assert "u0" not in stats.resident_users
    engine.store.check_integrity()


def test_cancelling_while_a_step_is_still_queued_releases_the_request(engine):
    """Many concurrent users queue their steps on the one model thread; cancel them all."""

    async def main():
        tasks = [
            asyncio.create_task(run(engine, f"q{i}", chat(engine, "long " * 20), max_tokens=200))
            for i in range(12)
        ]
        await asyncio.sleep(0.2)  # all started; most have a step waiting in the queue
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.5)  # the running step settles
        return engine.stats()

    stats = asyncio.run(main())
    assert stats.running_requests == 0 and engine._slots._value == 64
    engine.store.check_integrity()
