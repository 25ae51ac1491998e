"""The host KV tier on a GPU: asynchronous page copies through pinned memory, round trip."""

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu


def test_pages_round_trip_through_pinned_host_memory_asynchronously():
    import torch

    from deployments.engine.paged.cache_manager import Move
    from deployments.engine.paged.host_pool import HostKVPool
    from deployments.engine.paged.kv_pool import KVPool
    from deployments.engine.paged.spec import ModelSpec

    spec = ModelSpec("llama", 1000, 512, 1024, 4, 8, 2, 64, 1e-5, 4096, False, False, False,
                     False, None)
    pool = KVPool(spec, 64, 16, torch.bfloat16, "cuda")
    pool.buffer.normal_()
    original = pool.buffer.clone()
    host = HostKVPool(pool, 32)
    assert host.buffer.is_pinned()

    from deployments.engine.paged.tier_mover import CopyMover

    mover = CopyMover(pool, host)
    down = Move("u", [3, 4, 5, 9, 10], [0, 1, 2, 3, 4], down=True)
    mover.launch(down)
    mover.wait(down)
    assert mover.done(down)
    pool.buffer[[3, 4, 5, 9, 10]] = 0  # the device pages are reused meanwhile
    up = Move("u", [0, 1, 2, 3, 4], [20, 21, 22, 40, 41], down=False)
    mover.launch(up)
    mover.wait(up)
    assert torch.equal(pool.buffer[[20, 21, 22, 40, 41]], original[[3, 4, 5, 9, 10]])


def test_generation_with_the_host_tier_equals_generation_without_on_gpu():
    result = run_isolated('''
        import asyncio, json, random
        from deployments.config import AppArgs
        from deployments.engine import GenerationRequest, SamplingParams
        from deployments.engine.paged.engine import PagedEngine
        from deployments.memory import setup_memory
        from deployments.platform import detect_platform
        page = 16 * 2048  # tiny-llama, float32: 16-token pages
        platform = detect_platform()
        def make(device_pages, host_pages):
            args = AppArgs.model_validate({"model": {"dtype": "float32"},
                "memory": {"mode": "managed", "pool_size_bytes": "2GiB"},
                "replica": {"num_gpus": 1},
                "kv_cache": {"budget_bytes": device_pages * page,
                             "host_tier_bytes": host_pages * page}})
            return PagedEngine(args, memory)
        memory = setup_memory(AppArgs.model_validate({"memory": {"mode": "managed",
            "pool_size_bytes": "2GiB"}, "replica": {"num_gpus": 1}}).memory, platform,
            torch_allocator="native")
        tiered, flat = make(40, 400), make(600, 0)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 380) for _ in range(rng.randrange(60, 120))]
                   for _ in range(16)]
        async def turn(eng, user, prompt):
            req = GenerationRequest("r", user, prompt, SamplingParams(6, temperature=0.0))
            out, last = [], None
            async for o in eng.generate(req):
                out += o.token_ids; last = o
            return out, last.cached_tokens
        same, cached = True, []
        for i, p in enumerate(prompts):
            a = asyncio.run(turn(tiered, f"u{i}", p)); b = asyncio.run(turn(flat, f"u{i}", p))
            same &= a[0] == b[0]
        follow = prompts[0] + [5, 6, 7]
        a = asyncio.run(turn(tiered, "u0", follow)); b = asyncio.run(turn(flat, "u0", follow))
        tiered.check_integrity()
        print("RESULT " + json.dumps({"same": same and a[0] == b[0], "cached": [a[1], b[1]],
            "offloaded": tiered.cache.offloaded_users, "restored": tiered.cache.restored_users,
            "evicted": tiered.cache.evicted_users}))
    ''')
    assert result["same"] and result["offloaded"] > 0 and result["restored"] >= 1
    assert result["cached"][0] == result["cached"][1] > 0 and result["evicted"] == 0
