"""The host KV tier on a GPU: asynchronous page copies through pinned memory, round trip."""

import textwrap

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu

# An 8-layer Llama checkpoint saved to a temporary folder, and a small managed pool planned
# for this discrete card (never beyond its free memory): the start of an isolated run.
EIGHT_LAYERS = """
import json, tempfile
import torch, transformers
from deployments.config import AppArgs
from deployments.engine import SamplingParams
from deployments.engine.builtin_tokenizer import write_tokenizer
from deployments.engine.paged.engine import PagedEngine
from deployments.engine.paged.sequence import Sequence
from deployments.engine.paged.testing import logits_for, step_log
from deployments.memory import setup_memory
from deployments.platform import detect_platform
config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1024,
    num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
    max_position_embeddings=2048, vocab_size=448, tie_word_embeddings=False)
path = tempfile.mkdtemp()
transformers.LlamaForCausalLM(config).save_pretrained(path)
write_tokenizer(path)
memory = setup_memory(AppArgs.model_validate({"memory": {"mode": "managed",
    "pool_size_bytes": "2GiB"}, "replica": {"num_gpus": 1}}).memory,
    detect_platform(), torch_allocator="native")
"""


def test_pages_round_trip_through_pinned_host_memory_asynchronously():
    import torch

    from deployments.engine.paged.cache_manager import Move
    from deployments.engine.paged.host_pool import HostKVPool
    from deployments.engine.paged.kv_pool import KVPool
    from deployments.model_spec import ModelSpec

    spec = ModelSpec(
        "llama", 1000, 512, 1024, 4, 8, 2, 64, 1e-5, 4096, False, False, False, False, None
    )
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
    result = run_isolated("""
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
    """)
    assert result["same"] and result["offloaded"] > 0 and result["restored"] >= 1
    assert result["cached"][0] == result["cached"][1] > 0 and result["evicted"] == 0


def test_streamed_weights_compute_exactly_what_resident_weights_do_on_gpu():
    result = run_isolated(
        EIGHT_LAYERS
        + textwrap.dedent("""
        def make(budget):
            return PagedEngine(AppArgs.model_validate({
                "model": {"model_id": path, "dtype": "bfloat16",
                          "device_weight_budget_bytes": budget},
                "memory": {"mode": "managed"}, "replica": {"num_gpus": 1},
                "kv_cache": {"budget_bytes": "64MiB"}}), memory)
        from deployments.model_spec import ModelSpec
        from deployments.engine.paged.weights import layer_numel
        layer = layer_numel(ModelSpec.from_hf_config(transformers.AutoConfig.from_pretrained(
            path))) * 2
        streamed = make(448 * 512 * 2 * 2 + 512 * 2 + 4 * layer)  # 1 resident, 7 streamed
        whole = make(None)
        prompts = [list(range(3, 3 + n)) for n in (100, 37, 300)]
        out = []
        for eng in (streamed, whole):
            seqs = [Sequence("t", None, p, SamplingParams(1))
                    for p in prompts]
            out.append(logits_for(eng, [(s, len(s.token_ids)) for s in seqs]))
        same = all(torch.equal(a, b) for a, b in zip(*out))
        on_host = streamed.runner.model.w.blocks[-1].is_pinned()
        print("RESULT " + json.dumps({"same": same, "streamed": len(
            streamed.runner.model.streamer.streamed), "pinned": on_host}))
    """)
    )
    assert result["same"] and result["streamed"] == 7 and result["pinned"]


