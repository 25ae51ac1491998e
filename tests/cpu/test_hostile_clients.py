"""One client can never hurt another (issue 11): each hostile request fails itself only.

Every test here reproduces one way a single client once hurt others (a poison row failing its
whole engine step, a stalled body holding an ingress slot, an undecodable or huge prompt, ...)
and checks that now only that client's request fails, while the others get exactly what they
get alone.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from deployments.config import AppArgs
from deployments.engine import GenerationRequest, SamplingParams, select_engine_class
from deployments.engine.paged.engine import PagedEngine
from deployments.memory import setup_memory
from deployments.model_files import resolve_model_dir
from deployments.platform import detect_platform
from deployments.tokenizer import TextTokenizer

TOKENIZER = TextTokenizer.load(resolve_model_dir("builtin:tiny-llama", weights=False))
PROMPTS = [TOKENIZER.encode_text(text) for text in (
    "Unified memory lets the GPU and the CPU share one address space.",
    "A replica keeps each user's cache where it was made.",
    "The router sends a returning user home.",
)]


# ---- item 1: a poison row fails its own request only --------------------------------------

@pytest.fixture(scope="module")
def engine():
    args = AppArgs.model_validate({
        "model": {"model_id": "builtin:tiny-llama", "max_model_len": 512},
        "memory": {"cpu_memory_budget_bytes": "64MiB"},
        "kv_cache": {"budget_bytes": "8MiB"},
        "engine": {"cpu_threads": 1},
    })
    cls = select_engine_class(args)
    assert cls is PagedEngine
    eng = cls(args, setup_memory(args.memory, detect_platform(use_gpu=False)))
    yield eng
    asyncio.run(eng.shutdown())


async def run(engine: PagedEngine, ids: list[int], sampling: SamplingParams,
              started: asyncio.Event | None = None) -> list[int] | BaseException:
    """A request's tokens, or the error its stream ended with."""
    tokens: list[int] = []
    try:
        async for out in engine.generate(GenerationRequest("r", None, ids, sampling)):
            tokens += out.token_ids
            if started is not None and len(tokens) >= 3:
                started.set()
    except Exception as exc:
        return exc
    return tokens


def greedy(n: int = 32) -> SamplingParams:
    return SamplingParams(n, temperature=0.0, ignore_eos=True)


def alone(engine: PagedEngine) -> list[list[int]]:
    async def each():
        return [await run(engine, ids, greedy()) for ids in PROMPTS]
    return asyncio.run(each())


def test_an_out_of_range_sampling_value_joins_a_batch_without_failing_it(engine):
    """top_k = 2**70 once raised OverflowError while the step's plan was built: every row of
    that step failed. Now it is clipped like any other value, and greedy rows are unchanged."""
    reference = alone(engine)

    async def main():
        odd = SamplingParams(32, temperature=1.0, top_k=2**70, seed=3, ignore_eos=True)
        return await asyncio.gather(*(run(engine, ids, greedy()) for ids in PROMPTS),
                                    run(engine, PROMPTS[0], odd))

    *normal, odd = asyncio.run(main())
    assert normal == reference
    assert isinstance(odd, list) and len(odd) == 32
    engine.check_integrity()


def test_a_row_whose_step_fails_fails_alone_and_the_batch_keeps_its_tokens(engine):
    """A poison row (here: a forward pass that raises whenever the step holds the poison
    request's marker token, as a kernel might on one row's input) joins a running batch. Only
    that request ends in error; the others' streams carry on with exactly the tokens they get
    alone, and no KV page leaks."""
    reference = alone(engine)
    marker = TOKENIZER.vocab_size - 1
    assert all(marker not in ids + out for ids, out in zip(PROMPTS, reference, strict=True))
    model = engine.runner.model
    forward = model.forward

    def poisoned(tokens: torch.Tensor, *args, **kwargs):
        if bool((tokens == marker).any()):
            raise RuntimeError("poison row")
        return forward(tokens, *args, **kwargs)

    async def main():
        started = [asyncio.Event() for _ in PROMPTS]
        normal = [asyncio.create_task(run(engine, ids, greedy(), ev))
                  for ids, ev in zip(PROMPTS, started, strict=True)]
        for ev in started:  # every normal request is decoding: the poison joins their batch
            await ev.wait()
        poison = await run(engine, [*PROMPTS[1][:4], marker, *PROMPTS[1][4:]], greedy())
        return await asyncio.gather(*normal), poison

    model.forward = poisoned
    try:
        normal, poison = asyncio.run(main())
    finally:
        del model.forward
    assert isinstance(poison, RuntimeError) and "poison row" in str(poison)
    assert normal == reference
    engine.check_integrity()
    assert engine.cache.free_pages == engine.cache.usable_pages  # nothing kept, nothing leaked


# ---- items 3 and 4: undecodable text is a 400; text too long is refused untokenized ---------

def _ingress():
    from tests.cpu.test_ingress_failures import FakeHandle, events, ingress

    handle = FakeHandle(events())
    return handle, ingress(handle, request_timeout_s=5)


@pytest.mark.parametrize("field", ["content", "parts", "stop", "prompt"])
def test_a_lone_surrogate_anywhere_in_the_text_is_a_400_not_a_503(field):
    """JSON's "\\ud800" decodes to a lone surrogate, which the tokenizer cannot take: it once
    raised past the replica's error handling (503 replica_unavailable)."""
    import json

    bad = json.loads('"a\\ud800b"')
    chat = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
    if field == "content":
        chat["messages"][0]["content"] = bad
    elif field == "parts":
        chat["messages"][0]["content"] = [{"type": "text", "text": "x"},
                                          {"type": "text", "text": bad}]
    elif field == "stop":
        chat["stop"] = ["ok", bad]
    handle, obj = _ingress()
    from deployments.ingress import APIError

    with pytest.raises(APIError) as err:
        if field == "prompt":
            asyncio.run(obj.completion({"model": "tiny-llama", "prompt": bad}))
        else:
            asyncio.run(obj.chat(chat))
    assert err.value.status == 400 and "surrogate" in err.value.body["error"]["message"]
    assert handle.calls == []
    ok = {"model": "tiny-llama", "messages": [{"role": "user", "content": "héllo 😀 한"}]}
    assert asyncio.run(obj.chat(ok))["usage"]["completion_tokens"] == 3  # real Unicode is fine


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing():
    """A 3.9 MiB prompt once cost seconds of tokenizing before being refused as too long for
    the 512-token context; its bytes alone prove it cannot fit (at most 17 bytes a token for
    this tokenizer), so it is refused at once."""
    import time

    from deployments.ingress import APIError

    handle, obj = _ingress()
    huge = [{"role": "user", "content": "ab " * 1_300_000}]
    for body in ({"model": "tiny-llama", "prompt": "hello world, " * 300_000},
                 {"model": "tiny-llama", "messages": huge}):
        started = time.perf_counter()
        with pytest.raises(APIError) as err:
            asyncio.run(obj.completion(body) if "prompt" in body else obj.chat(body))
        assert time.perf_counter() - started < 1.0  # tokenizing it takes ~4 s here
        assert err.value.status == 400
        assert err.value.body["error"]["code"] == "context_length_exceeded"
    assert handle.calls == [] and obj._prompts.bytes_per_token == 17
    # Just under the bound it is tokenized as usual, and the exact count decides.
    with pytest.raises(APIError) as err:
        asyncio.run(obj.completion({"model": "tiny-llama", "prompt": "x" * (511 * 17)}))
    assert "tokens but this model's context is 512" in err.value.body["error"]["message"]
