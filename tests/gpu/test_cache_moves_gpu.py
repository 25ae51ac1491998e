"""A user's cache copied out of one paged engine and into another on a GPU (cache_export.py):
device pages to pinned host memory, the host tier's pages too, into the receiver's free pages;
the moved users' next turns equal an engine's that never moved them."""

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu


def test_moved_users_next_turns_equal_a_never_moved_engines_on_gpu():
    result = run_isolated("""
        import asyncio, json, pickle, random
        from deployments.config import AppArgs
        from deployments.engine import GenerationRequest, SamplingParams
        from deployments.engine.paged.engine import PagedEngine
        from deployments.memory import setup_memory
        from deployments.platform import detect_platform
        page = 16 * 2048  # tiny-llama, float32: 16-token pages
        memory = setup_memory(AppArgs.model_validate({"memory": {"mode": "managed",
            "pool_size_bytes": "2GiB"}, "replica": {"num_gpus": 1}}).memory,
            detect_platform(), torch_allocator="native")
        def make(device_pages, host_pages):
            return PagedEngine(AppArgs.model_validate({"model": {"dtype": "float32"},
                "memory": {"mode": "managed", "pool_size_bytes": "2GiB"},
                "replica": {"num_gpus": 1},
                "kv_cache": {"budget_bytes": device_pages * page,
                             "host_tier_bytes": host_pages * page}}), memory)
        sender, receiver, flat = make(30, 200), make(30, 200), make(600, 0)
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 380) for _ in range(rng.randrange(60, 120))]
                   for _ in range(10)]
        async def turn(eng, user, prompt):
            req = GenerationRequest("r", user, prompt, SamplingParams(6, temperature=0.0))
            out, last = [], None
            async for o in eng.generate(req):
                out += o.token_ids; last = o
            return out, last.cached_tokens
        for i, p in enumerate(prompts):
            asyncio.run(turn(sender, f"u{i}", p)); asyncio.run(turn(flat, f"u{i}", p))
        tiers = {"device": 0, "host": 0}
        for user in sender.movable_users():
            export = pickle.loads(pickle.dumps(sender.export_user(user.key)))
            assert receiver.import_user(export) is not None, user
            assert sender.forget_user(user.key, export.generation)
            tiers["device" if user.on_device else "host"] += 1
        same, cached = True, []
        for i, p in enumerate(prompts):
            follow = p + [5, 6, 7]
            a = asyncio.run(turn(receiver, f"u{i}", follow))
            b = asyncio.run(turn(flat, f"u{i}", follow))
            same &= a == b
            cached.append(a[1])
        sender.check_integrity(); receiver.check_integrity()
        print("RESULT " + json.dumps({"same": same, "cached": cached, "tiers": tiers,
            "left": sender.stats().resident_users}))
    """)
    assert result["same"] and result["left"] == []
    assert result["tiers"]["device"] > 0 and result["tiers"]["host"] > 0
    assert all(c > 0 for c in result["cached"])
