"""Llama 4's chunked-attention layers keep only their current chunk's pages, in the engine.

The tiny Llama 4 of test_paged_llama4.py (three chunked layers, one full; chunks of 32
tokens, pages of 16) has pages of one layer in four lanes (chunk_window.py). Logits and greedy
outputs must still equal HF's forward while chunk pages are released under running sequences,
for returning users whose prompts diverge before or inside their current chunk, through the
host tier, and for a user moved to another engine.
"""

from __future__ import annotations

import asyncio
import pickle

import pytest
import torch

from deployments.config import AppArgs
from deployments.engine.paged.engine import PagedEngine
from deployments.memory import setup_memory
from deployments.platform import detect_platform
from tests.cpu.test_paged_engine import generate, hf_greedy, hf_logits, new_seq, step
from tests.cpu.test_paged_llama4 import CHUNK, PAGE, TOL, save_tiny

PAGE_BYTES = 2 * 1 * PAGE * 2 * 16 * 4  # keys and values of one layer, 16 tokens, float32


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("llama4kv"))


def build(path: str, device_pages: int = 400, host_pages: int = 0, **engine) -> PagedEngine:
    args = AppArgs.model_validate(
        {
            "model": {"model_id": path, "dtype": "float32"},
            "memory": {"cpu_memory_budget_bytes": "256MiB"},
            "kv_cache": {
                "budget_bytes": device_pages * PAGE_BYTES,
                "host_tier_bytes": host_pages * PAGE_BYTES,
            },
            "engine": {"page_size": PAGE, "max_batched_tokens": 64, "cpu_threads": 1, **engine},
        }
    )
    return PagedEngine(args, setup_memory(args.memory, detect_platform(use_gpu=False)))


def test_the_pool_holds_one_layer_a_page_in_four_lanes(checkpoint):
    engine = build(checkpoint[0])
    assert engine.pool.buffer.shape[2] == 1 and engine.layout.kv_lanes == 4
    assert engine.page_bytes == PAGE_BYTES
    assert engine.stats().kv_bytes_per_token == 4 * PAGE_BYTES // PAGE  # a token, every layer
    asyncio.run(engine.shutdown())


def test_logits_match_hf_while_pages_behind_the_chunk_are_released(checkpoint):
    path, model = checkpoint
    engine = build(path)
    g = torch.Generator().manual_seed(11)
    convs = [torch.randint(3, 400, (n,), generator=g).tolist() for n in (110, 60)]
    a, b = (new_seq(engine, ids) for ids in convs)
    got = {id(a): [], id(b): []}
    window = engine.cache.window
    plans = [[(a, 12), (b, 40)]] + [[(a, 12), (b, 1)]] * 8 + [[(a, 2)]]
    for plan in plans:  # a's steps straddle 32, 64 and 96; b decodes across 64
        starts = {id(s): s.num_computed for s in (a, b)}
        for seq, logits in zip((s for s, _ in plan), step(engine, plan), strict=True):
            got[id(seq)].append(logits)
        for seq in (a, b):  # every block in lane 0; the step's first chunk on in the others
            blocks = -(-seq.num_computed // PAGE)
            held = blocks + 3 * (blocks - window.start(starts[id(seq)]))
            assert len(seq.pages) == blocks and len(seq.all_pages()) == held
        # what the chunked lanes no longer hold is back on the free list
        in_use = len(a.all_pages()) + len(b.all_pages())
        assert engine.cache.free_pages == engine.cache.usable_pages - in_use
    assert a.chunk_base == 96 // PAGE  # chunks 0-2 released
    for seq, n in ((a, 110), (b, 48)):
        reference = hf_logits(model, seq.token_ids[:n])
        torch.testing.assert_close(torch.cat(got[id(seq)]), reference, **TOL)
    engine.cache.free([p for s in (a, b) for p in s.all_pages()])
    engine.cache.check_integrity()
    asyncio.run(engine.shutdown())


def test_a_returning_user_reuses_its_chunk_or_up_to_a_boundary(checkpoint):
    path, model = checkpoint
    engine = build(path)
    g = torch.Generator().manual_seed(12)
    prompt = torch.randint(3, 400, (70,), generator=g).tolist()

    async def main():
        first, _ = await generate(engine, "u", prompt, max_tokens=6)
        history = prompt + first  # KV kept for 75 tokens: chunked lanes from 64 on
        diverging = [*history[:50], 9, 8, 7, 6, 5]  # diverges in chunk 1: reuse up to 32
        second, out2 = await generate(engine, "u", diverging, max_tokens=5)
        cont = diverging + second + [4, 3, 2] * 10  # continues its kept history (60 tokens)
        third, out3 = await generate(engine, "u", cont, max_tokens=5)
        return (first, prompt), (second, diverging, out2), (third, cont, out3)

    (first, p1), (second, p2, out2), (third, p3, out3) = asyncio.run(main())
    assert first == hf_greedy(model, p1, len(first))
    assert out2.cached_tokens == CHUNK and second == hf_greedy(model, p2, len(second))
    assert out3.cached_tokens == len(p2) + len(second) - 1
    assert third == hf_greedy(model, p3, len(third))
    engine.check_integrity()
    asyncio.run(engine.shutdown())


def test_host_tier_moves_keep_llama4_outputs(checkpoint):
    path, model = checkpoint
    engine = build(path, device_pages=24, host_pages=120)
    g = torch.Generator().manual_seed(13)
    prompts = [torch.randint(3, 400, (60,), generator=g).tolist() for _ in range(4)]

    async def main():
        firsts = [await generate(engine, f"h{i}", p, max_tokens=6) for i, p in enumerate(prompts)]
        follows = [p + t + [11, 12] for p, (t, _) in zip(prompts, firsts, strict=True)]
        seconds = [await generate(engine, f"h{i}", p, max_tokens=6) for i, p in enumerate(follows)]
        return firsts, follows, seconds

    firsts, follows, seconds = asyncio.run(main())
    assert engine.cache.offloaded_users > 0 and engine.cache.restored_users > 0
    for prompt, (tokens, _) in zip(prompts, firsts, strict=True):
        assert tokens == hf_greedy(model, prompt, len(tokens))
    for prompt, (tokens, out) in zip(follows, seconds, strict=True):
        assert out.cached_tokens >= 60
        assert tokens == hf_greedy(model, prompt, len(tokens))
    engine.check_integrity()
    asyncio.run(engine.shutdown())


def test_a_llama4_user_moved_to_another_engine_gets_the_same_tokens(checkpoint):
    path, model = checkpoint
    sender, receiver = build(path), build(path)
    prompt = torch.randint(3, 400, (75,), generator=torch.Generator().manual_seed(14)).tolist()
    first, _ = asyncio.run(generate(sender, "m", prompt, max_tokens=6))
    export = sender.export_user("m")
    assert export is not None
    assert export.nbytes == sender.cache.kept_pages(80) * PAGE_BYTES  # 5 + 3 chunked pages
    assert receiver.import_user(pickle.loads(pickle.dumps(export))) is not None
    assert sender.forget_user("m", export.generation)
    follow = prompt + first + [21, 22]
    tokens, out = asyncio.run(generate(receiver, "m", follow, max_tokens=6))
    assert out.cached_tokens == len(prompt) + len(first) - 1
    assert tokens == hf_greedy(model, follow, len(tokens))
    for engine in (sender, receiver):
        engine.check_integrity()
        asyncio.run(engine.shutdown())
