"""Generation on the GPU (RMM managed memory) matches the CPU reference."""

import pytest

from tests.gpu.conftest import run_isolated

pytestmark = pytest.mark.gpu

PROGRAM = """
    import asyncio, json
    import torch
    from deployments.config import AppArgs
    from deployments.platform import detect_platform
    from deployments.memory import setup_memory
    from deployments.engine.hf_engine import HFEngine
    from deployments.engine import GenerationRequest, SamplingParams
    from deployments.model_files import resolve_model_dir
    from deployments.tokenizer import TextTokenizer
    tokenizer = TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False))
    on_gpu = {gpu}
    args = AppArgs.model_validate({{
        "memory": {{"mode": "managed" if on_gpu else "auto"}},
        "replica": {{"num_gpus": 1 if on_gpu else 0}},
        "model": {{"dtype": "float32"}}, "kv_cache": {{"budget_bytes": "256MiB"}}}})
    platform = detect_platform(use_gpu=on_gpu)
    engine = HFEngine(args, setup_memory(args.memory, platform))
    prompts = ["Tell me about unified memory.", "What is a KV cache?", "Hi"]
    async def conversation(user, text):
        msgs, out = [{{"role": "user", "content": text}}], []
        for turn in range(2):
            ids = tokenizer.encode_chat(msgs)
            req = GenerationRequest("r", user, ids, SamplingParams(max_tokens=12, temperature=0))
            tokens, cached = [], 0
            async for o in engine.generate(req):
                tokens += list(o.token_ids); cached = o.cached_tokens
            out.append({{"tokens": tokens, "cached": cached}})
            msgs += [{{"role": "assistant", "content": engine.tokenizer.decode(tokens)}},
                     {{"role": "user", "content": "and more"}}]
        return out
    results = [asyncio.run(conversation(f"u{{i}}", p)) for i, p in enumerate(prompts)]
    ids = tokenizer.encode_chat([{{"role": "user", "content": prompts[0]}}])
    with torch.inference_mode():
        logits = engine.model(input_ids=torch.tensor([ids], device=engine.device)).logits[0, -1]
    print("RESULT " + json.dumps({{"results": results, "logits": logits.float().cpu().tolist()}}))
"""


def test_greedy_generation_and_logits_match_the_cpu():
    gpu = run_isolated(PROGRAM.format(gpu=True))
    cpu = run_isolated(PROGRAM.format(gpu=False))
    assert gpu["results"] == cpu["results"]  # same tokens, same cache hits, every turn
    assert all(turn[1]["cached"] > 0 for turn in gpu["results"])
    diff = max(abs(a - b) for a, b in zip(gpu["logits"], cpu["logits"], strict=False))
    assert diff < 1e-3, diff
