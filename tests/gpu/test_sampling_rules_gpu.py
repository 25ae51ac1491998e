"""Logit rules, logprobs and JSON masks on a GPU: what the CPU computes, and never a host wait
(the paged engine's step runs under torch.cuda.set_sync_debug_mode("error"))."""

import random

import pytest
import torch

from tests.gpu.conftest import run_isolated
from tests.gpu.test_serving_path_gpu import PRELUDE

pytestmark = pytest.mark.gpu


def test_rules_and_logprobs_on_cuda_match_the_cpu_without_host_waits():
    from deployments.engine import SamplingParams
    from deployments.engine.paged.logits_rules import (
        TokenCounts,
        apply_rules,
        build_rules,
        raw_logprobs,
    )

    rng, rows, vocab = random.Random(1), 64, 128_256
    params = [
        SamplingParams(
            8,
            presence_penalty=rng.uniform(-2, 2),
            frequency_penalty=rng.uniform(-2, 2),
            repetition_penalty=rng.uniform(0.5, 2),
            logit_bias=tuple((rng.randrange(vocab), rng.uniform(-100, 100)) for _ in range(8)),
        )
        for _ in range(rows)
    ]
    masks = [
        (
            r,
            torch.randint(-(2**31), 2**31 - 1, (vocab // 32,), dtype=torch.int64)
            .to(torch.int32)
            .numpy(),
        )
        for r in range(0, rows, 3)
    ]
    results = {}
    for device in ("cpu", "cuda"):
        gen = torch.Generator().manual_seed(2)
        logits = (torch.randn(rows, vocab, generator=gen) * 3).to(device)
        drawn = torch.randint(0, vocab, (5, rows), generator=gen).to(device)
        counts = TokenCounts(vocab, torch.device(device))
        slots = [counts.assign() for _ in range(rows)]
        picks = random.Random(3)  # the same earlier tokens on both devices
        fresh = [(s, [picks.randrange(vocab) for _ in range(20)]) for s in slots]
        host = build_rules(params, slots, fresh, vocab, masks)
        torch.cuda.synchronize()
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            rules = host.to_device(device)
            counts.reset(rules)
            for tokens in drawn:
                counts.add(rules.slots, tokens)
            x = apply_rules(logits, rules, counts)
            lp = raw_logprobs(logits, drawn[0], 20)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results[device] = (x.cpu(), [t.cpu() for t in lp])
    torch.testing.assert_close(results["cuda"][0], results["cpu"][0], rtol=1e-5, atol=1e-4)
    for got, want in zip(results["cuda"][1], results["cpu"][1], strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=1e-5, atol=1e-4)


def test_engine_steps_with_logprobs_penalties_bias_and_grammar_never_synchronize():
    result = run_isolated(
        PRELUDE
        + """
    from deployments.engine.interface import RequestProgress
    async def run_lp(req):
        progress = RequestProgress()
        ids = [t async for batch in engine.stream_tokens(req, progress) for t in batch]
        return ids, progress.logprobs
    async def many_lp(reqs):
        return await asyncio.gather(*[run_lp(r) for r in reqs])
    schema = json.dumps({"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"],
        "additionalProperties": False}}})
    def params(i):
        return SamplingParams(24, temperature=1.0, top_p=0.9, seed=i, logprobs=i % 6,
                              presence_penalty=0.5, frequency_penalty=0.5,
                              repetition_penalty=1.2, logit_bias=((i, 5.0),),
                              response_format=schema if i % 4 == 0 else None)
    asyncio.run(many_lp([GenerationRequest("warm", None, prompt(64), params(1)),
                         GenerationRequest("warm-g", None, prompt(64), params(0))]))
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call now raises
    outs = asyncio.run(many_lp([GenerationRequest(f"s{i}", None, prompt(rng.randint(16, 600)),
                                                  params(i)) for i in range(32)]))
    torch.cuda.set_sync_debug_mode("default")
    print("RESULT " + json.dumps({"lengths": [len(ids) for ids, _ in outs],
                                  "logprobs": [len(lp) for _, lp in outs],
                                  "json": [engine.tokenizer.decode(ids) for ids, _ in outs[::4]]}))
    """
    )
    assert result["logprobs"] == result["lengths"]
    assert all(n == 24 for i, n in enumerate(result["lengths"]) if i % 4)  # no EOS ids here
    # The engine's EOS ids are cleared here, so after the object only the tokenizer's EOS
    # may follow, up to max_tokens.
    assert all(text.startswith(('{"a":true}', '{"a":false}')) for text in result["json"])
