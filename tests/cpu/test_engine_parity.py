"""The two engines as one specification: the same request gives the same answer in either.

The generic engine (hf_engine) serves every architecture the paged engine does not run, so
both stay in production, and each policy they share exists once: end-of-sequence ids
(loader.eos_token_ids), draw keys and EOS bans (sampler.draw_base, runner.sampling_plan),
prefix reuse (kv_reuse.reusable_tokens), idle-user eviction (kv_shares.victims), the KV
budget (layout.kv_budget_bytes) and the memory figures (capacity.replica_memory). Each test
runs the builtin tiny Llama through both engines (float32 on CPU, where their logits agree to
rounding) and fails as soon as one engine's copy of a rule drifts from the other's.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from deployments.capacity import replica_memory
from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams
from deployments.engine.hf_engine import HFEngine
from deployments.engine.kv_reuse import reusable_tokens
from deployments.engine.paged.cache_manager import CacheManager
from deployments.engine.paged.engine import PagedEngine
from deployments.engine.user_cache import UserCacheStore
from deployments.memory import setup_memory
from deployments.model_files import resolve_model_dir
from deployments.platform import detect_platform

BUDGET = 256 * 2**20  # cpu_memory_budget_bytes
PROMPT = list(range(5, 25))


def engine_args(model_id: str = "builtin:tiny-llama") -> AppArgs:
    return AppArgs.model_validate(
        {
            "model": {"model_id": model_id, "dtype": "float32"},
            "memory": {"cpu_memory_budget_bytes": BUDGET},
            "kv_cache": {"budget_fraction": 0.05},  # of the memory free once the weights are in
            "engine": {"cpu_threads": 1},
        }
    )


def build_pair(model_id: str) -> dict:
    args = engine_args(model_id)
    pair = {}
    for cls in (PagedEngine, HFEngine):
        memory = setup_memory(args.memory, detect_platform(use_gpu=False))
        pair[cls] = (cls(args, memory), memory)
    return pair


def shut(pair: dict) -> None:
    for engine, _ in pair.values():
        asyncio.run(engine.shutdown())


@pytest.fixture(scope="module")
def engines():
    pair = build_pair("builtin:tiny-llama")
    yield {cls: engine for cls, (engine, _) in pair.items()}, pair
    shut(pair)


def greedy(path: str, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy continuation (argmax, no EOS handling)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def eos_checkpoint(tmp_path_factory):
    """The builtin model whose generation_config.json adds the third token of PROMPT's greedy
    continuation to its EOS ids (as Llama 3's lists end-of-turn ids the config does not)."""
    source = resolve_model_dir("builtin:tiny-llama")
    path = tmp_path_factory.mktemp("eos") / "tiny-llama"
    shutil.copytree(source, path)
    first = greedy(source, PROMPT, 3)
    stop = first[2]
    assert stop not in first[:2]
    config_file = path / "generation_config.json"
    config = json.loads(config_file.read_text())
    base = set(config["eos_token_id"])
    assert stop not in base
    config["eos_token_id"] = sorted(base | {stop})
    config_file.write_text(json.dumps(config))
    pair = build_pair(str(path))
    yield {cls: engine for cls, (engine, _) in pair.items()}, first, base
    shut(pair)


def generate(engine, prompt, user=None, **sampling) -> tuple[list[int], str | None, int]:
    """Tokens, finish reason and cached prompt tokens of one request."""

    async def main():
        req = GenerationRequest("r", user, list(prompt), SamplingParams(**sampling))
        return [o async for o in engine.generate(req)]

    outs = asyncio.run(main())
    return [t for o in outs for t in o.token_ids], outs[-1].finish_reason, outs[-1].cached_tokens


def both(engines, *args, **kwargs) -> list:
    return [generate(engines[cls], *args, **kwargs) for cls in (PagedEngine, HFEngine)]


# ---- sampling ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0.0},
        {"temperature": 1.0, "seed": 3},
        {
            "temperature": 1.0,
            "seed": -3,
        },  # negative seeds: the generic engine once keyed them apart
        {"temperature": 0.8, "seed": 2**62 + 5, "top_p": 0.9, "top_k": 50, "min_p": 0.01},
        {"temperature": 1.2, "seed": 9, "repetition_penalty": 1.3, "logit_bias": ((42, 4.0),)},
    ],
    ids=["greedy", "seeded", "negative-seed", "truncated", "penalized"],
)
def test_the_same_request_draws_the_same_tokens_in_both_engines(engines, sampling):
    paged, generic = both(engines[0], PROMPT, max_tokens=20, ignore_eos=True, **sampling)
    assert paged == generic
    assert len(paged[0]) == 20


def test_an_unseeded_request_draws_with_a_fresh_key_in_both_engines(engines):
    for engine in engines[0].values():
        runs = [
            generate(engine, PROMPT, max_tokens=12, temperature=1.0, ignore_eos=True)[0]
            for _ in range(2)
        ]
        assert runs[0] != runs[1]


# ---- end of sequence -----------------------------------------------------------------------


def test_both_engines_read_the_same_eos_ids_from_a_checkpoint(eos_checkpoint):
    pair, first, base = eos_checkpoint
    assert pair[PagedEngine].eos_token_ids == pair[HFEngine].eos_token_ids == base | {first[2]}