def test_grace_advice_places_cold_layers_and_the_host_tier_in_host_memory():
    """The Grace path with the platform faked on a discrete GPU (concurrent managed access):
    the driver reports the advice took effect, and the engine computes what it does without."""
    result = run_isolated(
        EIGHT_LAYERS
        + textwrap.dedent("""
        import asyncio, dataclasses
        from deployments.engine import GenerationRequest
        from deployments.memory_advice import CU_DEVICE_CPU, DriverAdvisor
        advisor = DriverAdvisor()
        page = 16 * 2 * 8 * 2 * 64 * 2  # 16 tokens, k+v, 8 layers, 2 heads of 64, bf16
        def make(budget, host_pages, grace):
            memory.platform = dataclasses.replace(memory.platform,
                                                  kind="grace" if grace else "discrete")
            return PagedEngine(AppArgs.model_validate({
                "model": {"model_id": path, "dtype": "bfloat16",
                          "device_weight_budget_bytes": budget},
                "memory": {"mode": "managed"}, "replica": {"num_gpus": 1},
                "kv_cache": {"budget_bytes": 40 * page, "host_tier_bytes": host_pages * page}}),
                memory)
        from deployments.model_spec import ModelSpec
        from deployments.engine.paged.weights import layer_numel
        layer = layer_numel(ModelSpec.from_hf_config(config)) * 2
        grace = make(448 * 512 * 2 * 2 + 512 * 2 + 3 * layer, 400, True)  # 3 resident
        plain = make(None, 0, False)
        grace.advice.check("after the plain engine was built")  # its allocations came later
        blocks = grace.runner.model.w.blocks
        torch.cuda.synchronize()
        def inner(t):  # a page at a range's edge may be shared with a neighbour's advice
            flat = t.view(-1)
            return flat[flat.numel() // 4: 3 * flat.numel() // 4]
        where = [advisor.preferred_location(inner(b)) for b in blocks]
        prefetched = [advisor.last_prefetch_location(inner(b)) for b in blocks]
        host_pool = advisor.preferred_location(inner(grace.mover.host.buffer))
        device_pool = advisor.preferred_location(inner(grace.pool.buffer))
        def chunks(t, n=8):  # (preferred, last prefetch) of n equal parts: a diagnostic
            flat = t.view(-1)
            step = flat.numel() // n
            return [(advisor.preferred_location(flat[i * step:(i + 1) * step]),
                     advisor.last_prefetch_location(flat[i * step:(i + 1) * step]))
                    for i in range(n)]
        base = min(b.data_ptr() for b in blocks)
        layout = {"blocks": [(b.data_ptr() - base, b.numel() * 2, chunks(b)) for b in blocks],
                  "pool": (grace.pool.buffer.data_ptr() - base, grace.pool.nbytes),
                  "host": (grace.mover.host.buffer.data_ptr() - base, grace.mover.host.nbytes)}
        prompts = [list(range(3, 3 + n)) for n in (100, 37, 300)]
        out = []
        for eng in (grace, plain):
            seqs = [Sequence("t", None, p, SamplingParams(1))
                    for p in prompts]
            out.append(logits_for(eng, [(s, len(s.token_ids)) for s in seqs]))
            eng.cache.free([p for s in seqs for p in s.pages])
        same_logits = all(torch.equal(a, b) for a, b in zip(*out))
        async def turn(eng, user, prompt):
            req = GenerationRequest("r", user, prompt, SamplingParams(6, temperature=0.0))
            return [t async for o in eng.generate(req) for t in o.token_ids]
        same = True
        for i in range(12):  # more users than the device pool holds: the tier is used
            p = [(7 * i + j) % 440 + 3 for j in range(90)]
            same &= asyncio.run(turn(grace, f"u{i}", p)) == asyncio.run(turn(plain, f"u{i}", p))
        follow = [(7 * 0 + j) % 440 + 3 for j in range(90)] + [5, 6]
        same &= asyncio.run(turn(grace, "u0", follow)) == asyncio.run(turn(plain, "u0", follow))
        grace.check_integrity()
        wrong = grace.advice.check("after generation")
        print("RESULT " + json.dumps({"advice": grace.advice.report(), "wrong": wrong,
            "mismatches": grace._placer.advisor.mismatches, "where": where,
            "prefetched": prefetched,
            "host_pool": host_pool, "device_pool": device_pool, "cpu": CU_DEVICE_CPU,
            "streamer": grace.runner.model.streamer is not None, "same_logits": same_logits,
            "same": same, "offloaded": grace.cache.offloaded_users,
            "restored": grace.cache.restored_users, "layout": layout}))
    """)
    )
    print("advice layout:", result["layout"])  # shown with -s: where each range's parts live
    advice = result["advice"]
    print("advice first lost:", advice["first_loss"])
    cpu = result["cpu"]
    assert not advice["first_loss"] and not result["mismatches"], (
        "advised ranges lost their advice; first phase each read wrong: "
        f"{advice['first_loss']}; every phase: {advice['history']}; ranges: {advice['ranges']}"
    )
    assert result["where"] == [0, 0, 0] + [cpu] * 5, result
    assert result["prefetched"] == result["where"]
    assert result["host_pool"] == cpu and result["device_pool"] == 0
    assert not result["streamer"] and result["same_logits"] and result["same"]
    assert result["offloaded"] > 0 and result["restored"] >= 1


