"""The paged engine on a GPU as the service drives it: nothing compiles once it has started,
and steps at the API's default sampling never wait on the host."""

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu

PRELUDE = """
    import asyncio, json, random, tempfile, pathlib
    import torch
    from deployments.config import AppArgs
    from deployments.platform import detect_platform
    from deployments.memory import setup_memory
    from deployments.engine import GenerationRequest, SamplingParams
    from deployments.engine.interface import RequestProgress
    from deployments.engine.builtin_tokenizer import write_tokenizer
    from deployments.engine.paged.engine import PagedEngine
    from deployments.engine.paged.warmup import compiled_variants
    # The Llama 3.1 8B attention shape (32 heads, 8 KV heads, head dim 128) in two layers.
    CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
              "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 32,
              "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 4096,
              "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}
    path = tempfile.mkdtemp()
    pathlib.Path(path, "config.json").write_text(json.dumps(CONFIG))
    write_tokenizer(path)
    args = AppArgs.model_validate({
        "model": {"model_id": path, "dtype": "bfloat16"}, "replica": {"num_gpus": 1},
        "memory": {"mode": "managed", "pool_size_bytes": "8GiB"},
        "kv_cache": {"budget_bytes": "4GiB"},
        "engine": {"random_weights": True, "max_num_seqs": 64, "max_batched_tokens": 4096}})
    memory = setup_memory(args.memory, detect_platform(), torch_allocator="native")
    engine = PagedEngine(args, memory)
    engine.eos_token_ids = frozenset()
    rng = random.Random(0)

    def prompt(n):
        return [rng.randrange(3, 4000) for _ in range(n)]

    async def run(req):
        return [t async for batch in engine.stream_tokens(req, RequestProgress()) for t in batch]

    async def many(reqs):
        return await asyncio.gather(*[run(r) for r in reqs])
"""


def test_no_kernel_compiles_once_the_engine_has_started():
    result = run_isolated(
        PRELUDE
        + """
    started = compiled_variants()
    history = prompt(8192)
    for turn in range(12):  # a returning user: 40-90 new tokens each time
        history += prompt(rng.randint(40, 90))
        out = asyncio.run(run(GenerationRequest(f"u{turn}", "user", history,
                                                SamplingParams(4, temperature=0))))
        history += out
    for batch in (1, 3, 17, 40, 64):  # fresh prompts of many lengths, decoding together
        asyncio.run(many([GenerationRequest(f"b{batch}-{i}", None, prompt(rng.randint(5, 900)),
                                            SamplingParams(rng.randint(2, 40), temperature=0))
                          for i in range(batch)]))
    print("RESULT " + json.dumps({"started": started, "after": compiled_variants()}))
    """
    )
    assert result["started"] > 0  # the counter sees Triton's caches
    assert result["after"] == result["started"]


def test_sampled_steps_never_synchronize_the_host():
    result = run_isolated(
        PRELUDE
        + """
    asyncio.run(many([GenerationRequest("warm", None, prompt(64),
                                        SamplingParams(8, temperature=1.0, top_p=0.9))]))
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    outs = asyncio.run(many([GenerationRequest(f"s{i}", None, prompt(rng.randint(16, 600)),
                                               SamplingParams(48, temperature=1.0, top_p=0.9,
                                                              seed=i if i % 2 else None))
                             for i in range(48)]))
    torch.cuda.set_sync_debug_mode("default")
    print("RESULT " + json.dumps({"lengths": [len(o) for o in outs]}))
    """
    )
    assert result["lengths"] == [48] * 48