@pytest.mark.parametrize(
    "sampling", [{"temperature": 0.0}, {"temperature": 0.7, "seed": 5}], ids=["greedy", "seeded"]
)
def test_eos_and_min_tokens_end_a_request_at_the_same_token_in_both_engines(
    eos_checkpoint, sampling
):
    pair, first, _ = eos_checkpoint
    eos = pair[HFEngine].eos_token_ids
    for min_tokens in (0, 4):
        paged, generic = both(pair, PROMPT, max_tokens=16, min_tokens=min_tokens, **sampling)
        assert paged == generic
        tokens, reason, _ = paged
        assert not eos & set(tokens[:min_tokens])  # EOS is banned before min_tokens
        assert (reason == "stop") == bool(eos & set(tokens))
        if reason == "stop":
            assert tokens[-1] in eos and not eos & set(tokens[:-1])
        if not sampling["temperature"] and not min_tokens:  # the checkpoint's own EOS id
            assert tokens == first and reason == "stop"
    ignored = both(pair, PROMPT, max_tokens=16, ignore_eos=True, **sampling)
    assert ignored[0] == ignored[1] and ignored[0][1] == "length"


def test_changed_eos_ids_change_the_ban_in_both_engines(engines):
    """Benchmarks and tests set eos_token_ids; the min_tokens ban must follow in both."""
    first = generate(engines[0][PagedEngine], PROMPT, max_tokens=1, temperature=0.0)[0][0]
    results = []
    for engine in engines[0].values():
        saved, engine.eos_token_ids = engine.eos_token_ids, frozenset({first})
        try:
            results.append(generate(engine, PROMPT, max_tokens=6, min_tokens=2, temperature=0.0))
        finally:
            engine.eos_token_ids = saved
    assert results[0] == results[1]
    assert results[0][0][0] != first  # banned at the first draw


# ---- kept caches ---------------------------------------------------------------------------


def test_a_conversation_gets_the_same_cached_tokens_from_both_engines(engines):
    def conversation(engine) -> list[int]:
        user = f"parity-{type(engine).__name__}"

        def turn(prompt, user=user, n=4) -> tuple[list[int], int]:
            tokens, _, cached = generate(
                engine, prompt, user, max_tokens=n, temperature=0.0, ignore_eos=True
            )
            return tokens, cached

        out, first = turn(PROMPT, n=8)
        cached = [first, turn(PROMPT + out + [7, 8, 9])[1]]  # a follow-up turn
        cached += [turn([*PROMPT[:10], 300, 301])[1] for _ in range(2)]  # an edited history
        cached.append(turn(PROMPT, None)[1])  # anonymous
        return cached

    paged, generic = (conversation(engines[0][cls]) for cls in (PagedEngine, HFEngine))
    assert paged == generic == [0, len(PROMPT) + 8 - 1, 10, 11, 0]


def test_a_users_concurrent_second_request_reuses_nothing_in_both_engines(engines):
    async def overlapping(engine) -> tuple[int, int]:
        user = f"busy-{type(engine).__name__}"
        await drain(engine, user, PROMPT)  # the user's kept cache now covers PROMPT
        first = engine.generate(
            GenerationRequest(
                "a", user, PROMPT, SamplingParams(400, temperature=0.0, ignore_eos=True)
            )
        )  # long enough to be running still
        head = await anext(first)  # the first request runs, holding the user's cache
        second = await drain(engine, user, PROMPT)
        await first.aclose()
        return head.cached_tokens, second

    async def drain(engine, user, prompt) -> int:
        req = GenerationRequest("b", user, prompt, SamplingParams(4, temperature=0.0))
        return [o async for o in engine.generate(req)][-1].cached_tokens

    for engine in engines[0].values():
        assert asyncio.run(overlapping(engine)) == (len(PROMPT) - 1, 0)


def test_a_kept_cache_supplies_the_same_prefix_to_either_store():
    rng = random.Random(4)
    for case in range(200):
        seen = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        kv_len = rng.randrange(len(seen) + 1)
        prompt = seen[: rng.randrange(len(seen) + 1)] + [
            rng.randrange(4) for _ in range(rng.randrange(3))
        ]
        if not prompt:
            continue
        expected = reusable_tokens(seen, kv_len, prompt)
        store = UserCacheStore(2**30, 1)
        entry = store.acquire("u")
        store.record(entry, seen, object() if kv_len else None, kv_len)
        cache = CacheManager(64, 4)
        cache.checkout("u", seen)
        cache.checkin("u", seen, kv_len, cache.allocate(cache.pages_for(kv_len)))
        assert store.reusable(entry, prompt) == expected, case
        assert cache.checkout("u", prompt).tokens == expected, case


# ---- KV budget and memory ------------------------------------------------------------------


def test_both_engines_size_the_same_kv_budget_from_the_same_memory(engines):
    paged, generic = engines[0][PagedEngine], engines[0][HFEngine]
    assert paged.weights_bytes == generic.weights_bytes
    expected = int(0.05 * (BUDGET - generic.weights_bytes))
    assert paged.layout.kv_budget_bytes == generic.store.budget_bytes == expected
    assert paged.stats().kv_bytes_per_token == generic.stats().kv_bytes_per_token


def test_both_engines_allow_the_same_context(engines):
    paged, generic = engines[0][PagedEngine], engines[0][HFEngine]
    assert paged.max_model_len == generic.max_model_len == paged.spec.max_position


def test_idle_engines_report_the_same_free_unified_memory_but_the_scratch_page(engines):
    pair = engines[1]
    free = {}
    for cls, (engine, memory) in pair.items():
        figures = replica_memory(memory.reading(), engine.stats())
        free[cls] = figures.snapshot.free_unified_memory_bytes
    generic_engine = pair[HFEngine][0]
    held = generic_engine.store.total_bytes  # users kept by the tests before this one
    assert free[HFEngine] == BUDGET - generic_engine.weights_bytes - held
    paged = pair[PagedEngine][0]
    kept = paged.stats().kv_cache_bytes
    assert free[PagedEngine] == BUDGET - paged.weights_bytes - paged.page_bytes - kept