def test_grace_advice_holds_after_100_decode_steps_and_a_tier_move():
    """The advice read back (every range, whole and in sub-ranges on a mismatch) after 100
    decode steps of a batch, and after users moved down to the host tier and one back up."""
    result = run_isolated(
        EIGHT_LAYERS
        + textwrap.dedent("""
        import asyncio, dataclasses
        from deployments.engine import GenerationRequest
        page = 16 * 2 * 8 * 2 * 64 * 2
        memory.platform = dataclasses.replace(memory.platform, kind="grace")
        from deployments.model_spec import ModelSpec
        from deployments.engine.paged.weights import layer_numel
        layer = layer_numel(ModelSpec.from_hf_config(config)) * 2
        grace = PagedEngine(AppArgs.model_validate({
            "model": {"model_id": path, "dtype": "bfloat16",
                      "device_weight_budget_bytes": 448 * 512 * 2 * 2 + 512 * 2 + 3 * layer},
            "memory": {"mode": "managed"}, "replica": {"num_gpus": 1},
            "kv_cache": {"budget_bytes": 40 * page, "host_tier_bytes": 400 * page}}), memory)
        built = grace.advice.check("built")
        async def turn(user, prompt, n):
            req = GenerationRequest("r", user, prompt, SamplingParams(n, temperature=0.0))
            return [t async for o in grace.generate(req) for t in o.token_ids]
        async def batch():
            return await asyncio.gather(*[turn(f"b{i}", [3 + i] * 20, 100) for i in range(4)])
        steps = len(step_log(grace))
        outs = asyncio.run(batch())
        decode_steps = sum(1 for s in list(step_log(grace))[steps:] if s[2])
        after_decode = grace.advice.check("after 100 decode steps")
        for i in range(12):  # more users than the device pool holds: the tier is used
            asyncio.run(turn(f"u{i}", [(7 * i + j) % 440 + 3 for j in range(90)], 4))
        asyncio.run(turn("u0", [(j % 440) + 3 for j in range(90)] + [5, 6], 4))
        after_move = grace.advice.check("after a tier move")
        print("RESULT " + json.dumps({"built": built, "after_decode": after_decode,
            "after_move": after_move, "decode_steps": decode_steps,
            "tokens": [len(o) for o in outs], "offloaded": grace.cache.offloaded_users,
            "restored": grace.cache.restored_users, "report": grace.advice.report(),
            "mismatches": grace._placer.advisor.mismatches}))
    """)
    )
    print("advice first lost:", result["report"]["first_loss"])
    assert result["tokens"] == [100] * 4 and result["decode_steps"] >= 99, result
    assert result["offloaded"] > 0 and result["restored"] >= 1, result
    assert not result["built"] and not result["mismatches"], result["report"]
    assert not result["after_decode"], (
        f"advice moved during 100 decode steps: {result['after_decode']}"
    )
    assert not result["after_move"], f"advice moved with a tier move: {result['after_move']}"
